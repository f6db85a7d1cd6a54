"""A waiting finetune task preempting running ones (pure): Kueue's LowerPriority rule with serving preemption's order —
never a task at its priority or above, never a task that is not preemptible, the fewest victims, lowest priority
first, then the fewest steps lost, then the most recently started; none when it would not help."""

from __future__ import annotations

from collections.abc import Sequence

from corral.domain.gpu_ledger import GpuClaim, GpuLedger, GpuUnit, Holder
from corral.domain.preemption import (
    TaskOnGpu,
    TaskPreemptionBlock,
    Victim,
    VictimReason,
    plan_task_preemption,
)
from corral.domain.queue import Demand

GIB = 1024**3
HIGH, NORMAL, LOW = 10, 0, -10


def running(name: str, units: Sequence[str], level: int = LOW, lost: int = 0, started: float = 0.0,
            preemptible: bool = True) -> TaskOnGpu:
    return TaskOnGpu(name, level, preemptible, tuple(units), lost, started)


def machine(gpus: int, tasks: Sequence[TaskOnGpu], replicas: dict[str, Sequence[str]] | None = None,
            total_gib: float = 80) -> GpuLedger:
    units = [GpuUnit.parse(str(i), total_gib * GIB, total_gib * GIB) for i in range(gpus)]
    claims = [GpuClaim(Holder.task(t.id), t.units) for t in tasks]
    claims += [GpuClaim(Holder.replica(r), tuple(u)) for r, u in (replicas or {}).items()]
    return GpuLedger.build(units, claims)


def plan(level: int, gpus: int, tasks: Sequence[TaskOnGpu], ledger: GpuLedger, memory_gib: float = 10,
         leaving: Sequence[str] = ()):
    return plan_task_preemption("ft-new", level, Demand(gpus, memory_gib * GIB), tasks, ledger, leaving)


def test_a_high_task_preempts_the_low_preemptible_one_on_the_only_gpu() -> None:
    low = running("ft-low", ["0"], LOW, lost=3)
    decided = plan(HIGH, 1, [low], machine(1, [low]))
    assert decided.victims == (Victim("ft-low", LOW, 3, VictimReason.LOWER_PRIORITY_PREEMPTIBLE),)
    assert decided.units == ("0",) and decided.blocked is None and decided.needed
    assert decided.describe() == ("preempting ft-low (priority -10 < 10, preemptible, 3 step(s) since its last checkpoint) "
                                  "for ft-new")


def test_never_equal_or_higher_priority_never_a_task_that_is_not_preemptible() -> None:
    for victim in (running("ft-peer", ["0"], HIGH), running("ft-above", ["0"], HIGH + 5),
                   running("ft-kept", ["0"], LOW, preemptible=False)):
        decided = plan(HIGH, 1, [victim], machine(1, [victim]))
        assert decided.victims == () and decided.blocked is TaskPreemptionBlock.NO_CANDIDATE, victim
        assert decided.describe() == "no preemptible finetune task below priority 10 holds a GPU"
    normal = running("ft-normal", ["0"], NORMAL)
    assert plan(NORMAL, 1, [normal], machine(1, [normal])).blocked is TaskPreemptionBlock.NO_CANDIDATE
    assert plan(HIGH, 1, [normal], machine(1, [normal])).victims[0].task == "ft-normal"  # strictly below: taken


def test_lowest_priority_first_then_fewest_steps_lost_then_most_recently_started() -> None:
    tasks = [running("ft-normal", ["0"], NORMAL), running("ft-low-old", ["1"], LOW, started=1.0),
             running("ft-low-new", ["2"], LOW, started=5.0), running("ft-low-lossy", ["3"], LOW, lost=9, started=9.0)]
    ledger = machine(4, tasks)
    assert [v.task for v in plan(HIGH, 1, tasks, ledger).victims] == ["ft-low-new"]
    assert [v.task for v in plan(HIGH, 3, tasks, ledger).victims] == ["ft-low-new", "ft-low-old", "ft-low-lossy"]
    assert [v.task for v in plan(HIGH, 4, tasks, ledger).victims][-1] == "ft-normal"


def test_the_fewest_victims_a_wide_one_replaces_narrow_ones_it_makes_unnecessary() -> None:
    tasks = [running("ft-a", ["0"], LOW, started=3.0), running("ft-wide", ["1", "2"], LOW, started=1.0)]
    decided = plan(HIGH, 2, tasks, machine(3, tasks))
    assert [v.task for v in decided.victims] == ["ft-wide"] and set(decided.units) == {"1", "2"}


def test_nothing_is_preempted_when_it_would_not_help_or_is_not_needed() -> None:
    low = running("ft-low", ["0"], LOW)
    ledger = machine(2, [low], replicas={"chat-0": ["1"]})  # a replica holds GPU 1: tasks never take it
    decided = plan(HIGH, 2, [low], ledger)
    assert decided.victims == () and decided.blocked is TaskPreemptionBlock.NOT_ENOUGH
    assert "would not let it start (1 of the 2 GPU(s) with 10.0 GiB)" in decided.describe()
    too_big = plan(HIGH, 1, [low], machine(1, [low], total_gib=8))  # 10 GiB asked, 8 GiB GPU
    assert too_big.victims == () and too_big.blocked is TaskPreemptionBlock.NOT_ENOUGH
    free = plan(HIGH, 1, [low], machine(2, [low]))
    assert free.victims == () and free.units == ("1",) and free.blocked is None  # GPU 1 is free: no preemption
    assert plan(HIGH, 0, [low], machine(1, [low])).blocked is TaskPreemptionBlock.CPU  # CPU slots are not taken


def test_tasks_already_leaving_for_it_count_as_gone_so_a_round_picks_no_more() -> None:
    tasks = [running("ft-leaving", ["0"], LOW), running("ft-other", ["1"], LOW, started=9.0)]
    decided = plan(HIGH, 1, tasks, machine(2, tasks), leaving=["ft-leaving"])
    assert decided.victims == () and decided.units == ("0",)
