from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.queue import (
    Capacity,
    Demand,
    Priority,
    Strategy,
    Unit,
    Wait,
    WaitingTask,
    WaitReason,
    queue_order,
    schedule,
)

GB = 1024**3


def task(tid: str, gpus: int = 1, mem_gb: float = 10, priority: Priority = Priority.NORMAL, at: float = 0, bypassed: int = 0) -> WaitingTask:
    return WaitingTask(tid, priority, at, Demand(gpus, mem_gb * GB), bypassed)


def gpus(*free_gb: float) -> tuple[Unit, ...]:
    return tuple(Unit(str(i), f * GB) for i, f in enumerate(free_gb))


def test_spec_example_on_a_cpu_only_machine() -> None:
    """Three tasks at once, one CPU slot: 1 trains, 2 and 3 queue; then 2, then 3."""
    waiting = [WaitingTask(t, Priority.NORMAL, i, Demand()) for i, t in enumerate(["t1", "t2", "t3"])]
    first = schedule(waiting, Capacity(cpu_slots=1), Strategy.STRICT_FIFO)
    assert first.starts == [("t1", ())] and set(first.waiting) == {"t2", "t3"}
    assert first.waiting == {"t2": Wait(WaitReason.CPU_SLOT), "t3": Wait(WaitReason.BEHIND, task="t2")}
    assert str(first.waiting["t2"]) == "waiting for a CPU training slot" and str(first.waiting["t3"]) == "queued behind t2"
    second = schedule(waiting[1:], Capacity(cpu_slots=1), Strategy.STRICT_FIFO)
    assert second.starts == [("t2", ())]


def test_priority_then_submission_time() -> None:
    tasks = [task("low", priority=Priority.LOW, at=0), task("n2", at=2), task("high", priority=Priority.HIGH, at=5), task("n1", at=1)]
    assert [t.id for t in queue_order(tasks)] == ["high", "n1", "n2", "low"]
    assert schedule(tasks, Capacity(gpus(80)), Strategy.STRICT_FIFO).starts == [("high", ("0",))]


def test_strict_head_blocks_best_effort_lets_small_tasks_pass() -> None:
    tasks = [task("big", gpus=2, at=0), task("small", gpus=1, at=1)]
    capacity = Capacity(gpus(80))
    strict = schedule(tasks, capacity, Strategy.STRICT_FIFO)
    assert strict.starts == [] and strict.waiting["big"] == Wait(WaitReason.GPUS, gpus=2, memory_per_gpu=10 * GB, available=1)
    assert str(strict.waiting["big"]) == "waiting for GPU to be released: needs 2 with 10.0GB free, 1 available"
    best = schedule(tasks, capacity, Strategy.BEST_EFFORT_FIFO)
    assert best.starts == [("small", ("0",))] and best.bypassed == ["big"]


def test_starvation_guard_stops_passing_a_head_bypassed_too_often() -> None:
    tasks = [task("big", gpus=2, at=0, bypassed=3), task("small", gpus=1, at=1)]
    decision = schedule(tasks, Capacity(gpus(80)), Strategy.BEST_EFFORT_FIFO, max_bypass=3)
    assert decision.starts == [] and decision.waiting["small"] == Wait(WaitReason.BEHIND, task="big")


