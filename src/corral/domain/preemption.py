"""Preemption: which running finetune tasks give their GPUs to a replica of a higher-priority business, or to a
higher-priority waiting finetune task (`plan_task_preemption`, below). Pure.

GPUs are shared both ways on one priority scale (`domain.queue.PRIORITY_LEVELS`: a task's low / normal /
high is -10 / 0 / 10; a business's priority is its autopilot policy's integer, 0 without one). When a
business needs a replica (the autopilot wants to scale out, or a person scales with `"preempt": true`) and
the GPU ledger has too few free GPUs, running tasks that are `preemptible` and strictly below the
business's priority may be asked to checkpoint and stop; they go back to the queue and resume from that
checkpoint once GPUs free up (the manager carries this out: `corral.finetune.manager`).

Which tasks: the fewest that free enough whole GPUs (replicas take whole GPUs), chosen lowest priority
first; among equals, the task that loses the fewest steps since its last checkpoint (the trainer saves on
the signal, so normally none — but if it cannot save in time it is stopped and loses those), then the newest
(least work of its own invested since it started). Nothing is preempted when even all candidates would not
free enough: stopping training for a replica that still cannot start helps nobody.

The same scale decides the opposite direction, reclaim (`domain.reclaim`): a waiting task may scale in
unassigned replicas of a pool only when its priority is above the pool's (its businesses' highest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from corral.domain.gpu_ledger import GpuLedger, Holder
from corral.domain.history import HistoryDraft, Intent
from corral.domain.queue import Demand, Unit, fit

DEFAULT_BUSINESS_PRIORITY = 0  # a business without an autopilot policy, and a pool without businesses


@dataclass(frozen=True)
class PreemptionRequest:
    """A business that needs GPUs for a replica of `pool` (the autopilot's scale-out, or a scale with `preempt`)."""

    pool: str
    business: str | None  # None: a pool without businesses (a manual scale), at DEFAULT_BUSINESS_PRIORITY
    priority: int
    gpus: int  # whole GPUs the new replicas need
    # The scale-out's history row (its target, `history.PREEMPTING`): written pending with the preemption's rows, as
    # one intent, before any trainer is asked — a restart in between then carries the scale out again
    # (`history.ScaleRedo`) instead of leaving stopped trainers and no replica. None: nothing to record with them.
    scale: HistoryDraft | None = None

    def describe(self) -> str:
        who = f"business '{self.business}'" if self.business else f"pool '{self.pool}'"
        return f"{who} (priority {self.priority})"


@dataclass(frozen=True)
class PreemptionOutcome:
    """What a preemption did: the tasks that checkpointed and gave their GPUs (none when enough were free already or
    when preempting could not help: `why_not`), and the GPUs kept for the new replicas until the scale is done."""

    tasks: tuple[str, ...] = ()
    freed: tuple[str, ...] = ()
    why_not: str = ""
    scale: Intent | None = None  # the request's scale row, written (pending) with the preemption: the scale completes it


@dataclass(frozen=True)
class TaskOnGpu:
    """A running finetune task as preemption sees it."""

    id: str
    level: int  # its priority on the shared scale (PRIORITY_LEVELS)
    preemptible: bool
    units: tuple[str, ...]  # the GPU units it holds (the ledger's Holder.task(id))
    steps_since_checkpoint: int  # what it would lose if stopped without saving
    started_at: float  # seconds (any clock, the same for all)


@dataclass(frozen=True)
class PreemptionPlan:
    victims: tuple[str, ...] = ()  # task ids, in the order they were chosen
    freed: tuple[str, ...] = ()  # the whole GPUs free once they are gone (those free already included)
    why_not: str = ""  # set when preemption was needed but cannot help

    @property
    def needed(self) -> bool:
        return bool(self.victims)


def victim_order(tasks: Sequence[TaskOnGpu]) -> list[TaskOnGpu]:
    """Lowest priority first, then fewest steps lost since the last checkpoint, then newest, then id."""
    return sorted(tasks, key=lambda t: (t.level, t.steps_since_checkpoint, -t.started_at, t.id))


def plan_preemption(gpus: int, level: int, tasks: Sequence[TaskOnGpu], ledger: GpuLedger) -> PreemptionPlan:
    """The tasks to preempt so that `gpus` whole GPUs are free for a replica of a business at `level`.
    No victims (and no `why_not`) when enough are free already."""
    if gpus <= 0:
        return PreemptionPlan()
    free = _free(ledger)
    if len(free) >= gpus:
        return PreemptionPlan(freed=free[:gpus])
    candidates = victim_order([t for t in tasks if t.preemptible and t.level < level and t.units])
    if not candidates:
        return PreemptionPlan(why_not=f"no preemptible finetune task below priority {level} holds a GPU")
    chosen: list[TaskOnGpu] = []
    after = ledger
    for task in candidates:
        after = after.release(Holder.task(task.id))
        chosen.append(task)
        if len(_free(after)) >= gpus:
            break
    else:
        return PreemptionPlan(why_not=f"stopping every preemptible finetune task below priority {level} would free "
                                      f"{len(_free(after))} of the {gpus} GPU(s) needed")
    # A victim picked early may have become unnecessary (a later one freed more): keep only those needed.
    for task in reversed(chosen[:-1]):
        rest = [t for t in chosen if t is not task]
        if len(_free(_without(ledger, rest))) >= gpus:
            chosen = rest
    return PreemptionPlan(tuple(t.id for t in chosen), _free(_without(ledger, chosen))[:gpus])


def business_priority(priorities: Mapping[str, int]) -> tuple[int, str | None]:
    """A pool's priority on the shared scale: its businesses' highest (business → policy priority), and which
    business that is (the lowest name among equals); (0, None) for a pool without businesses."""
    if not priorities:
        return DEFAULT_BUSINESS_PRIORITY, None
    business = min(priorities, key=lambda b: (-priorities[b], b))
    return priorities[business], business


def may_reclaim(task_level: int, pool_level: int) -> bool:
    """A task may take a pool's unassigned replicas only when it ranks strictly above the pool's businesses."""
    return task_level > pool_level


def steps_since(step: int | None, checkpoint_step: int | None) -> int:
    """Steps a task would lose if stopped now: those after its newest complete checkpoint."""
    return max(0, (step or 0) - (checkpoint_step or 0))


def _free(ledger: GpuLedger) -> tuple[str, ...]:
    return tuple(u.id for u in ledger.free_units(whole_only=True))


def _without(ledger: GpuLedger, tasks: Sequence[TaskOnGpu]) -> GpuLedger:
    for task in tasks:
        ledger = ledger.release(Holder.task(task.id))
    return ledger


# Finetune tasks preempting finetune tasks ------------------------------------------------------------------------
# A high-priority task waiting for GPUs takes them from lower-priority preemptible running tasks, with the rules above
# (Kueue's `withinClusterQueue: LowerPriority`): never a task at its priority or above, never one that is not
# preemptible; the fewest victims, lowest priority first, then the fewest steps lost, then the most recently started;
# none when even all of them would not let it start. The manager carries it out like a business's preemption
# (`corral.finetune.preemption`): intent first, the signal, the checkpoint, back to the queue, resumed later.


class TaskPreemptionBlock(StrEnum):
    """Why a waiting task preempts nobody (`TaskPreemptionPlan.blocked`)."""

    CPU = "cpu"  # it trains on the CPU: CPU slots are not taken from running tasks
    NO_CANDIDATE = "no-candidate"  # no running task strictly below it is preemptible and holds a GPU
    NOT_ENOUGH = "not-enough"  # stopping every candidate would still not let it start


class VictimReason(StrEnum):
    """Why a running task was chosen (`Victim.reason`): the only reason there is, kept typed so that a caller (and a
    test) states it rather than infers it."""

    LOWER_PRIORITY_PREEMPTIBLE = "lower-priority-preemptible"


@dataclass(frozen=True)
class Victim:
    task: str
    level: int  # its priority on the shared scale, strictly below the preemptor's
    steps_lost: int  # steps since its last checkpoint (saved on the signal: normally none are lost)
    reason: VictimReason = VictimReason.LOWER_PRIORITY_PREEMPTIBLE

    def describe(self, preemptor_level: int) -> str:
        return (f"{self.task} (priority {self.level} < {preemptor_level}, preemptible, {self.steps_lost} step(s) since its "
                "last checkpoint)")


@dataclass(frozen=True)
class TaskPreemptionPlan:
    task: str  # the waiting task the GPUs are for
    level: int
    victims: tuple[Victim, ...] = ()  # in the order chosen
    units: tuple[str, ...] = ()  # what the task gets once the victims (and the tasks already leaving for it) are gone
    blocked: TaskPreemptionBlock | None = None  # set when preemption would be needed and cannot help
    detail: str = ""  # the numbers behind `blocked`

    @property
    def needed(self) -> bool:
        return bool(self.victims)

    def describe(self) -> str:
        if self.victims:
            return f"preempting {', '.join(v.describe(self.level) for v in self.victims)} for {self.task}"
        if self.blocked is TaskPreemptionBlock.NO_CANDIDATE:
            return f"no preemptible finetune task below priority {self.level} holds a GPU"
        if self.blocked is TaskPreemptionBlock.NOT_ENOUGH:
            return f"stopping every preemptible finetune task below priority {self.level} would not let it start ({self.detail})"
        if self.blocked is TaskPreemptionBlock.CPU:
            return "a CPU task preempts nobody"
        return f"{self.task} fits without preempting anyone"


def plan_task_preemption(task: str, level: int, demand: Demand, running: Sequence[TaskOnGpu], ledger: GpuLedger,
                         leaving: Sequence[str] = ()) -> TaskPreemptionPlan:
    """The running tasks to preempt so that waiting `task` (at `level`) can start on `demand` (units with at least
    `demand.memory_per_gpu` bytes free each: its estimate plus the preflight's margin). `ledger`: the queue's (GPUs
    kept for replicas held). `leaving`: tasks already asked to give their GPUs to `task` (still stopping): planned as
    gone, so a second round does not pick more victims while the first ones save. No victims when it fits already."""
    if demand.gpus == 0:
        return TaskPreemptionPlan(task, level, blocked=TaskPreemptionBlock.CPU)
    for gone in leaving:
        ledger = ledger.release(Holder.task(gone))
    if (units := _fits(demand, ledger)) is not None:
        return TaskPreemptionPlan(task, level, units=units)
    candidates = victim_order([t for t in running if t.preemptible and t.level < level and t.units and t.id not in leaving])
    if not candidates:
        return TaskPreemptionPlan(task, level, blocked=TaskPreemptionBlock.NO_CANDIDATE)
    chosen: list[TaskOnGpu] = []
    after = ledger
    for candidate in candidates:
        after = after.release(Holder.task(candidate.id))
        chosen.append(candidate)
        if _fits(demand, after) is not None:
            break
    else:
        enough = sum(1 for u in after.free_units() if u.memory_free_bytes >= demand.memory_per_gpu)
        return TaskPreemptionPlan(task, level, blocked=TaskPreemptionBlock.NOT_ENOUGH,
                                  detail=f"{enough} of the {demand.gpus} GPU(s) with {demand.memory_per_gpu / 1024**3:.1f} GiB")
    for candidate in reversed(chosen[:-1]):  # the fewest: drop a victim a later one made unnecessary
        rest = [t for t in chosen if t is not candidate]
        if _fits(demand, _without(ledger, rest)) is not None:
            chosen = rest
    units = _fits(demand, _without(ledger, chosen)) or ()
    return TaskPreemptionPlan(task, level, tuple(Victim(t.id, t.level, t.steps_since_checkpoint) for t in chosen), units)


def _fits(demand: Demand, ledger: GpuLedger) -> tuple[str, ...] | None:
    return fit(demand, [Unit(u.id, u.memory_free_bytes) for u in ledger.free_units()], 0)
