"""A finetune task's state machine: pending → queued → preparing → training → completed | failed | cancelled
(`corral.domain.tasks.TaskState`), with resume back to queued.

Every state change goes through `Lifecycle.set_status`, which writes the database row, the task log, the History
row of a lifecycle step and a `finetune_task` event together. `follow` reads a launched trainer's new progress lines
and its exit (completed, preempted back to the queue, failed) and enforces the timeout; `spawn` launches a trainer
(resuming from its newest checkpoint by itself); `recover` re-adopts, resumes or fails the trainers launched before
a control-plane restart — never silently lost. What starts when is the queue round's (`finetune.queue_round`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from corral.domain.errors import Conflict, Hint, NotFound
from corral.domain.history import Action, HistoryDraft, Outcome
from corral.domain.hyperparameters import DEFAULTS
from corral.domain.preemption import PreemptionRequest
from corral.domain.queue import Priority
from corral.domain.tasks import ACTIVE, FINISHED, WAITING, StopCause, TaskState
from corral.domain.usage import legacy_runs, runs_after
from corral.events import EventBus, EventType
from corral.finetune.intake import Submission
from corral.finetune.progress import ProgressEvent, event_of, progress_update
from corral.finetune.runners import TrainerRunner
from corral.finetune.store import TaskRecord, TaskStore
from corral.finetune.task_files import TaskFiles
from corral.intents import Intents
from corral.views import FinetuneTask

log = logging.getLogger("corral.finetune")

# Progress lines that only move a task's progress (the others also change its state or result).
_PROGRESS_ONLY = (ProgressEvent.STEP, ProgressEvent.DATASET, ProgressEvent.EVAL, ProgressEvent.PREEMPTED)


def now() -> datetime:
    return datetime.now(timezone.utc)


class Lifecycle:
    def __init__(self, tasks: TaskStore, files: TaskFiles, runner: TrainerRunner, bus: EventBus, intents: Intents,
                 save_timeout_s: float = 120.0) -> None:
        self.tasks = tasks
        self.save_timeout_s = save_timeout_s  # how long a timed-out trainer may take to checkpoint before it is stopped
        self.intents = intents  # the History rows of every step (corral.intents: the one writer of history)
        self.files = files
        self.runner = runner
        self.bus = bus

    # reads -------------------------------------------------------------------------------------
    def get(self, task_id: str) -> TaskRecord:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"finetune task '{task_id}' not found", Hint.LIST_FINETUNE_TASKS)
        return task

    def launched(self) -> list[TaskRecord]:
        """Tasks whose trainer was started: running, or (with Kueue) launched and waiting for admission."""
        return self.tasks.list(ACTIVE) + [t for t in self.tasks.list((TaskState.QUEUED,)) if t.pid_start]

    def announce(self, task: TaskRecord) -> None:
        """A `finetune_task` event with the task's view: pages showing it redraw."""
        self.bus.publish(EventType.FINETUNE_TASK, task_view(task))

    # requests ----------------------------------------------------------------------------------
    def create(self, request: Submission) -> TaskRecord:
        """A checked submission (`finetune.intake`) as a `pending` task, with its directory. A failure leaves nothing
        behind: no row, no directory."""
        task = TaskRecord(
            id=f"ft-{secrets.token_hex(4)}", status=TaskState.PENDING, base_model=request.base_model,
            dataset_path=request.dataset_path, method=request.method, priority=request.priority,
            hyperparameters=request.hyperparameters, gpus=request.gpus, timeout_s=request.timeout_s,
            examples=request.examples, memory_gb=request.memory_gb, created_at=now(), preemptible=request.preemptible,
            datasets=request.dataset_sources, business_tag=request.business_tag, runs=[],
        )
        directory = self.files.dir(task.id)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            # The dataset as validated, copied beside the task: a file replaced or edited later changes nothing of it.
            if request.dataset_snapshot is not None:  # a table or a mix: the records validated, as JSONL
                self.files.write_snapshot(task.id, request.dataset_snapshot)
            else:
                self.files.snapshot_dataset(task.id, Path(request.dataset_path), request.dataset_sha256)
            self.tasks.add(task)
        except BaseException:  # nothing left behind: no directory without its task
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.files.note(task.id, f"submitted: {task.method} of {task.base_model} on {task.examples} examples "
                                 f"({request.dataset_format}; snapshot {self.files.dataset(task.id).name}, sha256 "
                                 f"{request.dataset_sha256[:16]}…), priority {task.priority} "
                                 f"({Priority.parse(task.priority).level} on the business scale), "
                                 + ("preemptible" if task.preemptible else "not preemptible")
                                 + (f"; GPU time billed to business '{task.business_tag}'" if task.business_tag else ""))
        _record_submitted(self.intents, task)
        self.announce(self.get(task.id))
        return task

    async def cancel(self, task_id: str) -> None:
        task = self.get(task_id)
        if task.status in FINISHED:
            raise Conflict(f"task {task_id} is already {task.status}")
        if task.status in ACTIVE or task.pid_start:
            await self.stop(task, TaskState.CANCELLED, "cancelled by request", StopCause.REQUEST)
        else:
            self.set_status(task_id, TaskState.CANCELLED, "cancelled by request", cause=StopCause.REQUEST, finished_at=now())

    async def resume(self, task_id: str) -> None:
        """A cancelled, timed-out or failed task back in the queue; when it starts, the trainer continues from its newest
        checkpoint (the Trainer's `resume_from_checkpoint`: weights, optimizer, schedule, RNG and data position).
        Conflict when its state does not allow it or it has no checkpoint. Its timeout counts again from the new start,
        and the steps replayed since that checkpoint replace their first values in the curves (`TaskFiles.curve`)."""
        task = self.get(task_id)
        if task.status not in (TaskState.CANCELLED, TaskState.FAILED):
            hint = ("it is still queued or running" if task.status not in FINISHED else "it completed; its checkpoints were "
                    "removed with its result")
            raise Conflict(f"task {task_id} is {task.status}: only a cancelled, timed-out or failed task can be resumed ({hint})")
        checkpoint = self.files.checkpoint(task_id)
        if checkpoint is None:
            raise Conflict(f"task {task_id} has no checkpoint to resume from (it saves one every saveSteps "
                           f"{task.hyperparameters.get('saveSteps', DEFAULTS['saveSteps'])} steps, and stopped "
                           "before the first): submit it again instead")
        if task.reclaimed:
            raise Conflict(f"task {task_id} is still giving back the replicas it reclaimed "
                           f"({', '.join(f'{p} ({n})' for p, n in task.reclaimed.items())}); resume it once they are restored")
        # A Job that failed on its own is kept by the cluster (ttlSecondsAfterFinished): it goes before a new one takes its
        # name. A local trainer is gone already (a no-op then).
        await self.runner.stop(task)
        self.files.note(task_id, f"resume requested: from {checkpoint} (status was {task.status}: {task.reason})")
        self.set_status(task_id, TaskState.QUEUED, f"resumed from {checkpoint}; waiting for its turn", started_at=None,
                        finished_at=None, pid=None, pid_start=None, units=[], output=None, bypassed=0, preempted_by=None,
                        promised_start=None)

    def resumable(self, task_id: str) -> bool:
        """Whether `resume` would accept the task now (for the UI's button)."""
        task = self.tasks.get(task_id)
        return (task is not None and task.status in (TaskState.CANCELLED, TaskState.FAILED) and not task.reclaimed
                and self.files.checkpoint(task_id) is not None)

    # the trainers --------------------------------------------------------------------------------
    def recover(self) -> None:
        """After a control-plane restart: every launched task's trainer re-adopted, followed to its result, resumed
        from its last checkpoint, or failed with the reason."""
        for task in self.launched():
            if self.runner.alive(task):
                self.files.note(task.id, f"re-adopted trainer process {task.pid} after a control-plane restart")
            elif task.preempted_by:  # it was giving its GPUs to a replica: back to the queue, not onto those GPUs
                self.files.note(task.id, "the preempted trainer exited while Corral was down")
                self.follow(task)
            elif self.files.reported(task.id, ProgressEvent.COMPLETED):
                self.files.note(task.id, "the trainer finished while Corral was down")
                self.follow(task)  # reads its result: completed, never launched again
            elif self.files.checkpoint(task.id):
                self.files.note(task.id, "the trainer died while Corral was down; resuming from its last checkpoint")
                self.spawn(task)
            else:
                self.set_status(task.id, TaskState.FAILED, "the trainer died while Corral was down and had no checkpoint to "
                                "resume from", finished_at=now())

    def spawn(self, task: TaskRecord, units: list[str] | None = None, visible: list[str] | None = None) -> None:
        """Launch the task's trainer on `units` (its own by default; `visible`: how CUDA_VISIBLE_DEVICES names them)."""
        self.files.write_spec(task)
        units = task.units if units is None else units
        visible = units if visible is None else visible
        started = self.runner.launch(task, self.files.dir(task.id), visible)
        checkpoint = self.files.checkpoint(task.id)  # the trainer resumes from it by itself
        if task.preempted_by:
            self.files.note(task.id, f"GPUs free again after its preemption by {describe_preemptor(task.preempted_by)}: "
                                     + (f"resuming from {checkpoint}" if checkpoint else "no checkpoint was saved; starting over"))
        self.set_status(task.id, TaskState.PREPARING, f"resuming from {checkpoint}" if checkpoint else "loading the model and dataset",
                        new_run=True, units=units, started_at=task.started_at or now(), preempted_by=None, promised_start=None,
                        **started)

    def follow(self, task: TaskRecord) -> None:
        """A launched task's new progress lines, then its trainer: admitted (Kueue), past its timeout, or exited —
        completed, preempted (back to the queue, to resume from its checkpoint) or failed."""
        for fields in self.files.new_progress(task.id):
            kind = event_of(fields)
            if kind is ProgressEvent.TRAINING and task.status != TaskState.TRAINING:
                task = self.set_status(task.id, TaskState.TRAINING, "training", progress=progress_update(task.progress, fields))
            elif kind in _PROGRESS_ONLY:
                task = self.tasks.update(task.id, progress=progress_update(task.progress, fields))
                self.announce(task)
            elif kind is ProgressEvent.COMPLETED:
                task = self.tasks.update(task.id, output=fields["output"], progress=progress_update(task.progress, fields))
        if self.runner.alive(task):
            if waiting := self.runner.waiting(task):
                if task.reason != waiting:
                    self.set_status(task.id, TaskState.QUEUED, waiting)  # launched, not admitted yet (Kueue)
                return
            if task.status == TaskState.QUEUED:
                task = self.set_status(task.id, TaskState.PREPARING, "admitted; loading the model and dataset", started_at=now())
            if task.started_at and (now() - task.started_at).total_seconds() > task.timeout_s:
                asyncio.get_running_loop().create_task(self.stop(
                    task, TaskState.CANCELLED, f"timed out after {task.timeout_s:.0f} s (timeoutSeconds)", StopCause.TIMEOUT))
            return
        if task.output:  # the trainer reported its result before exiting
            self.set_status(task.id, TaskState.COMPLETED, f"completed; output in {task.output}", finished_at=now(), pid=None,
                            pid_start=None)
        elif task.preempted_by or self.files.last_event(task.id) is ProgressEvent.PREEMPTED:
            self.runner.failure(task)  # reaps the process
            checkpoint = self.files.checkpoint(task.id)
            saved = f"{checkpoint} saved at step {task.progress.get('step', 0)}" if checkpoint else "no checkpoint saved"
            self.set_status(task.id, TaskState.QUEUED, f"{preempted_reason(task.preempted_by)}; {saved}, resumes from it when "
                            "GPUs free up", pid=None, pid_start=None, units=[], started_at=None, bypassed=0)
        else:
            failure = self.runner.failure(task)
            last = self.files.last_log_line(task.id)
            self.set_status(task.id, TaskState.FAILED, f"{failure}: {last[-300:]}", finished_at=now(), pid=None, pid_start=None)

    async def stop(self, task: TaskRecord, status: TaskState, reason: str, cause: StopCause) -> None:
        """Stop a launched task's trainer, the task ending as `status` for `cause`. A timeout checkpoints first: the
        trainer gets the preemption signal (save at the step end, then exit) and `save_timeout_s` to obey, and only then
        is stopped, so a timed-out task resumes where it stopped instead of losing every step since its last save."""
        self.set_status(task.id, status, reason, cause=cause, finished_at=now())  # first: the exit is not read as a failure
        if cause is StopCause.TIMEOUT and self.runner.preempt(task):
            self.files.note(task.id, f"timed out: asked the trainer to save a checkpoint and exit (at most {self.save_timeout_s:.0f} s)")
            deadline = asyncio.get_running_loop().time() + self.save_timeout_s
            while self.runner.alive(task) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)  # the trainer's exit: a process we may not be the parent of (re-adopted)
            checkpoint = self.files.checkpoint(task.id)
            self.files.note(task.id, f"timed out; {checkpoint} saved, resume continues from it" if checkpoint
                            else "timed out before the trainer saved a checkpoint")
        await self.runner.stop(task)
        self.tasks.update(task.id, pid=None, pid_start=None)

    # the one way a state changes ------------------------------------------------------------------
    def set_status(self, task_id: str, status: TaskState, reason: str, *, cause: StopCause | None = None,
                   new_run: bool = False, **columns: Any) -> TaskRecord:
        """The task's new status and reason (and any other columns): its row, its log, the History row of a lifecycle
        step and its event. `cause`: why Corral stopped it, when it did (History tells a timeout from a request).
        Its runs (what its GPU-seconds are billed from) change in the same row update: a run opens when it turns
        preparing or training, and closes when it leaves them (at `finished_at` when given, else now) or when a trainer
        is launched again (`new_run`: a task found dead after a restart closes its run now and opens another)."""
        current = self.get(task_id)
        before = current.status
        runs = current.runs if current.runs is not None else legacy_runs(
            current.started_at, current.finished_at, before in ACTIVE, current.gpus)
        at = columns.get("finished_at") or now()
        columns["runs"] = runs_after(runs, status in ACTIVE, at, current.gpus, new_run)
        task = self.tasks.update(task_id, status=status, reason=reason, **columns)
        if (step := _history_event(before, status, self.runner.admits_itself, cause)) is not None:  # the History page's row
            said = (f"on {', '.join(task.units)}" if task.units else "on the CPU") if step[0] == "started" else reason
            _record_step(self.intents, task_id, before, status, step[1], f"{step[0]} {said}")
        self.files.note(task_id, f"{status}: {reason}")
        log.info("finetune task %s: %s (%s)", task_id, status, reason)
        self.announce(task)
        return task