def test_memory_fit_respects_free_memory_and_prefers_the_smallest_sufficient_unit() -> None:
    units = gpus(80, 24, 12)
    assert schedule([task("a", mem_gb=20)], Capacity(units), Strategy.STRICT_FIFO).starts == [("a", ("1",))]
    assert schedule([task("a", mem_gb=90)], Capacity(units), Strategy.STRICT_FIFO).starts == []
    several = schedule([task("a", mem_gb=10), task("b", mem_gb=10, at=1), task("c", mem_gb=10, at=2)], Capacity(units),
                       Strategy.STRICT_FIFO)
    assert several.starts == [("a", ("2",)), ("b", ("1",)), ("c", ("0",))]


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 80), st.sampled_from(list(Priority)), st.integers(0, 5)), max_size=25),
    st.lists(st.integers(0, 80), max_size=8),
    st.integers(0, 2),
    st.sampled_from(list(Strategy)),
)
def test_schedule_properties(specs, free, cpu_slots, strategy) -> None:
    tasks = [task(f"t{i:02d}", g, m, p, at=i, bypassed=b) for i, (g, m, p, b) in enumerate(specs)]
    capacity = Capacity(gpus(*free), cpu_slots)
    decision = schedule(tasks, capacity, strategy)
    started = [tid for tid, _ in decision.starts]
    # Every task is either started or waiting with a reason; no unit is given twice; demands are met.
    assert set(started) | set(decision.waiting) == {t.id for t in tasks} and not set(started) & set(decision.waiting)
    given_units = [u for _, units in decision.starts for u in units]
    assert len(given_units) == len(set(given_units))
    by_id = {t.id: t for t in tasks}
    free_by_id = {u.id: u.free_bytes for u in capacity.units}
    for tid, units in decision.starts:
        assert len(units) == by_id[tid].demand.gpus and all(free_by_id[u] >= by_id[tid].demand.memory_per_gpu for u in units)
    assert sum(1 for _, units in decision.starts if not units) <= cpu_slots
    # Strict FIFO starts a prefix of the queue order.
    order = [t.id for t in queue_order(tasks)]
    if strategy == Strategy.STRICT_FIFO:
        assert started == order[: len(started)]
    # Deterministic.
    assert schedule(list(reversed(tasks)), capacity, strategy).starts == decision.starts


# --- easy-backfill -------------------------------------------------------------------------------------------------

import math  # noqa: E402

from corral.domain.queue import Decision, Reservation, RunningTask, carried_promises, estimated_end, reserve  # noqa: E402


def run(tid: str, units: tuple[str, ...], ends_at: float, free_gb: float = 80) -> RunningTask:
    return RunningTask(tid, tuple(Unit(u, free_gb * GB) for u in units), ends_at)


def timed(tid: str, gpus: int, estimated_s: float | None, at: float = 0, priority: Priority = Priority.NORMAL) -> WaitingTask:
    return WaitingTask(tid, priority, at, Demand(gpus, 10 * GB), estimated_s=estimated_s)


def test_easy_backfill_reserves_the_head_and_lets_only_harmless_tasks_pass() -> None:
    """4 GPUs: 0 and 1 free; a 2-GPU task ends at t=100 (units 2, 3). The head wants 4: reserved at t=100 on all
    four. A 1-GPU task of 50 s ends before then and starts; one of 500 s would delay the head and waits."""
    capacity = Capacity(gpus(80, 80), running=(run("r", ("2", "3"), 100.0),), now=0.0)
    waiting = [timed("head", 4, 1000), timed("short", 1, 50, at=1), timed("long", 1, 500, at=2)]
    decision = schedule(waiting, capacity, Strategy.EASY_BACKFILL)
    assert decision.reservations == {"head": Reservation(100.0, ("2", "3", "0", "1"))}
    assert decision.starts == [("short", ("0",))]
    assert decision.waiting["long"] == Wait(WaitReason.RESERVED, task="head")
    assert str(decision.waiting["long"]) == "waiting for GPU to be released: starting now could delay head, which has GPUs reserved"
    assert decision.waiting["head"].reason is WaitReason.GPUS and decision.waiting["head"].gpus == 4
    unknown = schedule([timed("head", 4, 1000), timed("no-estimate", 1, None, at=1)], capacity, Strategy.EASY_BACKFILL)
    assert unknown.starts == []  # no bound on its run time: it may only use units the reservation leaves (none here)


