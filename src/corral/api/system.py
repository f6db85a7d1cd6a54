"""Spec 02 system endpoints: the detected GPUs with a computed recommendation, and the memory estimator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from corral.api.schemas import errors
from corral.domain.hyperparameters import DEFAULTS as SUBMIT_DEFAULTS
from corral.domain.memory import METHODS, TrainingSetup, serving_memory, training_memory
from corral.model_files import size_model
from corral.views import DataPlaneStatus, Estimate, GpuInfo, gpu_info

router = APIRouter(prefix="/api/system", tags=["system"])



@router.get("/gpu-info", response_model=GpuInfo)
async def get_gpu_info(request: Request) -> Any:
    """`{available, count, devices: [{id, name, memory_gb, …}], recommendation}`; detected through NVML."""
    runtime = request.app.state.runtime
    return gpu_info(runtime.gpu_inventory, runtime.catalogue, runtime.settings.finetune_memory_margin_gb)


@router.get("/estimate", response_model=Estimate, responses=errors(400))
def estimate(  # sync: FastAPI runs it in a worker thread, since sizing reads config.json and safetensors headers
    model: str = Query(max_length=4096, description="a catalogue model (qwen2.5-coder-7b), a local model directory, "
                       "or a hub id (Org/Name) found in the Hugging Face cache or, by name, in the catalogue"),
    method: str = Query(default="lora", description=" | ".join(METHODS)),
    quantBits: int = Query(default=4, description="qlora: 4 or 8"),  # noqa: N803 (API field names are camelCase)
    # The submit's defaults (`domain.hyperparameters`): an estimate asked without them is the default task's.
    seqLen: int = Query(default=SUBMIT_DEFAULTS["maxSeqLen"], ge=1, le=1_048_576),  # noqa: N803
    batchSize: int = Query(default=SUBMIT_DEFAULTS["batchSize"], ge=1, le=4096),  # noqa: N803
    loraRank: int = Query(default=SUBMIT_DEFAULTS["loraRank"], ge=1, le=4096),  # noqa: N803
    contextTokens: int = Query(default=4096, ge=1, le=10_000_000),  # noqa: N803
    concurrency: int = Query(default=8, ge=1, le=100_000),
) -> Any:
    """GPU memory to finetune `model` with `method`, and to serve it (weights + KV cache). Any decoder is sized from its
    config.json and safetensors headers without loading weights (`corral.model_files`); 400 says what to give when
    nothing on this machine tells the model's size."""
    sized = size_model(model)
    spec = sized.spec
    setup = TrainingSetup(method=method, quant_bits=quantBits, seq_len=seqLen, batch_size=batchSize, lora_rank=loraRank)  # type: ignore[arg-type]
    return Estimate(
        model=spec.name, displayName=spec.display, parameters=spec.params, method=method,
        activeParameters=spec.active_params or None, source=sized.source, countedFrom=sized.counted_from,
        dtype=spec.dtype, note=sized.note,
        training=training_memory(spec, setup).as_dict(),  # type: ignore[arg-type]
        serving=serving_memory(spec, contextTokens, concurrency).as_dict() | {"contextTokens": contextTokens, "concurrency": concurrency},  # type: ignore[arg-type]
    )


@router.get("/data-plane", response_model=DataPlaneStatus)
async def data_plane(request: Request) -> Any:
    """The gateway's routing reconciler: `{dataPlane, desiredVersion, appliedVersion, lastError, pushes, faults,
    lastFault}`. `appliedVersion < desiredVersion` means the gateway has not confirmed the latest routing table yet;
    `faults` counts versions served above the desired one (a table Corral never pushed), each replaced at once."""
    runtime = request.app.state.runtime
    return {"dataPlane": runtime.data_plane, **runtime.routing.status()}
