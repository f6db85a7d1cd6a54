"""The usage integral (corral.domain.usage): GPU-seconds from random assignment histories, and counter deltas."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.usage import (
    HOUR_S,
    AssignmentChange,
    GroupBy,
    Held,
    TaskRun,
    UsageCounts,
    assigned_intervals,
    assignment_changes,
    by_business,
    deltas,
    gpu_seconds,
    gpu_seconds_by_hour,
    report,
    task_intervals,
)

BUSINESSES = ["production", "testing", "batch"]
T0 = 1_800_000_000.0  # a whole hour

changes_st = st.lists(
    st.builds(AssignmentChange, t=st.floats(T0, T0 + 4 * HOUR_S, allow_nan=False).map(lambda x: round(x, 3)),
              replica=st.sampled_from(["r1", "r2", "r3", "r4"]), business=st.sampled_from([*BUSINESSES, None]),
              gpus=st.integers(0, 8)),
    max_size=30,
)
UNTIL = T0 + 5 * HOUR_S


def _state_at(changes: list[AssignmentChange], replica: str, t: float) -> AssignmentChange | None:
    """The reference: the replica's last change at or before t (the later one in the list on a tie)."""
    found = None
    for c in changes:
        if c.replica == replica and c.t <= t and (found is None or c.t >= found.t):
            found = c
    return found


def _reference_total(changes: list[AssignmentChange], start: float, end: float) -> float:
    """Σ over replicas of ∫ gpus·[assigned] dt, by sweeping every breakpoint (independent of the interval code)."""
    points = sorted({start, end, *(c.t for c in changes if start < c.t < end)})
    total = 0.0
    for a, b in zip(points, points[1:], strict=False):
        mid = (a + b) / 2
        for replica in {c.replica for c in changes}:
            state = _state_at(changes, replica, mid)
            if state is not None and state.business is not None:
                total += state.gpus * (b - a)
    return total


@settings(max_examples=200, deadline=None)
@given(changes_st, st.floats(T0 - HOUR_S, UNTIL), st.floats(0, 6 * HOUR_S))
def test_the_businesses_share_exactly_the_assigned_gpu_seconds(changes, start, length):
    # distinct times per replica: on a tie the reference and the code agree only by the list order
    changes = list({(c.replica, c.t): c for c in changes}.values())
    end = min(start + length, UNTIL)
    billed = gpu_seconds(assigned_intervals(changes, UNTIL), start, end)
    assert math.isclose(sum(h.gpu_seconds for h in billed.values()), _reference_total(changes, start, end),
                        rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=200, deadline=None)
@given(changes_st, st.floats(T0, UNTIL), st.floats(0, 1), st.floats(0, 1))
def test_splitting_the_window_adds_up(changes, start, f1, f2):
    intervals = assigned_intervals(changes, UNTIL)
    end = start + (UNTIL - start) * f1
    middle = start + (end - start) * f2
    whole = gpu_seconds(intervals, start, end)
    first, second = gpu_seconds(intervals, start, middle), gpu_seconds(intervals, middle, end)
    for business in {*whole, *first, *second}:
        parts = first.get(business, Held()) + second.get(business, Held())
        assert math.isclose(whole.get(business, Held()).gpu_seconds, parts.gpu_seconds, rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(whole.get(business, Held()).replica_seconds, parts.replica_seconds, rel_tol=1e-9, abs_tol=1e-6)
    hourly = gpu_seconds_by_hour(intervals, start, end)
    for business, held in whole.items():
        assert math.isclose(held.gpu_seconds, sum(h.gpu_seconds for (_, b), h in hourly.items() if b == business),
                            rel_tol=1e-9, abs_tol=1e-6)
    assert all(hour % HOUR_S == 0 and h.replica_seconds <= 4 * HOUR_S + 1e-6 for (hour, _), h in hourly.items())


@given(st.floats(T0 + 1, T0 + HOUR_S), st.floats(1, HOUR_S), st.integers(1, 8))
def test_a_moved_replica_is_billed_to_each_business_for_its_share(moved_at, after, gpus):
    changes = [AssignmentChange(T0, "r1", "production", gpus), AssignmentChange(moved_at, "r1", "testing", gpus)]
    until = moved_at + after
    billed = gpu_seconds(assigned_intervals(changes, until), T0, until)
    # (unix times near 1.8e9 carry about 1e-6 s of float error)
    assert math.isclose(billed["production"].gpu_seconds, (moved_at - T0) * gpus, abs_tol=1e-4)
    assert math.isclose(billed["testing"].gpu_seconds, after * gpus, abs_tol=1e-4)
    before_move = gpu_seconds(assigned_intervals(changes, until), T0, moved_at)
    assert set(before_move) == {"production"}


def test_history_rows_become_changes_and_a_pool_delete_ends_them():
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).isoformat()

    rows = [
        {"action": "assign", "target": "pool-a-x1", "timestamp": iso(T0), "after": {"business": "production", "gpus": 2}},
        {"action": "assign", "target": "pool-a-x2", "timestamp": iso(T0), "after": {"business": "testing"}},  # old row
        {"action": "assign", "target": "pool-a-x1", "timestamp": iso(T0 + 100), "after": {"business": "unassigned"}},
        {"action": "assign", "target": "pool-a-x1", "timestamp": iso(T0 + 200), "after": {"business": "testing", "gpus": 2}},
        {"action": "delete", "target": "pool-a", "timestamp": iso(T0 + 300)},
    ]
    billed = gpu_seconds(assigned_intervals(assignment_changes(rows, {"pool-a": 1}), T0 + 1000), T0, T0 + 1000)
    assert billed["production"] == Held(100, 200)
    assert billed["testing"] == Held(100 + 300, 200 + 300)


