"""Finetune queue policy: which waiting tasks start now, on which GPUs. Pure: no clock, no I/O.

Order: priority (high, normal, low), then submission time, then id — so equal inputs always give
equal decisions. Two named strategies, as in Kueue:

- `strict-fifo`: only the head of the queue may start; if it does not fit, everyone waits
  (spec 02's original behaviour, generalised to priorities).
- `best-effort-fifo`: tasks are tried in order and each one that fits starts, so a small task may
  pass a head that is waiting for a big GPU. Guard against starvation: every pass counts against
  the head; once a task has been passed `max_bypass` times, nothing may pass it any more — the queue
  behaves strictly until it starts.
- `easy-backfill` (EASY backfilling, as in Slurm's backfill scheduler and the Argonne EASY scheduler): the
  first GPU task that does not fit (the head) gets a *reservation*: the earliest time enough units free up,
  from the running tasks' estimated ends (`Capacity.running`), and the units it will get then. A later task
  may start now only if it cannot delay that reservation: it fits in units the reservation does not need,
  or it is certain to end before the reservation time (`WaitingTask.estimated_s`, an upper bound such as its
  timeout, is known and now + it ≤ the reservation time). So small tasks fill the holes a big head leaves
  (utilisation of best-effort) while the head starts no later than reserved (the guarantee strict FIFO
  gives), and no bypass counter is needed. Estimates that are upper bounds keep the guarantee: a running
  task that ends early only moves the reservation earlier. A head that cannot fit even when every running
  task has ended (units held by serving replicas, which have no end) gets no reservation: nothing can delay
  a start that is not in sight, so any task that fits starts.

  *Slack* (`backfill_slack_s`; slack-based backfilling, Talby & Feitelson 1999): a normal or low head is promised
  a start by its reservation plus its slack (`Reservation.promised_start`, which the caller carries from round to
  round as `WaitingTask.promised_start`, `carried_promises`), and a task may be backfilled on its units if it ends
  by then — so a task ending a little after the reservation still fills the GPUs the head drains, which with pure
  EASY sit idle whenever every waiting task is longer than the drain. Its slack is `backfill_slack_s`, or what it
  has waited so far when that is less: on a quiet machine a task that has only just arrived is not delayed for
  packing, while in a backlog the slack is small next to the waits. The promise is kept, not renewed each round,
  so slips never add up: a backfilled task ends by the promise, so no later reservation passes it. (Only what
  backfilling cannot cause renews it: an estimate that was not an upper bound, such as a trainer's ETA; and a head
  that a higher-priority task displaced is promised afresh when it is the head again.) High-priority heads get no
  slack: urgent work is not delayed for packing.

Fit: a task asks for N schedulable units (whole GPUs or MIG instances) with at least M bytes free
each, or for a CPU slot when N = 0. Among fitting units the smallest sufficient ones are chosen, so
large units stay free for large tasks. The units are the GPU ledger's free ones (`domain.gpu_ledger`);
a whole GPU and a MIG slice of it are never given out together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum

from corral.domain.gpu_ledger import GpuLedger, units_overlap

# One priority scale for finetune tasks and businesses (the autopilot's policy `priority`, an integer, higher wins):
# a task's `low | normal | high` is this integer wherever the two meet — preemption (a business above a running
# task may take its GPUs, `domain.preemption`) and reclaim (a task above a pool's businesses may take its
# unassigned replicas). A business without a policy is at 0, like a normal task: neither preempts the other.
PRIORITY_LEVELS: dict[str, int] = {"high": 10, "normal": 0, "low": -10}


class Priority(IntEnum):
    """The queue's order (lower value first). `level` is the task's place on the shared integer scale."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str) -> Priority:
        return cls[value.upper()]

    @property
    def level(self) -> int:
        return PRIORITY_LEVELS[self.name.lower()]


class Strategy(StrEnum):
    STRICT_FIFO = "strict-fifo"
    BEST_EFFORT_FIFO = "best-effort-fifo"
    EASY_BACKFILL = "easy-backfill"