# History rows: a task's steps are over as they are written (the task's own row is its desired state) -------
def _record_submitted(intents: Intents, task: TaskRecord) -> None:
    intents.applied(HistoryDraft(Action.FINETUNE, task.id, after={
        "status": task.status, "method": task.method, "priority": task.priority, "preemptible": task.preemptible,
        **({"businessTag": task.business_tag} if task.business_tag else {})},
        message=f"submitted: {task.method} of {task.base_model} on {task.examples} examples"))


def _record_step(intents: Intents, task_id: str, before: TaskState, after: TaskState, outcome: Outcome, message: str) -> None:
    intents.applied(HistoryDraft(Action.FINETUNE, task_id, before={"status": before}, after={"status": after},
                                 message=message[:500]), outcome)


def _history_event(before: TaskState, after: TaskState, admission: bool,
                   cause: StopCause | None = None) -> tuple[str, Outcome] | None:
    """The lifecycle steps History records (what happened, its outcome); queue-reason updates are not steps.
    `admission`: the runner's Jobs wait for Kueue and a task passes `preparing` before it is admitted, so it has
    started when it trains; otherwise when its trainer is launched. `cause`: why a cancelled task was stopped."""
    if before == after:
        return None
    if ((after, before) == (TaskState.TRAINING, TaskState.PREPARING) if admission
            else (after == TaskState.PREPARING and before in WAITING)):
        return "started", Outcome.SUCCESS
    if after == TaskState.QUEUED and before == TaskState.TRAINING:  # e.g. Kueue suspended its Job again
        return "preempted:", Outcome.RESTARTING
    if after == TaskState.QUEUED and before in (TaskState.CANCELLED, TaskState.FAILED):  # POST .../resume
        return "queued again:", Outcome.SUCCESS
    if after == TaskState.COMPLETED:
        return "completed:", Outcome.SUCCESS
    if after == TaskState.FAILED:
        return "failed:", Outcome.FAILED
    if after == TaskState.CANCELLED:
        return "cancelled:", Outcome.TIMEOUT if cause is StopCause.TIMEOUT else Outcome.SUCCESS
    return None


