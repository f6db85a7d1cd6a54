"""A distribution that fails half-way is rolled back: the pool is never left half-distributed.

Runs the real controller on a real LocalBackend (real simulator processes, real SQLite); the only
change is a fault injected into the third relabel.
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


class FlakyBackend(LocalBackend):
    fail_on_call = 3

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    async def set_businesses(self, businesses: Mapping[str, str]) -> None:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("injected relabel failure")
        await super().set_businesses(businesses)


async def test_failed_distribution_rolls_back(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, stop_grace_s=2)
    store = StateStore(settings.database_path)
    bus = EventBus()
    backend = FlakyBackend(settings, store, bus.publish, gpu_ids=[])
    controller = Controller(backend, store, bus)
    await backend.start()
    try:
        result = await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="m", replicas=4, deploy_as_pool=True))
        pool = result["deployment"]["name"]
        await controller.deploy_service("prod", pool, "production", False)
        await controller.deploy_service("test", pool, "testing", False)
        before = {p.name: p.business for p in backend.list_pods(pool)}

        with pytest.raises(Conflict, match="rolled back \\(2 move\\(s\\) undone\\): injected relabel failure"):
            await controller.distribute(pool, {"production": 3, "testing": 1}, None)

        assert {p.name: p.business for p in backend.list_pods(pool)} == before
        row = store.history(action="distribute")[0]
        assert row["outcome"] == "rolled_back" and "after 2 of 4" in row["message"]
        assert store.history(action="assign") == []  # nothing announced as assigned

        backend.fail_on_call = 0  # healthy again: the same request now succeeds
        done = await controller.distribute(pool, {"production": 3, "testing": 1}, None)
        assert Counter(p.business for p in backend.list_pods(pool)) == Counter({"production": 3, "testing": 1})
        assert len(done["moves"]) == 4
    finally:
        for deployment in backend.list_deployments():
            await (await backend.delete_deployment(deployment.name))
        await backend.close()
        store.close()
