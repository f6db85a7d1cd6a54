"""RoutingSync, the data plane's reconciler, against an in-memory data plane (fast; the real ones are
tested in tests/integration/test_routing_sync.py)."""

from __future__ import annotations

import asyncio

import pytest

from corral.api.schemas import STATUS
from corral.domain.errors import CorralError
from corral.gateway.policies import make_policy
from corral.gateway.proxy import Gateway
from corral.gateway.routing import Route, RoutingTable, Target
from corral.gateway.sync import DataPlaneLagging, RoutingSync
from tests.conftest import wait_for_async


def table_of(n: int) -> RoutingTable:
    return {f"s{i}": Route(f"s{i}", "m", "b", None, (Target(f"r{i}", f"http://127.0.0.1:{9000 + i}"),)) for i in range(n)}


class FakePlane:
    """Serves whatever it was pushed last; can hang, fail, or restart (forget its table)."""

    def __init__(self) -> None:
        self.version = 0
        self.table: RoutingTable | None = None
        self.pushed: list[int] = []
        self.error: Exception | None = None
        self.running = asyncio.Event()
        self.running.set()

    async def push(self, table: RoutingTable, version: int, replace: bool = False) -> int:
        self.pushed.append(version)
        await self.running.wait()
        if self.error:
            raise self.error
        if replace or version > self.version:
            self.table, self.version = table, version
        return self.version

    async def served_version(self) -> int:
        await self.running.wait()
        if self.error:
            raise self.error
        return self.version

    def restart(self) -> None:
        self.table, self.version = None, 0


class Source:
    """The state the routing table is built from, counting builds."""

    def __init__(self) -> None:
        self.services = 1
        self.builds = 0

    def build(self) -> RoutingTable:
        self.builds += 1
        return table_of(self.services)


@pytest.fixture
async def env():
    source, plane = Source(), FakePlane()
    sync = RoutingSync(source.build, plane, timeout_s=0.5, verify_interval_s=0.05, push_timeout_s=0.3,
                       backoff_initial_s=0.01, backoff_max_s=0.05)
    yield source, plane, sync
    await sync.close()


async def test_first_sync_pushes_the_table_and_returns_the_acknowledged_version(env) -> None:
    source, plane, sync = env
    assert await sync.sync() == 1
    assert plane.table == table_of(1) and plane.pushed == [1]
    assert sync.status() == {"desiredVersion": 1, "appliedVersion": 1, "lastError": None, "pushes": 1,
                           "faults": 0, "lastFault": None}
    assert await sync.sync() == 1 and plane.pushed == [1]  # nothing marked: no rebuild, no push
    assert source.builds == 1


async def test_a_burst_of_changes_costs_one_rebuild_and_one_push(env) -> None:
    source, plane, sync = env
    await sync.sync()
    builds, pushes = source.builds, sync.pushes
    for i in range(100):  # e.g. a distribution of 100 moves: one event each
        source.services = 2 + i
        sync.mark_dirty()
    assert source.builds == builds  # marking is cheap: nothing is built there
    assert await sync.sync() == 2
    assert source.builds == builds + 1 and sync.pushes == pushes + 1
    assert plane.table == table_of(101)


async def test_an_event_that_changes_no_route_costs_no_push(env) -> None:
    source, plane, sync = env
    await sync.sync()
    sync.mark_dirty()
    assert await sync.sync() == 1
    assert plane.pushed == [1] and sync.status()["desiredVersion"] == 1


async def test_concurrent_callers_share_one_push(env) -> None:
    source, plane, sync = env
    await sync.sync()
    source.services = 5
    sync.mark_dirty()
    plane.running.clear()  # hold the push so that every caller arrives while it is in flight
    callers = [asyncio.create_task(sync.sync()) for _ in range(10)]
    await wait_for_async(lambda: len(plane.pushed) == 2, timeout=5, interval=0.005, what="the push")
    plane.running.set()
    assert await asyncio.gather(*callers) == [2] * 10
    assert plane.pushed == [1, 2]


async def test_a_change_during_a_push_goes_with_the_next_push(env) -> None:
    source, plane, sync = env
    await sync.sync()
    plane.running.clear()
    source.services = 2
    sync.mark_dirty()
    first = asyncio.create_task(sync.sync())
    await wait_for_async(lambda: plane.pushed == [1, 2], timeout=5, interval=0.005, what="push 2")
    source.services = 3
    sync.mark_dirty()
    second = asyncio.create_task(sync.sync())
    plane.running.set()
    assert await first >= 2 and await second == 3
    assert plane.table == table_of(3)


