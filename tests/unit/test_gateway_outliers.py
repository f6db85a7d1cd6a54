"""Issue 25, part 3, the pure half (domain/outliers.py) and the Python plane's bookkeeping: thresholds in a row
(an answer starts the count again), ejection time growing with repeats up to its cap and forgiven over time,
readmission after passed checks in a row, readiness with the same thresholds, the cap per business with several
faulty replicas (on the gateway's own code path), the engines' progress counters, and the nginx plane's rendering
of the same numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.domain.outliers import (
    Outlier,
    OutlierPolicy,
    Readiness,
    Reason,
    due,
    eject,
    failed,
    forgiven,
    hung,
    may_eject,
    probed,
    progress_counter,
    readiness,
    succeeded,
    wants_probe,
)
from corral.gateway.nginx_plane import parse_outliers, render_config, table_payload
from corral.gateway.policies import LeastOutstanding
from corral.gateway.proxy import Gateway, GatewayLimits
from corral.gateway.routing import Route, Target


@given(base=st.floats(0.1, 100), cap=st.floats(0.1, 1000), n=st.integers(1, 200))
def test_ejection_time_grows_with_repeats_up_to_its_cap(base: float, cap: float, n: int) -> None:
    policy = OutlierPolicy(base_ejection_s=base, max_ejection_s=cap)
    now, later = policy.ejection_seconds(n), policy.ejection_seconds(n + 1)
    assert now <= later <= max(cap, base)
    assert policy.ejection_seconds(1) == min(base, max(cap, base))
    if base * (n + 1) <= cap:
        assert later == base * (n + 1) > now  # base × ejections in a row


@given(steps=st.lists(st.floats(0, 200), min_size=1, max_size=12))
def test_each_ejection_in_a_row_lasts_longer_and_time_in_rotation_forgives(steps: list[float]) -> None:
    """Ejected, readmitted after its time, ejected again after `gap` seconds in rotation: the count is the earlier
    one less one per `decay_s` of the gap, plus one."""
    policy = OutlierPolicy(base_ejection_s=5, max_ejection_s=300, decay_s=60)
    state, now = Outlier(), 0.0
    for gap in steps:
        expected = max(0, state.ejections - int(gap // 60)) + 1 if state.readmitted_at is not None else state.ejections + 1
        now += gap
        state = eject(state, policy, now, Reason.FAILURES)
        assert state.ejections == expected and state.until == now + min(5 * expected, 300)
        now = state.until
        for _ in range(policy.passed_probes):
            state = probed(state, policy, now, ok=True)
        assert not state.ejected and state.readmitted_at == now


@given(threshold=st.integers(1, 6), outcomes=st.lists(st.booleans(), max_size=60))
def test_failures_eject_only_in_a_row(threshold: int, outcomes: list[bool]) -> None:
    """`outcomes`: True for an answer, False for a gateway failure. Ejected exactly when, and as soon as, the last
    `threshold` outcomes were failures (checked against a recount)."""
    policy = OutlierPolicy(consecutive_failures=threshold)
    state, run = Outlier(), 0
    for ok in outcomes:
        state = succeeded(state) if ok else failed(state)
        run = 0 if ok else run + 1
        assert (due(state, policy) is Reason.FAILURES) == (run >= threshold)
        assert state.suspect == (not ok or state.suspect)  # a failure makes it checked; only a passed check clears it


def test_checks_of_a_suspected_replica_and_of_an_ejected_one() -> None:
    policy = OutlierPolicy(failed_probes=3, passed_probes=2, base_ejection_s=10)
    state = failed(Outlier())
    assert wants_probe(state, 0.0)
    state = probed(probed(state, policy, 1, ok=False), policy, 2, ok=False)
    assert due(state, policy) is None
    cleared = probed(state, policy, 3, ok=True)  # a pass clears the suspicion and the failed checks
    assert not cleared.suspect and cleared.probe_failures == 0 and not wants_probe(cleared, 4)
    state = probed(state, policy, 3, ok=False)
    assert due(state, policy) is Reason.PROBES
    state = eject(state, policy, 10.0, Reason.PROBES)
    assert not wants_probe(state, 19.9) and probed(state, policy, 19.9, ok=True) == state  # not before its time
    assert wants_probe(state, 20.0)
    state = probed(state, policy, 20.0, ok=True)
    state = probed(state, policy, 20.5, ok=False)  # a failure: the passes start again
    state = probed(state, policy, 21.0, ok=True)
    assert state.ejected
    state = probed(state, policy, 21.5, ok=True)
    assert not state.ejected and state.ejections == 1 and state.failures == 0 and state.readmitted_at == 21.5


@given(ready=st.booleans(), checks=st.lists(st.booleans(), max_size=40), fails=st.integers(1, 5), passes=st.integers(1, 5))
def test_readiness_follows_checks_in_a_row(ready: bool, checks: list[bool], fails: int, passes: int) -> None:
    policy = OutlierPolicy(failed_probes=fails, passed_probes=passes)
    state = Readiness(ready=ready, was_ready=ready)
    expected, ever, run = ready, ready, 0
    for ok in checks:
        state = readiness(state, ok, policy)
        if expected:
            run = 0 if ok else run + 1
            if run >= fails:
                expected, run = False, 0
        else:
            run = run + 1 if ok else 0
            if run >= (passes if ever else 1):  # a starting replica is ready at its first pass
                expected, ever, run = True, True, 0
        assert state.ready == expected


def cap_of(percent: float, replicas: int) -> int:
    return math.floor(percent * replicas / 100 + 1e-9)


def test_the_cap_rounds_down_and_keeps_a_lone_replica() -> None:
    policy = OutlierPolicy(max_ejection_percent=50)
    assert [policy.ejectable(n) for n in range(1, 6)] == [0, 1, 1, 2, 2]
    assert not may_eject("a", [{"a"}], set(), policy)  # a business of one replica never loses it to ejection
    assert may_eject("a", [{"a", "b"}], set(), policy) and not may_eject("a", [{"a", "b"}], {"b"}, policy)
    assert may_eject("a", [{"b", "c"}], {"b"}, policy)  # a business it does not serve is not its concern
    assert OutlierPolicy(max_ejection_percent=100).ejectable(3) == 3 and OutlierPolicy(max_ejection_percent=0).ejectable(9) == 0


def gateway(percent: float, threshold: int = 2) -> Gateway:
    return Gateway(LeastOutstanding(), connect_timeout_s=1, read_timeout_s=5, health_path=lambda _: "/health",
                   limits=GatewayLimits(outliers=OutlierPolicy(consecutive_failures=threshold,
                                                               max_ejection_percent=percent, base_ejection_s=60)))


@given(replicas=st.integers(1, 8), percent=st.sampled_from([0.0, 10.0, 25.0, 50.0, 75.0, 100.0]),
       shared=st.integers(0, 3), data=st.data())
def test_the_cap_holds_with_several_faulty_replicas(replicas: int, percent: float, shared: int, data: st.DataObject) -> None:
    """Any replicas failing in any order, on the gateway's own path (`_failed`), with a second business sharing some
    of them: never more than the cap of either business out at once; and once every faulty one failed enough, as
    many are out as the caps allow (a lone business's replicas: min(faulty, cap))."""
    gw = gateway(percent)
    targets = [Target(f"r{i}", f"http://127.0.0.1:{1000 + i}") for i in range(replicas)]
    second = targets[:shared] + [Target("x", "http://127.0.0.1:999")]
    gw.set_table({"a": Route("a", "m", "a", "pool", tuple(targets)), "b": Route("b", "m", "b", "pool", tuple(second))})
    faulty = data.draw(st.lists(st.sampled_from(targets), max_size=60))
    events = []
    gw.on_outlier = events.append
    for target in faulty:
        gw._failed(target)  # noqa: SLF001
        assert len(set(gw.ejected) & {t.name for t in targets}) <= cap_of(percent, replicas)
        assert len(set(gw.ejected) & {t.name for t in second}) <= cap_of(percent, len(second))
    for _ in range(2):  # every faulty one fails twice more in a row
        for target in dict.fromkeys(faulty):
            gw._failed(target)  # noqa: SLF001
    if shared == 0:
        assert len(gw.ejected) == min(len(set(faulty)), cap_of(percent, replicas))
    assert len([e for e in events if e.change == "ejected"]) == len(gw.ejected)  # each reported once
    assert set(gw.ejection_views()) == set(gw.ejected)


def test_a_record_outlives_a_short_absence_from_the_table() -> None:
    """A replica ejected, gone from the table (not ready) and back, is still out until its time; a replica that
    left is neither shown nor checked."""
    gw = gateway(100, threshold=1)
    r = Target("r", "http://127.0.0.1:1000")
    table = {"a": Route("a", "m", "a", "pool", (r,))}
    gw.set_table(table)
    gw._failed(r)  # noqa: SLF001
    assert set(gw.ejected) == {"r"}
    gw.set_table({"a": Route("a", "m", "a", "pool", ())})
    assert gw.ejected == {} and gw.ejection_views() == {} and gw.outliers["r"].ejected
    gw.set_table(table)
    assert set(gw.ejected) == {"r"} and gw.free_targets(table["a"]) == []


def test_hung_needs_the_failed_checks_and_no_progress() -> None:
    policy = OutlierPolicy(failed_probes=3)
    assert not hung(2, False, policy) and hung(3, False, policy) and not hung(5, True, policy)


def test_progress_is_the_engines_token_counters() -> None:
    vllm = ('# HELP vllm:generation_tokens_total x\n# TYPE vllm:generation_tokens_total counter\n'
            'vllm:generation_tokens_total{model_name="m"} 120.0\nvllm:prompt_tokens_total{model_name="m"} 30.0\n'
            'vllm:num_requests_running{model_name="m"} 2.0\n'
            'sglang:generation_tokens_total{model_name="a b"} 5\n')
    assert progress_counter(vllm) == 155.0
    assert progress_counter("vllm:num_requests_running 2\n") is None and progress_counter("") is None


def test_the_nginx_plane_gets_the_same_numbers(tmp_path: Path) -> None:
    policy = OutlierPolicy(consecutive_failures=7, failed_probes=4, passed_probes=3, base_ejection_s=2.5,
                           max_ejection_s=90, max_ejection_percent=33.3, decay_s=45)
    conf = render_config(tmp_path, "127.0.0.1", 8000, tmp_path / "c.sock", 2.0, 600.0, 5.0, 1,
                         GatewayLimits(outliers=policy, probe_interval_s=0.25, first_byte_timeout_s=4))
    assert ("{ failures = 7, probes = 4, passes = 3, base = 2.5, max = 90.0, percent = 33.3, decay = 45.0, "
            "interval = 0.25, timeout = 2.0 }") in conf
    assert "corral.init_worker()" in conf and "location = /prune" in conf
    table = {"a": Route("a", "m", "a", "pool", (Target("r", "http://127.0.0.1:9", health_path="/ping"),
                                                 Target("q", "http://127.0.0.1:8")))}
    assert b'"health": "/ping"' in table_payload(table) and table_payload(table).count(b'"health"') == 1


def test_the_lua_records_read_as_the_same_outlier_state() -> None:
    raw = {"ej:r": 130.0, "ea:r": 100.0, "en:r": 2, "ew:r": "probes", "ot:r": 40.0, "oc:r": 0, "oc:q": 3,
           "ot:p": 12.5, "en:p": 1, "if:r": 0}
    found = parse_outliers(raw)
    assert found["r"] == Outlier(ejections=2, ejected_at=100.0, until=130.0, readmitted_at=40.0, reason=Reason.PROBES)
    assert found["q"] == Outlier(failures=3) and not found["p"].ejected and found["p"].readmitted_at == 12.5
    assert forgiven(found["p"], OutlierPolicy(decay_s=60), 12.5 + 61) == 0


async def test_the_supervisor_changes_readiness_after_checks_in_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local backend's supervisor: a ready replica is not ready after 3 failed checks in a row (not one), and
    ready again after 2 passed ones; a starting replica is ready at its first."""
    from corral.backends.local import supervisor as module
    from corral.config import Settings
    from corral.domain.models import PodPhase
    from corral.store.state import ReplicaRecord

    records = {"r": ReplicaRecord("r", "d", {}, 1, "log", phase=PodPhase.PENDING, ready=False, pid=1)}

    class Store:
        def update_replica(self, name: str, **columns: object) -> None:
            records[name] = records[name].replace(**columns)

    checks: list[bool] = []
    monkeypatch.setattr(module.process, "is_alive", lambda *_: True)
    supervisor = module.ReplicaSupervisor(Settings(data_dir=tmp_path), Store(), lambda *_, **__: None)  # type: ignore[arg-type]

    async def probe(*_: object) -> bool:
        return checks.pop(0)

    monkeypatch.setattr(supervisor, "_probe", probe)
    seen = []
    for ok in [True, False, False, True, False, False, False, True, True, False, True, True]:
        checks.append(ok)
        await supervisor._check(records["r"], "/health")  # noqa: SLF001
        seen.append(records["r"].ready)
    assert seen == [True, True, True, True, True, True, False, False, True, True, True, True]
    await supervisor.close()


async def test_the_pods_view_shows_the_ejected_replicas(tmp_path: Path) -> None:
    from corral.backends.memory import MemoryBackend
    from corral.controller import Controller
    from corral.domain.deploy_request import DeploySpec
    from corral.events import EventBus
    from corral.store.state import StateStore
    from corral.views import EjectionView

    out: dict[str, EjectionView] = {}
    store = StateStore(tmp_path / "corral.db")
    controller = Controller(MemoryBackend(gpu_ids=[0]), store, EventBus(), ejections=lambda: out)
    try:
        await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="m", replicas=2,
                                           deploy_as_pool=True))
        first, second = controller.list_pods()
        assert first.ejection is None and second.ejection is None
        out[second.name] = EjectionView(since="2026-12-07T00:00:00.000+00:00", until="2026-12-07T00:00:10.000+00:00",
                                        count=2, reason="5 gateway failures in a row")
        views = controller.list_pods()
        assert views[0] is first and views[1].ejection == out[second.name]  # the others' views are reused as they are
        assert views[1].wire()["ejection"] == {"since": "2026-12-07T00:00:00.000+00:00", "count": 2,
                                               "until": "2026-12-07T00:00:10.000+00:00",
                                               "reason": "5 gateway failures in a row"}
        assert second.ejection is None  # the cached view is not changed
    finally:
        store.close()
