"""The usage integral (corral.domain.usage): GPU-seconds from random assignment histories, and counter deltas."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.tasks import TaskState
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


# Finetune runs: every run billed, to the task's business --------------------------------------------------------
# (status changes at increasing times: the status, and whether a trainer is launched again: spawn's `new_run`)
steps_st = st.lists(st.tuples(st.floats(0.5, 500).map(lambda x: round(x, 3)), st.sampled_from([state.value for state in TaskState]),
                              st.booleans()), max_size=25)


@settings(max_examples=300, deadline=None)
@given(steps_st, st.integers(0, 4), st.floats(0, 1))
def test_a_tasks_runs_add_up_to_its_time_preparing_or_training(steps, gpus, cut):
    """Whatever the order of preemptions, resumes and restarts: the runs never overlap, at most the last is open, and
    they bill exactly the GPU time the task spent preparing or training (a restart closes and opens at one instant)."""
    from corral.domain.tasks import ACTIVE
    from corral.domain.usage import billed_runs, runs_after

    t, runs, status, reference = T0, [], TaskState.PENDING, 0.0
    for dt, name, new_run in steps:
        if status in ACTIVE:
            reference += dt * gpus
        t += dt
        status = TaskState(name)
        runs = runs_after(runs, status in ACTIVE, datetime.fromtimestamp(t, timezone.utc), gpus,
                          new_run and status in ACTIVE)
        assert all(r["endedAt"] is not None for r in runs[:-1])
    until = t + 10.0
    if status in ACTIVE:
        reference += 10.0 * gpus  # billed up to now while it runs
    billed = billed_runs(runs, "research")
    assert all(a.end is not None and a.end <= b.start for a, b in zip(billed, billed[1:], strict=False))
    held = gpu_seconds(task_intervals(billed, until), T0, until)
    assert math.isclose(held.get("research", Held()).gpu_seconds, reference, rel_tol=1e-9, abs_tol=1e-3)
    middle = T0 + (until - T0) * cut  # two windows (two flushes, two reports) bill the whole once
    parts = gpu_seconds(task_intervals(billed, until), T0, middle).get("research", Held()) + gpu_seconds(
        task_intervals(billed, until), middle, until).get("research", Held())
    assert math.isclose(parts.gpu_seconds, reference, rel_tol=1e-9, abs_tol=1e-3)
    assert {r.business for r in billed_runs(runs, None)} <= {"(finetune)"}


class FakeRunner:
    """A trainer that runs while its id is in `running` (launch adds it)."""

    admits_itself = False

    def __init__(self) -> None:
        self.running: set[str] = set()

    def launch(self, task, directory, visible):
        self.running.add(task.id)
        return {"pid": 4242, "pid_start": "1"}

    def alive(self, task) -> bool:
        return task.id in self.running

    def failure(self, task) -> str:
        return "exited"

    def waiting(self, task):
        return None

    def preempt(self, task) -> bool:
        return True

    async def stop(self, task) -> None:
        self.running.discard(task.id)


def test_every_run_of_a_preempted_and_restarted_task_is_billed_to_its_business_once(tmp_path, monkeypatch):
    """Through the real lifecycle and database: a task tagged `research` runs, is preempted, runs again, Corral is killed,
    the trainer is found dead and resumed from its checkpoint, and completes: each of its 3 runs is billed to research
    (the old billing had only the last start to the end); an untagged task stays under (finetune) and its run is closed
    when it is found dead. Two reports, and two flushes of the Prometheus counter, give the same GPU-seconds."""
    import asyncio
    import time

    from corral.domain.usage import GroupBy
    from corral.events import EventBus
    from corral.finetune import lifecycle as lifecycle_module
    from corral.finetune.lifecycle import Lifecycle
    from corral.finetune.store import TaskRecord, TaskStore
    from corral.finetune.task_files import TaskFiles
    from corral.intents import Intents
    from corral.metering import Metering
    from corral.store.state import StateStore
    from corral.store.usage import UsageStore

    t0 = (time.time() // HOUR_S - 24) * HOUR_S  # yesterday: reports stop at the real now
    clock = [t0]
    monkeypatch.setattr(lifecycle_module, "now", lambda: datetime.fromtimestamp(clock[0], timezone.utc))

    def lifecycle(state: StateStore, runner: FakeRunner) -> Lifecycle:
        return Lifecycle(TaskStore(state), TaskFiles(tmp_path / "finetune"), runner, EventBus(), Intents(state))  # type: ignore[arg-type]

    def at(t: float) -> datetime:
        return datetime.fromtimestamp(t, timezone.utc)

    state, runner = StateStore(tmp_path / "corral.db"), FakeRunner()
    life = lifecycle(state, runner)
    for task_id, gpus, business in (("ft-a", 2, "research"), ("ft-b", 1, None)):
        life.tasks.add(TaskRecord(id=task_id, status=TaskState.QUEUED, base_model="/m", dataset_path="/d.jsonl",
                                  method="lora", priority="normal", hyperparameters={}, gpus=gpus, business_tag=business,
                                  runs=[], created_at=at(t0 - 1)))
        life.files.dir(task_id).mkdir(parents=True)
    # a task written by an older Corral (no runs recorded), training since t0 on one GPU
    life.tasks.add(TaskRecord(id="ft-old", status=TaskState.TRAINING, base_model="/m", dataset_path="/d.jsonl", method="lora",
                              priority="low", hyperparameters={}, gpus=1, created_at=at(t0 - 1), started_at=at(t0)))
    runner.running.add("ft-old")

    life.spawn(life.get("ft-a"), units=["0", "1"])  # t0: a's first run
    clock[0] = t0 + 100  # a preempted: it saves, exits and waits in the queue; the old task too
    for task_id in ("ft-a", "ft-old"):
        life.tasks.update(task_id, preempted_by={"task": "ft-x", "priority": 10})
        runner.running.discard(task_id)
        life.follow(life.get(task_id))
    assert life.get("ft-a").status == TaskState.QUEUED and life.get("ft-a").started_at is None
    clock[0] = t0 + 300  # GPUs free again: a resumes, b starts
    life.spawn(life.get("ft-a"), units=["0", "1"])
    life.spawn(life.get("ft-b"), units=["2"])
    usage = UsageStore(state)
    now = t0 + 450  # Corral killed at t0 + 400 (nothing written); while down both count as running
    assert gpu_seconds(task_intervals(usage.task_runs(at(t0), at(now)), now), t0, now) == {
        "research": Held(100 + 150, 2 * (100 + 150)), "(finetune)": Held(100 + 150, 100 + 150)}
    state.close()

    # The restart: both trainers found dead at t0 + 500; a resumes from its checkpoint (a new run), b has none (failed).
    clock[0] = t0 + 500
    state = StateStore(tmp_path / "corral.db")
    life = lifecycle(state, FakeRunner())
    (life.files.dir("ft-a") / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (life.files.dir("ft-a") / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    life.recover()
    assert life.get("ft-a").status == TaskState.PREPARING and life.get("ft-b").status == TaskState.FAILED
    clock[0] = t0 + 600
    life.tasks.update("ft-a", output="/out")  # the trainer reported its result and exited
    life.runner.running.discard("ft-a")  # type: ignore[attr-defined]
    life.follow(life.get("ft-a"))
    a = life.get("ft-a")
    assert a.status == TaskState.COMPLETED
    assert [(r["startedAt"], r["endedAt"], r["gpus"]) for r in a.runs or []] == [
        (at(t0).isoformat(), at(t0 + 100).isoformat(), 2), (at(t0 + 300).isoformat(), at(t0 + 500).isoformat(), 2),
        (at(t0 + 500).isoformat(), at(t0 + 600).isoformat(), 2)]

    end = t0 + 1000
    expected = {"research": Held(100 + 200 + 100, 2 * (100 + 200 + 100)), "(finetune)": Held(200 + 100, 200 + 100)}
    usage = UsageStore(state)
    assert gpu_seconds(task_intervals(usage.task_runs(at(t0), at(end)), end), t0, end) == expected
    split = t0 + 250  # two windows: each run counted once, split where it crosses
    first = gpu_seconds(task_intervals(usage.task_runs(at(t0), at(split)), end), t0, split)
    second = gpu_seconds(task_intervals(usage.task_runs(at(split), at(end)), end), split, end)
    assert {b: first.get(b, Held()) + second.get(b, Held()) for b in expected} == expected

    # What GET /api/usage?groupBy=business answers (Metering.report), twice; and the Prometheus counter over two flushes.
    class Plane:
        epoch = "e1"

        async def refresh(self) -> None:
            return None

        def snapshot(self):
            return self

        def meter(self):
            return {}

    metering = Metering(state, lambda: Plane(), lambda: {}, lambda: [], 30, 90)  # type: ignore[arg-type,return-value]
    for _ in range(2):
        rows = {r.business: r.held.gpu_seconds for r in metering.report(at(t0), at(end), GroupBy.BUSINESS, set())}
        assert rows == {"research": 800.0, "(finetune)": 300.0}
    metering._started = t0 - 10
    for _ in range(2):
        metering._held_at = 0.0
        asyncio.run(metering.flush())
        assert {b: h.gpu_seconds for b, h in metering._held_since_start.items()} == {"research": 800.0, "(finetune)": 300.0}
    assert 'corral_usage_gpu_seconds_total{business="research"} 800.000' in metering.metrics()
    state.close()
