"""Preemption: a business above a running task needs its GPUs (the controller's scale-out asks, `preempting`), or a
waiting task above it does (the queue round asks, `for_waiting_task`: the same steps, without a scale to carry out).

Which tasks give way is `domain.preemption.plan_preemption`'s. Each is asked to save a checkpoint and stop (intent
first: a pending History row and `preempted_by` on the task before the signal), waits in the queue with the reason,
and resumes from that checkpoint once GPUs free up. The GPUs they leave are kept from the queue round
(`keep_for_replicas`) until the scale-out is done, by which time the new replicas hold them.

The preemption and the scale-out it is for are one intent: the scale's row (`PreemptionRequest.scale`) is written,
pending, in the same transaction as the preemption's rows, before any trainer is asked. A control plane killed in
between (the trainers checkpointed and stopped, no replica yet) finds that row on restart and carries the scale out
again (`domain.history.ScaleRedo`, `Controller.start`): it asks for the same preemption, whose tasks are found
already leaving for that pool (asked before the restart) and waited for, and whose GPUs are kept from the queue from
the moment it is asked — before the queue's first round after the restart could start those tasks again on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from corral import failpoints
from corral.config import Settings
from corral.domain.gpu_ledger import GpuLedger, Holder
from corral.domain.history import Action, HistoryDraft, Intent, Outcome
from corral.domain.preemption import (
    PreemptionOutcome,
    PreemptionPlan,
    PreemptionRequest,
    TaskOnGpu,
    TaskPreemptionPlan,
    plan_preemption,
    plan_task_preemption,
    steps_since,
)
from corral.domain.queue import Demand, Priority
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
        # Whole GPUs kept for a preemption asked for and not planned yet (waiting for the one before it, or not
        # entered yet): the first free ones, whichever they are.
        self._reserved: dict[int, int] = {}
        self._keys = itertools.count()
        self._preemptions = asyncio.Lock()  # one at a time: two scale-outs never pick the same victims
        # Tasks preempted for a waiting task: victim id → (its intent row, when it was asked, monotonic). Completed once
        # the victim is back in the queue; after a restart the rows are judged instead (`domain.history`).
        self._for_tasks: dict[str, tuple[Intent | None, float]] = {}
        self._stopping: set[asyncio.Task] = set()  # stops of trainers that did not save in time (referenced until done)

    def preempting(self, request: PreemptionRequest) -> AbstractAsyncContextManager[PreemptionOutcome]:
        """Free `request.gpus` whole GPUs for new replicas of `request.pool`, then let the caller scale inside the
        block. If too few GPUs are free, the tasks `domain.preemption.plan_preemption` picks are asked to checkpoint
        and stop, wait in the queue with the reason, and resume from that checkpoint once GPUs free up; with them,
        `request.scale` is written as one intent (`PreemptionOutcome.scale`: the scale completes it). Tasks asked
        for this pool before a restart and still stopping are waited for too (and asked again: the restart may
        have come before the signal). GPUs are kept from the queue (which would otherwise start a task again on
        them) from this call — before the block is entered — until the block ends: so enter it. A trainer that has
        not saved within `preempt_timeout_s` is stopped (it loses the steps since its last checkpoint). Nothing is
        stopped when stopping all candidates would still not be enough."""
        key = next(self._keys)
        self._reserved[key] = request.gpus
        return self._preempting(request, key)

    @contextlib.asynccontextmanager
    async def _preempting(self, request: PreemptionRequest, key: int) -> AsyncIterator[PreemptionOutcome]:
        try:
            async with self._preemptions:
                plan, leaving = self._plan(request)
                self._kept_for_replicas[key] = plan.freed
                self._reserved.pop(key, None)
                if not plan.needed and not leaving:
                    yield PreemptionOutcome(freed=plan.freed, why_not=plan.why_not)
                    return
                intents, scale = self._ask_to_checkpoint(plan.victims, request)
                for task in leaving:
                    self.files.note(task.id, f"preempted for {request.describe()} before a control-plane restart: "
                                             "asked again to save a checkpoint and stop")
                    self.runner.preempt(task)  # the trainer's handler only sets a flag: a second signal changes nothing
                    intents[task.id] = None  # its row was judged on restart (`domain.history`)
                await self._wait_preempted(intents)
                yield PreemptionOutcome(tasks=(*plan.victims, *(t.id for t in leaving)), freed=plan.freed, scale=scale)
        finally:
            self._reserved.pop(key, None)
            self._kept_for_replicas.pop(key, None)

    # a waiting task preempting running ones ---------------------------------------------------------------------
    def for_waiting_task(self, task: TaskRecord, ledger: GpuLedger, memory_per_gpu: float) -> TaskPreemptionPlan:
        """The queue round's head `task` waits for GPUs: preempt the running tasks `domain.preemption.plan_task_preemption`
        picks (intent first: one pending History row per victim, written together, then each victim's `preempted_by`,
        then its signal). They save a checkpoint, go back to the queue and resume from it later; `task` starts on their
        GPUs in a later round (the queue's order puts it first). Tasks already leaving for it are planned as gone and,
        after a control-plane restart, asked again. `ledger`: the queue's; `memory_per_gpu`: estimate + margin."""
        level = Priority.parse(task.priority).level
        candidates, leaving = [], []
        for running in self.lifecycle.launched():
            if running.status not in ACTIVE or not running.units:
                continue
            if running.preempted_by:
                if running.preempted_by.get("task") == task.id:
                    leaving.append(running)
                continue
            if self.runner.can_preempt(running):
                candidates.append(self._on_gpu(running))
        for gone in leaving:
            if gone.id not in self._for_tasks:  # asked before a control-plane restart: the signal may never have left
                self.files.note(gone.id, f"preempted for finetune task {task.id} before a control-plane restart: asked again "
                                         "to save a checkpoint and stop")
                self.runner.preempt(gone)  # the trainer's handler only sets a flag: a second signal changes nothing
                self._for_tasks[gone.id] = (None, time.monotonic())  # its row was judged on restart
        plan = plan_task_preemption(task.id, level, Demand(task.gpus, memory_per_gpu), candidates, ledger,
                                    [t.id for t in leaving])
        if plan.needed:
            self._ask_for_task(task, plan)
        return plan

    def leaving(self) -> dict[str, list[str]]:
        """Waiting task → the running tasks asked to give their GPUs to it, not back in the queue yet."""
        by_task: dict[str, list[str]] = {}
        for task in self.lifecycle.launched():
            if task.preempted_by and task.preempted_by.get("task"):
                by_task.setdefault(str(task.preempted_by["task"]), []).append(task.id)
        return by_task

    def follow_task_preemptions(self) -> None:
        """Each round: complete the row of a victim back in the queue; stop a trainer that has not saved within
        `preempt_timeout_s` (it resumes from its last checkpoint, losing the steps since)."""
        for victim_id, (row, asked_at) in list(self._for_tasks.items()):
            victim = self.lifecycle.get(victim_id)
            if victim.status not in ACTIVE or not victim.preempted_by:
                self._for_tasks.pop(victim_id)
                if row is not None:
                    _complete_preemption(self.lifecycle.intents, row, victim)
            elif time.monotonic() - asked_at > self.settings.preempt_timeout_s and self.runner.alive(victim):
                self.files.note(victim_id, f"the trainer did not save within {self.settings.preempt_timeout_s:.0f} s "
                                           "(preempt_timeout_s): stopping it; it resumes from its last checkpoint")
                self._for_tasks[victim_id] = (row, math.inf)  # stopped once
                stopping = asyncio.get_running_loop().create_task(self.runner.stop(victim))
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)

    def _ask_for_task(self, task: TaskRecord, plan: TaskPreemptionPlan) -> None:
        by = {"task": task.id, "priority": plan.level}
        victims = [self.lifecycle.get(v.task) for v in plan.victims]
        messages = {v.task: (f"preempting for finetune task {task.id} (priority {task.priority}, {plan.level}), which needs "
                             f"{task.gpus} GPU(s): {v.describe(plan.level)}; asked the trainer to save a checkpoint at its "
                             f"next step and stop (step {victim.progress.get('step', 0)})")
                    for v, victim in zip(plan.victims, victims, strict=True)}
        drafts = [_preemption_row(victim, by, messages[victim.id]) for victim in victims]
        intent = Intent(drafts)
        self.lifecycle.intents.begin(intent)  # every victim's row, pending, in one transaction: the whole change or none
        failpoints.reached("preempt-task.intent-recorded")
        for victim, draft, row_id in zip(victims, drafts, intent.ids, strict=True):
            self.tasks.update(victim.id, preempted_by=by)
            self.files.note(victim.id, messages[victim.id])
            log.info("finetune task %s: %s", victim.id, messages[victim.id])
            self._for_tasks[victim.id] = (Intent([draft], ids=[row_id]), time.monotonic())
            if not self.runner.preempt(victim):
                self.files.note(victim.id, "the trainer could not be signalled; it is stopped instead")
                self._for_tasks[victim.id] = (self._for_tasks[victim.id][0], -math.inf)  # the next round stops it
        self.files.note(task.id, plan.describe())
        failpoints.reached("preempt-task.asked")

    def keep_for_replicas(self, ledger: GpuLedger) -> GpuLedger:
        """The ledger the queue reads, with the GPUs a preemption freed held for the replicas it freed them for."""
        for key, units in self._kept_for_replicas.items():
            free = [u for u in units if ledger.is_free(u)]
            if free:
                ledger = ledger.hold(Holder.replica(f"(replica starting after preemption {key})"), free)
        for key, gpus in self._reserved.items():
            free = [u.id for u in ledger.free_units(whole_only=True)][:gpus]
            if free:
                ledger = ledger.hold(Holder.replica(f"(replica of a scale-out waiting to preempt, {key})"), free)
        return ledger

    def _plan(self, request: PreemptionRequest) -> tuple[PreemptionPlan, list[TaskRecord]]:
        """The plan, and the tasks asked for this pool before a restart that still hold their GPUs: planned as gone
        (they are stopping), waited for."""
        candidates, leaving = [], []
        ledger = self.ledger()
        for task in self.lifecycle.launched():
            if task.status not in ACTIVE or not task.units:
                continue
            if task.preempted_by:
                if task.preempted_by.get("pool") == request.pool:
                    leaving.append(task)
                    ledger = ledger.release(Holder.task(task.id))
                continue
            if self.runner.can_preempt(task):
                candidates.append(self._on_gpu(task))
        return plan_preemption(request.gpus, request.priority, candidates, ledger), leaving

    def _on_gpu(self, task: TaskRecord) -> TaskOnGpu:
        """A running task as the preemption plans see it."""
        checkpoint = self.files.checkpoint(task.id)
        return TaskOnGpu(task.id, Priority.parse(task.priority).level, task.preemptible, tuple(task.units),
                         steps_since(task.progress.get("step"), int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None),
                         task.started_at.timestamp() if task.started_at else 0.0)

    def _ask_to_checkpoint(self, victims: Sequence[str], request: PreemptionRequest
                           ) -> tuple[dict[str, Intent | None], Intent | None]:
        """Ask each victim to checkpoint and stop: first one intent — a row per task and the scale's row — then each
        task's desired state (`preempted_by`), then its signal. Each task's row (completed once it is back in the
        queue), and the scale's."""
        tasks = [self.lifecycle.get(task_id) for task_id in victims]
        by = {"business": request.business, "priority": request.priority, "pool": request.pool}
        messages = {task.id: (f"preempting for {request.describe()}, which needs {request.gpus} GPU(s) for pool "
                              f"{request.pool}: asked the trainer to save a checkpoint at its next step and stop (step "
                              f"{task.progress.get('step', 0)})") for task in tasks}
        drafts = [_preemption_row(task, by, messages[task.id]) for task in tasks]
        intent = Intent([*drafts, *([request.scale] if request.scale is not None else [])])
        if intent.rows:
            self.lifecycle.intents.begin(intent)
        failpoints.reached("preempt.intent-recorded")
        rows: dict[str, Intent | None] = {task.id: Intent([draft], ids=[row_id])
                                          for task, draft, row_id in zip(tasks, drafts, intent.ids, strict=False)}
        scale = Intent([request.scale], ids=[intent.ids[-1]]) if request.scale is not None else None
        for task in tasks:
            self.tasks.update(task.id, preempted_by=by)
            self.files.note(task.id, messages[task.id])
            log.info("finetune task %s: %s", task.id, messages[task.id])
            if not self.runner.preempt(task):
                self.files.note(task.id, "the trainer could not be signalled; it is stopped instead")
        failpoints.reached("preempt.asked")
        return rows, scale

    async def _wait_preempted(self, intents: dict[str, Intent | None]) -> None:
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
                    if (row := left.pop(task_id)) is not None:
                        _complete_preemption(self.lifecycle.intents, row, task)
            if left:
                await asyncio.sleep(0.1)


# The History row of a preemption: part of an intent begun before the signal, completed once the task is back in the
# queue.
def _preemption_row(task: TaskRecord, by: dict[str, Any], message: str) -> HistoryDraft:
    return HistoryDraft(Action.FINETUNE, task.id, before={"status": task.status, "units": list(task.units)},
                        after={"status": TaskState.QUEUED, "preemptedBy": by}, message=message[:500])


def _complete_preemption(intents: Intents, intent: Intent, task: TaskRecord) -> None:
    intents.complete(intent, Outcome.SUCCESS, after={"status": task.status, "preemptedBy": task.preempted_by})