def test_easy_backfill_uses_units_the_head_will_not_need_for_as_long_as_it_likes() -> None:
    """The head wants 3; units 2 and 3 free up at t=100, so one of the units free now is not reserved."""
    capacity = Capacity(gpus(80, 80), running=(run("r", ("2", "3"), 100.0),), now=0.0)
    decision = schedule([timed("head", 3, 10), timed("a", 1, 10_000, at=1), timed("b", 1, None, at=2)], capacity,
                        Strategy.EASY_BACKFILL)
    assert decision.reservations["head"] == Reservation(100.0, ("2", "3", "0"))
    assert decision.starts == [("a", ("1",))] and "b" in decision.waiting  # one spare unit; b would need unit 0
    three_free = Capacity(gpus(80, 80, 80), running=(run("r", ("3", "4"), 100.0),), now=0.0)
    two = schedule([timed("head", 4, 10), timed("a", 1, None, at=1), timed("b", 1, None, at=2)], three_free,
                   Strategy.EASY_BACKFILL)
    assert two.reservations["head"].units == ("3", "4", "0", "1")  # released units first: free ones stay spare
    assert two.starts == [("a", ("2",))] and "b" in two.waiting


def test_easy_backfill_without_a_reservation_in_sight_behaves_like_best_effort() -> None:
    """A head that cannot fit even when every running task has ended (units held by replicas) gets no reservation:
    nothing could delay it, so what fits starts. CPU tasks are another resource: a GPU head never blocks them."""
    capacity = Capacity(gpus(80), cpu_slots=1, running=(run("forever", ("1",), math.inf),), now=0.0)
    decision = schedule([timed("head", 2, 10), timed("small", 1, 10_000, at=1), WaitingTask("cpu", Priority.LOW, 3, Demand())],
                        capacity, Strategy.EASY_BACKFILL)
    assert decision.reservations == {} and decision.starts == [("small", ("0",)), ("cpu", ())]


def test_tasks_started_in_the_same_round_count_for_the_reservation() -> None:
    """'first' starts now on both GPUs for 30 s; the head, behind it, is reserved at now + 30."""
    decision = schedule([timed("first", 2, 30), timed("head", 2, 10, at=1)], Capacity(gpus(80, 80), now=1000.0),
                        Strategy.EASY_BACKFILL)
    assert decision.starts == [("first", ("0", "1"))] and decision.reservations["head"] == Reservation(1030.0, ("0", "1"))


def test_slack_lets_a_task_end_a_little_after_the_reservation_and_the_promise_is_kept() -> None:
    """The head (4 GPUs) is reserved at t=100; a 1-GPU task of 130 s ends 30 s after that. Pure EASY leaves GPU 0
    idle until then; with 60 s of slack it starts, and the head is promised a start by 160. A promise from an earlier
    round is kept, not renewed: one of 140 leaves no room for it from t=20 (it would end at 150). When a running
    task ending early brings the reservation sooner, backfilling counts from the sooner one. A reservation past the
    promise (a higher-priority task took the head's place) gets a new one. A high-priority head gets no slack.
    (Every task here has waited 1000 s: the slack is at most what the head has waited, below.)"""
    capacity = Capacity(gpus(80, 80), running=(run("r", ("2", "3"), 100.0),), now=0.0)
    waiting = [timed("head", 4, 1000, at=-1000), timed("fill", 1, 130, at=-999), timed("long", 1, 170, at=-998)]
    assert schedule(waiting, capacity, Strategy.EASY_BACKFILL).starts == []
    slack = schedule(waiting, capacity, Strategy.EASY_BACKFILL, backfill_slack_s=60.0)
    assert slack.starts == [("fill", ("0",))] and "long" in slack.waiting
    assert slack.reservations["head"] == Reservation(100.0, ("2", "3", "0", "1"), promised_start=160.0, slack_s=60.0)
    assert slack.reservations["head"].start_by == 160.0

    def round_with(promised: float | None, now: float = 0.0, priority: Priority = Priority.NORMAL) -> Decision:
        head = replace(waiting[0], promised_start=promised, priority=priority)
        return schedule([head, *waiting[1:]], replace(capacity, now=now), Strategy.EASY_BACKFILL, backfill_slack_s=60.0)

    kept = round_with(140.0, now=20.0)
    assert kept.starts == [] and kept.reservations["head"].promised_start == 140.0
    assert round_with(140.0).starts == [("fill", ("0",))]  # from t=0 it ends at 130
    sooner = round_with(500.0)  # promised when the running task's estimate was later
    assert (sooner.reservations["head"].promised_start, sooner.reservations["head"].start_by) == (500.0, 160.0)
    renewed = round_with(90.0)
    assert (renewed.reservations["head"].promised_start, renewed.reservations["head"].start_by) == (160.0, 160.0)
    urgent = round_with(None, priority=Priority.HIGH)
    assert urgent.starts == [] and urgent.reservations["head"] == Reservation(100.0, ("2", "3", "0", "1"))
    assert urgent.reservations["head"].promised_start is None  # no slack, no promise: nothing to keep between rounds
    assert schedule(waiting, capacity, Strategy.EASY_BACKFILL).reservations == urgent.reservations  # pure EASY


