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
    ready = [p for p in pods if p.ready and p.endpoint]
    table: RoutingTable = {}
    for service in services:
        targets = tuple(Target(p.name, p.endpoint) for p in ready if L.matches(service.selector, p.labels))  # type: ignore[arg-type]
        table[service.name] = Route(
            service=service.name,
            model=service.model,
            business=service.business if service.is_business_service else None,
            deployment=service.deployment,
            targets=targets,
        )
    return table
