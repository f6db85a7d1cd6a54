"""The reclaim planner: only unassigned pool replicas, only when it lets the task start, in scale-down order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone

from corral.domain import labels as L
from corral.domain.gpu_ledger import GpuClaim, GpuLedger, GpuUnit, Holder
from corral.domain.models import Pod
from corral.domain.queue import Demand, Unit
from corral.domain.reclaim import plan_reclaim

GIB = 1024**3
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
TOTALS = {str(i): 80.0 * GIB for i in range(8)}


def pod(name: str, gpus: tuple[int, ...], business: str = L.UNASSIGNED, age_s: int = 0, ready: bool = True) -> Pod:
    labels = {L.MODEL: "m", L.POOL: "p", L.BUSINESS: business, L.DEPLOYMENT_TYPE: L.MODEL_POOL}
    return Pod(name, "pool", labels, ready=ready, gpu_ids=gpus, created_at=T0 - timedelta(seconds=age_s))


def ledger(free: Sequence[Unit], pools: Mapping[str, Sequence[Pod]]) -> GpuLedger:
    """The GPU ledger's snapshot: `free` units, and every pod's GPUs held by it (no memory free until released)."""
    pods = [p for ps in pools.values() for p in ps]
    units = [GpuUnit.parse(u.id, TOTALS.get(u.id, u.free_bytes), u.free_bytes) for u in free]
    units += [GpuUnit.parse(str(g), TOTALS[str(g)], 0.0) for p in pods for g in p.gpu_ids]
    return GpuLedger.build(units, [GpuClaim(Holder.replica(p.name), tuple(map(str, p.gpu_ids))) for p in pods])


def test_takes_unassigned_replicas_only_and_no_more_than_needed() -> None:
    pools = {"pool-a": [pod("a-0", (0,), "prod"), pod("a-1", (1,)), pod("a-2", (2,))]}
    plan = plan_reclaim(Demand(1), ledger([], pools), pools)
    assert plan is not None and plan.replicas == {"pool-a": 1}
    # Scale-down order (newest first among ready ones): the plan names what the scale-down removes.
    pools = {"pool-a": [pod("a-1", (1,), age_s=100), pod("a-2", (2,), age_s=10)]}
    assert plan_reclaim(Demand(1), ledger([], pools), pools).units == ("2",)  # type: ignore[union-attr]


def test_counts_free_units_and_spans_pools() -> None:
    pools = {"pool-b": [pod("b-0", (3,))], "pool-a": [pod("a-0", (1,), "prod"), pod("a-1", (2,))]}
    plan = plan_reclaim(Demand(3), ledger([Unit("0", 80 * GIB)], pools), pools)
    assert plan is not None and plan.replicas == {"pool-a": 1, "pool-b": 1} and set(plan.units) == {"2", "3"}


def test_no_plan_when_it_would_not_help_or_is_not_needed() -> None:
    assigned_only = {"pool-a": [pod("a-0", (0,), "prod"), pod("a-1", (1,), "test")]}
    assert plan_reclaim(Demand(1), ledger([], assigned_only), assigned_only) is None  # never touches a business's replica
    one_spare = {"pool-a": [pod("a-0", (0,))]}
    assert plan_reclaim(Demand(2), ledger([], one_spare), one_spare) is None  # would still not fit: scale nothing in
    assert plan_reclaim(Demand(1), ledger([Unit("5", 80 * GIB)], one_spare), one_spare) is None  # fits already
    assert plan_reclaim(Demand(0), ledger([], one_spare), one_spare) is None  # a CPU task needs no GPU
    cpu_replica = {"pool-a": [pod("a-0", ())]}
    assert plan_reclaim(Demand(1), ledger([], cpu_replica), cpu_replica) is None
    small = {"pool-a": [pod("a-0", (0,))]}
    assert plan_reclaim(Demand(1, 90 * GIB), ledger([], small), small) is None  # the freed GPU is too small
