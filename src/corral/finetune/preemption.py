"""Preemption: a business above a running task needs its GPUs (the controller's scale-out asks, `preempting`).

Which tasks give way is `domain.preemption.plan_preemption`'s. Each is asked to save a checkpoint and stop (intent
first: a pending History row and `preempted_by` on the task before the signal), waits in the queue with the reason,
and resumes from that checkpoint once GPUs free up. The GPUs they leave are kept from the queue round
(`keep_for_replicas`) until the scale-out is done, by which time the new replicas hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from corral.config import Settings
from corral.domain.gpu_ledger import GpuLedger, Holder
from corral.domain.history import Action, HistoryDraft, Intent, Outcome
from corral.domain.preemption import (
    PreemptionOutcome,
    PreemptionPlan,
    PreemptionRequest,
    TaskOnGpu,
    plan_preemption,
    steps_since,
)
from corral.domain.queue import Priority
from corral.domain.tasks import ACTIVE, TaskState
from corral.finetune.lifecycle import Lifecycle
from corral.finetune.runners import TrainerRunner
from corral.finetune.store import TaskRecord, TaskStore
from corral.finetune.task_files import TaskFiles
from corral.intents import Intents

log = logging.getLogger("corral.finetune")


class Preemption:
    def __init__(self, settings: Settings, tasks: TaskStore, lifecycle: Lifecycle, files: TaskFiles, runner: TrainerRunner,
                 ledger: Callable[[], GpuLedger]) -> None:
        self.settings = settings
        self.tasks = tasks
        self.lifecycle = lifecycle
        self.files = files
        self.runner = runner
        self.ledger = ledger
        # GPUs freed by a preemption, kept out of the queue's reach until the replicas they were freed for hold them.
        self._kept_for_replicas: dict[int, tuple[str, ...]] = {}
        self._preemptions = asyncio.Lock()  # one at a time: two scale-outs never pick the same victims

    @contextlib.asynccontextmanager
    async def preempting(self, request: PreemptionRequest) -> AsyncIterator[PreemptionOutcome]:
        """Free `request.gpus` whole GPUs for new replicas of `request.pool`, then let the caller scale inside the
        block. If too few GPUs are free, the tasks `domain.preemption.plan_preemption` picks are asked to checkpoint
        and stop, wait in the queue with the reason, and resume from that checkpoint once GPUs free up. The GPUs they
        leave are kept from the queue (which would otherwise start the task again on them) until the block ends. A
        trainer that has not saved within `preempt_timeout_s` is stopped (it loses the steps since its last
        checkpoint). Nothing is stopped when stopping all candidates would still not be enough."""
        async with self._preemptions:
            plan = self._plan(request)
            if not plan.needed:
                yield PreemptionOutcome(freed=plan.freed, why_not=plan.why_not)
                return
            key = id(plan)
            self._kept_for_replicas[key] = plan.freed
            try:
                intents = {task_id: self._ask_to_checkpoint(self.lifecycle.get(task_id), request) for task_id in plan.victims}
                await self._wait_preempted(intents)
                yield PreemptionOutcome(tasks=plan.victims, freed=plan.freed)
            finally:
                self._kept_for_replicas.pop(key, None)

    def keep_for_replicas(self, ledger: GpuLedger) -> GpuLedger:
        """The ledger the queue reads, with the GPUs a preemption freed held for the replicas it freed them for."""
        for key, units in self._kept_for_replicas.items():
            free = [u for u in units if ledger.is_free(u)]
            if free:
                ledger = ledger.hold(Holder.replica(f"(replica starting after preemption {key})"), free)
        return ledger

    def _plan(self, request: PreemptionRequest) -> PreemptionPlan:
        candidates = []
        for task in self.lifecycle.launched():
            if task.status not in ACTIVE or not task.units or task.preempted_by or not self.runner.can_preempt(task):
                continue
            checkpoint = self.files.checkpoint(task.id)
            candidates.append(TaskOnGpu(
                task.id, Priority.parse(task.priority).level, task.preemptible, tuple(task.units),
                steps_since(task.progress.get("step"), int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None),
                task.started_at.timestamp() if task.started_at else 0.0))
        return plan_preemption(request.gpus, request.priority, candidates, self.ledger())

    def _ask_to_checkpoint(self, task: TaskRecord, request: PreemptionRequest) -> Intent:
        by = {"business": request.business, "priority": request.priority, "pool": request.pool}
        message = (f"preempting for {request.describe()}, which needs {request.gpus} GPU(s) for pool {request.pool}: "
                   f"asked the trainer to save a checkpoint at its next step and stop (step {task.progress.get('step', 0)})")
        intent = _begin_preemption(self.lifecycle.intents, task, by, message)  # the intent, then the desired state, then the signal
        self.tasks.update(task.id, preempted_by=by)
        self.files.note(task.id, message)
        log.info("finetune task %s: %s", task.id, message)
        if not self.runner.preempt(task):
            self.files.note(task.id, "the trainer could not be signalled; it is stopped instead")
        return intent

    async def _wait_preempted(self, intents: dict[str, Intent]) -> None:
        """Until every preempted trainer has exited and its task is back in the queue (at most `preempt_timeout_s`,
        then it is stopped). Follows them itself, so the caller need not wait for the next round."""
        deadline = time.monotonic() + self.settings.preempt_timeout_s
        left = dict(intents)
        while left:
            for task_id in list(left):
                task = self.lifecycle.get(task_id)
                if task.status in ACTIVE and not self.runner.alive(task):
                    self.lifecycle.follow(task)  # reads the `preempted` event and the exit: back to `queued`
                    task = self.lifecycle.get(task_id)
                elif task.status in ACTIVE and (time.monotonic() > deadline or not self.runner.can_preempt(task)):
                    self.files.note(task_id, f"the trainer did not save within {self.settings.preempt_timeout_s:.0f} s "
                                             "(preempt_timeout_s): stopping it; it resumes from its last checkpoint")
                    await self.runner.stop(task)
                    continue
                if task.status not in ACTIVE:  # the intent row keeps its message; `set_status` wrote the "preempted:" row
                    _complete_preemption(self.lifecycle.intents, left.pop(task_id), task)
            if left:
                await asyncio.sleep(0.1)


# The History row of a preemption: an intent begun before the signal, completed once the task is back in the queue.
def _begin_preemption(intents: Intents, task: TaskRecord, by: dict[str, Any], message: str) -> Intent:
    intent = Intent([HistoryDraft(Action.FINETUNE, task.id, before={"status": task.status, "units": list(task.units)},
                                  after={"status": TaskState.QUEUED, "preemptedBy": by}, message=message[:500])])
    intents.begin(intent)
    return intent


def _complete_preemption(intents: Intents, intent: Intent, task: TaskRecord) -> None:
    intents.complete(intent, Outcome.SUCCESS, after={"status": task.status, "preemptedBy": task.preempted_by})
