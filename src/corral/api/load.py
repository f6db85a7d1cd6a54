"""Live load (spec 01 phase 4, "performance monitoring"): per business service and per replica, over a
sliding window of the gateway's counters (corral.gateway.monitor). Pushed on `/ws` as `load` events."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from corral.api.schemas import errors
from corral.domain.load import WINDOW_DEFAULT_S, WINDOW_MAX_S, WINDOW_MIN_S
from corral.views import LoadOverview, ServiceLoad

router = APIRouter(prefix="/api", tags=["serving"])

WINDOW = Query(default=WINDOW_DEFAULT_S, ge=WINDOW_MIN_S, le=WINDOW_MAX_S,
               description=f"seconds of the sliding window ({WINDOW_MIN_S}..{WINDOW_MAX_S})")


@router.get("/business-services/{name}/load", response_model=ServiceLoad, responses=errors(400, 404))
async def service_load(name: str, request: Request, window: int = WINDOW) -> Any:
    """Requests/s, in flight, errors/s, latency p50/p95/p99, time to first byte p50/p95 (streamed responses)
    and tokens/s over the last `window` seconds, the same per replica, and the last 5 minutes as a series
    (one point per 5 s: requests/s, p95 latency, ready replicas assigned)."""
    return request.app.state.runtime.load.service(name, window)


@router.get("/load", response_model=LoadOverview, responses=errors(400))
async def load(request: Request, window: int = WINDOW) -> Any:
    """The load of every business service (as `GET /api/business-services/{name}/load`)."""
    return request.app.state.runtime.load.snapshot(window)