async def test_a_hung_data_plane_raises_lagging_in_time_and_catches_up_without_another_call(env) -> None:
    source, plane, sync = env
    sync.start()
    await sync.sync()
    plane.running.clear()  # hung (nginx SIGSTOPped)
    source.services = 7
    sync.mark_dirty()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DataPlaneLagging) as caught:
        await sync.sync(timeout_s=0.2)
    assert 0.2 <= loop.time() - started < 1.0
    error = caught.value
    assert isinstance(error, CorralError) and STATUS[error.kind] == 503
    assert "the change is recorded" in error.message and "has not applied it yet" in error.message
    assert "keeps retrying" in error.message
    assert error.details == {"desiredVersion": 2, "appliedVersion": 1}
    plane.running.set()  # resumed: the loop applies the latest version by itself
    await wait_for_async(lambda: sync.status()["appliedVersion"] == 2, timeout=5, interval=0.01, what="version 2 applied")
    assert plane.table == table_of(7)


async def test_failed_pushes_are_retried_with_back_off_and_reported(env) -> None:
    source, plane, sync = env
    sync.start()
    plane.error = ConnectionRefusedError("control socket gone")
    with pytest.raises(DataPlaneLagging, match="control socket gone"):
        await sync.sync(timeout_s=0.2)
    status = sync.status()
    assert status["appliedVersion"] == 0 and "control socket gone" in status["lastError"]
    assert 2 <= status["pushes"] < 40  # retried, but backing off (a tight loop would be thousands)
    plane.error = None
    await wait_for_async(lambda: sync.status()["appliedVersion"] == 1, timeout=5, interval=0.01, what="applied")
    assert sync.status()["lastError"] is None


async def test_a_restarted_data_plane_gets_the_latest_table_again(env) -> None:
    source, plane, sync = env
    sync.start()
    source.services = 3
    await sync.sync()
    plane.restart()  # e.g. nginx restarted: empty shared memory
    await wait_for_async(lambda: plane.version == 1 and plane.table == table_of(3), timeout=5, interval=0.01,
                         what="the table pushed again")
    assert sync.status()["appliedVersion"] == 1


async def test_events_outside_a_mutation_are_pushed_by_the_loop(env) -> None:
    source, plane, sync = env
    sync.start()
    await sync.sync()
    source.services = 4  # e.g. a replica became ready: an event, no API call
    sync.mark_dirty()
    await wait_for_async(lambda: plane.table == table_of(4), timeout=5, interval=0.01, what="the loop's push")


async def test_a_change_marked_from_another_thread_wakes_the_loop() -> None:
    source, plane = Source(), FakePlane()
    sync = RoutingSync(source.build, plane, verify_interval_s=60)  # only the wake-up can push it in time
    sync.start()
    try:
        await sync.sync()
        source.services = 6
        await asyncio.to_thread(sync.mark_dirty)
        await wait_for_async(lambda: plane.table == table_of(6), timeout=5, interval=0.01, what="the loop's push")
    finally:
        await sync.close()


async def test_a_build_failure_is_reported_as_lagging_and_retried() -> None:
    plane, calls = FakePlane(), []

    def build() -> RoutingTable:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("backend not ready")
        return table_of(1)

    sync = RoutingSync(build, plane, timeout_s=0.2, backoff_initial_s=0.01, backoff_max_s=0.05)
    sync.start()
    try:
        with pytest.raises(DataPlaneLagging, match="backend not ready"):
            await sync.sync()
        await wait_for_async(lambda: sync.status()["appliedVersion"] == 1, timeout=5, interval=0.01, what="applied")
    finally:
        await sync.close()


async def test_the_python_gateway_swaps_its_table_and_never_goes_back() -> None:
    gateway = Gateway(make_policy("least-outstanding"), connect_timeout_s=1, read_timeout_s=1, health_path=lambda r: "/health")
    assert await gateway.served_version() == 0
    assert await gateway.push(table_of(2), 5) == 5 and gateway.table == table_of(2)
    assert await gateway.push(table_of(3), 4) == 5 and gateway.table == table_of(2)  # a stale push changes nothing
    assert await gateway.served_version() == 5


async def test_a_version_above_the_desired_one_is_a_fault_repaired_by_replacing_the_table(env) -> None:
    """Something else put version 99 in the data plane (a table Corral never pushed): the verify loop counts a fault,
    shows it, and replaces the table with the desired one, although 99 > 1 (versions otherwise only go forward)."""
    source, plane, sync = env
    sync.start()
    assert await sync.sync() == 1
    foreign = table_of(3)
    plane.table, plane.version = foreign, 99
    await wait_for_async(lambda: plane.version == 1, timeout=5, what="the foreign table replaced")
    assert plane.table == table_of(1)
    status = sync.status()
    assert status["faults"] == 1 and "99" in status["lastFault"] and status["appliedVersion"] == 1


async def test_a_push_answered_with_a_foreign_version_is_not_an_acknowledgement(env) -> None:
    source, plane, sync = env
    plane.table, plane.version = table_of(5), 50  # before the first push
    assert await sync.sync() == 1
    assert plane.table == table_of(1) and plane.version == 1 and sync.faults == 1
