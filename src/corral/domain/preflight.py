"""Preflight: does a finetune task's memory fit a GPU unit *now*, with real numbers. Pure.

Spec 02's first known limit: another program holding GPU memory made a task start and then OOM. The
queue policy (`domain.queue`) fits a task to units by their free bytes, so what it is given decides:
here that is NVML's free memory on the unit now (the GPU ledger carries a fresh reading), minus what
replicas still starting there are about to take (an engine that has not allocated yet shows as free
memory it will not leave), minus a margin (allocator fragmentation, CUDA context, a reading that is a
moment old). A task whose estimate does not fit that room stays `queued`, and its reason carries the
unit and the numbers, so a person can see *why* it waits and what would change it.

What a starting replica will take: the deployment's own estimate where it has one — the engine's
memory share flag (`--gpu-memory-utilization` for vLLM, `--mem-fraction-static` for SGLang) times the
unit's total — else the documented assumption `ASSUMED_REPLICA_SHARE` (vLLM's default share, 0.9) of the
unit; the simulator takes none. The ledger already keeps a unit a replica holds from being free, so the
term only bites where a starting replica and a free unit share memory (overlapping units: a whole GPU and
its MIG slices, books that disagree after a restart): a second line of defence that costs nothing when
it does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corral.domain.gpu_ledger import units_overlap
from corral.domain.queue import Demand, Unit

GIB = 1024**3
ASSUMED_REPLICA_SHARE = 0.9  # vLLM's default --gpu-memory-utilization: what an engine without a flag is assumed to take
SHARE_FLAGS = ("--gpu-memory-utilization", "--mem-fraction-static")  # vLLM, SGLang
NO_GPU_MEMORY_ENGINES = frozenset({"simulator"})


@dataclass(frozen=True)
class StartingReplica:
    """A replica that holds units in the ledger but is not ready yet: its memory is still to come."""

    name: str
    units: tuple[str, ...]
    expected_bytes: float  # per unit


@dataclass(frozen=True)
class UnitRoom:
    """One free unit as the preflight reads it."""

    id: str
    free_now: float  # NVML's free bytes on the unit now
    reserved: float = 0.0  # bytes starting replicas on (an overlapping) unit are about to take

    @property
    def room(self) -> float:
        return max(0.0, self.free_now - self.reserved)


def expected_replica_bytes(engine: str, engine_args: Sequence[str], unit_total_bytes: float) -> float:
    """What a starting replica of `engine` will hold on each of its units once loaded (see the module doc)."""
    if engine in NO_GPU_MEMORY_ENGINES:
        return 0.0
    share = ASSUMED_REPLICA_SHARE
    args = list(engine_args)
    for i, arg in enumerate(args):
        name, _, inline = arg.partition("=")
        if name in SHARE_FLAGS:
            text = inline if inline else (args[i + 1] if i + 1 < len(args) else "")
            try:
                value = float(text)
            except ValueError:
                continue
            if 0 < value <= 1:
                share = value
    return share * max(0.0, unit_total_bytes)


def rooms(free: Sequence[tuple[str, float]], starting: Sequence[StartingReplica]) -> tuple[UnitRoom, ...]:
    """(unit id, NVML free bytes) of each free unit → its room, less what starting replicas there will take."""
    return tuple(UnitRoom(unit_id, free_now, sum(r.expected_bytes for r in starting for held in r.units
                                                 if units_overlap(held, unit_id)))
                 for unit_id, free_now in free)


def admissible(units: Sequence[UnitRoom], margin_bytes: float) -> tuple[Unit, ...]:
    """The units as the queue policy should fit against them: a task fits a unit only if its estimate plus the
    margin fits the room (so the queue's `free_bytes >= memory_per_gpu` is the preflight's test)."""
    return tuple(Unit(u.id, max(0.0, u.room - margin_bytes)) for u in units)


def shortfall(demand: Demand, units: Sequence[UnitRoom], margin_bytes: float) -> str | None:
    """Why `demand` does not start for lack of memory, with the numbers, or None when memory is not what stops it
    (it fits, it is a CPU task, or there are too few free units whatever their memory: the queue's reason then).
    Names the free unit closest to fitting that falls short — the one whose memory would have to grow least."""
    if demand.gpus == 0 or len(units) < demand.gpus:
        return None
    short = [u for u in units if u.room - margin_bytes < demand.memory_per_gpu]
    if len(units) - len(short) >= demand.gpus or not short:
        return None
    unit = max(short, key=lambda u: (u.room, u.id))
    return (f"waiting for GPU {unit.id}: {_gib(unit.free_now)} GiB free now, {_gib(unit.reserved)} GiB reserved by starting "
            f"replicas, needs {_gib(demand.memory_per_gpu)} GiB + {_gib(margin_bytes)} GiB margin")


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"