def test_the_slack_is_at_most_what_the_head_has_waited() -> None:
    """On a quiet machine a head reserved just after it arrived is not delayed by its slack: a task submitted a
    moment ago gets none (pure EASY), one that has waited 20 s may slip 20 s, one that has waited an hour the whole
    60 s. So the slack bites only in a backlog, where it is small next to the waits."""
    capacity = Capacity(gpus(80, 80), running=(run("r", ("2", "3"), 100.0),), now=0.0)

    def promise(waited: float) -> float | None:
        head, fill = timed("head", 4, 1000, at=-waited), timed("fill", 1, 130, at=-waited + 0.5)
        return schedule([head, fill], capacity, Strategy.EASY_BACKFILL, backfill_slack_s=60.0).reservations["head"].promised_start

    assert (promise(0.0), promise(20.0), promise(3600.0)) == (None, 120.0, 160.0)


def test_a_head_keeps_its_promise_and_a_task_no_longer_the_head_has_none() -> None:
    """`carried_promises`: what the caller stores after a round — only changes."""
    capacity = Capacity(gpus(80, 80), running=(run("r", ("2", "3"), 100.0),), now=0.0)
    head, fill = timed("head", 4, 1000, at=-1000), timed("fill", 1, 130, at=-999)
    first = schedule([head, fill], capacity, Strategy.EASY_BACKFILL, backfill_slack_s=60.0)
    assert carried_promises([head, fill], first) == {"head": 160.0}  # fill starts: nothing to carry for it
    kept = replace(head, promised_start=160.0)
    assert carried_promises([kept], schedule([kept], capacity, Strategy.EASY_BACKFILL, backfill_slack_s=60.0)) == {}
    urgent = timed("urgent", 4, 10, priority=Priority.HIGH)  # takes the head's place: the old head's promise is void
    displaced = schedule([kept, urgent], capacity, Strategy.EASY_BACKFILL, backfill_slack_s=60.0)
    assert carried_promises([kept, urgent], displaced) == {"head": None}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 200), st.sampled_from(list(Priority))), min_size=1, max_size=14),
    st.sampled_from([0.0, 30.0, 100.0]),
)
def test_with_slack_every_head_starts_by_its_first_reservation_plus_the_slack(specs, slack) -> None:
    """Every round of a whole run, 4 GPUs, every task known from t=0 and running exactly its estimate (so a head stays
    the head until it starts): each reserved head starts by its first reservation plus the slack (none for high), and
    its promise never changes. This fails if the promise were renewed each round: backfilled tasks would push it."""
    tasks = {f"t{i:02d}": WaitingTask(f"t{i:02d}", p, i, Demand(g, 10 * GB), estimated_s=float(d))
             for i, (g, d, p) in enumerate(specs)}
    now, free, running, started, first, promised = 0.0, set("0123"), {}, {}, {}, {}
    while len(started) < len(tasks):
        waiting = [replace(t, promised_start=promised.get(t.id)) for t in tasks.values() if t.id not in started]
        decision = schedule(waiting, Capacity(tuple(Unit(u, 80 * GB) for u in sorted(free)), now=now, running=tuple(
            RunningTask(r, tuple(Unit(u, 80 * GB) for u in units), end) for r, (units, end) in running.items())),
            Strategy.EASY_BACKFILL, backfill_slack_s=slack)
        for head_id, held in decision.reservations.items():
            first.setdefault(head_id, held.at)
            if head_id in promised:
                assert held.promised_start == promised[head_id]
        promised |= carried_promises(waiting, decision)  # what the manager stores
        for tid, units in decision.starts:
            started[tid] = now
            free -= set(units)
            running[tid] = (units, now + (tasks[tid].estimated_s or 0.0))
        if running:  # the next event: the first running task to end
            tid = min(running, key=lambda r: (running[r][1], r))
            units, now = running.pop(tid)
            free |= set(units)
    for tid, at in first.items():
        assert started[tid] <= at + (0.0 if tasks[tid].priority == Priority.HIGH else slack) + 1e-9


