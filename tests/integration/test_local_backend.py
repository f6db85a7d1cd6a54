"""The local backend in-process: GPU hand-out and finishing work a crash interrupted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.backends.local import LocalBackend
from corral.backends.local.process import process_start_time
from corral.config import Settings
from corral.controller import Controller, DeploySpec
from corral.domain.errors import Conflict
from corral.domain.models import PodPhase
from corral.events import EventBus
from corral.store.state import StateStore
from tests.conftest import wait_for_async


class Plane:
    def __init__(self, data_dir: Path, gpu_ids: list[int]) -> None:
        self.settings = Settings(data_dir=data_dir, stop_grace_s=2, health_interval_s=0.2)
        self.store = StateStore(self.settings.database_path)
        self.bus = EventBus()
        self.backend = LocalBackend(self.settings, self.store, self.bus.publish, gpu_ids=gpu_ids)
        self.controller = Controller(self.backend, self.store, self.bus)

    async def close(self, stop_replicas: bool = True) -> None:
        if stop_replicas:
            for name in [d.name for d in self.backend.list_deployments()]:
                await (await self.backend.delete_deployment(name))
        await self.backend.close()
        self.store.close()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    p = Plane(tmp_path, gpu_ids=[0, 1, 2])
    await p.backend.start()
    yield p
    await p.close()


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


async def test_gpus_are_whole_devices_never_shared(plane: Plane) -> None:
    spec = DeploySpec(engine="simulator", model_id="sim", model_tag="m", replicas=2, deploy_as_pool=True, gpus_per_replica=1)
    result = await plane.controller.deploy(spec)
    pool = result.deployment.name
    records = plane.store.list_replicas(pool)
    assert sorted(r.gpu_ids for r in records) == [(0,), (1,)]
    assert sorted(environ(r.pid)["CUDA_VISIBLE_DEVICES"] for r in records) == ["0", "1"]

    # A second deployment wanting 2 GPUs per replica: only 1 is free. Refused, nothing created.
    with pytest.raises(Conflict, match="needs 2 GPU\\(s\\) but only 1 of 3 detected GPU\\(s\\) are free"):
        await plane.controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="big", replicas=1, gpus_per_replica=2))
    assert [d.name for d in plane.backend.list_deployments()] == [pool]

    # Scale-up takes the last GPU, and one more is refused with the pool unchanged.
    await plane.controller.scale(pool, 3, pool_endpoint=True)
    with pytest.raises(Conflict, match="only 0 of 3"):
        await plane.controller.scale(pool, 4, pool_endpoint=True)
    assert len(plane.backend.list_pods(pool)) == 3
    # A removed replica's GPU is free again once its process has stopped.
    await plane.controller.scale(pool, 2, pool_endpoint=True)
    await wait_for_async(lambda: len(plane.store.list_replicas(pool)) == 2, what="the removed replica to stop")
    await plane.controller.scale(pool, 3, pool_endpoint=True)
    assert sorted(g for r in plane.store.list_replicas(pool) for g in r.gpu_ids) == [0, 1, 2]


async def test_restart_finishes_an_interrupted_delete_and_scale_down(tmp_path: Path) -> None:
    first = Plane(tmp_path, gpu_ids=[])
    await first.backend.start()
    a = (await first.controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="a", replicas=2, deploy_as_pool=True)))
    b = (await first.controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="b", replicas=3, deploy_as_pool=True)))
    doomed, shrinking = a.deployment.name, b.deployment.name
    # The control plane dies right after marking: a deletion of `doomed` and the removal of one `shrinking` replica.
    first.store.mark_deleting(doomed)
    victim = first.store.list_replicas(shrinking)[0]
    first.store.update_replica(victim.name, phase=PodPhase.TERMINATING)
    pids = [r.pid for r in first.store.list_replicas()]
    await first.close(stop_replicas=False)

    second = Plane(tmp_path, gpu_ids=[])
    await second.backend.start()
    try:
        assert [d.name for d in second.backend.list_deployments()] == [shrinking]
        assert second.store.deployments_being_deleted() == []
        assert victim.name not in {r.name for r in second.store.list_replicas()}
        assert second.backend.get_deployment(shrinking).replicas == 2  # desired count follows what remains
        assert sum(process_start_time(pid) is not None for pid in pids) == 2  # b's two survivors
        await wait_for_async(lambda: all(p.ready for p in second.backend.list_pods(shrinking)), what="the survivors to be ready")
    finally:
        await second.close()
