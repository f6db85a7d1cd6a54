"""A distribution that fails half-way is rolled back: the pool is never left half-distributed.

Runs the real controller on a real LocalBackend (real simulator processes, real SQLite); the only
change is a fault injected into the third relabel of the distribution's one transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import pytest

from corral.backends.local import LocalBackend
from corral.config import Settings
from corral.controller import Controller, DeploySpec
from corral.domain.errors import Conflict
from corral.events import EventBus
from corral.store.state import StateStore


class FailingMoves(dict):
    """Relabels that fail at the third pod, inside the store's transaction (after two were written)."""

    def items(self):  # type: ignore[override]
        for index, item in enumerate(super().items()):
            if index == 2:
                raise RuntimeError("injected relabel failure")
            yield item


class FlakyBackend(LocalBackend):
    failing = True

    async def set_businesses(self, businesses: Mapping[str, str], intent=None) -> None:
        await super().set_businesses(FailingMoves(businesses) if self.failing else businesses, intent)


async def test_failed_distribution_rolls_back(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, stop_grace_s=2)
    store = StateStore(settings.database_path)
    bus = EventBus()
    backend = FlakyBackend(settings, store, bus.publish, gpu_ids=[])
    controller = Controller(backend, store, bus)
    await backend.start()
    try:
        result = await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="m", replicas=4, deploy_as_pool=True))
        pool = result.deployment.name
        await controller.deploy_service("prod", pool, "production", False)
        await controller.deploy_service("test", pool, "testing", False)
        before = {p.name: p.business for p in backend.list_pods(pool)}

        with pytest.raises(Conflict, match="rolled back \\(none of its 4 move\\(s\\) applied\\): injected relabel failure"):
            await controller.distribute(pool, {"production": 3, "testing": 1}, None)

        assert {p.name: p.business for p in backend.list_pods(pool)} == before
        row = store.history(action="distribute")[0]
        assert row["outcome"] == "rolled_back" and "none of its 4 move(s) applied" in row["message"]
        assert store.history(action="assign") == []  # nothing announced as assigned

        backend.failing = False  # healthy again: the same request now succeeds
        done = await controller.distribute(pool, {"production": 3, "testing": 1}, None)
        assert Counter(p.business for p in backend.list_pods(pool)) == Counter({"production": 3, "testing": 1})
        assert len(done.moves) == 4
    finally:
        for deployment in backend.list_deployments():
            await (await backend.delete_deployment(deployment.name))
        await backend.close()
        store.close()