@dataclass(frozen=True)
class Demand:
    gpus: int = 0  # 0: a CPU slot
    memory_per_gpu: float = 0.0  # bytes that must be free on each unit


@dataclass(frozen=True)
class WaitingTask:
    id: str
    priority: Priority
    submitted_at: float
    demand: Demand
    bypassed: int = 0  # how often a later task started while this one waited
    # easy-backfill: an upper bound on its run time once started (its timeout), so that it may start ahead of a
    # reserved head when it surely ends first; None: unknown, it may only use units the reservation leaves.
    estimated_s: float | None = None
    # easy-backfill: the start promised to it as the head in an earlier round (`Reservation.promised_start`, kept by
    # the caller); None: never reserved
    promised_start: float | None = None


@dataclass(frozen=True)
class Unit:
    id: str
    free_bytes: float


@dataclass(frozen=True)
class RunningTask:
    """A task holding units now (easy-backfill's input): when they are expected back."""

    id: str
    units: tuple[Unit, ...]  # the units it holds, each with the bytes it will have free once the task ends
    ends_at: float  # estimated end (start + timeout, or sooner from its progress); math.inf when unknown


@dataclass(frozen=True)
class Capacity:
    units: tuple[Unit, ...] = ()  # GPUs/MIG instances the GPU ledger has free (`GpuLedger.free_units`)
    cpu_slots: int = 0  # CPU training slots still free
    running: tuple[RunningTask, ...] = ()  # easy-backfill: the tasks holding the other units, and their ends
    now: float = 0.0  # easy-backfill: the time the estimates are measured against (seconds, like `ends_at`)


@dataclass(frozen=True)
class Reservation:
    at: float  # the earliest time the head fits, from the running tasks' estimated ends
    units: tuple[str, ...]  # what it will get then: a backfilled task may hold these only if it ends by `start_by`
    promised_start: float | None = None  # with slack: the head starts by then at the latest (kept between rounds)
    slack_s: float = 0.0

    @property
    def start_by(self) -> float:
        """What a task backfilled on `units` must end by: the promise, or `at` plus the slack when a running task
        ending early brought the reservation sooner; `at` without slack (pure EASY)."""
        return self.at if self.promised_start is None else max(self.at, min(self.promised_start, self.at + self.slack_s))

    def with_slack(self, promised: float | None, slack_s: float) -> Reservation:
        """Keep an earlier round's promise while it still holds (a reservation only moves past it when something other
        than backfilling pushed it), else promise this reservation plus the slack. No slack, no promise: the
        reservation itself, which moves with the estimates, is all there is."""
        if slack_s <= 0:
            return self
        kept = promised if promised is not None and self.at <= promised else self.at + slack_s
        return replace(self, promised_start=kept, slack_s=slack_s)


class WaitReason(StrEnum):
    """Why a task the round did not start waits (`Wait.reason`); callers decide on it, `Wait.describe` words it."""

    CPU_SLOT = "cpu-slot"  # a CPU task: every CPU training slot is taken
    GPUS = "gpus"  # too few free units with the memory it needs (`Wait.gpus`, `.memory_per_gpu`, `.available`)
    RESERVED = "reserved"  # easy-backfill: starting now could delay the head's reservation (`Wait.task`: the head)
    BEHIND = "behind"  # queued behind a task nothing may pass (`Wait.task`)


@dataclass(frozen=True)
class Wait:
    """Why a task waits, with the numbers its wording needs."""

    reason: WaitReason
    task: str = ""  # RESERVED: the head holding the reservation; BEHIND: the task it is queued behind
    gpus: int = 0  # GPUS: the units it asks for
    memory_per_gpu: float = 0.0  # GPUS: the bytes each must have free
    available: int = 0  # GPUS: the free units with that much memory

    def describe(self) -> str:
        """The one wording of a wait, as a task's queue reason says it."""
        if self.reason is WaitReason.CPU_SLOT:
            return "waiting for a CPU training slot"
        if self.reason is WaitReason.BEHIND:
            return f"queued behind {self.task}"
        if self.reason is WaitReason.RESERVED:
            return f"waiting for GPU to be released: starting now could delay {self.task}, which has GPUs reserved"
        memory = f" with {self.memory_per_gpu / 1024**3:.1f}GB free" if self.memory_per_gpu else ""
        return f"waiting for GPU to be released: needs {self.gpus}{memory}, {self.available} available"

    def __str__(self) -> str:
        return self.describe()


