"""Businesses as tenants: a business service's auth mode, quotas and API keys (corral.tenancy).

A key is in the answer of its creation only; listings show its id, name and prefix."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Request, status
from pydantic import Field

from corral.api.auth import require_token
from corral.api.schemas import Body, errors
from corral.domain import labels as L
from corral.domain.tenancy import KEY_NAME_MAX, LIMIT_MAX, WEIGHT_MAX, WEIGHT_MIN, AuthMode, Limits
from corral.tenancy import Tenancy
from corral.views import ApiKeyCreated, ApiKeyRevoked, ApiKeyView, ServiceAccessView

router = APIRouter(prefix="/api", tags=["tenancy"])
mutating = [Depends(require_token)]
ServiceName = Path(max_length=L.MAX_NAME_LENGTH, description="the business service's name (e.g. production-nlb)")
KeyId = Path(max_length=32, description="the key's id (from the listing)")
Limit = Field(default=None, ge=0, le=LIMIT_MAX, description="0 refuses every request; null: no limit")


class LimitsBody(Body):
    requestsPerMinute: int | None = Limit
    tokensPerMinute: int | None = Limit
    tokensPerDay: int | None = Limit

    def limits(self) -> Limits:
        return Limits(self.requestsPerMinute, self.tokensPerMinute, self.tokensPerDay)


class AccessBody(Body):
    auth: Literal["none", "keys"] | None = Field(default=None, description="`keys`: only requests with a key get through")
    limits: LimitsBody | None = Field(default=None, description="the business service's quotas (replaced whole)")


class KeyBody(Body):
    name: str | None = Field(default=None, max_length=KEY_NAME_MAX, description="what the key is for")
    expiresAt: datetime | None = Field(default=None, description="when it stops working (ISO 8601 with a time zone)")
    limits: LimitsBody | None = Field(default=None, description="this key's own quotas, within the service's")
    weight: int | None = Field(default=None, ge=WEIGHT_MIN, le=WEIGHT_MAX, strict=True,
                               description="its share when the business's keys compete for its replicas: a key of "
                                           "weight 2 gets twice the tokens of a key of weight 1 (default 1)")


class KeyUpdateBody(KeyBody):
    """A key's changes: a field left out keeps its value; `name: null` and `expiresAt: null` clear, `limits` is
    replaced whole (null: no limits of its own), `weight: null` is the default (1)."""


def tenancy(request: Request) -> Tenancy:
    return request.app.state.runtime.tenancy


@router.get("/business-services/{name}/access", response_model=ServiceAccessView, responses=errors(400, 404))
async def get_access(request: Request, name: str = ServiceName) -> Any:
    """Who may call the business service (`auth`: none | keys) and its quotas."""
    return tenancy(request).access(name)


@router.put("/business-services/{name}/access", dependencies=mutating, response_model=ServiceAccessView,
            responses=errors(400, 401, 404, 503))
async def put_access(body: AccessBody, request: Request, name: str = ServiceName) -> Any:
    """Set its auth mode and/or quotas (a field left out keeps its value); enforced once the gateway has it."""
    auth = AuthMode(body.auth) if body.auth is not None else None
    return await tenancy(request).set_access(name, auth, body.limits.limits() if body.limits is not None else None)


@router.post("/business-services/{name}/keys", dependencies=mutating, status_code=status.HTTP_201_CREATED,
             response_model=ApiKeyCreated, responses=errors(400, 401, 404, 409, 503))
async def create_key(request: Request, body: KeyBody | None = None, name: str = ServiceName) -> Any:
    """A new API key, shown in this answer only: send it as `Authorization: Bearer <key>` (or `api-key`)."""
    body = body or KeyBody()
    return await tenancy(request).create_key(name, body.name, body.expiresAt,
                                             body.limits.limits() if body.limits is not None else None, body.weight)


@router.get("/business-services/{name}/keys", response_model=list[ApiKeyView], responses=errors(400, 404))
async def list_keys(request: Request, name: str = ServiceName) -> Any:
    """Its keys, without secrets: id, name, prefix, createdAt, lastUsedAt, expiresAt, limits, weight."""
    return await tenancy(request).list_keys(name)


@router.patch("/business-services/{name}/keys/{key_id}", dependencies=mutating, response_model=ApiKeyView,
              responses=errors(400, 401, 404, 503))
async def update_key(body: KeyUpdateBody, request: Request, name: str = ServiceName, key_id: str = KeyId) -> Any:
    """Change a key without re-issuing it: its name, expiry, limits or weight (a field left out keeps its value);
    in force at the gateway once this returns. Answers the key as listed (never the key itself)."""
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    if "name" in given:
        changes["key_name"] = body.name
    if "expiresAt" in given:
        changes["expires_at"] = body.expiresAt
    if "limits" in given:
        changes["limits"] = body.limits.limits() if body.limits is not None else None
    if "weight" in given:
        changes["weight"] = body.weight
    return await tenancy(request).update_key(name, key_id, **changes)


@router.delete("/business-services/{name}/keys/{key_id}", dependencies=mutating, response_model=ApiKeyRevoked,
               responses=errors(400, 401, 404, 503))
async def revoke_key(request: Request, name: str = ServiceName, key_id: str = KeyId) -> Any:
    """Revoke a key: refused by the gateway once this returns."""
    return await tenancy(request).revoke_key(name, key_id)
