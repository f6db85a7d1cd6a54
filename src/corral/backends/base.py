"""The backend interface: the operations the controller needs, nothing more."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from corral.domain.manifests import HTTP_PORT, ClusterOptions, deployment_manifest, service_manifest
from corral.domain.models import Deployment, Pod, Service
from corral.engines import get_engine

EventSink = Callable[[str, dict[str, Any]], None]


class Backend(ABC):
    """Carries out validated changes. Reads are cheap (a database or an informer cache)."""

    cluster_options: ClusterOptions = ClusterOptions()

    def set_mutation_lock(self, lock: asyncio.Lock) -> None:  # noqa: B027 (optional hook)
        """The controller's lock: a backend that changes state on its own (restoring assignments)
        takes it, so that it never acts on a half-applied change of the controller."""

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

    def gpus_in_use(self) -> set[int]:
        """GPU indices held by replicas, draining ones included: their memory is not free until they stop."""
        return {g for pod in self.list_pods() for g in pod.gpu_ids}

    @abstractmethod
    def list_services(self) -> list[Service]: ...

    @abstractmethod
    def get_service(self, name: str) -> Service | None: ...

    # writes
    @abstractmethod
    async def create_deployment(self, deployment: Deployment, service: Service | None) -> list[Pod]:
        """Create the deployment with `deployment.replicas` new replicas (and a standard deployment's service)."""

    @abstractmethod
    async def delete_deployment(self, name: str) -> Awaitable[None]:
        """Take the deployment out of service now; the returned awaitable ends once its replicas are gone."""

    @abstractmethod
    async def add_replicas(self, deployment: str, count: int) -> list[Pod]: ...

    @abstractmethod
    async def remove_replicas(self, deployment: str, pods: list[str]) -> Awaitable[None]:
        """Remove exactly these replicas (the pool-safe path depends on it): out of service at once,
        drained and stopped by the time the returned awaitable ends."""

    @abstractmethod
    async def set_businesses(self, businesses: Mapping[str, str]) -> None:
        """Relabel `business` of the given pods, all or nothing."""

    @abstractmethod
    async def create_service(self, service: Service) -> None: ...

    @abstractmethod
    async def delete_service(self, name: str) -> None: ...

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
        """The replicas per business a pool should keep. A backend whose replicas can be replaced
        behind Corral's back (Kubernetes: node loss, rollouts) assigns replacements to restore them."""

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