@dataclass
class Decision:
    starts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (task id, unit ids; () for CPU)
    waiting: dict[str, Wait] = field(default_factory=dict)  # task id → why it waits
    bypassed: list[str] = field(default_factory=list)  # waiting tasks that a later task passed in this round
    reservations: dict[str, Reservation] = field(default_factory=dict)  # easy-backfill: the head's reservation


def carried_promises(tasks: Sequence[WaitingTask], decision: Decision) -> dict[str, float | None]:
    """What changes in the promises the waiting tasks carry into the next round (`WaitingTask.promised_start`): a
    head keeps its reservation's promise; a task that is no longer the head (it starts, or a higher-priority task
    took its place) has none — should it become the head again, it is promised afresh. The manager and the bench
    both keep them this way."""
    starting = {task_id for task_id, _ in decision.starts}
    changes: dict[str, float | None] = {}
    for task in tasks:
        held = decision.reservations.get(task.id)
        promise = held.promised_start if held else None
        if task.id not in starting and promise != task.promised_start:
            changes[task.id] = promise
    return changes


def estimated_end(started_at: float | None, timeout_s: float, eta_at: object, now: float) -> float:
    """When a running task's units are expected back (easy-backfill's `RunningTask.ends_at`): the timeout cancels
    it at start + timeout at the latest; the trainer's own ETA (its progress, an absolute time) may say sooner."""
    bound = (started_at if started_at is not None else now) + timeout_s
    if isinstance(eta_at, (int, float)) and not isinstance(eta_at, bool) and math.isfinite(eta_at):
        bound = min(bound, float(eta_at))
    return max(now, bound)


def released_units(ledger: GpuLedger, unit_ids: Sequence[str]) -> tuple[Unit, ...]:
    """A running task's units as the queue will see them once it ends: all their memory free (`GpuLedger.release`)."""
    return tuple(Unit(u, unit.memory_total_bytes if (unit := ledger.unit(u)) is not None else 0.0) for u in unit_ids)


def queue_order(tasks: Sequence[WaitingTask]) -> list[WaitingTask]:
    return sorted(tasks, key=lambda t: (t.priority, t.submitted_at, t.id))


def fit(demand: Demand, units: Sequence[Unit], cpu_slots: int,
        prefer: Callable[[Unit], float] | None = None) -> tuple[str, ...] | None:
    """The units a task would get now, () for a CPU slot, or None if it does not fit. `prefer`: a rank tried before
    the size (lower first; easy-backfill's reservation uses it)."""
    if demand.gpus == 0:
        return () if cpu_slots > 0 else None
    candidates = sorted((u for u in units if u.free_bytes >= demand.memory_per_gpu),
                        key=lambda u: (prefer(u) if prefer else 0, u.free_bytes, u.id))
    chosen: list[str] = []
    for unit in candidates:  # never a whole GPU together with one of its MIG slices (the GPU ledger's rule)
        if not any(units_overlap(unit.id, c) for c in chosen):
            chosen.append(unit.id)
            if len(chosen) == demand.gpus:
                return tuple(chosen)
    return None


def why_not(demand: Demand, capacity: Capacity) -> Wait:
    if demand.gpus == 0:
        return Wait(WaitReason.CPU_SLOT)
    enough = sum(1 for u in capacity.units if u.free_bytes >= demand.memory_per_gpu)
    return Wait(WaitReason.GPUS, gpus=demand.gpus, memory_per_gpu=demand.memory_per_gpu, available=enough)