# wording -------------------------------------------------------------------------------------------
def describe_preemptor(by: Mapping[str, Any] | None) -> str:
    """Who preempted a task, from its `preempted_by`: "business '<b>' (priority P)" or "finetune task <id> (priority P)"."""
    if not by:
        return "a higher-priority business"
    if by.get("task"):  # a higher-priority finetune task (`Preemption.for_waiting_task`)
        return f"finetune task {by['task']} (priority {by.get('priority')})"
    return PreemptionRequest(str(by.get("pool") or ""), by.get("business"), int(by.get("priority") or 0), 0).describe()


def preempted_reason(by: Mapping[str, Any] | None) -> str:
    """The queued task's reason: "preempted by business '<b>' (priority P)"."""
    return f"preempted by {describe_preemptor(by)}"


def task_view(task: TaskRecord) -> FinetuneTask:
    return FinetuneTask(
        id=task.id, status=task.status, reason=task.reason, baseModel=task.base_model,
        datasetPath=task.dataset_path, method=task.method, priority=task.priority, gpus=task.gpus,
        memoryGb=task.memory_gb, timeoutSeconds=task.timeout_s, hyperparameters=task.hyperparameters,
        examples=task.examples, progress=task.progress, units=task.units, output=task.output,  # type: ignore[arg-type]
        reclaimed=task.reclaimed or {}, preemptible=task.preemptible, datasets=task.datasets, businessTag=task.business_tag,
        createdAt=task.created_at.isoformat() if task.created_at else None,
        startBy=task.promised_start.isoformat() if task.promised_start and task.status == TaskState.QUEUED else None,
        startedAt=task.started_at.isoformat() if task.started_at else None,
        finishedAt=task.finished_at.isoformat() if task.finished_at else None,
    )
