"""Spec 02 finetune endpoints: submit, list, inspect, cancel, logs (streamed), queue summary, dataset preview."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Union

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from corral.api.auth import require_token
from corral.api.schemas import ENGINE_LENGTH, PATH_LENGTH, Body, Name, errors, plain_text
from corral.backends.local.process import tail_lines
from corral.domain.finetune_request import MAX_DATASET_SOURCES
from corral.domain.hyperparameters import HYPERPARAMETERS_HELP
from corral.domain.tasks import FINISHED
from corral.finetune.manager import FinetuneManager
from corral.views import (
    AdapterResult,
    DeployResult,
    ExportState,
    FinetuneTask,
    PreviewResult,
    QueueSummary,
    TaskCurves,
)

router = APIRouter(prefix="/api/finetune", tags=["finetune"])
mutating = [Depends(require_token)]


class GpuRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = 1
    memoryGb: float | None = Field(default=None, description="free memory each GPU must have; default: estimated")


class DatasetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(max_length=PATH_LENGTH, description="as datasetPath: under the dataset folders")
    ratio: float = Field(default=1.0, description="the share of its examples trained, above 0 and at most 1")


DATASETS_HELP = (f"instead of datasetPath: several datasets mixed, 1 to {MAX_DATASET_SOURCES} {{path, ratio}} (each "
                 "source's ratio of its examples, chosen with the seed)")


class SubmitRequest(Body):
    baseModel: str = Field(max_length=PATH_LENGTH, description="local model directory or hub id")
    datasetPath: str | None = Field(default=None, max_length=PATH_LENGTH, description="JSONL or a JSON array: OpenAI `messages`, "
                                    "ShareGPT `conversations`, Alpaca `instruction`/`input`/`output`, `prompt`/`completion`, "
                                    "or `text`; or their rows in a Parquet or Arrow file, or a Hugging Face `datasets` "
                                    "directory (save_to_disk)")
    datasets: list[DatasetEntry] | None = Field(default=None, max_length=MAX_DATASET_SOURCES, description=DATASETS_HELP)
    method: str = Field(default="lora", max_length=16, description="lora | qlora | full | dpo | orpo (dpo, orpo: a LoRA "
                        "adapter trained on preference data, `chosen`/`rejected`, with TRL)")
    priority: str = Field(default="normal", max_length=16, description="high | normal | low (10 / 0 / -10 on the scale of "
                          "business policy priorities)")
    preemptible: bool | None = Field(default=None, description="a business of higher priority may take its GPUs (it saves a "
                                     "checkpoint, waits, resumes); default true below high")
    gpus: int | GpuRequest | None = Field(default=None, description="a count, or {count, memoryGb}; default 1, or 0 without GPU")
    businessTag: Name | None = Field(default=None, description="the business its GPU-seconds are billed to in `GET /api/usage` "
                                    "(a business name, as deploy-service's businessTag); default none: billed under "
                                    "`(finetune)`")
    timeoutSeconds: float | None = Field(default=None, description="default 6 h, at most 366 days; the task is cancelled when "
                                          "it runs longer (easy-backfill reserves GPUs from it: near the run time packs best)")
    # Checked by the one validator the CLI and the UI use too (corral.domain.hyperparameters), so that its
    # messages are the same everywhere and an integer stays an integer all the way to the trainer.
    hyperparameters: Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=32)] = Field(
        default_factory=dict, description=HYPERPARAMETERS_HELP)


def manager(request: Request) -> FinetuneManager:
    return request.app.state.runtime.finetune


@router.post("/tasks", dependencies=mutating, status_code=status.HTTP_201_CREATED, response_model=FinetuneTask,
             responses=errors(400, 401))
async def submit(body: SubmitRequest, request: Request) -> Any:
    """Validate and queue a finetune task; it starts as soon as its GPUs (or a CPU slot) are free."""
    gpus, memory = (body.gpus.count, body.gpus.memoryGb) if isinstance(body.gpus, GpuRequest) else (body.gpus, None)
    return manager(request).submit(base_model=body.baseModel, dataset_path=body.datasetPath, method=body.method,
                                   priority=body.priority, gpus=gpus, memory_gb=memory, timeout_s=body.timeoutSeconds,
                                   hyperparameters=body.hyperparameters, preemptible=body.preemptible,
                                   datasets=None if body.datasets is None else [d.model_dump() for d in body.datasets],
                                   business_tag=body.businessTag)


class PreviewRequest(Body):
    baseModel: str = Field(max_length=PATH_LENGTH, description="local model directory or hub id (its tokenizer is used)")
    datasetPath: str | None = Field(default=None, max_length=PATH_LENGTH, description="as for a task: under the dataset folders")
    datasets: list[DatasetEntry] | None = Field(default=None, max_length=MAX_DATASET_SOURCES, description=DATASETS_HELP)
    maxSeqLen: int | None = Field(default=None, description="default: the maxSeqLen hyperparameter's default")
    trainOnPrompt: bool | None = Field(default=None, description="default false: the loss covers the assistant's turns only")
    chatTemplate: str | None = Field(default=None, max_length=32, description="as the chatTemplate hyperparameter: model (the "
                                     "tokenizer's own, the default) or a built-in template's name")
    examples: int = Field(default=5, ge=0, le=50, description="how many examples to show")
    method: str = Field(default="lora", max_length=16, description="as for a task: dpo and orpo read preference pairs")
    batchSize: int | None = Field(default=None, description="as the batchSize hyperparameter (default its default): the "
                                                            "padding with and without packing is counted in batches of it")


@router.post("/preview", dependencies=mutating, response_model=PreviewResult, responses=errors(400, 401))
async def preview(body: PreviewRequest, request: Request) -> Any:
    """What the trainer would make of a dataset before any GPU is spent: its format, the first examples with the
    tokens the loss covers (`spans`), how many are truncated or dropped at `maxSeqLen`, and their lengths."""
    return await manager(request).preview(base_model=body.baseModel, dataset_path=body.datasetPath, max_seq_len=body.maxSeqLen,
                                          train_on_prompt=body.trainOnPrompt, examples=body.examples, chat_template=body.chatTemplate,
                                          batch_size=body.batchSize,
                                          datasets=None if body.datasets is None else [d.model_dump() for d in body.datasets],
                                          method=body.method)


@router.get("/tasks", response_model=list[FinetuneTask])
async def tasks(request: Request) -> Any:
    return manager(request).list()


@router.get("/queue", response_model=QueueSummary)
async def queue(request: Request) -> Any:
    """Waiting and running counts, the strategy, and a warning when more than 5 tasks wait."""
    return manager(request).queue_summary()


@router.get("/tasks/{task_id}", response_model=FinetuneTask, responses=errors(404))
async def task(task_id: str, request: Request) -> Any:
    """`{id, status, reason, progress: {step, totalSteps, loss, eta, …}, …}`."""
    return manager(request).get(task_id)


@router.post("/tasks/{task_id}/cancel", dependencies=mutating, response_model=FinetuneTask, responses=errors(401, 404, 409))
async def cancel(task_id: str, request: Request) -> Any:
    return await manager(request).cancel(task_id)


@router.post("/tasks/{task_id}/resume", dependencies=mutating, response_model=FinetuneTask, responses=errors(400, 401, 404, 409))
async def resume(task_id: str, request: Request) -> Any:
    """Put a cancelled, timed-out or failed task back in the queue; its trainer continues from its newest checkpoint.
    409 when the task is in another state or has no checkpoint."""
    return await manager(request).resume(task_id)


@router.get("/tasks/{task_id}/curves", response_model=TaskCurves, responses=errors(404))
async def curves(task_id: str, request: Request) -> Any:
    """Training loss, eval loss and learning rate by step, for charts; a step replayed after a resume counts once."""
    return manager(request).curves(task_id)


@router.post("/tasks/{task_id}/export", dependencies=mutating, status_code=status.HTTP_202_ACCEPTED, response_model=ExportState,
             responses=errors(400, 401, 404, 409))
async def export(task_id: str, request: Request) -> Any:
    """Start writing a completed task's merged weights (the adapter merged into its base model) to a directory; the
    answer is the state (`running`, or `done` with the directory); follow it with GET."""
    return manager(request).export(task_id)


@router.get("/tasks/{task_id}/export", response_model=ExportState, responses=errors(404))
async def export_state(task_id: str, request: Request) -> Any:
    """`none`, `running`, `done` (with the directory) or `failed` (with the reason)."""
    return manager(request).export_state(task_id)


class TaskDeployRequest(Body):
    engine: str = Field(default="vllm", max_length=ENGINE_LENGTH,
                        description="vllm serves the adapter on the base model; others get merged weights")
    modelTag: Name = Field(description="the pool's `model` label, e.g. qwen-06b-support")
    replicas: int = 1
    gpusPerReplica: int | None = None
    merge: bool = Field(default=False, description="serve merged weights even with vLLM")


class AdapterDeployRequest(Body):
    pool: Name = Field(description="a running vLLM pool started with --enable-lora")
    adapterName: str = Field(max_length=63, description="the `model` name clients send for this adapter: letters, digits, "
                             "'.', '_', '-'")


# `{modelTag, ...}` deploys the task as a new pool; `{pool, adapterName}` adds its adapter to a running one.
TaskDeployBody = Annotated[
    Union[Annotated[TaskDeployRequest, Tag("pool")], Annotated[AdapterDeployRequest, Tag("adapter")]],
    Discriminator(lambda value: "adapter" if isinstance(value, dict) and "pool" in value else "pool"),
]


@router.post("/tasks/{task_id}/deploy", dependencies=mutating, status_code=status.HTTP_201_CREATED,
             response_model=Union[DeployResult, AdapterResult], responses=errors(400, 401, 404, 409, 503))
async def deploy(task_id: str, body: TaskDeployBody, request: Request) -> Any:
    """Deploy a completed task's result as a new model pool (`{modelTag, engine?, replicas?, ...}`), or add its LoRA
    adapter to a running vLLM pool (`{pool, adapterName}`, multi-LoRA): loaded on every ready replica before this
    answers, and on every replica that starts later; requests with `model: <adapterName>` to the pool's business
    services get it. Remove it with DELETE /api/deployments/{pool}/adapters/{adapterName}."""
    if isinstance(body, AdapterDeployRequest):
        from corral.adapters import task_adapter

        path, rank = task_adapter(manager(request).get(task_id))
        return await request.app.state.runtime.adapters.add(body.pool, body.adapterName, path=path, task_id=task_id,
                                                            rank=rank)
    return await manager(request).deploy(task_id, engine=body.engine, model_tag=body.modelTag, replicas=body.replicas,
                                         gpus_per_replica=body.gpusPerReplica, merge=body.merge)


@router.get("/tasks/{task_id}/logs", response_model=None, response_class=PlainTextResponse,
            responses=plain_text("the task's log; with follow=true, streamed until the task ends") | errors(400, 404))
async def logs(task_id: str, request: Request, tail: int = Query(default=200, ge=1, le=100_000),
               follow: bool = False) -> PlainTextResponse | StreamingResponse:
    """The task's log (Corral's lines and the trainer's output); `follow=true` streams until the task ends."""
    path = manager(request).log_path(task_id)
    if not follow:
        return PlainTextResponse(tail_lines(path, tail))

    async def stream() -> AsyncIterator[bytes]:
        text = tail_lines(path, tail)
        yield (text + "\n").encode() if text else b""
        offset = path.stat().st_size if path.exists() else 0
        while True:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            if chunk:
                yield chunk
            elif manager(request).get(task_id).status in FINISHED:
                return
            await asyncio.sleep(0.25)

    return StreamingResponse(stream(), media_type="text/plain")
