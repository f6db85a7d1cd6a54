"""Reclaim: which unassigned pool replicas a high-priority finetune task may take GPUs from. Pure.

Spec 02's optional policy. Only *unassigned* replicas of model pools are candidates — they carry no
business traffic — and they are taken away through the same pool-safe scale-down as any other
(`scaling.plan_pool_scale`), so the replicas predicted here are exactly those that scale-down would
remove: per pool, `removal_order` of its unassigned replicas. A plan is made only if it lets the
task start; scaling replicas in for a task that still would not fit helps nobody.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.domain import labels as L
from corral.domain.gpu_ledger import GpuLedger, Holder
from corral.domain.models import Pod
from corral.domain.queue import Demand, Unit, fit
from corral.domain.scaling import removal_order


@dataclass(frozen=True)
class ReclaimPlan:
    replicas: Mapping[str, int]  # pool name → unassigned replicas to scale in
    units: tuple[str, ...]  # the GPU units that frees


def free_units(ledger: GpuLedger) -> tuple[Unit, ...]:
    """The ledger's free units as the queue policy reads them."""
    return tuple(Unit(u.id, u.memory_free_bytes) for u in ledger.free_units())


def plan_reclaim(demand: Demand, ledger: GpuLedger, pools: Mapping[str, Sequence[Pod]]) -> ReclaimPlan | None:
    """Unassigned replicas, taken one at a time until the units they hold plus the free ones fit
    `demand`; None if even all of them would not.

    `ledger`: the GPU ledger's snapshot — which units each replica holds is read there (the same
    books replica placement and the queue read), and a released unit counts with its total memory
    (`GpuLedger.release`). `pools`: each model pool's pods. Pools are visited by name and, within a
    pool, in scale-down order, so the plan is deterministic and matches what the pool-safe
    scale-down will do.
    """
    if demand.gpus == 0 or fit(demand, free_units(ledger), 0) is not None:
        return None  # nothing to reclaim: a CPU task, or it fits already
    taken: dict[str, int] = {}
    freed: list[str] = []
    for pool in sorted(pools):
        unassigned = [p for p in pools[pool] if p.business == L.UNASSIGNED and ledger.units_of(Holder.replica(p.name))]
        for pod in removal_order(unassigned):
            holder = Holder.replica(pod.name)
            taken[pool] = taken.get(pool, 0) + 1
            freed.extend(ledger.units_of(holder))
            ledger = ledger.release(holder)
            if fit(demand, free_units(ledger), 0) is not None:
                return ReclaimPlan(dict(taken), tuple(freed))
    return None
