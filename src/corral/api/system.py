"""Spec 02 system endpoints: the detected GPUs with a computed recommendation, and the memory estimator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from corral.domain.memory import GIB, METHODS, TrainingSetup, find_model, serving_memory, training_memory
from corral.domain.recommendation import DeviceMemory, recommend
from corral.gpus.inventory import GpuDevice, GpuInventory

router = APIRouter(prefix="/api/system", tags=["system"])


def _device_view(device: GpuDevice) -> dict[str, Any]:
    return {
        "id": device.index if device.parent_index is None else device.id,
        "name": device.name,
        "memory_gb": round(device.memory_total_bytes / GIB, 1),
        "memory_used_gb": round(device.memory_used_bytes / GIB, 2),
        "memory_free_gb": round(device.memory_free_bytes / GIB, 2),
        "utilization": device.utilization_percent,
        "uuid": device.uuid,
        "processes": [{"pid": p.pid, "memory_gb": round(p.used_memory_bytes / GIB, 2)} for p in device.processes],
        "mig": device.mig_enabled,
        "parent": device.parent_index,
    }


def gpu_info(inventory: GpuInventory, catalogue: list) -> dict[str, Any]:
    units = inventory.schedulable_units()
    text, warning = recommend([DeviceMemory(d.name, d.memory_total_bytes) for d in units], catalogue,
                              no_gpu_reason=inventory.error)
    return {
        "available": inventory.available,
        "count": len(units),
        "devices": [_device_view(d) for d in units],
        "recommendation": text,
        "warning": warning,
        "driverVersion": inventory.driver_version,
        "migInstances": len(inventory.mig_instances),
    }


@router.get("/gpu-info")
async def get_gpu_info(request: Request) -> dict[str, Any]:
    """`{available, count, devices: [{id, name, memory_gb, …}], recommendation}`; detected through NVML."""
    runtime = request.app.state.runtime
    return gpu_info(runtime.gpu_inventory, runtime.catalogue)


@router.get("/estimate")
async def estimate(
    model: str = Query(description="a catalogue model, e.g. qwen2.5-coder-7b"),
    method: str = Query(default="lora", description=" | ".join(METHODS)),
    quantBits: int = Query(default=4, description="qlora: 4 or 8"),  # noqa: N803 (API field names are camelCase)
    seqLen: int = Query(default=2048, ge=1, le=1_048_576),  # noqa: N803
    batchSize: int = Query(default=1, ge=1, le=4096),  # noqa: N803
    loraRank: int = Query(default=8, ge=1, le=4096),  # noqa: N803
    contextTokens: int = Query(default=4096, ge=1, le=10_000_000),  # noqa: N803
    concurrency: int = Query(default=8, ge=1, le=100_000),
) -> dict[str, Any]:
    """GPU memory to finetune `model` with `method`, and to serve it (weights + KV cache)."""
    spec = find_model(model)
    setup = TrainingSetup(method=method, quant_bits=quantBits, seq_len=seqLen, batch_size=batchSize, lora_rank=loraRank)  # type: ignore[arg-type]
    return {
        "model": spec.name, "displayName": spec.display, "parameters": spec.params, "method": method,
        "training": training_memory(spec, setup).as_dict(),
        "serving": serving_memory(spec, contextTokens, concurrency).as_dict() | {"contextTokens": contextTokens, "concurrency": concurrency},
    }
