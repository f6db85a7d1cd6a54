"""Reclaim (spec 02's optional policy, `reclaim_unassigned_replicas`): unassigned replicas of model pools scaled in
for a waiting GPU task that outranks the pools' businesses, and given back once the task has ended.

On the one priority scale: a task takes only replicas of pools whose businesses all rank below it
(`domain.preemption.may_reclaim`), so a high task (10) reclaims from pools at the default 0, and nothing reclaims
from a business above it. What to take is `domain.reclaim.plan_reclaim`'s; the scale-in and the restore go through
the controller's pool-safe scaling. The debt is on the task (`reclaimed`: pool → replicas), written before the
scale-in, so a restart still restores them. Pools are read through the controller's queries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from corral.config import Settings
from corral.domain.errors import CorralError, NotFound
from corral.domain.gpu_ledger import GpuLedger
from corral.domain.memory import GIB
from corral.domain.preemption import may_reclaim
from corral.domain.queue import Demand, Priority
from corral.domain.reclaim import plan_reclaim
from corral.domain.tasks import FINISHED
from corral.finetune.store import TaskRecord, TaskStore
from corral.finetune.task_files import TaskFiles

if TYPE_CHECKING:
    from corral.controller import Controller

log = logging.getLogger("corral.finetune")

RESTORE_RETRY_S = 30.0


class Reclaim:
    def __init__(self, settings: Settings, tasks: TaskStore, files: TaskFiles, controller: Controller | None) -> None:
        self.settings = settings
        self.tasks = tasks
        self.files = files
        self.controller = controller  # scales pools in and out; None: nothing to reclaim
        self._pool_changes: set[str] = set()  # tasks whose reclaim or restore is in flight
        self._restore_after: dict[str, float] = {}  # task id → monotonic time of the next restore attempt

    def maybe_reclaim(self, waiting: list[TaskRecord], ledger: GpuLedger) -> None:
        """Scale in unassigned pool replicas for the first waiting GPU task they would let start — one reclaim at a
        time, through the pool-safe scale-down; restored when the task ends."""
        if not self.settings.reclaim_unassigned_replicas or self.controller is None or self._pool_changes:
            return
        controller = self.controller
        pools = {d.name: controller.pods(d.name) for d in controller.deployments() if d.is_pool}
        levels = {pool: controller.pool_priority(pool)[0] for pool in pools} if any(t.gpus for t in waiting) else {}
        for task in waiting:
            if not task.gpus or task.reclaimed:
                continue
            level = Priority.parse(task.priority).level
            below = {pool: pods for pool, pods in pools.items() if may_reclaim(level, levels[pool])}
            if not below:
                continue
            plan = plan_reclaim(Demand(task.gpus, task.memory_gb * GIB), ledger, below)
            if plan is None:
                continue
            self.tasks.update(task.id, reclaimed=dict(plan.replicas))  # first: a restart still restores them
            self.files.note(task.id, f"priority {task.priority} ({level}), above the pools' businesses: reclaiming GPU "
                            + ", ".join(plan.units) + " from unassigned replicas of "
                            + ", ".join(f"{p} ({n}, priority {levels[p]})" for p, n in plan.replicas.items()))
            self._change_pools(task.id, self._reclaim(task.id, dict(plan.replicas)))
            return

    def units_owed(self) -> int:
        """GPU units the pools are owed by ended tasks, not restored yet: the queue keeps that many free for them."""
        if self.controller is None:
            return 0
        owed = 0
        for task in self.tasks.list_reclaiming():
            if task.status in FINISHED:
                for pool, count in (task.reclaimed or {}).items():
                    deployment = self.controller.deployment(pool)
                    owed += count * (deployment.gpus_per_replica if deployment else 0)
        return owed

    def restore_due(self) -> None:
        """Give pools back the replicas taken for a task once it has ended and its trainer is gone."""
        if self.controller is None:
            return
        for task in self.tasks.list_reclaiming():
            due = self._restore_after.get(task.id, 0.0) <= time.monotonic()
            if task.status in FINISHED and task.pid_start is None and task.id not in self._pool_changes and due:
                self._change_pools(task.id, self._restore(task.id, dict(task.reclaimed or {})))

    async def _reclaim(self, task_id: str, replicas: dict[str, int]) -> None:
        assert self.controller is not None
        for pool, count in replicas.items():
            try:
                await self.controller.scale_by(pool, -count, reason=f"reclaimed for high-priority finetune task {task_id}")
            except CorralError as exc:
                self.files.note(task_id, f"could not reclaim replicas of {pool}: {exc.message}")
                self._settle(task_id, pool)

    async def _restore(self, task_id: str, replicas: dict[str, int]) -> None:
        assert self.controller is not None
        for pool, count in replicas.items():
            try:
                await self.controller.scale_by(pool, count, reason=f"restored after finetune task {task_id} ended")
                self.files.note(task_id, f"restored {count} replica(s) of {pool}")
            except NotFound:
                self.files.note(task_id, f"pool {pool} was deleted meanwhile; nothing to restore")
            except CorralError as exc:  # e.g. no free GPU right now: try again later, keep the debt
                if task_id not in self._restore_after:
                    self.files.note(task_id, f"could not restore {count} replica(s) of {pool} yet ({exc.message}); "
                                             f"retrying every {RESTORE_RETRY_S:.0f} s")
                self._restore_after[task_id] = time.monotonic() + RESTORE_RETRY_S
                continue
            self._settle(task_id, pool)

    def _settle(self, task_id: str, pool: str) -> None:
        """Nothing more is owed to `pool` for this task."""
        task = self.tasks.get(task_id)
        left = {p: n for p, n in ((task.reclaimed if task else None) or {}).items() if p != pool}
        self.tasks.update(task_id, reclaimed=left or None)

    def _change_pools(self, task_id: str, change: Coroutine[Any, Any, None]) -> None:
        self._pool_changes.add(task_id)

        async def run() -> None:
            try:
                await change
            except Exception:
                log.exception("reclaim/restore for finetune task %s failed", task_id)
            finally:
                self._pool_changes.discard(task_id)

        asyncio.get_running_loop().create_task(run(), name=f"pools-{task_id}")
