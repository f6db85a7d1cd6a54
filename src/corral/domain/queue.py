"""Finetune queue policy: which waiting tasks start now, on which GPUs. Pure: no clock, no I/O.

Order: priority (high, normal, low), then submission time, then id — so equal inputs always give
equal decisions. Two named strategies, as in Kueue:

- `strict-fifo`: only the head of the queue may start; if it does not fit, everyone waits
  (spec 02's original behaviour, generalised to priorities).
- `best-effort-fifo`: tasks are tried in order and each one that fits starts, so a small task may
  pass a head that is waiting for a big GPU. Guard against starvation: every pass counts against
  the head; once a task has been passed `max_bypass` times, nothing may pass it any more — the queue
  behaves strictly until it starts.

Fit: a task asks for N schedulable units (whole GPUs or MIG instances) with at least M bytes free
each, or for a CPU slot when N = 0. Among fitting units the smallest sufficient ones are chosen, so
large units stay free for large tasks. The units are the GPU ledger's free ones (`domain.gpu_ledger`);
a whole GPU and a MIG slice of it are never given out together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from corral.domain.gpu_ledger import units_overlap


class Priority(IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str) -> Priority:
        return cls[value.upper()]


class Strategy(StrEnum):
    STRICT_FIFO = "strict-fifo"
    BEST_EFFORT_FIFO = "best-effort-fifo"


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


@dataclass(frozen=True)
class Unit:
    id: str
    free_bytes: float


@dataclass(frozen=True)
class Capacity:
    units: tuple[Unit, ...] = ()  # GPUs/MIG instances the GPU ledger has free (`GpuLedger.free_units`)
    cpu_slots: int = 0  # CPU training slots still free


@dataclass
class Decision:
    starts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (task id, unit ids; () for CPU)
    waiting: dict[str, str] = field(default_factory=dict)  # task id → why it waits
    bypassed: list[str] = field(default_factory=list)  # waiting tasks that a later task passed in this round


def queue_order(tasks: Sequence[WaitingTask]) -> list[WaitingTask]:
    return sorted(tasks, key=lambda t: (t.priority, t.submitted_at, t.id))


def fit(demand: Demand, units: Sequence[Unit], cpu_slots: int) -> tuple[str, ...] | None:
    """The units a task would get now, () for a CPU slot, or None if it does not fit."""
    if demand.gpus == 0:
        return () if cpu_slots > 0 else None
    candidates = sorted((u for u in units if u.free_bytes >= demand.memory_per_gpu), key=lambda u: (u.free_bytes, u.id))
    chosen: list[str] = []
    for unit in candidates:  # never a whole GPU together with one of its MIG slices (the GPU ledger's rule)
        if not any(units_overlap(unit.id, c) for c in chosen):
            chosen.append(unit.id)
            if len(chosen) == demand.gpus:
                return tuple(chosen)
    return None


def why_not(demand: Demand, capacity: Capacity) -> str:
    if demand.gpus == 0:
        return "waiting for a CPU training slot"
    enough = sum(1 for u in capacity.units if u.free_bytes >= demand.memory_per_gpu)
    memory = f" with {demand.memory_per_gpu / 1024**3:.1f}GB free" if demand.memory_per_gpu else ""
    return f"waiting for GPU: needs {demand.gpus}{memory}, {enough} available"


def schedule(tasks: Sequence[WaitingTask], capacity: Capacity, strategy: Strategy, max_bypass: int = 3) -> Decision:
    decision = Decision()
    units = list(capacity.units)
    cpu_slots = capacity.cpu_slots
    blocked_by: WaitingTask | None = None  # a task nothing may pass
    passed_over: list[WaitingTask] = []  # tasks that did not fit, in order
    for task in queue_order(tasks):
        if blocked_by is not None:
            decision.waiting[task.id] = f"queued behind {blocked_by.id}"
            continue
        chosen = fit(task.demand, units, cpu_slots)
        if chosen is None:
            decision.waiting[task.id] = why_not(task.demand, Capacity(tuple(units), cpu_slots))
            passed_over.append(task)
            if strategy == Strategy.STRICT_FIFO or task.bypassed >= max_bypass:
                blocked_by = task
            continue
        decision.starts.append((task.id, chosen))
        units = [u for u in units if not any(units_overlap(u.id, c) for c in chosen)]
        cpu_slots -= 1 if not chosen else 0
        decision.bypassed.extend(t.id for t in passed_over if t.id not in decision.bypassed)
    return decision