def test_finetune_runs_are_billed_until_they_end_or_now():
    runs = [TaskRun("(finetune)", 2, T0, T0 + 10), TaskRun("(finetune)", 1, T0 + 5, None), TaskRun("(finetune)", 0, T0, None)]
    assert gpu_seconds(task_intervals(runs, T0 + 20), T0, T0 + 20) == {"(finetune)": Held(25, 35)}


def test_deltas_count_from_the_cursor_and_a_counter_that_went_back_counts_whole():
    cursor = {("prod-svc", None): UsageCounts(requests=5, completion_tokens=50),
              ("gone", "k1"): UsageCounts(requests=9), ("pruned", None): UsageCounts(requests=4)}
    now = {("prod-svc", None): UsageCounts(requests=7, completion_tokens=80, held=1),
           ("gone", "k1"): UsageCounts(requests=2), ("idle", None): UsageCounts()}
    moved = deltas(cursor, now)
    assert moved == {("prod-svc", None): UsageCounts(requests=2, completion_tokens=30, held=1),
                     ("gone", "k1"): UsageCounts(requests=2)}
    assert deltas(now, now) == {}
    assert by_business(moved, {"prod-svc": "production", "gone": "production"}) == {
        ("production", None): UsageCounts(requests=2, completion_tokens=30, held=1), ("production", "k1"): UsageCounts(requests=2)}


def test_report_groups_traffic_and_gpu_time():
    traffic = {(T0, "production", None): UsageCounts(requests=1), (T0, "production", "k1"): UsageCounts(requests=2),
               (T0 + HOUR_S, "production", None): UsageCounts(requests=4)}
    held = {(T0, "production"): Held(10, 20)}
    [one] = report(traffic, held, GroupBy.BUSINESS)
    assert (one.business, one.counts.requests, one.held.gpu_seconds) == ("production", 7, 20)
    keys = report(traffic, held, GroupBy.KEY)
    assert [(r.key_id, r.counts.requests, r.held.gpu_seconds) for r in keys] == [(None, 5, 20), ("k1", 2, 0)]
    hours = report(traffic, held, GroupBy.HOUR)
    assert [(r.hour, r.counts.requests) for r in hours] == [(T0, 3), (T0 + HOUR_S, 4)]


def test_a_replica_lost_behind_corrals_back_is_billed_until_its_replacement():
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).isoformat()

    rows = [
        {"action": "assign", "target": "pool-a-x1", "timestamp": iso(T0), "after": {"business": "production", "gpus": 1}},
        {"action": "assign", "target": "pool-a-x2", "timestamp": iso(T0 + 50), "after": {"business": "production", "gpus": 1},
         "message": "restored: replacement for a lost replica of business 'production' in pool-a"},
    ]
    changes = assignment_changes(rows, {}, present={"pool-a-x2"})
    billed = gpu_seconds(assigned_intervals(changes, T0 + 100), T0, T0 + 100)
    assert billed["production"] == Held(50 + 50, 50 + 50)  # x1 until x2 replaced it, then x2


