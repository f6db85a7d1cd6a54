"""The in-memory double's own promises (beyond the contract): all-or-nothing relabels, intents
written before the change, configurable readiness, injected failures, and listing by deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.backends.memory import MemoryBackend
from corral.controller import Controller, DeploySpec
from corral.domain import labels as L
from corral.domain.errors import Conflict
from corral.domain.history import Action, HistoryDraft, Intent
from corral.events import EventBus
from corral.store.state import StateStore


@pytest.fixture
def store(tmp_path: Path):  # noqa: ANN201
    store = StateStore(tmp_path / "corral.db")
    yield store
    store.close()


async def deploy(controller: Controller, tag: str = "m", replicas: int = 4) -> str:
    result = await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag=tag, replicas=replicas,
                                                deploy_as_pool=True))
    return result.deployment.name


async def test_relabel_is_all_or_nothing_and_the_intent_comes_first(store: StateStore) -> None:
    backend = MemoryBackend()
    controller = Controller(backend, store, EventBus())
    pool = await deploy(controller)
    pods = [p.name for p in backend.list_pods(pool)]
    with pytest.raises(Conflict, match="not found; nothing relabelled"):
        await backend.set_businesses({pods[0]: "a", "no-such-pod": "a"})
    assert {p.business for p in backend.list_pods()} == {L.UNASSIGNED}

    intent = Intent([HistoryDraft(Action.ASSIGN, pods[0], after={"business": "a"})])
    await backend.set_businesses({pods[0]: "a"}, intent)
    assert intent.ids and store.history(action="assign")[0]["outcome"] == "pending"  # written; the controller completes it
    assert backend.get_pod(pods[0]).business == "a"  # type: ignore[union-attr]


async def test_a_failed_relabel_rolls_the_distribution_back(store: StateStore) -> None:
    backend = MemoryBackend()
    controller = Controller(backend, store, EventBus())
    pool = await deploy(controller)
    await controller.deploy_service("a-chat", pool, "a", False)
    backend.fail_next("set_businesses", RuntimeError("injected"))
    with pytest.raises(Conflict, match="rolled back"):
        await controller.distribute(pool, {"a": 1}, None)
    assert {p.business for p in backend.list_pods(pool)} == {L.UNASSIGNED}
    assert store.history(action="distribute")[0]["outcome"] == "rolled_back"
    assert not [r for r in store.history() if r["outcome"] == "pending"]


async def test_readiness_is_configurable_and_reported(store: StateStore) -> None:
    backend = MemoryBackend(ready=False, endpoints=False)
    bus = EventBus()
    events: list[tuple[str, dict]] = []
    bus.listen(lambda kind, data: events.append((kind, data)))
    controller = Controller(backend, store, bus)
    pool = await deploy(controller, replicas=2)
    pods = backend.list_pods(pool)
    assert [(p.ready, p.phase.value, p.endpoint) for p in pods] == [(False, "Pending", None)] * 2
    backend.set_ready(pods[0].name)
    assert backend.get_pod(pods[0].name).ready  # type: ignore[union-attr]
    assert events[-1] == ("replica_status", {"name": pods[0].name, "deployment": pool, "phase": "Running", "ready": True,
                                             "restarts": 0, "business": L.UNASSIGNED})


async def test_remove_replicas_removes_exactly_the_named_pods_and_lists_by_deployment(store: StateStore) -> None:
    backend = MemoryBackend(gpu_ids=[0, 1])
    controller = Controller(backend, store, EventBus())
    pools = [await deploy(controller, f"m{i}", replicas=100) for i in range(10)]
    assert len(backend.list_pods()) == 1000 and all(len(backend.list_pods(p)) == 100 for p in pools)
    doomed = [p.name for p in backend.list_pods(pools[3])][10:13]
    await (await backend.remove_replicas(pools[3], doomed))
    remaining = {p.name for p in backend.list_pods(pools[3])}
    assert len(remaining) == 97 and not remaining & set(doomed)
    assert backend.get_deployment(pools[3]).replicas == 97  # type: ignore[union-attr]
    with pytest.raises(Conflict, match="not replicas of"):
        await backend.remove_replicas(pools[3], [next(iter(remaining)), "stranger"])
    assert len(backend.list_pods(pools[3])) == 97
    # GPUs are whole devices, never shared; too few → refused, nothing created.
    big = await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="g", replicas=2, gpus_per_replica=1))
    assert sorted(g for p in backend.list_pods(big.deployment.name) for g in p.gpu_ids) == [0, 1]
    with pytest.raises(Conflict, match="only 0 of 2"):
        await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="h", replicas=1, gpus_per_replica=1))
