"""The autopilot's endpoints: business policies, pool settings, status and decisions, pins."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request

from corral.api.auth import require_token
from corral.api.schemas import POD_NAME_LENGTH, errors
from corral.autopilot import Autopilot
from corral.domain import labels as L
from corral.views import AutopilotSpec, AutopilotStatus, BusinessPolicySpec, UnpinResult

router = APIRouter(prefix="/api", tags=["autopilot"])
mutating = [Depends(require_token)]
PoolName = Path(max_length=L.MAX_NAME_LENGTH, description="the pool (deployment) name")
ServiceName = Path(max_length=L.MAX_NAME_LENGTH, description="the business service's name (e.g. production-nlb)")


def autopilot(request: Request) -> Autopilot:
    return request.app.state.runtime.autopilot


@router.get("/business-services/{name}/policy", response_model=BusinessPolicySpec, responses=errors(400, 404))
async def get_policy(request: Request, name: str = ServiceName) -> Any:
    """The business's autopilot policy (defaults: min 0, no max, priority 0, waitingPerReplica 1, no concurrency target)."""
    return autopilot(request).policy(name)


@router.put("/business-services/{name}/policy", dependencies=mutating, response_model=BusinessPolicySpec,
            responses=errors(400, 401, 404))
async def put_policy(body: BusinessPolicySpec, request: Request, name: str = ServiceName) -> Any:
    """Replace the policy: `{minReplicas, maxReplicas, priority, target: {ttftP90Ms?, waitingPerReplica?, concurrencyPerReplica?}}`.
    The autopilot of the business's pool honours it from its next tick."""
    return autopilot(request).set_policy(name, body)


@router.get("/autopilot", response_model=list[AutopilotStatus])
async def list_autopilots(request: Request) -> Any:
    """Every pool's autopilot: settings, signals per business, last decisions."""
    ap = autopilot(request)
    return [ap.status(d.name) for d in ap.controller.deployments() if d.is_pool]


@router.get("/autopilot/{pool}", response_model=AutopilotStatus, responses=errors(400, 404))
async def get_autopilot(request: Request, pool: str = PoolName) -> Any:
    """The settings, the signals per business (engine and gateway), the replicas, the last decisions."""
    return autopilot(request).status(pool)


@router.put("/autopilot/{pool}", dependencies=mutating, response_model=AutopilotStatus, responses=errors(400, 401, 404))
async def put_autopilot(body: AutopilotSpec, request: Request, pool: str = PoolName) -> Any:
    """Replace the pool's settings: `{enabled, warmSpares, cooldownSeconds, scaleOut, scaleIn, maxReplicas, ...}`."""
    return autopilot(request).set_settings(pool, body)


@router.post("/pods/{name}/unpin", dependencies=mutating, response_model=UnpinResult, responses=errors(400, 401, 404))
async def unpin(request: Request, name: str = Path(max_length=POD_NAME_LENGTH)) -> Any:
    """Let the autopilot move this replica again (a manual assignment while it is on pins it)."""
    return await request.app.state.controller.unpin(name)
