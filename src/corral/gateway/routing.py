"""The routing table: for each service, the ready replicas its selector matches.

Rebuilt from the backend's state on every change event, before the change's API call returns,
so an assignment takes effect for the next request. A table is immutable; a rebuild swaps it whole,
so a request never sees half of an update.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from corral.domain import labels as L
from corral.domain.models import Pod, Service


@dataclass(frozen=True)
class Target:
    name: str
    endpoint: str


@dataclass(frozen=True)
class Route:
    service: str
    model: str
    business: str | None  # None for a standard deployment's own service
    deployment: str | None
    targets: tuple[Target, ...]

    def no_replica_message(self) -> str:
        if self.business is not None:
            return f"no replica assigned to business '{self.business}' of model '{self.model}'"
        return f"no ready replica of deployment '{self.deployment}'"


RoutingTable = dict[str, Route]


def build_routes(services: Iterable[Service], pods: Iterable[Pod]) -> RoutingTable:
    """Each service's ready replicas. Ready pods are indexed by label pair and each service looks only
    at the pods carrying its rarest selector pair, so 100 services over 1,000 pods cost thousands of
    label checks, not 100,000 (this runs on every change, before its API call returns)."""
    ready = [p for p in pods if p.ready and p.endpoint]
    by_pair: dict[tuple[str, str], list[int]] = {}
    for index, pod in enumerate(ready):
        for pair in pod.labels.items():
            by_pair.setdefault(pair, []).append(index)
    everyone = range(len(ready))
    table: RoutingTable = {}
    for service in services:
        pairs = list(service.selector.items())
        candidates = min((by_pair.get(pair, []) for pair in pairs), key=len) if pairs else everyone
        targets = tuple(Target(ready[i].name, ready[i].endpoint) for i in candidates  # type: ignore[arg-type]
                        if L.matches(service.selector, ready[i].labels))
        table[service.name] = Route(
            service=service.name,
            model=service.model,
            business=service.business if service.is_business_service else None,
            deployment=service.deployment,
            targets=targets,
        )
    return table
