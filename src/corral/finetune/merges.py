"""A completed task's result put to use: exported as merged weights (TASK_DIR/merged: model + tokenizer, servable by
any engine), or deployed as a model pool through the controller — vLLM serves a LoRA adapter on its base model,
any other engine (or `merge`) the adapter merged into the weights. A merge runs in a child process (it loads the
whole model); at most one per task is in flight, shared by an export and a deployment; the child holds the task
directory's merge lock and dies with this process (`corral.finetune.merge`), so a merge left by a killed control
plane never races a new one on the same directory. A deployment is checked (its values, the engine, its name) before
anything is merged: a refused one merges nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from corral.domain import labels as L
from corral.domain.deploy_request import check_deploy
from corral.domain.errors import Conflict, NotFound
from corral.domain.hyperparameters import MODEL_TEMPLATE
from corral.domain.tasks import TaskState
from corral.engines import get_engine
from corral.finetune.checks import adapter_config, vllm_lora_args
from corral.finetune.lifecycle import Lifecycle
from corral.finetune.merge import PARENT_ENV
from corral.finetune.store import TaskRecord
from corral.finetune.task_files import TaskFiles
from corral.views import DeployResult, ExportState

if TYPE_CHECKING:
    from corral.controller import Controller


class Merges:
    def __init__(self, lifecycle: Lifecycle, files: TaskFiles, controller: Controller | None) -> None:
        self.lifecycle = lifecycle  # the tasks (`get`) and their events (`announce`)
        self.files = files
        self.controller = controller  # deploys a result as a model pool
        self._merges: dict[str, asyncio.Task[str | None]] = {}  # task id → its merge in flight (export or deploy)
        self._export_errors: dict[str, str] = {}  # task id → why its last merge failed

    async def deploy(self, task_id: str, *, engine: str, model_tag: str, replicas: int = 1, gpus_per_replica: int | None = None,
                     merge: bool = False) -> DeployResult:
        """A completed task's result as a model pool, through the controller like any other deployment."""
        from corral.controller import DeploySpec

        assert self.controller is not None
        self._completed(task_id, "deployed")
        # The request checked first, as the controller will (a refused deploy merges nothing): its values, the engine,
        # and the pool's name not taken. The model id checked is where the merged weights would go.
        check = DeploySpec(engine=engine, model_id=str(self.files.merged(task_id)), model_tag=model_tag, replicas=replicas,
                           deploy_as_pool=True, gpus_per_replica=gpus_per_replica, engine_args=[])
        engine_kind = get_engine(engine)
        checked = check_deploy(check, needs_gpu=engine_kind.needs_gpu, check_args=engine_kind.check_args)
        if self.controller.deployment(L.pool_name(engine_kind.name, checked.model_tag)) is not None:
            raise Conflict(f"deployment '{L.pool_name(engine_kind.name, checked.model_tag)}' already exists; choose another "
                           "modelTag, or scale or delete it first")
        model_id, engine_args = await self.deployable_model(task_id, engine, merge, model_tag=model_tag)
        return await self.controller.deploy(DeploySpec(engine=engine, model_id=model_id, model_tag=model_tag, replicas=replicas,
                                                       deploy_as_pool=True, gpus_per_replica=gpus_per_replica,
                                                       engine_args=engine_args))

    async def deployable_model(self, task_id: str, engine: str, merge: bool, model_tag: str | None = None) -> tuple[str, list[str]]:
        """(modelId, engineArgs) that serve a completed task: vLLM loads the LoRA adapter on the base model under
        the pool's tag (so requests for the tag get the adapter; the base model answers to `<tag>-base`), with
        `--max-lora-rank` from the adapter's config and, for a task trained with a built-in chat template, the
        adapter's tokenizer (that template, its end-of-turn token as EOS); any other engine (or `merge`) gets the
        adapter merged into the weights first. A DoRA adapter is merged for vLLM too: vLLM cannot serve DoRA."""
        task = self._completed(task_id, "deployed")
        assert task.output is not None
        if task.method == "full":
            return task.output, []
        dora = bool(adapter_config(Path(task.output)).get("use_dora"))
        if engine == "vllm" and not merge and not dora:
            own_tokenizer = task.hyperparameters.get("chatTemplate", MODEL_TEMPLATE) != MODEL_TEMPLATE
            return task.base_model, vllm_lora_args(model_tag or task_id, Path(task.output), own_tokenizer=own_tokenizer)
        if engine == "vllm" and dora and not merge:
            self.files.note(task_id, "a DoRA adapter, which vLLM cannot serve: merging it into the base model for the pool")
        merged = self.files.merged(task_id)
        if not (merged / "config.json").exists():
            error = await asyncio.shield(self._merge(task_id, "for deployment"))  # the same merge as an export's, at most one
            if error:
                raise Conflict(f"merging the adapter failed: {error}")
        return str(merged), []

    def export(self, task_id: str) -> ExportState:
        """Start producing the merged weights of a completed task; answered at once, the state follows (`export_state`).
        A full finetune's result is already plain weights."""
        self._completed(task_id, "exported")
        state = self.export_state(task_id)
        if state.state in ("none", "failed"):
            self._export_errors.pop(task_id, None)
            self._merge(task_id, "on request (export)")
            state = self.export_state(task_id)
        return state

    def export_state(self, task_id: str) -> ExportState:
        task = self.lifecycle.get(task_id)
        merged = self.files.merged(task_id)
        if task.method == "full" and task.output:
            return ExportState(taskId=task_id, state="done", directory=task.output, reason="a full finetune's result is the whole model")
        if (merged / "config.json").exists():
            return ExportState(taskId=task_id, state="done", directory=str(merged), reason="the adapter merged into the base model")
        if task_id in self._merges:
            return ExportState(taskId=task_id, state="running", directory=None, reason="merging the adapter into the base model")
        if error := self._export_errors.get(task_id):
            return ExportState(taskId=task_id, state="failed", directory=None, reason=error)
        return ExportState(taskId=task_id, state="none", directory=None, reason="not exported yet")

    def _completed(self, task_id: str, what: str) -> TaskRecord:
        task = self.lifecycle.get(task_id)
        if task.status != TaskState.COMPLETED or not task.output:
            raise Conflict(f"task {task_id} is {task.status}; only a completed task can be {what}")
        return task

    def _merge(self, task_id: str, why: str) -> asyncio.Task[str | None]:
        """The one merge of a task's adapter in flight (a child process: merging loads the whole model), started if
        none is; its result is None or why it failed. It writes beside TASK_DIR/merged and renames when done, so
        `merged` is either complete or absent."""
        if (running := self._merges.get(task_id)) is not None:
            return running

        async def merge() -> str | None:
            self.files.note(task_id, f"merging the adapter into the base model {why}")
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral.finetune.merge", str(self.files.dir(task_id)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, PARENT_ENV: str(os.getpid())},  # it dies with this process (no orphan merge)
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
            self.files.note(task_id, f"merge failed: {error}" if error else f"merged weights in {self.files.merged(task_id)}")
            return error

        job = asyncio.get_running_loop().create_task(merge(), name=f"merge-{task_id}")
        self._merges[task_id] = job

        def done(_: asyncio.Task) -> None:
            self._merges.pop(task_id, None)
            with contextlib.suppress(NotFound):
                self.lifecycle.announce(self.lifecycle.get(task_id))  # pages showing the task redraw its export state

        job.add_done_callback(done)
        return job
