"""One control plane (a real Controller, StateStore and EventBus) per backend, for the contract suite.

- `memory`: the in-memory double (`corral.backends.memory`);
- `local`: simulator engine processes, supervised, on this machine;
- `kubernetes`: the Kubernetes backend against the emulated cluster of `tests/k8s` (kmock + mini
  controllers over real HTTP); skipped where kmock is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.backends.base import Backend
from corral.backends.memory import MemoryBackend
from corral.config import Settings
from corral.controller import Controller, DeploySpec
from corral.domain.history import Outcome
from corral.events import EventBus
from corral.store.state import StateStore
from tests.conftest import wait_for_async

HAVE_KMOCK = importlib.util.find_spec("kmock") is not None
if HAVE_KMOCK:
    from tests.k8s.conftest import cluster  # noqa: F401 (the emulated cluster fixture, reused)

BACKENDS = ["memory", "local", "kubernetes"]
MODEL = "qwen-7b"
BUSINESSES = ("production", "testing")

# Every event the controller publishes, with its keys: the same for every backend.
EVENT_KEYS: dict[str, set[str]] = {
    "deployment": {"action", "deployment"},
    "service_deployment": {"action", "service"},
    "pod_assignment": {"podName", "deployment", "modelName", "from", "to"},
    "distribution": {"success", "deploymentName", "targets", "moves", "podDistribution"},
    "scale": {"success", "deploymentName", "currentReplicas", "targetReplicas", "added", "removed", "unassignedPods"},
    "history": {"id", "timestamp", "action", "target", "before", "after", "outcome", "message"},
}
OPTIONAL_KEYS = {"pod_assignment": {"reason"}}
# What backends report of their own (through `report`): the replica's status, and on a cluster the
# cut-over of an assignment once the EndpointSlices follow.
REPLICA_STATUS_KEYS = {"name", "deployment", "phase", "ready", "restarts", "business"}
OBSERVATIONS = {"replica_status", "assignment_complete"}


@dataclass
class Plane:
    kind: str
    engine: str
    controller: Controller
    backend: Backend
    store: StateStore
    bus: EventBus
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def pool(self) -> str:
        return f"{self.engine}-{MODEL}-pool"

    def pods(self) -> list[str]:
        return [p.name for p in self.backend.list_pods(self.pool)]

    def distribution(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for pod in self.backend.list_pods(self.pool):
            counts[pod.business or ""] = counts.get(pod.business or "", 0) + 1
        return counts

    def history(self, action: str | None = None) -> list[dict[str, Any]]:
        return self.store.history(action=action, limit=5000)

    async def deploy_pool(self, replicas: int = 4) -> list[str]:
        """A pool of `replicas` ready pods and the business services `production-chat` and `testing-chat`."""
        await self.controller.deploy(DeploySpec(engine=self.engine, model_id="sim" if self.engine == "simulator" else "Qwen/Qwen2.5-7B",
                                                model_tag=MODEL, replicas=replicas, deploy_as_pool=True))
        await wait_for_async(lambda: len(p := self.backend.list_pods(self.pool)) == replicas and all(x.ready for x in p),
                             timeout=30, what=f"{replicas} ready pods of {self.pool}")
        for business in BUSINESSES:
            await self.controller.deploy_service(f"{business}-chat", self.pool, business, business == "production")
        self.assert_settled()
        return self.pods()

    def assert_settled(self) -> None:
        """Every change has ended with a record: no history row is left pending."""
        pending = [row for row in self.history() if row["outcome"] == Outcome.PENDING]
        assert not pending, f"history rows left pending: {pending}"

    def assert_event_shapes(self) -> None:
        """The controller's events have the same keys whichever backend runs; backends' own reports are
        `replica_status` (and `assignment_complete` on a cluster) with known keys."""
        seen = {kind for kind, _ in self.events}
        assert {"deployment", "service_deployment", "history"} <= seen, seen
        for kind, data in self.events:
            if kind in EVENT_KEYS:
                keys = set(data) - OPTIONAL_KEYS.get(kind, set())
                if kind in ("deployment", "service_deployment") and data.get("action") == "deleted":
                    assert keys == {"action", "name"}, (kind, data)
                else:
                    assert keys == EVENT_KEYS[kind], (kind, sorted(keys))
            elif kind == "replica_status":
                assert "deployment" in data and "phase" in data and set(data) <= REPLICA_STATUS_KEYS, data
            else:
                assert kind in OBSERVATIONS, f"unexpected event {kind}: {data}"


@asynccontextmanager
async def _memory_plane(tmp_path: Path) -> AsyncIterator[Plane]:
    store, bus = StateStore(tmp_path / "corral.db"), EventBus()
    store.on_record = lambda entry: bus.publish("history", entry)
    backend = MemoryBackend()
    try:
        yield Plane("memory", "simulator", Controller(backend, store, bus), backend, store, bus)
    finally:
        store.close()


@asynccontextmanager
async def _local_plane(tmp_path: Path) -> AsyncIterator[Plane]:
    from corral.backends.local import LocalBackend

    settings = Settings(data_dir=tmp_path, stop_grace_s=2, health_interval_s=0.1)
    store, bus = StateStore(settings.database_path), EventBus()
    store.on_record = lambda entry: bus.publish("history", entry)
    backend = LocalBackend(settings, store, bus.publish, gpu_ids=[])
    await backend.start()
    plane = Plane("local", "simulator", Controller(backend, store, bus), backend, store, bus)
    try:
        yield plane
    finally:
        for name in [d.name for d in backend.list_deployments()]:
            await (await backend.delete_deployment(name))
        await backend.close()
        store.close()


@asynccontextmanager
async def _kubernetes_plane(tmp_path: Path, config: Path) -> AsyncIterator[Plane]:
    from corral.backends.kubernetes import KubernetesBackend, client_from
    from tests.k8s.cluster import NAMESPACE

    settings = Settings(data_dir=tmp_path, backend="kubernetes", kubeconfig=config, kubernetes_namespace=NAMESPACE)
    store, bus = StateStore(settings.database_path), EventBus()
    store.on_record = lambda entry: bus.publish("history", entry)
    backend = KubernetesBackend(client_from(config, NAMESPACE), settings.cluster_options(), bus.publish,
                                settings.manifests_dir)
    await backend.start()
    plane = Plane("kubernetes", "vllm", Controller(backend, store, bus), backend, store, bus)  # the emulator runs no engine
    try:
        yield plane
    finally:
        await backend.close()
        store.close()


async def close_controller(controller: Controller, patience_s: float = 5.0) -> bool:
    """`controller.close()`; False if it did not return in time (a reconciler that ignored its
    cancellation: `asyncio.wait_for` swallowed it on Python 3.11 when the wake-up event was set at once)."""
    try:
        await asyncio.wait_for(controller.close(), patience_s)
    except TimeoutError:
        return False
    return True


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> tuple[str, Path | None]:
    """Which backend, and for `kubernetes` the kubeconfig of a fresh emulated cluster."""
    if request.param != "kubernetes":
        return request.param, None
    if not HAVE_KMOCK:
        pytest.skip("kmock is not installed (the emulated cluster)")
    return request.param, request.getfixturevalue("cluster")[2]


@pytest.fixture
async def plane(backend_kind: tuple[str, Path | None], tmp_path: Path) -> AsyncIterator[Plane]:
    kind, config = backend_kind
    if kind == "memory":
        making = _memory_plane(tmp_path)
    elif kind == "local":
        making = _local_plane(tmp_path)
    else:
        assert config is not None
        making = _kubernetes_plane(tmp_path, config)
    async with making as plane:
        plane.bus.listen(lambda kind, data: plane.events.append((kind, data)))
        await plane.controller.start()
        try:
            yield plane
        finally:
            assert await close_controller(plane.controller), "Controller.close() hung"
