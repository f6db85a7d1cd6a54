"""The finetune task manager: the one door to finetune tasks, composing one part per concern.

- `intake`: a submit or preview request checked against this machine (the pure checks are `corral.domain`'s);
- `lifecycle`: the task state machine — every state change writes the row, the task log, the History row and a
  `finetune_task` event together; trainers are followed, stopped, and re-adopted or resumed after a restart;
- `queue_round`: the scheduling round carrying out the pure queue policy (`corral.domain.queue`);
- `preemption`: a higher-priority business's scale-out takes GPUs from running tasks (checkpoint, queue, resume);
- `reclaim`: unassigned pool replicas scaled in for a high-priority task, restored when it ends;
- `merges`: a completed task exported as merged weights or deployed as a model pool;
- `task_files`: the task directory shared with the trainer (its progress lines: `finetune.progress`).

One loop (every 0.5 s) follows running trainers (progress lines, exit, timeout), runs a scheduling round and gives
pools back what was reclaimed. Trainers run in their own session and outlive the control plane; on start they are
re-adopted, resumed from their last checkpoint, or failed with the reason — never silently lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.aio import stop
from corral.config import Settings
from corral.domain.gpu_ledger import GpuClaim, GpuLedger, Holder
from corral.domain.preemption import PreemptionOutcome, PreemptionRequest
from corral.events import EventBus
from corral.finetune.intake import Intake
from corral.finetune.lifecycle import Lifecycle, task_view
from corral.finetune.merges import Merges
from corral.finetune.preemption import Preemption
from corral.finetune.queue_round import QueueRound
from corral.finetune.reclaim import Reclaim
from corral.finetune.runners import ProcessRunner, TrainerRunner
from corral.finetune.store import TaskRecord, TaskStore
from corral.finetune.task_files import TaskFiles
from corral.gpus.inventory import GpuInventory
from corral.intents import Intents
from corral.store.state import StateStore
from corral.views import DeployResult, ExportState, FinetuneTask, PreviewResult, QueueSummary

if TYPE_CHECKING:
    from corral.controller import Controller

log = logging.getLogger("corral.finetune")

ROUND_INTERVAL_S = 0.5


class FinetuneManager:
    def __init__(self, settings: Settings, state: StateStore, bus: EventBus, inventory: Callable[[], GpuInventory],
                 ledger: Callable[[], GpuLedger], controller: Controller | None = None,
                 runner: TrainerRunner | None = None) -> None:
        self.settings = settings
        self.tasks = TaskStore(state)
        self.bus = bus
        self.runner = runner or ProcessRunner(settings.stop_grace_s)
        self.files = TaskFiles(settings.data_dir / "finetune")
        # inventory: a fresh NVML read (is there a GPU at all, at submit); ledger: the one GPU ledger (replicas +
        # launched tasks, fresh free memory), read before every round; controller: its queries and scaling.
        self.intake = Intake(settings, inventory, self.runner)
        self.lifecycle = Lifecycle(self.tasks, self.files, self.runner, bus, Intents(state), settings.preempt_timeout_s)
        self.reclaim = Reclaim(settings, self.tasks, self.files, controller)
        self.preemption = Preemption(settings, self.tasks, self.lifecycle, self.files, self.runner, ledger)
        self.queue = QueueRound(settings, self.tasks, self.lifecycle, self.files, self.runner, ledger, self.reclaim,
                                self.preemption, controller)
        self.merges = Merges(self.lifecycle, self.files, controller)
        self._loop: asyncio.Task | None = None

    # running -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.lifecycle.recover()
        self._loop = asyncio.create_task(self._run(), name="finetune-manager")

    async def close(self) -> None:
        await stop(self._loop)

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("finetune round failed")
            await asyncio.sleep(ROUND_INTERVAL_S)

    def tick(self) -> None:
        """One round: follow the launched trainers, start what the queue policy says, restore reclaimed replicas."""
        for task in self.lifecycle.launched():
            self.lifecycle.follow(task)
        self.queue.run()
        self.reclaim.restore_due()

    # tasks -------------------------------------------------------------------------------------
    def submit(self, *, base_model: str, dataset_path: str | None, method: str = "lora", priority: str = "normal",
               gpus: int | None = None, memory_gb: float | None = None, timeout_s: float | None = None,
               hyperparameters: Mapping[str, Any] | None = None, preemptible: bool | None = None,
               datasets: list[Any] | None = None, business_tag: str | None = None) -> FinetuneTask:
        """Validate everything, then queue: a task that cannot start now is `queued`, never refused. A refusal
        (InvalidInput: 400) creates nothing: no row, no task directory."""
        request = self.intake.check_submit(base_model=base_model, dataset_path=dataset_path, method=method, priority=priority,
                                           gpus=gpus, memory_gb=memory_gb, timeout_s=timeout_s,
                                           hyperparameters=hyperparameters, preemptible=preemptible, datasets=datasets,
                                           business_tag=business_tag)
        task = self.lifecycle.create(request)
        self.tick()
        return self.get(task.id)

    async def preview(self, *, base_model: str, dataset_path: str | None, max_seq_len: int | None = None,
                      train_on_prompt: bool | None = None, examples: int = 5, chat_template: str | None = None,
                      batch_size: int | None = None, datasets: list[Any] | None = None, method: str = "lora") -> PreviewResult:
        return await self.intake.preview(base_model=base_model, dataset_path=dataset_path, max_seq_len=max_seq_len,
                                         train_on_prompt=train_on_prompt, examples=examples, chat_template=chat_template,
                                         batch_size=batch_size, datasets=datasets, method=method)

    async def cancel(self, task_id: str) -> FinetuneTask:
        await self.lifecycle.cancel(task_id)
        self.tick()
        return self.get(task_id)

    async def resume(self, task_id: str) -> FinetuneTask:
        """A cancelled, timed-out or failed task back in the queue, to continue from its newest checkpoint
        (`Lifecycle.resume`)."""
        await self.lifecycle.resume(task_id)
        self.tick()
        return self.get(task_id)

    def resumable(self, task_id: str) -> bool:
        """Whether `resume` would accept the task now (for the UI's button)."""
        return self.lifecycle.resumable(task_id)

    def get(self, task_id: str) -> FinetuneTask:
        return self.view(self.lifecycle.get(task_id))

    def list(self) -> list[FinetuneTask]:
        return [self.view(t) for t in self.tasks.list()]

    def view(self, task: TaskRecord) -> FinetuneTask:
        return task_view(task)

    def queue_summary(self) -> QueueSummary:
        return self.queue.summary()

    def gpu_claims(self) -> list[GpuClaim]:
        """The GPU units launched tasks hold, for the GPU ledger (`domain.gpu_ledger`)."""
        return [GpuClaim(Holder.task(t.id), tuple(t.units)) for t in self.lifecycle.launched() if t.units]

    # progress and logs -------------------------------------------------------------------------
    def log_path(self, task_id: str) -> Path:
        self.lifecycle.get(task_id)
        return self.files.log(task_id)

    def loss_curve(self, task_id: str, key: str = "loss") -> list[tuple[int, float]]:
        """(step, value) of every logged step, from the trainer's progress file; `key="evalLoss"` for the eval
        loss, `"learningRate"` for the schedule. A step replayed after a resume from a checkpoint counts once
        (its latest value)."""
        return self.files.curve(self.lifecycle.get(task_id).id, key)

    def curves(self, task_id: str) -> dict[str, list[tuple[int, float]]]:
        """The training loss, eval loss and learning rate by step, each step once (see `loss_curve`)."""
        return {"loss": self.loss_curve(task_id), "evalLoss": self.loss_curve(task_id, "evalLoss"),
                "learningRate": self.loss_curve(task_id, "learningRate")}

    # results -----------------------------------------------------------------------------------
    async def deploy(self, task_id: str, *, engine: str, model_tag: str, replicas: int = 1, gpus_per_replica: int | None = None,
                     merge: bool = False) -> DeployResult:
        return await self.merges.deploy(task_id, engine=engine, model_tag=model_tag, replicas=replicas,
                                        gpus_per_replica=gpus_per_replica, merge=merge)

    async def deployable_model(self, task_id: str, engine: str, merge: bool, model_tag: str | None = None) -> tuple[str, list[str]]:
        return await self.merges.deployable_model(task_id, engine, merge, model_tag=model_tag)

    def export(self, task_id: str) -> ExportState:
        return self.merges.export(task_id)

    def export_state(self, task_id: str) -> ExportState:
        return self.merges.export_state(task_id)

    # preemption --------------------------------------------------------------------------------
    def preempting(self, request: PreemptionRequest) -> AbstractAsyncContextManager[PreemptionOutcome]:
        """Free GPUs for a higher-priority business's new replicas (`Preemption.preempting`); the controller scales
        inside the block."""
        return self.preemption.preempting(request)
