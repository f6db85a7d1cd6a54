"""The backend interface: the operations the controller needs, nothing more."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from corral.domain.gpu_ledger import GpuClaim, Holder
from corral.domain.history import HistoryDraft, Intent, Outcome
from corral.domain.manifests import HTTP_PORT, ClusterOptions, deployment_manifest, service_manifest
from corral.domain.models import Deployment, Pod, Service
from corral.engines import get_engine
from corral.events import EventType


class Report(Protocol):
    """How a backend reports what it observed (a replica died, the cluster removed an assigned pod,
    traffic followed a relabel): an event for listeners and, where it matters, a history row.
    The controller implements it; backends never write history or publish events themselves."""

    def __call__(self, event: EventType | None, data: dict[str, Any] | None = None, *,
                 history: HistoryDraft | None = None, outcome: Outcome = Outcome.SUCCESS) -> None: ...


IntentWriter = Callable[[Intent], None]
"""Writes a change's history rows, pending, before the change (the controller's `Intents.begin`)."""


class Backend(ABC):
    """Carries out validated changes. Reads are cheap (a database or an informer cache)."""

    cluster_options: ClusterOptions = ClusterOptions()
    # Whether replicas can get a deploy's `secretEnv` (environment variables kept secret); each backend says.
    supports_secret_env: bool
    _intent_writer: IntentWriter | None = None

    def set_report(self, report: Report) -> None:
        """Where observations go from now on: the controller, which records and announces them."""
        self.report = report

    def set_intent_writer(self, write: IntentWriter) -> None:
        """How the backend records a change's intent where its desired state is not in Corral's database (a
        cluster, memory): the controller gives its `Intents.begin`, so that history has one owner. A backend
        that keeps its desired state in the store hands the rows to it instead, in the same transaction."""
        self._intent_writer = write

    def _write_intent(self, intent: Intent | None) -> None:
        """Record the change's intent (its pending rows) now, before the first write of the change."""
        if intent is None:
            return
        if self._intent_writer is None:
            raise RuntimeError(f"{type(self).__name__} cannot record the change's intent: no controller has "
                               "given it an intent writer (Controller(backend, ...) does, with set_intent_writer)")
        self._intent_writer(intent)

    def set_drain(self, drain: Callable[[str, float], Awaitable[None]]) -> None:  # noqa: B027 (optional hook)
        """Give the backend the data plane's drain: a removed replica is stopped only once it is idle.
        A backend whose data plane drains by itself (Kubernetes: endpoints + grace period) ignores it."""

    @abstractmethod
    async def start(self) -> None:
        """Recover: re-adopt what is running, restart what died, finish what was half-done."""

    @abstractmethod
    async def close(self) -> None:
        """Stop supervising. Replicas keep running: they outlive the control plane."""

    # reads
    @abstractmethod
    def list_deployments(self) -> list[Deployment]: ...

    @abstractmethod
    def get_deployment(self, name: str) -> Deployment | None: ...

    @abstractmethod
    def list_pods(self, deployment: str | None = None) -> list[Pod]: ...

    @abstractmethod
    def get_pod(self, name: str) -> Pod | None: ...

    def gpu_claims(self) -> list[GpuClaim]:
        """The GPU units each replica holds, for the GPU ledger (`domain.gpu_ledger`). A backend whose
        removed replicas keep their GPUs until they exit (draining) lists those too."""
        return [GpuClaim(Holder.replica(p.name), tuple(str(g) for g in p.gpu_ids)) for p in self.list_pods() if p.gpu_ids]

    @abstractmethod
    def list_services(self) -> list[Service]: ...

    @abstractmethod
    def get_service(self, name: str) -> Service | None: ...

    # writes: each takes the change's `intent` (its pending history rows) and records it before acting —
    # in the same transaction as the desired state where that lives in Corral's database (local), or
    # with the intent writer just before the first write where the desired state lives elsewhere (a cluster).
    @abstractmethod
    async def create_deployment(self, deployment: Deployment, service: Service | None, intent: Intent | None = None) -> list[Pod]:
        """Create the deployment with `deployment.replicas` new replicas (and a standard deployment's service)."""

    @abstractmethod
    async def delete_deployment(self, name: str, intent: Intent | None = None) -> Awaitable[None]:
        """Take the deployment out of service now; the returned awaitable ends once its replicas are gone."""

    @abstractmethod
    async def add_replicas(self, deployment: str, count: int, intent: Intent | None = None) -> list[Pod]: ...

    @abstractmethod
    async def remove_replicas(self, deployment: str, pods: list[str], intent: Intent | None = None) -> Awaitable[None]:
        """Remove exactly these replicas (the pool-safe path depends on it): out of service at once,
        drained and stopped by the time the returned awaitable ends."""

    @abstractmethod
    async def set_businesses(self, businesses: Mapping[str, str], intent: Intent | None = None) -> None:
        """Relabel `business` of the given pods, all or nothing."""

    @abstractmethod
    async def create_service(self, service: Service, intent: Intent | None = None) -> None: ...

    @abstractmethod
    async def delete_service(self, name: str, unassign: Mapping[str, str] | None = None, intent: Intent | None = None) -> None:
        """Delete a service and unassign the pods it would strand (`unassign`: pod → `unassigned`)."""

    @abstractmethod
    async def pod_logs(self, name: str, tail: int) -> str | None:
        """The last `tail` lines of a replica's output, or None if there is no such replica."""

    @abstractmethod
    def write_manifests(self, name: str, documents: list[dict]) -> str:
        """Keep the generated manifests (spec 01: a `deployments/` directory); return the path."""

    def metrics(self) -> list[str]:
        """Prometheus text lines of the backend's own measurements (none by default)."""
        return []

    async def remember_assignment(self, deployment: str, counts: Mapping[str, int]) -> None:  # noqa: B027 (optional hook)
        """The replicas per business a pool should keep, where replicas can be replaced behind Corral's
        back (Kubernetes: node loss, rollouts start new pods `unassigned`)."""

    def desired_assignment(self, deployment: str) -> Mapping[str, int]:
        """What `remember_assignment` kept; the controller's reconciler assigns replacements to restore it.
        Empty where assignments are never lost (local replicas keep their labels across restarts)."""
        return {}

    def manifests(self, deployment: Deployment, service: Service | None) -> list[dict]:
        """The Kubernetes objects of a deployment (and a standard deployment's service)."""
        engine = get_engine(deployment.engine)
        args = engine.server_args(model_id=deployment.model_id, model_tag=deployment.model_tag, port=HTTP_PORT, host="0.0.0.0",
                                  gpus=deployment.gpus_per_replica, extra=list(deployment.engine_args))
        documents = [deployment_manifest(deployment, args, self.cluster_options, engine.health_path)]
        return documents + ([service_manifest(service, self.cluster_options)] if service else [])


def save_manifests(directory: Path, name: str, documents: list[dict]) -> str:
    """`<directory>/<name>.yaml`, one YAML document per object."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return str(path)