def test_reservation_and_estimated_end() -> None:
    running = [run("a", ("1",), 50.0), run("b", ("2",), 20.0), run("c", ("3",), math.inf)]
    assert reserve(Demand(2, 0), gpus(80)[:1], running, now=10.0) == Reservation(20.0, ("2", "0"))
    assert reserve(Demand(3, 0), gpus(80)[:1], running, now=10.0) == Reservation(50.0, ("1", "2", "0"))  # freed last first
    assert reserve(Demand(4, 0), gpus(80)[:1], running, now=10.0) is None  # needs c, whose end is unknown
    assert reserve(Demand(1, 50 * GB), (), [run("small", ("1",), 5.0, free_gb=40)], 0.0) is None  # memory counts
    assert estimated_end(100.0, 60.0, None, now=120.0) == 160.0  # start + timeout
    assert estimated_end(100.0, 60.0, 130.0, now=120.0) == 130.0  # the trainer's ETA, sooner
    assert estimated_end(100.0, 60.0, 110.0, now=120.0) == 120.0  # an ETA already past: now
    assert estimated_end(None, 60.0, "soon", now=0.0) == 60.0  # not started (Kueue), a malformed ETA


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 200), st.booleans()), min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 300)), max_size=4),
    st.integers(0, 4),
)
def test_easy_backfill_never_delays_the_head_beyond_its_reservation(specs, running_specs, n_free) -> None:
    """Simulate from the decision on, every task running exactly its estimate: whatever was backfilled, the
    reserved head can start at its reservation time on its reserved units."""
    unit_ids = iter(str(i) for i in range(100))
    free = tuple(Unit(next(unit_ids), 80 * GB) for _ in range(n_free))
    running = tuple(RunningTask(f"r{i}", tuple(Unit(next(unit_ids), 80 * GB) for _ in range(g)), float(end))
                    for i, (g, end) in enumerate(running_specs))
    tasks = [WaitingTask(f"t{i:02d}", Priority.NORMAL, i, Demand(g, 10 * GB), estimated_s=float(d) if known else None)
             for i, (g, d, known) in enumerate(specs)]
    decision = schedule(tasks, Capacity(free, running=running, now=0.0), Strategy.EASY_BACKFILL)
    by_id = {t.id: t for t in tasks}
    started = dict(decision.starts)
    given_units = [u for units in started.values() for u in units]
    assert len(given_units) == len(set(given_units)) and set(given_units) <= {u.id for u in free}
    for head_id, held in decision.reservations.items():
        assert head_id not in started
        head_index = [t.id for t in queue_order(tasks)].index(head_id)
        for tid, units in decision.starts:
            if [t.id for t in queue_order(tasks)].index(tid) < head_index:
                continue  # ahead of the head in the queue: counted in its reservation already
            estimate = by_id[tid].estimated_s
            if set(units) & set(held.units):  # a backfilled task on a reserved unit ends by the reservation time
                assert estimate is not None and estimate <= held.at
        # Every reserved unit is free at the reservation time: free now and untaken (or returned by then), or
        # released by a running task (or a task started in this round) that ends by then.
        ends = {u.id: r.ends_at for r in running for u in r.units}
        ends |= {u: by_id[tid].estimated_s if by_id[tid].estimated_s is not None else math.inf
                 for tid, units in decision.starts for u in units}
        for unit in held.units:
            assert ends.get(unit, 0.0) <= held.at
