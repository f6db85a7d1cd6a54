"""Reads that are cheap at 1,000 replicas give the same answers as the plain way of computing them: pod views
reused until their pod changes, services matched through a label index, the autopilot's traffic from the
samples and the routing table, and the autopilot's settings and pins read from memory between writes
(bench/control_plane.py measures the costs; here only the answers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.backends.memory import MemoryBackend
from corral.controller import Controller
from corral.domain.deploy_request import DeploySpec
from corral.domain.history import Action, HistoryDraft
from corral.domain.load import Counts, Sample, bucket_index, in_window, unserved_per_second
from corral.domain.models import Pod, Service, selected_pods
from corral.events import EventBus
from corral.gateway.monitor import LoadMonitor
from corral.gateway.routing import Route, Target
from corral.store.state import StateStore
from corral.views import BusinessServiceView, PodView


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    store = StateStore(tmp_path / "corral.db")
    try:
        yield Controller(MemoryBackend(seed=1), store, EventBus())
    finally:
        store.close()


async def test_pod_views_are_reused_until_their_pod_changes(controller: Controller) -> None:
    spec = DeploySpec(engine="simulator", model_id="sim", model_tag="m", replicas=3, deploy_as_pool=True)
    deployed = await controller.deploy(spec)
    pool = deployed.deployment.name
    await controller.deploy_service("chat", pool, "chat", False)
    first = controller.list_pods()
    # built without validation, yet exactly what validation gives
    assert [PodView.model_validate(v.model_dump()) for v in first] == first
    fresh = [Controller.pod_view(p).wire() for p in controller.backend.list_pods()]
    assert [v.wire() for v in first] == fresh
    moved = first[1].name
    await controller.assign_pod(moved, "chat", None)
    second = controller.list_pods()
    assert [a is b for a, b in zip(first, second, strict=True)] == [v.name != moved for v in first]
    assert next(v for v in second if v.name == moved).business == "chat"
    assert controller.list_pods(pool) == second  # one pool's listing shares the views
    with pytest.raises(ValueError):
        second[0].business = "other"  # frozen: a shared view cannot be altered by one reader


labels = st.dictionaries(st.sampled_from(["model", "business", "app", "pool"]),
                         st.sampled_from(["a", "b", "c"]), max_size=4)


@given(st.lists(labels, max_size=12), st.lists(labels, max_size=6))
def test_services_select_through_the_index_as_one_by_one(pod_labels: list[dict], selectors: list[dict]
                                                          ) -> None:
    pods = [Pod(name=f"p{i}", deployment="d", labels=x) for i, x in enumerate(pod_labels)]
    services = [Service(name=f"s{i}", model="m", selector=x) for i, x in enumerate(selectors)]
    selected = selected_pods(services, pods)
    assert selected == {s.name: [p for p in pods if s.selects(p)] for s in services}


async def test_the_autopilots_traffic_is_the_load_views_and_computed_once_per_sample() -> None:
    readings: list[Sample] = []

    async def read() -> Sample:
        return readings.pop(0)

    def service(name: str) -> BusinessServiceView:
        return BusinessServiceView(name=name, displayName=name, businessTag="b", modelName="m",
                                   modelPool="pool", baseUrl=None, isExternal=False, llmRouting=False,
                                   type="ClusterIP", selector={}, labels={}, replicas=2, readyReplicas=2,
                                   createdAt=None)

    replicas = (Target("r1", "http://x:1"), Target("r2", "http://x:2"))
    table = {"a-nlb": Route("a-nlb", "m", "a", "pool", replicas),
             "b-nlb": Route("b-nlb", "m", "b", "pool", ()),
             "standard": Route("standard", "m", None, "d", (Target("s1", "http://x:3"),))}
    monitor = LoadMonitor(read, lambda: table, lambda: [service("a-nlb"), service("b-nlb")], EventBus())
    fast, slow = bucket_index(0.012), bucket_index(0.3)
    readings += [Sample({}, {}),
                 Sample({("a-nlb", "r1"): Counts(10, 1, {fast: 10}, {fast: 4}, 40, 10),
                         ("a-nlb", "r2"): Counts(5, 0, {slow: 5}, {slow: 5}),
                         ("b-nlb", "old"): Counts(2, 0, {fast: 2})},
                        {("a-nlb", "r1"): 3, ("a-nlb", "r2"): 1}, {"b-nlb": 4})]
    await monitor.sample()
    await monitor.sample()
    traffic = monitor.traffic(5)
    assert set(traffic) == {"a-nlb", "b-nlb"}  # business services only
    for view in monitor.snapshot(5).services:
        seen = traffic[view.service]
        assert seen.figures.requests_per_s == view.requestsPerSecond
        assert seen.figures.ttfb_ms[1] == view.ttfbMs.p95
        assert seen.figures.latency_ms == (view.latencyMs.p50, view.latencyMs.p95, view.latencyMs.p99)
        assert seen.in_flight == view.inFlight
    assert traffic["b-nlb"].unserved_per_s == unserved_per_second(in_window(list(monitor._ticks), 5))["b-nlb"] > 0
    assert monitor.traffic(5) is traffic  # no new sample, same table: the same answer
    readings.append(Sample({("a-nlb", "r1"): Counts(20, 1, {fast: 20}, {fast: 4}, 40, 10)}, {}))
    await monitor.sample()
    assert monitor.traffic(5) is not traffic and monitor.traffic(5)["a-nlb"].in_flight == 0


def test_autopilot_settings_and_pins_are_read_again_after_each_write(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "corral.db")
    try:
        assert store.pins() == set() and store.autopilots() == {} and store.policies() == {}
        store.set_pins("pool", ["p1", "p2"], True)
        pins = store.pins()
        pins.add("mine")  # a caller's copy
        assert store.pins() == {"p1", "p2"}
        store.forget_pins(["p1", "p2", "p3"])  # all alive: nothing to forget
        assert store.pins() == {"p1", "p2"}
        store.forget_pins(["p2"])
        assert store.pins() == {"p2"}
        store.set_autopilot("pool", {"enabled": True}, HistoryDraft(Action.POLICY, "pool", message="on"))
        store.set_policy("chat", {"priority": 3}, HistoryDraft(Action.POLICY, "chat", message="policy"))
        assert store.autopilots() == {"pool": {"enabled": True}}
        assert store.policies() == {"chat": {"priority": 3}}
        store.autopilots()["pool"]["enabled"] = False  # a caller's copy
        assert store.autopilots() == {"pool": {"enabled": True}}
        store.forget_autopilot(pool="pool", service="chat")
        assert store.pins() == set() and store.autopilots() == {} and store.policies() == {}
    finally:
        store.close()
    reopened = StateStore(tmp_path / "corral.db")  # what was written is what a restart reads
    try:
        assert reopened.pins() == set() and reopened.autopilots() == {}
    finally:
        reopened.close()