def reserve(demand: Demand, free: Sequence[Unit], running: Sequence[RunningTask], now: float) -> Reservation | None:
    """The earliest time `demand` fits if the running tasks end as estimated (units free now, plus each task's
    units from its end on), and the units it would get; None if it never fits from known ends.

    Which units: the ones freed last first (at the reservation time itself), then those freed earlier, then
    those free now — so that the units free now, or free before the reservation time, are the ones the
    reservation leaves to backfilled tasks for as long as they like."""
    ending = sorted((r for r in running if r.ends_at != math.inf), key=lambda r: (r.ends_at, r.id))
    for i, task in enumerate(ending):
        if i + 1 < len(ending) and ending[i + 1].ends_at == task.ends_at:
            continue  # units that free up at the same instant count together
        rank = {u.id: -j for j, r in enumerate(ending[: i + 1]) for u in r.units}  # freed later: preferred
        pool = [*(u for r in ending[: i + 1] for u in r.units), *free]
        if (chosen := fit(demand, pool, 0, prefer=lambda u, rank=rank: rank.get(u.id, 1))) is not None:
            return Reservation(max(now, task.ends_at), chosen)
    return None


def _backfill(task: WaitingTask, units: Sequence[Unit], held: Reservation, now: float) -> tuple[str, ...] | None:
    """The units `task` may take now without delaying the reservation `held`: first among the units it leaves, else
    any free unit when the task surely ends by the time the head must start."""
    spare = [u for u in units if not any(units_overlap(u.id, r) for r in held.units)]
    if (chosen := fit(task.demand, spare, 0)) is not None:
        return chosen
    if task.estimated_s is not None and now + task.estimated_s <= held.start_by:
        return fit(task.demand, units, 0)
    return None


def schedule(tasks: Sequence[WaitingTask], capacity: Capacity, strategy: Strategy, max_bypass: int = 3,
             backfill_slack_s: float = 0.0) -> Decision:
    decision = Decision()
    units = list(capacity.units)
    cpu_slots = capacity.cpu_slots
    blocked_by: WaitingTask | None = None  # a task nothing may pass
    passed_over: list[WaitingTask] = []  # tasks that did not fit, in order
    easy = strategy == Strategy.EASY_BACKFILL
    running = list(capacity.running)  # easy-backfill: grows with the tasks started in this round
    head: tuple[WaitingTask, Reservation | None] | None = None  # easy-backfill: the first GPU task that did not fit
    for task in queue_order(tasks):
        if blocked_by is not None:
            decision.waiting[task.id] = Wait(WaitReason.BEHIND, task=blocked_by.id)
            continue
        chosen = fit(task.demand, units, cpu_slots)
        if easy and head is not None and head[1] is not None and chosen and task.demand.gpus:
            chosen = _backfill(task, units, head[1], capacity.now)
            if chosen is None:
                decision.waiting[task.id] = Wait(WaitReason.RESERVED, task=head[0].id)
                passed_over.append(task)
                continue
        if chosen is None:
            decision.waiting[task.id] = why_not(task.demand, Capacity(tuple(units), cpu_slots))
            passed_over.append(task)
            if easy:
                if head is None and task.demand.gpus:
                    held = reserve(task.demand, units, running, capacity.now)
                    if held is not None:
                        held = held.with_slack(task.promised_start, 0.0 if task.priority == Priority.HIGH else
                                               min(backfill_slack_s, max(0.0, capacity.now - task.submitted_at)))
                    head = (task, held)
                    if held is not None:
                        decision.reservations[task.id] = held
            elif strategy == Strategy.STRICT_FIFO or task.bypassed >= max_bypass:
                blocked_by = task
            continue
        decision.starts.append((task.id, chosen))
        if easy and chosen:
            ends = capacity.now + task.estimated_s if task.estimated_s is not None else math.inf
            running.append(RunningTask(task.id, tuple(u for u in units if u.id in chosen), ends))
        units = [u for u in units if not any(units_overlap(u.id, c) for c in chosen)]
        cpu_slots -= 1 if not chosen else 0
        decision.bypassed.extend(t.id for t in passed_over if t.id not in decision.bypassed)
    return decision
