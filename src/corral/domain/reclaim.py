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
from corral.domain.models import Pod
from corral.domain.queue import Demand, Unit, fit
from corral.domain.scaling import removal_order


@dataclass(frozen=True)
class ReclaimPlan:
    replicas: Mapping[str, int]  # pool name → unassigned replicas to scale in
    units: tuple[str, ...]  # the GPU units that frees


def plan_reclaim(demand: Demand, free: Sequence[Unit], pools: Mapping[str, Sequence[Pod]],
                 unit_bytes: Mapping[str, float]) -> ReclaimPlan | None:
    """Unassigned replicas, taken one at a time until their GPUs plus the free units fit `demand`; None if
    even all of them would not.

    `pools`: each model pool's pods; `unit_bytes`: the memory a unit has once its replica is gone
    (its total). Pools are visited by name and, within a pool, in scale-down order, so the plan is
    deterministic and matches what the pool-safe scale-down will do.
    """
    if demand.gpus == 0 or fit(demand, free, 0) is not None:
        return None  # nothing to reclaim: a CPU task, or it fits already
    units = list(free)
    taken: dict[str, int] = {}
    freed: list[str] = []
    for pool in sorted(pools):
        unassigned = [p for p in pools[pool] if p.business == L.UNASSIGNED and p.gpu_ids]
        for pod in removal_order(unassigned):
            taken[pool] = taken.get(pool, 0) + 1
            for gpu in pod.gpu_ids:
                units.append(Unit(str(gpu), unit_bytes.get(str(gpu), 0.0)))
                freed.append(str(gpu))
            if fit(demand, units, 0) is not None:
                return ReclaimPlan(dict(taken), tuple(freed))
    return None