def test_the_flush_cursor_never_counts_twice_in_a_real_database(tmp_path):
    from datetime import timedelta

    from corral.store.state import StateStore
    from corral.store.usage import UsageStore

    store = UsageStore(StateStore(tmp_path / "corral.db"))
    at = datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc)
    business_of = {"prod-nlb": "production"}
    counters = {("prod-nlb", None): UsageCounts(requests=3, completion_tokens=30)}
    assert store.flush("e1", counters, business_of, at) == {("production", None): UsageCounts(requests=3, completion_tokens=30)}
    assert store.flush("e1", counters, business_of, at) == {}  # flushed again (a restart against a living plane): nothing new
    grown = {("prod-nlb", None): UsageCounts(requests=5, completion_tokens=50, held=1)}
    store.flush("e1", grown, business_of, at + timedelta(hours=1))
    store.flush("e2", {("prod-nlb", None): UsageCounts(requests=1)}, business_of, at + timedelta(hours=1))  # restarted plane
    # a second StateStore on the same file: what a restarted control plane reads
    again = UsageStore(StateStore(tmp_path / "corral.db"))
    traffic = again.traffic(at - timedelta(hours=1), at + timedelta(hours=2))
    hour = at.replace(minute=0).timestamp()
    assert traffic == {(hour, "production", None): UsageCounts(requests=3, completion_tokens=30),
                       (hour + HOUR_S, "production", None): UsageCounts(requests=3, completion_tokens=20, held=1)}
    assert again.prune(at + timedelta(hours=1)) == 1
    assert list(again.traffic(at - timedelta(hours=1), at + timedelta(hours=2))) == [(hour + HOUR_S, "production", None)]


def test_a_report_window_is_validated_naming_the_field():
    import pytest

    from corral.domain.errors import InvalidInput
    from corral.domain.usage import usage_window

    now = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)
    assert usage_window(None, None, now) == (datetime(2026, 12, 6, 12, tzinfo=timezone.utc), now)
    assert usage_window("2026-12-07T10:00", "2026-12-07T11:00:00Z", now)[0] == datetime(2026, 12, 7, 10, tzinfo=timezone.utc)
    for start, end, words in [("x", None, "from must be"), (None, "1" * 80, "to must be"), ("2026-12-07T12:00Z", "2026-12-07", "before"),
                              ("2020-01-01", "2026-01-01", "366 days"), (None, "0001-01-01", "to must be between"),
                              ("9999-12-31", None, "from must be between")]:
        with pytest.raises(InvalidInput, match=words):
            usage_window(start, end, now)


def test_both_planes_meter_per_service_and_key_and_keep_it_when_a_replica_leaves():
    from corral.gateway.nginx_plane import parse_stats
    from corral.gateway.stats import TrafficStats

    stats = TrafficStats()
    stats.finish("prod-nlb", "r1", 0.01, False, tokens=7, prompt_tokens=3, key_id="k1")
    stats.finish("prod-nlb", "r2", 0.01, True)
    stats.rejected[("prod-nlb", 429)] += 1
    stats.rejected[("", 404)] += 1  # a service that does not exist: nobody's
    stats.hold("prod-nlb")
    stats.unhold("prod-nlb", 0.2)
    expected = {("prod-nlb", "k1"): UsageCounts(requests=1, prompt_tokens=3, completion_tokens=7),
                ("prod-nlb", None): UsageCounts(requests=1, errors=1, held=1, rejected=1)}
    assert stats.meter() == expected
    stats.prune(replicas=["r1", "r2"])  # the replicas' counters go; the meter's stay (else they would count again)
    assert stats.meter() == expected
    assert stats.epoch != TrafficStats().epoch
    # nginx's keys for the same (corral_gateway.lua's `finish`), as the control plane parses them
    nginx = parse_stats({"mq:prod-nlb|k1": 1, "mp:prod-nlb|k1": 3, "mc:prod-nlb|k1": 7, "mq:prod-nlb|": 1, "me:prod-nlb|": 1,
                         "rj:prod-nlb|429": 1, "rj:|404": 1, "hb:prod-nlb|3": 1})
    assert nginx.meter() == expected
