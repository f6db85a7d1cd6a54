"""The nouns of Corral as plain immutable values, shared by every backend and the API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from corral.domain import labels as L
from corral.domain.sleep import SleepLevel, SleepState


class PodPhase(StrEnum):
    """Kubernetes-like phases; `ready` is tracked separately, from the engine's health endpoint."""

    PENDING = "Pending"  # process started, engine not healthy yet
    RUNNING = "Running"
    CRASH_LOOP = "CrashLoopBackOff"  # exited; will be restarted after a back-off
    TERMINATING = "Terminating"


@dataclass(frozen=True)
class Pod:
    name: str
    deployment: str
    labels: Mapping[str, str]
    phase: PodPhase = PodPhase.PENDING
    ready: bool = False
    endpoint: str | None = None
    restarts: int = 0
    created_at: datetime | None = None
    gpu_ids: tuple[int, ...] = ()
    # Sleep mode (domain/sleep.py): only an awake replica is a routing target (gateway/routing.py).
    sleep: SleepState = SleepState.AWAKE
    sleep_level: SleepLevel | None = None  # the level it sleeps (or is to sleep) at; None when wanted awake

    @property
    def model(self) -> str | None:
        return self.labels.get(L.MODEL)

    @property
    def business(self) -> str | None:
        """The business label of a pool pod; None for a standard pod (shown as "N/A")."""
        return self.labels.get(L.BUSINESS) if self.is_pool_pod else None

    @property
    def is_pool_pod(self) -> bool:
        return L.is_pool_pod(self.labels)


@dataclass(frozen=True)
class Deployment:
    name: str
    engine: str
    model_id: str
    model_tag: str
    is_pool: bool
    replicas: int
    gpus_per_replica: int = 0
    engine_args: tuple[str, ...] = ()
    created_at: datetime | None = None
    shared_gpus: bool = False  # its replicas may share a GPU unit with other sharedGpus pools' sleepers (gpu_ledger)

    @property
    def selector(self) -> dict[str, str]:
        """The Deployment's pod selector: never `business`, so relabelling never orphans a pod."""
        if self.is_pool:
            return {L.MODEL: self.model_tag, L.POOL: self.name}
        return {L.APP: self.name}

    def new_pod_labels(self) -> dict[str, str]:
        if self.is_pool:
            return L.pool_labels(model_tag=self.model_tag, pool=self.name, engine=self.engine)
        return L.standard_labels(model_tag=self.model_tag, deployment=self.name)


@dataclass(frozen=True)
class Service:
    """A stable endpoint selecting replicas by labels.

    A business service selects `{model, business}`; a standard deployment's own service selects
    `{app: <deployment>}`.
    """

    name: str
    model: str
    selector: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    is_external: bool = False
    deployment: str | None = None  # the pool it was created for, or the standard deployment it fronts
    created_at: datetime | None = None
    llm_routing: bool = False  # a vllm-router (KV-cache-aware) beside it, discovering the same replicas (Kubernetes)

    @property
    def business(self) -> str | None:
        return self.labels.get(L.BUSINESS)

    @property
    def is_business_service(self) -> bool:
        return self.labels.get(L.SERVICE_TYPE) == L.BUSINESS_SERVICE

    @property
    def display_name(self) -> str:
        return L.display_name_of(self.name)

    def selects(self, pod: Pod) -> bool:
        return L.matches(self.selector, pod.labels)


def selected_pods(services: Sequence[Service], pods: Sequence[Pod]) -> dict[str, list[Pod]]:
    """Service name → the pods its selector matches (in `pods`' order), for many services at once: pods are
    indexed by label pair and each service tests only those carrying its rarest selector pair, so 100 services
    over 1,000 pods cost about a thousand label checks instead of 100,000 (43 ms: every service listing, every
    load snapshot paid it; the routing table is rebuilt with it on every change)."""
    by_pair: dict[tuple[str, str], list[Pod]] = {}
    for pod in pods:
        for pair in pod.labels.items():
            by_pair.setdefault(pair, []).append(pod)
    selected = {}
    for service in services:
        pairs = list(service.selector.items())
        candidates = min((by_pair.get(pair, []) for pair in pairs), key=len) if pairs else pods
        selected[service.name] = [p for p in candidates if service.selects(p)]
    return selected


@dataclass(frozen=True)
class Move:
    """Relabel one pod's business."""

    pod: str
    source: str
    target: str
