from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.queue import Capacity, Demand, Priority, Strategy, Unit, WaitingTask, queue_order, schedule

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
    assert first.waiting["t2"] == "waiting for a CPU training slot" and first.waiting["t3"] == "queued behind t2"
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
    assert strict.starts == [] and strict.waiting["big"] == "waiting for GPU: needs 2 with 10.0GB free, 1 available"
    best = schedule(tasks, capacity, Strategy.BEST_EFFORT_FIFO)
    assert best.starts == [("small", ("0",))] and best.bypassed == ["big"]


def test_starvation_guard_stops_passing_a_head_bypassed_too_often() -> None:
    tasks = [task("big", gpus=2, at=0, bypassed=3), task("small", gpus=1, at=1)]
    decision = schedule(tasks, Capacity(gpus(80)), Strategy.BEST_EFFORT_FIFO, max_bypass=3)
    assert decision.starts == [] and decision.waiting["small"] == "queued behind big"


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
