"""The finetune task manager: queue, lifecycle, persistence, recovery.

Every state change goes through `_set`, which writes the database row, the task log and a
`finetune_task` event together. One loop (every 0.5 s) follows running trainers (progress lines,
exit, timeout) and runs a scheduling round: the pure queue policy (`corral.domain.queue`) decides
what starts where; this module only carries it out. Trainers run in their own session and outlive
the control plane; on start they are re-adopted, resumed from their last checkpoint, or failed with
the reason — never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.aio import within
from corral.backends.local.process import tail_lines
from corral.config import Settings
from corral.domain import preflight
from corral.domain.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.domain.gpu_ledger import GpuClaim, GpuLedger, Holder
from corral.domain.history import Action, HistoryDraft, Intent, Outcome
from corral.domain.memory import GIB, MemoryEstimate, ModelSpec, TrainingSetup, training_memory
from corral.domain.preemption import (
    PreemptionOutcome,
    PreemptionPlan,
    PreemptionRequest,
    TaskOnGpu,
    may_reclaim,
    plan_preemption,
    steps_since,
)
from corral.domain.queue import (
    Capacity,
    Demand,
    Priority,
    RunningTask,
    Strategy,
    Unit,
    WaitingTask,
    carried_promises,
    estimated_end,
    released_units,
    schedule,
)
from corral.domain.reclaim import plan_reclaim
from corral.events import EventBus
from corral.finetune import hyperparameters as hyperparameter_rules
from corral.finetune.checks import chat_template_problem, vllm_lora_args
from corral.finetune.dataset import read_dataset
from corral.finetune.runners import ProcessRunner, TrainerRunner
from corral.finetune.store import ACTIVE, FINISHED, WAITING, TaskRecord, TaskStore
from corral.finetune.trainer import newest_checkpoint
from corral.gpus.inventory import GpuInventory
from corral.model_files import size_model, size_model_or_none
from corral.paths import confine_dataset
from corral.store.state import StateStore
from corral.views import ExportState, FinetuneTask, PreviewResult

if TYPE_CHECKING:
    from corral.controller import Controller

log = logging.getLogger("corral.finetune")

DEFAULT_HYPERPARAMETERS: dict[str, Any] = dict(hyperparameter_rules.DEFAULTS)  # names, types and ranges: finetune.hyperparameters
METHODS = ("lora", "qlora", "full")
MAX_PATH = 4096  # characters of baseModel and datasetPath
MAX_MEMORY_GB = 1_000_000.0
MAX_TIMEOUT_S = 366 * 86400.0  # timeoutSeconds: a year; the queue turns it into a time (a reservation, a start-by date)
# What the trainer imports (importable names; `corral[train]` installs the first three).
TRAINER_PACKAGES = ("torch", "transformers", "peft")
QLORA_PACKAGES = ("bitsandbytes",)
PREVIEW_TIMEOUT_S = 120.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


_LAST_TIMESTAMP = datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp()


def queue_time(seconds: float) -> datetime:
    """A time of the queue policy (Unix seconds) as a date. Past the last date there is (a timeout of 1e300 s, which a
    database written before timeoutSeconds had a bound may hold): the last date, instead of an error every round."""
    return datetime.fromtimestamp(min(seconds, _LAST_TIMESTAMP), timezone.utc)


class FinetuneManager:
    def __init__(self, settings: Settings, state: StateStore, bus: EventBus, inventory: Callable[[], GpuInventory],
                 ledger: Callable[[], GpuLedger], controller: Controller | None = None,
                 runner: TrainerRunner | None = None) -> None:
        self.settings = settings
        self.tasks = TaskStore(state)
        self.bus = bus
        self.inventory = inventory  # a fresh NVML read: is there a GPU at all (submit)
        # The one GPU ledger (replicas + launched tasks, fresh free memory), read before every round.
        self.ledger = ledger
        self.controller = controller  # scales pools in and out for the reclaim policy
        self._pool_changes: set[str] = set()  # tasks whose reclaim or restore is in flight
        self._restore_after: dict[str, float] = {}  # task id → monotonic time of the next restore attempt
        self.root = settings.data_dir / "finetune"
        self.runner = runner or ProcessRunner(settings.stop_grace_s)
        self._offsets: dict[str, int] = {}
        self._loop: asyncio.Task | None = None
        self._previews = asyncio.Semaphore(2)
        self._merges: dict[str, asyncio.Task[str | None]] = {}  # task id → its merge in flight (export or deploy)
        self._export_errors: dict[str, str] = {}  # task id → why its last merge failed
        # GPUs freed by a preemption, kept out of the queue's reach until the replicas they were freed for hold them.
        self._kept_for_replicas: dict[int, tuple[str, ...]] = {}
        self._preemptions = asyncio.Lock()  # one at a time: two scale-outs never pick the same victims

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        for task in self._launched():
            if self.runner.alive(task):
                self._note(task.id, f"re-adopted trainer process {task.pid} after a control-plane restart")
            elif task.preempted_by:  # it was giving its GPUs to a replica: back to the queue, not onto those GPUs
                self._note(task.id, "the preempted trainer exited while Corral was down")
                self._follow(task)
            elif self._finished_while_down(task):
                self._note(task.id, "the trainer finished while Corral was down")
                self._follow(task)  # reads its result: completed, never launched again
            elif newest_checkpoint(self._dir(task.id) / "checkpoints"):
                self._note(task.id, "the trainer died while Corral was down; resuming from its last checkpoint")
                self._spawn(task)
            else:
                self._set(task.id, "failed", "the trainer died while Corral was down and had no checkpoint to resume from",
                          finished_at=_now())
        self._loop = asyncio.create_task(self._run(), name="finetune-manager")

    async def close(self) -> None:
        if self._loop:
            self._loop.cancel()
            try:
                await self._loop
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("finetune round failed")
            await asyncio.sleep(0.5)

    # API ---------------------------------------------------------------------------------------
    def submit(self, *, base_model: str, dataset_path: str, method: str = "lora", priority: str = "normal",
               gpus: int | None = None, memory_gb: float | None = None, timeout_s: float | None = None,
               hyperparameters: Mapping[str, Any] | None = None, preemptible: bool | None = None) -> dict[str, Any]:
        """Validate everything, then queue: a task that cannot start now is `queued`, never refused. A refusal
        (InvalidInput: 400) creates nothing: no row, no task directory."""
        if not isinstance(method, str) or method not in METHODS:
            raise InvalidInput(f"method must be one of {', '.join(METHODS)}, got '{_short(method)}'")
        try:
            Priority.parse(priority)
        except (KeyError, AttributeError, TypeError):
            raise InvalidInput(f"priority must be high, normal or low, got '{_short(priority)}'") from None
        if preemptible is not None and not isinstance(preemptible, bool):
            raise InvalidInput(f"preemptible must be true or false, got {_short(preemptible)}")
        preemptible = priority.lower() != "high" if preemptible is None else preemptible  # default: true below high
        hp = hyperparameter_rules.validate(hyperparameters, method)  # the one check of the API, the CLI and the UI
        _check_path_text(base_model, "baseModel")
        if not base_model or not (_is_dir(base_model) or "/" in base_model):
            raise InvalidInput(f"baseModel '{_short(base_model)}' is neither a local model directory nor a hub id (org/name)")
        _check_path_text(dataset_path, "datasetPath")
        dataset_path = str(confine_dataset(dataset_path, self.settings.dataset_roots))  # before the file is opened
        dataset = read_dataset(Path(dataset_path))
        examples = len(dataset.examples)
        if dataset.chat and hp["chatTemplate"] == "model" and (problem := chat_template_problem(base_model, dataset.format)):
            raise InvalidInput(problem)  # a built-in chatTemplate needs nothing from the tokenizer
        inventory = self.inventory()
        has_gpu = inventory.available
        count = (1 if has_gpu else 0) if gpus is None else gpus
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or count > 64:
            raise InvalidInput(f"gpus must be an integer from 0 to 64, got {_short(count)}")
        if count and not has_gpu:
            raise InvalidInput("this machine has no GPU: submit with gpus 0 to train on the CPU")
        if method == "qlora" and not count:
            raise InvalidInput("qlora needs a GPU (bitsandbytes 4-bit); use method 'lora' on the CPU")
        if method == "qlora" and count > 1:
            raise InvalidInput(f"qlora trains on one GPU (its 4-bit weights are not spread over data-parallel processes "
                               f"here), got gpus {count}: submit it with gpus 1, or use lora or full on {count} GPUs "
                               "(distributed data parallel, one process per GPU)")
        if memory_gb is not None and (not _finite(memory_gb) or not 0 <= memory_gb <= MAX_MEMORY_GB):
            raise InvalidInput(f"gpus.memoryGb must be a number of GB from 0 to {MAX_MEMORY_GB:.0f}, got {_short(memory_gb)}")
        timeout = self.settings.finetune_timeout_s if timeout_s is None else timeout_s
        if not _finite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
            raise InvalidInput(f"timeoutSeconds must be a positive number of seconds, at most {MAX_TIMEOUT_S:.0f} (366 days), "
                               f"got {_short(timeout)}")
        self._check_trainer_installed(method)
        need_gb = float(memory_gb) if memory_gb is not None else self._estimate_gb(base_model, method, hp, count)
        if count:
            _check_fits(need_gb, memory_gb is not None, inventory, base_model, method, hp, count)
        task = TaskRecord(
            id=f"ft-{secrets.token_hex(4)}", status="pending", base_model=base_model, dataset_path=str(Path(dataset_path).resolve()),
            method=method, priority=priority.lower(), hyperparameters=hp, gpus=count, timeout_s=float(timeout), examples=examples,
            memory_gb=need_gb, created_at=_now(), preemptible=preemptible,
        )
        directory = self._dir(task.id)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.tasks.add(task)
        except BaseException:  # nothing left behind: no directory without its task
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._note(task.id, f"submitted: {method} of {base_model} on {examples} examples ({dataset.format}), priority {task.priority} "
                            f"({Priority.parse(task.priority).level} on the business scale), "
                            + ("preemptible" if preemptible else "not preemptible"))
        self.tasks.state.record(Action.FINETUNE, task.id, after={"status": "pending", "method": method, "priority": task.priority,
                                                                 "preemptible": preemptible},
                                message=f"submitted: {method} of {base_model} on {examples} examples")
        self.bus.publish("finetune_task", self.view(self.tasks.get(task.id)))  # type: ignore[arg-type]
        self.tick()
        return self.view(self.tasks.get(task.id))  # type: ignore[arg-type]

    def _check_trainer_installed(self, method: str) -> None:
        """A local trainer needs torch, transformers and peft (bitsandbytes for qlora) in Corral's environment:
        refuse at submit instead of a task that fails seconds later. Looked up, not imported (cheap)."""
        if not isinstance(self.runner, ProcessRunner):  # a Job runs the trainer in its own image
            return
        missing = [name for name in TRAINER_PACKAGES if not _importable(name)]
        if missing:
            raise InvalidInput(f"finetuning needs the trainer packages, and {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not installed in Corral's environment "
                               f"({sys.executable}): pip install 'corral[train]'")
        if method == "qlora" and not all(_importable(name) for name in QLORA_PACKAGES):
            raise InvalidInput(f"qlora needs bitsandbytes, which is not installed in Corral's environment ({sys.executable}): "
                               "pip install bitsandbytes (beside 'corral[train]'), or use method 'lora'")

    async def cancel(self, task_id: str) -> dict[str, Any]:
        task = self._get(task_id)
        if task.status in FINISHED:
            raise Conflict(f"task {task_id} is already {task.status}")
        if task.status in ACTIVE or task.pid_start:
            await self._stop(task, "cancelled", "cancelled by request")
        else:
            self._set(task_id, "cancelled", "cancelled by request", finished_at=_now())
        self.tick()
        return self.view(self._get(task_id))

    async def resume(self, task_id: str) -> dict[str, Any]:
        """A cancelled, timed-out or failed task back in the queue; when it starts, the trainer continues from its newest
        checkpoint (the Trainer's `resume_from_checkpoint`: weights, optimizer, schedule, RNG and data position).
        Conflict when its state does not allow it or it has no checkpoint. Its timeout counts again from the new start,
        and the steps replayed since that checkpoint replace their first values in the curves (`curves`)."""
        task = self._get(task_id)
        if task.status not in ("cancelled", "failed"):
            hint = ("it is still queued or running" if task.status not in FINISHED else "it completed; its checkpoints were "
                    "removed with its result")
            raise Conflict(f"task {task_id} is {task.status}: only a cancelled, timed-out or failed task can be resumed ({hint})")
        checkpoint = newest_checkpoint(self._dir(task_id) / "checkpoints")
        if checkpoint is None:
            raise Conflict(f"task {task_id} has no checkpoint to resume from (it saves one every saveSteps "
                           f"{task.hyperparameters.get('saveSteps', DEFAULT_HYPERPARAMETERS['saveSteps'])} steps, and stopped "
                           "before the first): submit it again instead")
        if task.reclaimed:
            raise Conflict(f"task {task_id} is still giving back the replicas it reclaimed "
                           f"({', '.join(f'{p} ({n})' for p, n in task.reclaimed.items())}); resume it once they are restored")
        # A Job that failed on its own is kept by the cluster (ttlSecondsAfterFinished): it goes before a new one takes its
        # name. A local trainer is gone already (a no-op then).
        await self.runner.stop(task)
        self._note(task_id, f"resume requested: from {checkpoint} (status was {task.status}: {task.reason})")
        self._set(task_id, "queued", f"resumed from {checkpoint}; waiting for its turn", started_at=None, finished_at=None,
                  pid=None, pid_start=None, units=[], output=None, bypassed=0, preempted_by=None, promised_start=None)
        self.tick()
        return self.view(self._get(task_id))

    def resumable(self, task_id: str) -> bool:
        """Whether `resume` would accept the task now (for the UI's button)."""
        task = self.tasks.get(task_id)
        return (task is not None and task.status in ("cancelled", "failed") and not task.reclaimed
                and newest_checkpoint(self._dir(task_id) / "checkpoints") is not None)

    def curves(self, task_id: str) -> dict[str, list[tuple[int, float]]]:
        """The training loss, eval loss and learning rate by step, each step once (see `loss_curve`)."""
        return {"loss": self.loss_curve(task_id), "evalLoss": self.loss_curve(task_id, "evalLoss"),
                "learningRate": self.loss_curve(task_id, "learningRate")}

    async def deploy(self, task_id: str, *, engine: str, model_tag: str, replicas: int = 1, gpus_per_replica: int | None = None,
                     merge: bool = False) -> dict[str, Any]:
        """A completed task's result as a model pool, through the controller like any other deployment."""
        from corral.controller import DeploySpec

        assert self.controller is not None
        model_id, engine_args = await self.deployable_model(task_id, engine, merge, model_tag=model_tag)
        return await self.controller.deploy(DeploySpec(engine=engine, model_id=model_id, model_tag=model_tag, replicas=replicas,
                                                       deploy_as_pool=True, gpus_per_replica=gpus_per_replica,
                                                       engine_args=engine_args))

    def loss_curve(self, task_id: str, key: str = "loss") -> list[tuple[int, float]]:
        """(step, loss) of every logged step, from the trainer's progress file; `key="evalLoss"` for the eval
        loss, `"learningRate"` for the schedule. A step replayed after a resume from a checkpoint counts once
        (its latest value)."""
        path = self._dir(self._get(task_id).id) / "progress.jsonl"
        if not path.exists():
            return []
        kind = "eval" if key == "evalLoss" else "step"
        points: dict[int, float] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                event = json.loads(line)
                if event.get("event") == kind and event.get(key) is not None:
                    points[int(event["step"])] = float(event[key])
        return sorted(points.items())

    async def preview(self, *, base_model: str, dataset_path: str, max_seq_len: int | None = None,
                      train_on_prompt: bool | None = None, examples: int = 5, chat_template: str | None = None) -> PreviewResult:
        """What the trainer would make of a dataset, before any GPU is spent: the format, the first examples with
        the tokens the loss covers, and how many examples are truncated or dropped at `maxSeqLen`. The base
        model's tokenizer runs in a child process (transformers stays out of the control plane)."""
        hp = hyperparameter_rules.validate({k: v for k, v in (("maxSeqLen", max_seq_len), ("trainOnPrompt", train_on_prompt),
                                                              ("chatTemplate", chat_template)) if v is not None})
        _check_path_text(base_model, "baseModel")
        if not (_is_dir(base_model) or "/" in base_model):
            raise InvalidInput(f"baseModel '{_short(base_model)}' is neither a local model directory nor a hub id (org/name)")
        _check_path_text(dataset_path, "datasetPath")
        path = confine_dataset(dataset_path, self.settings.dataset_roots)  # before the file is opened (by the child)
        if not _importable("transformers"):
            raise InvalidInput(f"the preview needs transformers in Corral's environment ({sys.executable}): pip install 'corral[train]'")
        request = {"baseModel": base_model, "datasetPath": str(path), "maxSeqLen": hp["maxSeqLen"],
                   "trainOnPrompt": hp["trainOnPrompt"], "chatTemplate": hp["chatTemplate"], "examples": max(0, min(int(examples), 50))}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1" if _is_dir(base_model) else os.environ.get("HF_HUB_OFFLINE", "0")}
        async with self._previews:  # each child holds a tokenizer (and torch): a few at a time
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral.finetune.preview", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env)
            try:
                out, err = await within(PREVIEW_TIMEOUT_S, child.communicate(json.dumps(request).encode()))
            except asyncio.TimeoutError:
                raise InvalidInput(f"the preview took longer than {PREVIEW_TIMEOUT_S:.0f} s; try a smaller dataset") from None
            finally:  # timed out, or the request went away: the child goes too
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        try:
            answer = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise InvalidInput(f"the preview failed: {tail[0][-500:]}") from None
        if "error" in answer:
            raise InvalidInput(answer["error"])
        return PreviewResult.model_validate(answer)

    async def deployable_model(self, task_id: str, engine: str, merge: bool, model_tag: str | None = None) -> tuple[str, list[str]]:
        """(modelId, engineArgs) that serve a completed task: vLLM loads the LoRA adapter on the base model under
        the pool's tag (so requests for the tag get the adapter; the base model answers to `<tag>-base`), with
        `--max-lora-rank` from the adapter's config; any other engine (or `merge`) gets the adapter merged into
        the weights first."""
        task = self._get(task_id)
        if task.status != "completed" or not task.output:
            raise Conflict(f"task {task_id} is {task.status}; only a completed task can be deployed")
        if task.method == "full":
            return task.output, []
        if engine == "vllm" and not merge:
            return task.base_model, vllm_lora_args(model_tag or task_id, Path(task.output))
        merged = self._dir(task_id) / "merged"
        if not (merged / "config.json").exists():
            error = await asyncio.shield(self._merge(task_id, "for deployment"))  # the same merge as an export's, at most one
            if error:
                raise Conflict(f"merging the adapter failed: {error}")
        return str(merged), []

    def export(self, task_id: str) -> ExportState:
        """Start producing the merged weights of a completed task (TASK_DIR/merged: model + tokenizer, servable by any
        engine); answered at once, the state follows (`export_state`). A full finetune's result is already plain weights."""
        task = self._get(task_id)
        if task.status != "completed" or not task.output:
            raise Conflict(f"task {task_id} is {task.status}; only a completed task can be exported")
        state = self.export_state(task_id)
        if state.state in ("none", "failed"):
            self._export_errors.pop(task_id, None)
            self._merge(task_id, "on request (export)")
            state = self.export_state(task_id)
        return state

    def export_state(self, task_id: str) -> ExportState:
        task = self._get(task_id)
        merged = self._dir(task_id) / "merged"
        if task.method == "full" and task.output:
            return ExportState(taskId=task_id, state="done", directory=task.output, reason="a full finetune's result is the whole model")
        if (merged / "config.json").exists():
            return ExportState(taskId=task_id, state="done", directory=str(merged), reason="the adapter merged into the base model")
        if task_id in self._merges:
            return ExportState(taskId=task_id, state="running", directory=None, reason="merging the adapter into the base model")
        if error := self._export_errors.get(task_id):
            return ExportState(taskId=task_id, state="failed", directory=None, reason=error)
        return ExportState(taskId=task_id, state="none", directory=None, reason="not exported yet")

    def _merge(self, task_id: str, why: str) -> asyncio.Task[str | None]:
        """The one merge of a task's adapter in flight (a child process: merging loads the whole model), started if
        none is; its result is None or why it failed. It writes beside TASK_DIR/merged and renames when done, so
        `merged` is either complete or absent."""
        if (running := self._merges.get(task_id)) is not None:
            return running

        async def merge() -> str | None:
            self._note(task_id, f"merging the adapter into the base model {why}")
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral.finetune.merge", str(self._dir(task_id)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            try:
                output, _ = await child.communicate()
            finally:
                if child.returncode is None:  # Corral is closing: the child goes too
                    child.kill()
                    await child.wait()
            error = None if child.returncode == 0 else (output.decode(errors="replace").strip()[-500:] or f"exit code {child.returncode}")
            if error:
                self._export_errors[task_id] = error
            self._note(task_id, f"merge failed: {error}" if error else f"merged weights in {self._dir(task_id) / 'merged'}")
            return error

        job = asyncio.get_running_loop().create_task(merge(), name=f"merge-{task_id}")
        self._merges[task_id] = job

        def done(_: asyncio.Task) -> None:
            self._merges.pop(task_id, None)
            if (task := self.tasks.get(task_id)) is not None:
                self.bus.publish("finetune_task", self.view(task))  # pages showing the task redraw its export state

        job.add_done_callback(done)
        return job

    def get(self, task_id: str) -> dict[str, Any]:
        return self.view(self._get(task_id))

    def list(self) -> list[dict[str, Any]]:
        return [self.view(t) for t in self.tasks.list()]

    def queue_summary(self) -> dict[str, Any]:
        waiting = self.tasks.list(WAITING)
        running = self.tasks.list(ACTIVE)
        threshold = self.settings.queue_warning_threshold
        warning = (f"{len(waiting)} tasks are waiting (more than {threshold}): consider more GPUs, lower priorities or "
                   "cancelling stale tasks") if len(waiting) > threshold else None
        return {"waiting": len(waiting), "running": [t.id for t in running], "strategy": self.settings.queue_strategy,
                "backfillSlackSeconds": self.settings.backfill_slack_s, "warning": warning}

    def log_path(self, task_id: str) -> Path:
        self._get(task_id)
        return self._dir(task_id) / "train.log"

    # scheduling --------------------------------------------------------------------------------
    def tick(self) -> None:
        for task in self._launched():
            self._follow(task)
        self._schedule_round()
        self._restore_reclaimed()

    def _launched(self) -> list[TaskRecord]:
        """Tasks whose trainer was started: running, or (with Kueue) launched and waiting for admission."""
        return self.tasks.list(ACTIVE) + [t for t in self.tasks.list(("queued",)) if t.pid_start]

    def gpu_claims(self) -> list[GpuClaim]:
        """The GPU units launched tasks hold, for the GPU ledger (`domain.gpu_ledger`)."""
        return [GpuClaim(Holder.task(t.id), tuple(t.units)) for t in self._launched() if t.units]

    def _schedule_round(self) -> None:
        waiting = [t for t in self.tasks.list(WAITING) if not t.pid_start]
        if not waiting:
            return
        if self.runner.admits_itself:  # Kueue admits against its quotas; every task's Job is created now
            for task in waiting:
                self._note(task.id, "creating its Job for Kueue to admit")
                self._spawn(task, units=[], visible=[])
            return
        running = self._launched()
        ledger = self.ledger()  # replicas' and launched tasks' units are held there
        if owed := self._units_owed_to_pools():  # kept for the replicas being restored, not for the next task
            restoring = Holder.replica("(pools being restored)")
            kept = tuple(u.id for u in ledger.free_units(whole_only=True))[:owed]  # where the restored replicas will go
            ledger = ledger.hold(restoring, kept)
        ledger = self._keep_for_replicas(ledger)
        # Preflight (domain.preflight): a unit's room is NVML's free memory now less what replicas starting there will
        # take; a task fits only if its estimate plus the margin fits that room.
        margin = self.settings.finetune_memory_margin_gb * GIB
        room = preflight.rooms([(u.id, u.memory_free_bytes) for u in ledger.free_units()], self._starting_replicas(ledger))
        cpu_slots = max(0, self.settings.cpu_training_slots - sum(1 for t in running if not t.units))
        now = time.time()  # easy-backfill: running tasks' estimated ends (timeout, or the trainer's ETA) and bounds
        offered = [WaitingTask(t.id, Priority.parse(t.priority), t.created_at.timestamp() if t.created_at else 0.0,
                               Demand(t.gpus, t.memory_gb * GIB), t.bypassed, estimated_s=t.timeout_s,
                               promised_start=t.promised_start.timestamp() if t.promised_start else None) for t in waiting]
        decision = schedule(
            offered,
            Capacity(preflight.admissible(room, margin), cpu_slots, now=now, running=tuple(
                RunningTask(t.id, tuple(Unit(u.id, max(0.0, u.free_bytes - margin)) for u in released_units(ledger, t.units)),
                            estimated_end(t.started_at.timestamp() if t.started_at else None, t.timeout_s,
                                          t.progress.get("etaAt"), now))
                for t in running if t.units)),
            Strategy(self.settings.queue_strategy), self.settings.max_bypass, self.settings.backfill_slack_s,
        )
        for task_id, chosen in decision.starts:  # the ledger refuses a unit that is not free: check all before starting any
            ledger = ledger.hold(Holder.task(task_id), chosen)
        for task_id in decision.bypassed:
            self.tasks.update(task_id, bypassed=self._get(task_id).bypassed + 1)
        by_id = {t.id: t for t in waiting}
        for task_id, promise in carried_promises(offered, decision).items():  # easy-backfill's promises, before acting
            by_id[task_id] = self.tasks.update(task_id, promised_start=None if promise is None else queue_time(promise))
        started = []
        for task_id, chosen in decision.starts:
            log.info("starting finetune task %s on %s", task_id, ", ".join(chosen) or "the CPU")
            self._note(task_id, f"starting on {', '.join(chosen) or 'the CPU'}")
            self._spawn(by_id[task_id], units=list(chosen), visible=[_visible(ledger, u) for u in chosen])
            started.append(task_id)
        running_ids = [t.id for t in running] + started
        self._maybe_reclaim([by_id[t] for t in decision.waiting], ledger)
        for task_id, why in decision.waiting.items():
            if why.startswith("waiting for GPU: needs"):  # too few units with the memory: the numbers when memory is why
                why = preflight.shortfall(Demand(by_id[task_id].gpus, by_id[task_id].memory_gb * GIB), room, margin) or why
            reason = f"queued, {why.replace('waiting for GPU:', 'waiting for GPU to be released:')} (currently running: {', '.join(running_ids) or 'none'})"
            if held := decision.reservations.get(task_id):
                reason += f"; GPU {', '.join(held.units)} reserved for it" + (
                    "" if held.promised_start is None else
                    f": it starts by {queue_time(held.promised_start):%Y-%m-%d %H:%M} UTC at the latest")
            if by := by_id[task_id].preempted_by:
                reason = f"{_preempted_reason(by)}; {reason}"
            if reclaimed := self._get(task_id).reclaimed:
                reason += f"; reclaiming unassigned replicas of {', '.join(f'{p} ({n})' for p, n in reclaimed.items())}"
            if by_id[task_id].status != "queued" or by_id[task_id].reason != reason:
                self._set(task_id, "queued", reason)

    # reclaim (spec 02's optional policy) -------------------------------------------------------
    def _maybe_reclaim(self, waiting: list[TaskRecord], ledger: GpuLedger) -> None:
        """Scale in unassigned pool replicas for the first waiting GPU task they would let start — one reclaim at a
        time, through the pool-safe scale-down; restored when the task ends. On the one priority scale: a task takes
        only replicas of pools whose businesses all rank below it (`domain.preemption.may_reclaim`), so a high task
        (10) reclaims from pools at the default 0, and nothing reclaims from a business above it."""
        if not self.settings.reclaim_unassigned_replicas or self.controller is None or self._pool_changes:
            return
        backend = self.controller.backend
        pools = {d.name: backend.list_pods(d.name) for d in backend.list_deployments() if d.is_pool}
        levels = {pool: self.controller.pool_priority(pool)[0] for pool in pools} if any(t.gpus for t in waiting) else {}
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
            self._note(task.id, f"priority {task.priority} ({level}), above the pools' businesses: reclaiming GPU "
                       + ", ".join(plan.units) + " from unassigned replicas of "
                       + ", ".join(f"{p} ({n}, priority {levels[p]})" for p, n in plan.replicas.items()))
            self._change_pools(task.id, self._reclaim(task.id, dict(plan.replicas)))
            return

    async def _reclaim(self, task_id: str, replicas: dict[str, int]) -> None:
        assert self.controller is not None
        for pool, count in replicas.items():
            try:
                await self.controller.scale_by(pool, -count, reason=f"reclaimed for high-priority finetune task {task_id}")
            except CorralError as exc:
                self._note(task_id, f"could not reclaim replicas of {pool}: {exc.message}")
                self._settle_reclaim(task_id, pool)

    def _units_owed_to_pools(self) -> int:
        if self.controller is None:
            return 0
        owed = 0
        for task in self.tasks.list_reclaiming():
            if task.status in FINISHED:
                for pool, count in (task.reclaimed or {}).items():
                    deployment = self.controller.backend.get_deployment(pool)
                    owed += count * (deployment.gpus_per_replica if deployment else 0)
        return owed

    def _restore_reclaimed(self) -> None:
        """Give pools back the replicas taken for a task once it has ended and its trainer is gone."""
        if self.controller is None:
            return
        for task in self.tasks.list_reclaiming():
            due = self._restore_after.get(task.id, 0.0) <= time.monotonic()
            if task.status in FINISHED and task.pid_start is None and task.id not in self._pool_changes and due:
                self._change_pools(task.id, self._restore(task.id, dict(task.reclaimed or {})))

    async def _restore(self, task_id: str, replicas: dict[str, int]) -> None:
        assert self.controller is not None
        for pool, count in replicas.items():
            try:
                await self.controller.scale_by(pool, count, reason=f"restored after finetune task {task_id} ended")
                self._note(task_id, f"restored {count} replica(s) of {pool}")
            except NotFound:
                self._note(task_id, f"pool {pool} was deleted meanwhile; nothing to restore")
            except CorralError as exc:  # e.g. no free GPU right now: try again later, keep the debt
                if task_id not in self._restore_after:
                    self._note(task_id, f"could not restore {count} replica(s) of {pool} yet ({exc.message}); retrying every 30 s")
                self._restore_after[task_id] = time.monotonic() + 30
                continue
            self._settle_reclaim(task_id, pool)

    def _settle_reclaim(self, task_id: str, pool: str) -> None:
        """Nothing more is owed to `pool` for this task."""
        left = {p: n for p, n in (self._get(task_id).reclaimed or {}).items() if p != pool}
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

    # preemption (a business above a running task needs its GPUs) ----------------------------------
    @contextlib.asynccontextmanager
    async def preempting(self, request: PreemptionRequest) -> AsyncIterator[PreemptionOutcome]:
        """Free `request.gpus` whole GPUs for new replicas of `request.pool`, then let the caller scale inside the
        block. If too few GPUs are free, the tasks `domain.preemption.plan_preemption` picks are asked to checkpoint
        and stop (intent first: a pending history row and `preempted_by` on the task before the signal), wait in the
        queue with the reason, and resume from that checkpoint once GPUs free up. The GPUs they leave are kept from
        the queue (which would otherwise start the task again on them) until the block ends, by which time the new
        replicas hold them. A trainer that has not saved within `preempt_timeout_s` is stopped (it loses the steps
        since its last checkpoint). Nothing is stopped when stopping all candidates would still not be enough."""
        async with self._preemptions:
            plan = self._plan_preemption(request)
            if not plan.needed:
                yield PreemptionOutcome(freed=plan.freed, why_not=plan.why_not)
                return
            key = id(plan)
            self._kept_for_replicas[key] = plan.freed
            try:
                intents = {task_id: self._ask_to_checkpoint(self._get(task_id), request) for task_id in plan.victims}
                await self._wait_preempted(intents)
                yield PreemptionOutcome(tasks=plan.victims, freed=plan.freed)
            finally:
                self._kept_for_replicas.pop(key, None)

    def _plan_preemption(self, request: PreemptionRequest) -> PreemptionPlan:
        candidates = []
        for task in self._launched():
            if task.status not in ACTIVE or not task.units or task.preempted_by or not self.runner.can_preempt(task):
                continue
            checkpoint = newest_checkpoint(self._dir(task.id) / "checkpoints")
            candidates.append(TaskOnGpu(
                task.id, Priority.parse(task.priority).level, task.preemptible, tuple(task.units),
                steps_since(task.progress.get("step"), int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None),
                task.started_at.timestamp() if task.started_at else 0.0))
        return plan_preemption(request.gpus, request.priority, candidates, self.ledger())

    def _ask_to_checkpoint(self, task: TaskRecord, request: PreemptionRequest) -> Intent:
        by = {"business": request.business, "priority": request.priority, "pool": request.pool}
        message = (f"preempting for {request.describe()}, which needs {request.gpus} GPU(s) for pool {request.pool}: "
                   f"asked the trainer to save a checkpoint at its next step and stop (step {task.progress.get('step', 0)})")
        intent = Intent([HistoryDraft(Action.FINETUNE, task.id, before={"status": task.status, "units": list(task.units)},
                                      after={"status": "queued", "preemptedBy": by}, message=message[:500])])
        self.tasks.state.begin(intent)  # the intent, then the desired state, then the signal
        self.tasks.update(task.id, preempted_by=by)
        self._note(task.id, message)
        log.info("finetune task %s: %s", task.id, message)
        if not self.runner.preempt(task):
            self._note(task.id, "the trainer could not be signalled; it is stopped instead")
        return intent

    async def _wait_preempted(self, intents: dict[str, Intent]) -> None:
        """Until every preempted trainer has exited and its task is back in the queue (at most `preempt_timeout_s`,
        then it is stopped). Follows them itself, so the caller need not wait for the next round."""
        deadline = time.monotonic() + self.settings.preempt_timeout_s
        left = dict(intents)
        while left:
            for task_id in list(left):
                task = self._get(task_id)
                if task.status in ACTIVE and not self.runner.alive(task):
                    self._follow(task)  # reads the `preempted` event and the exit: back to `queued`
                    task = self._get(task_id)
                elif task.status in ACTIVE and (time.monotonic() > deadline or not self.runner.can_preempt(task)):
                    self._note(task_id, f"the trainer did not save within {self.settings.preempt_timeout_s:.0f} s "
                                        "(preempt_timeout_s): stopping it; it resumes from its last checkpoint")
                    await self.runner.stop(task)
                    continue
                if task.status not in ACTIVE:  # the intent row keeps its message; `_set` wrote the "preempted:" row
                    self.tasks.state.complete(left.pop(task_id), Outcome.SUCCESS,
                                              after={"status": task.status, "preemptedBy": task.preempted_by})
            if left:
                await asyncio.sleep(0.1)

    def _keep_for_replicas(self, ledger: GpuLedger) -> GpuLedger:
        """The ledger the queue reads, with the GPUs a preemption freed held for the replicas it freed them for."""
        for key, units in self._kept_for_replicas.items():
            free = [u for u in units if ledger.is_free(u)]
            if free:
                ledger = ledger.hold(Holder.replica(f"(replica starting after preemption {key})"), free)
        return ledger

    def _starting_replicas(self, ledger: GpuLedger) -> list[preflight.StartingReplica]:
        """Replicas that hold GPUs and are not ready yet, with what each will take per unit (`domain.preflight`)."""
        if self.controller is None:
            return []
        backend = self.controller.backend
        deployments = {d.name: d for d in backend.list_deployments()}
        starting = []
        for pod in backend.list_pods():
            held = ledger.units_of(Holder.replica(pod.name))
            if pod.ready or not held or (deployment := deployments.get(pod.deployment)) is None:
                continue
            total = max((unit.memory_total_bytes for u in held if (unit := ledger.unit(u)) is not None), default=0.0)
            starting.append(preflight.StartingReplica(pod.name, held, preflight.expected_replica_bytes(
                deployment.engine, deployment.engine_args, total)))
        return starting

    # processes ---------------------------------------------------------------------------------
    def _spawn(self, task: TaskRecord, units: list[str] | None = None, visible: list[str] | None = None) -> None:
        directory = self._dir(task.id)
        (directory / "task.json").write_text(json.dumps({
            "baseModel": task.base_model, "datasetPath": task.dataset_path, "method": task.method,
            "hyperparameters": task.hyperparameters,
        }))
        units = task.units if units is None else units
        visible = units if visible is None else visible
        started = self.runner.launch(task, directory, visible)
        checkpoint = newest_checkpoint(directory / "checkpoints")  # the trainer resumes from it by itself
        if task.preempted_by:
            self._note(task.id, f"GPUs free again after its preemption by {_preempted_by(task.preempted_by)}: "
                                + (f"resuming from {checkpoint}" if checkpoint else "no checkpoint was saved; starting over"))
        self._set(task.id, "preparing", f"resuming from {checkpoint}" if checkpoint else "loading the model and dataset",
                  units=units, started_at=task.started_at or _now(), preempted_by=None, promised_start=None, **started)

    def _follow(self, task: TaskRecord) -> None:
        events = self._read_progress(task.id)
        for event in events:
            kind = event.get("event")
            if kind == "training" and task.status != "training":
                task = self._set(task.id, "training", "training", progress=_progress(task.progress, event))
            elif kind in ("step", "dataset", "eval", "preempted"):
                task = self.tasks.update(task.id, progress=_progress(task.progress, event))
                self.bus.publish("finetune_task", self.view(task))
            elif kind == "completed":
                task = self.tasks.update(task.id, output=event["output"], progress=_progress(task.progress, event))
        if self.runner.alive(task):
            if waiting := self.runner.waiting(task):
                if task.reason != waiting:
                    self._set(task.id, "queued", waiting)  # launched, not admitted yet (Kueue)
                return
            if task.status == "queued":
                task = self._set(task.id, "preparing", "admitted; loading the model and dataset", started_at=_now())
            if task.started_at and (_now() - task.started_at).total_seconds() > task.timeout_s:
                asyncio.get_running_loop().create_task(
                    self._stop(task, "cancelled", f"timed out after {task.timeout_s:.0f} s (timeoutSeconds)"))
            return
        if task.output:  # the trainer reported its result before exiting
            self._set(task.id, "completed", f"completed; output in {task.output}", finished_at=_now(), pid=None, pid_start=None)
        elif task.preempted_by or '"event": "preempted"' in tail_lines(self._dir(task.id) / "progress.jsonl", 1):
            self.runner.failure(task)  # reaps the process
            checkpoint = newest_checkpoint(self._dir(task.id) / "checkpoints")
            saved = f"{checkpoint} saved at step {task.progress.get('step', 0)}" if checkpoint else "no checkpoint saved"
            self._set(task.id, "queued", f"{_preempted_reason(task.preempted_by)}; {saved}, resumes from it when GPUs free up",
                      pid=None, pid_start=None, units=[], started_at=None, bypassed=0)
        else:
            failure = self.runner.failure(task)
            last = tail_lines(self._dir(task.id) / "train.log", 1).strip()
            self._set(task.id, "failed", f"{failure}: {last[-300:]}", finished_at=_now(), pid=None, pid_start=None)

    async def _stop(self, task: TaskRecord, status: str, reason: str) -> None:
        self._set(task.id, status, reason, finished_at=_now())  # first, so the loop does not read the exit as a failure
        await self.runner.stop(task)
        self.tasks.update(task.id, pid=None, pid_start=None)

    def _finished_while_down(self, task: TaskRecord) -> bool:
        """The trainer wrote its result before exiting (a `completed` progress event)."""
        path = self._dir(task.id) / "progress.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return False
        return any(json.loads(line).get("event") == "completed" for line in lines if line.strip())

    def _read_progress(self, task_id: str) -> list[dict[str, Any]]:
        path = self._dir(task_id) / "progress.jsonl"
        try:
            with open(path, encoding="utf-8") as f:
                f.seek(self._offsets.get(task_id, 0))
                data = f.read()
                complete = data[: data.rfind("\n") + 1]  # a line being written is read next time
                self._offsets[task_id] = self._offsets.get(task_id, 0) + len(complete.encode())
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    # helpers -----------------------------------------------------------------------------------
    def _set(self, task_id: str, status: str, reason: str, **columns: Any) -> TaskRecord:
        before = self._get(task_id).status
        task = self.tasks.update(task_id, status=status, reason=reason, **columns)
        if (event := _history_event(before, status, reason, self.runner.admits_itself)) is not None:  # the History page's row
            said = (f"on {', '.join(task.units)}" if task.units else "on the CPU") if event[0] == "started" else reason
            self.tasks.state.record(Action.FINETUNE, task_id, before={"status": before}, after={"status": status},
                                    outcome=event[1], message=f"{event[0]} {said}"[:500])
        self._note(task_id, f"{status}: {reason}")
        log.info("finetune task %s: %s (%s)", task_id, status, reason)
        self.bus.publish("finetune_task", self.view(task))
        return task

    def _note(self, task_id: str, line: str) -> None:
        path = self._dir(task_id) / "train.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"[corral {time.strftime('%H:%M:%S')}] {line}\n")

    def _dir(self, task_id: str) -> Path:
        return self.root / task_id

    def _get(self, task_id: str) -> TaskRecord:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"finetune task '{task_id}' not found; list them with GET /api/finetune/tasks")
        return task

    @staticmethod
    def _estimate_gb(base_model: str, method: str, hp: dict[str, Any], gpus: int) -> float:
        """Memory per GPU from the estimator (`corral.model_files` sizes any model on disk or in the catalogue; a GPU
        task whose model it cannot size is refused, saying to give memoryGb). With several GPUs each runs a
        data-parallel process holding a whole copy: the per-process figure, not total ÷ N."""
        estimate = training_estimate(base_model, method, hp, gpus, strict=bool(gpus))
        return round(estimate[1].total_gb, 2) if estimate and gpus else 0.0

    def view(self, task: TaskRecord) -> FinetuneTask:
        return FinetuneTask(
            id=task.id, status=task.status, reason=task.reason, baseModel=task.base_model,  # type: ignore[arg-type]
            datasetPath=task.dataset_path, method=task.method, priority=task.priority, gpus=task.gpus,
            memoryGb=task.memory_gb, timeoutSeconds=task.timeout_s, hyperparameters=task.hyperparameters,
            examples=task.examples, progress=task.progress, units=task.units, output=task.output,  # type: ignore[arg-type]
            reclaimed=task.reclaimed or {}, preemptible=task.preemptible,
            createdAt=task.created_at.isoformat() if task.created_at else None,
            startBy=task.promised_start.isoformat() if task.promised_start and task.status == "queued" else None,
            startedAt=task.started_at.isoformat() if task.started_at else None,
            finishedAt=task.finished_at.isoformat() if task.finished_at else None,
        )


def training_estimate(base_model: str, method: str, hp: dict[str, Any], gpus: int = 1,
                      strict: bool = False) -> tuple[ModelSpec, MemoryEstimate] | None:
    """The estimator's figures for a task (per GPU) when its base model can be sized (`corral.model_files`: a local
    directory, the Hugging Face cache, the catalogue by name); else None, or with `strict` the 400 saying what to give."""
    sized = size_model(base_model) if strict else size_model_or_none(base_model)
    if sized is None:
        return None
    spec = sized.spec
    setup = TrainingSetup(method=method, seq_len=int(hp["maxSeqLen"]), batch_size=int(hp["batchSize"]),  # type: ignore[arg-type]
                          lora_rank=int(hp["loraRank"]), gradient_checkpointing=bool(hp.get("gradientCheckpointing", True)),
                          processes=max(1, gpus))
    return spec, training_memory(spec, setup)


def _check_fits(need_gb: float, given: bool, inventory: GpuInventory, base_model: str, method: str, hp: dict[str, Any],
                gpus: int) -> None:
    """Refuse a task whose memory per GPU exceeds the largest GPU here: it would wait forever (or OOM)."""
    units = inventory.schedulable_units()
    if not units or need_gb <= 0:
        return
    largest = max(units, key=lambda u: u.memory_total_bytes)
    largest_gb = largest.memory_total_bytes / GIB
    if need_gb <= largest_gb:
        return
    if given:
        raise InvalidInput(f"gpus.memoryGb asks for {need_gb:.1f} GB per GPU, more than the largest GPU here ({largest.name}, "
                           f"{largest_gb:.1f} GB)")
    spec = training_estimate(base_model, method, hp, gpus)
    what = f"{spec[0].display} {method}" if spec else method
    raise InvalidInput(
        f"{what} needs an estimated {need_gb:.1f} GB per GPU (maxSeqLen {hp['maxSeqLen']}, batchSize {hp['batchSize']}, "
        f"{gpus} GPU{'s' if gpus > 1 else ''}), more than the largest GPU here ({largest.name}, {largest_gb:.1f} GB): use "
        + ("" if method == "qlora" else "qlora, ") + "a smaller maxSeqLen or batchSize (with gradientAccumulation), or a smaller model"
        + (", or keep gradientCheckpointing on" if not hp.get("gradientCheckpointing", True) else ""))


def _history_event(before: str, after: str, reason: str, admission: bool) -> tuple[str, Outcome] | None:
    """The lifecycle steps History records (what happened, its outcome); queue-reason updates are not steps.
    `admission`: the runner's Jobs wait for Kueue and a task passes `preparing` before it is admitted, so it has
    started when it trains; otherwise when its trainer is launched."""
    if before == after:
        return None
    if (after, before) == ("training", "preparing") if admission else (after == "preparing" and before in WAITING):
        return "started", Outcome.SUCCESS
    if after == "queued" and before == "training":  # e.g. Kueue suspended its Job again
        return "preempted:", Outcome.RESTARTING
    if after == "queued" and before in ("cancelled", "failed"):  # POST .../resume
        return "queued again:", Outcome.SUCCESS
    if after == "completed":
        return "completed:", Outcome.SUCCESS
    if after == "failed":
        return "failed:", Outcome.FAILED
    if after == "cancelled":
        return "cancelled:", Outcome.TIMEOUT if reason.startswith("timed out") else Outcome.SUCCESS
    return None


def _preempted_by(by: Mapping[str, Any] | None) -> str:
    if not by:
        return "a higher-priority business"
    return PreemptionRequest(str(by.get("pool") or ""), by.get("business"), int(by.get("priority") or 0), 0).describe()


def _preempted_reason(by: Mapping[str, Any] | None) -> str:
    """The queued task's reason: "preempted by business '<b>' (priority P)"."""
    return f"preempted by {_preempted_by(by)}"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return False


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 200) -> str:
    """A value quoted in a refusal: readable (NaN, not nan), and never megabytes long."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _check_path_text(value: Any, field: str) -> None:
    """A path or hub id Corral can store and hand to a process: a string, at most MAX_PATH characters, no NUL."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} is required")
    if len(value) > MAX_PATH:
        raise InvalidInput(f"{field} is {len(value)} characters long; at most {MAX_PATH} are allowed")
    if "\x00" in value:
        raise InvalidInput(f"{field} must not contain a NUL byte")


def _is_dir(value: str) -> bool:
    try:
        return Path(value).is_dir()
    except (OSError, ValueError):
        return False


def _visible(ledger: GpuLedger, unit_id: str) -> str:
    """What CUDA_VISIBLE_DEVICES names a unit by: a whole GPU by index, a MIG instance by its UUID."""
    unit = ledger.unit(unit_id)
    return unit.uuid if unit is not None and not unit.whole and unit.uuid else unit_id


def _progress(previous: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    keys = ("step", "totalSteps", "loss", "learningRate", "epoch", "eta", "evalLoss", "truncated", "dropped", "trainExamples",
            "evalExamples")
    update = {k: event[k] for k in keys if k in event}
    if "eta" in event:  # a time, not a duration: it stays right however late it is read
        update["etaAt"] = event["time"] + event["eta"] if event["eta"] is not None and "time" in event else None
    if event.get("event") == "eval":  # an evaluation reports its loss, not the training step's progress
        update = {"evalLoss": event.get("evalLoss")}
    if "format" in event:
        update["datasetFormat"] = event["format"]
    return {**previous, **update}
