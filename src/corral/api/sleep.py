"""Sleeping replicas (issue 31): `POST /api/pods/{name}/sleep {"level": 1|2}` and `POST /api/pods/{name}/wake`.

Each answers once the engine has slept or woken (seconds: the weights' copy), with the history row of the change;
the change is recorded before the engine is asked (corral.sleeping)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam

from corral.api.auth import require_token
from corral.api.schemas import SleepRequest, errors
from corral.domain.sleep import SleepLevel
from corral.views import GpuSharingView, SleepResult

router = APIRouter(prefix="/api", tags=["serving"])
mutating = [Depends(require_token)]
POD = PathParam(max_length=80, description="the replica's name (GET /api/pods)")


@router.post("/pods/{name}/sleep", dependencies=mutating, response_model=SleepResult,
             responses=errors(400, 401, 404, 409))
async def sleep(request: Request, body: SleepRequest | None = None, name: str = POD) -> Any:
    """Put a replica to sleep: level 1 offloads its weights to host memory, level 2 discards them. It leaves routing
    first; its process, kernels and CUDA graphs stay. 409 when its engine has no sleep mode (and why)."""
    level = SleepLevel(body.level if body is not None else SleepLevel.OFFLOAD)  # 1-2: SleepRequest refuses others (400)
    return await request.app.state.runtime.sleeping.sleep(name, level)


@router.post("/pods/{name}/wake", dependencies=mutating, response_model=SleepResult, responses=errors(400, 401, 404, 409))
async def wake(request: Request, name: str = POD) -> Any:
    """Wake a sleeping replica; it rejoins routing once awake. 409 when another replica is awake on its shared GPU."""
    return await request.app.state.runtime.sleeping.wake(name)


@router.get("/gpus/sharing", response_model=GpuSharingView, tags=["system"])
async def sharing(request: Request) -> Any:
    """Each GPU unit with the replica awake on it and those asleep (sharedGpus pools), the sleep and wake times
    measured per model (p50, p95), and the host memory level-1 sleepers use."""
    runtime = request.app.state.runtime
    ledger = await asyncio.to_thread(runtime.gpu_ledger)  # reads the inventory: off the event loop
    return runtime.sleeping.sharing(ledger)
