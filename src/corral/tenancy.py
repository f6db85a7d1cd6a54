"""Businesses as tenants: a business service's API keys, its auth mode and its quotas (issue 28, items 1, 2, 5).

The decisions are `corral.domain.tenancy`'s; this service records them (intent first: the desired state and its
pending history row in one transaction, then the routing push that makes the data plane enforce it, then the row
completed) and words nothing. The data planes never read this database: every change here marks the routing table
dirty and waits for the push (`routes_applied`), so a revoked key is refused once its API call returns.

A key appears exactly once, in `create_key`'s answer; history rows carry its id and prefix only. `update_key` changes
a key's name, expiry, limits or weight in place (the key itself stays).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from corral.domain import labels as L
from corral.domain.errors import Conflict, Hint, InvalidInput, NotFound
from corral.domain.history import Action, HistoryDraft, Intent
from corral.domain.models import Service
from corral.domain.tenancy import (
    MAX_KEYS_PER_SERVICE,
    ApiKey,
    AuthMode,
    Limits,
    RouteAccess,
    ServiceAccess,
    Usage,
    check_expiry,
    check_key_name,
    check_weight,
    new_key,
    route_access,
)
from corral.intents import Intents
from corral.store.state import StateStore
from corral.views import ApiKeyCreated, ApiKeyRevoked, ApiKeyView, QuotaLimits, QuotaUsed, ServiceAccessView

log = logging.getLogger("corral.tenancy")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _limits_view(limits: Limits) -> QuotaLimits:
    return QuotaLimits(**limits.wire())


def _key_wire(key: ApiKey) -> dict[str, Any]:
    """What an update may change of a key, as history shows it (never the key, nor its digest)."""
    return {"name": key.name, "expiresAt": _iso(key.expires_at), "limits": key.limits.wire(), "weight": key.weight}


_WIRE_FIELD = {"name": "name", "expires_at": "expiresAt", "limits": "limits", "weight": "weight"}  # ApiKey → `_key_wire`


def _said(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "no limits"
    return "none" if value is None else str(value)


def _used(usage: Usage | None) -> QuotaUsed:
    if usage is None:
        return QuotaUsed()
    return QuotaUsed(requestsThisMinute=usage.requests, tokensThisMinute=usage.tokens, tokensToday=usage.day_tokens)


class Tenancy:
    def __init__(self, store: StateStore, service: Callable[[str], Service | None],
                 mark_dirty: Callable[[], None], routes_applied: Callable[[], Awaitable[Any]] | None = None,
                 last_used: Callable[[], Awaitable[dict[str, float]]] | None = None,
                 windows: Callable[[], Mapping[str, Usage]] | None = None) -> None:
        self.store = store
        self._windows = windows  # the data plane's quota windows by scope (`s:<service>`, `k:<key id>`)
        self._last_used = last_used  # the data plane's key id → last use (epoch seconds)
        self._service = service  # the backend's service lookup
        self._mark_dirty = mark_dirty
        self.intents = Intents(store, confirmed=routes_applied)

    # the routing table's part --------------------------------------------------------------------------------
    def route_access(self, services: list[Service]) -> dict[str, RouteAccess]:
        """Service name → what its data plane checks (only services with a key check or a quota)."""
        access, keys = self.store.tenancy()
        by_service: dict[str, list[ApiKey]] = {}
        for key in keys:
            by_service.setdefault(key.service, []).append(key)
        table = {}
        for service in services:
            if service.is_business_service and (entry := route_access(access.get(service.name), service.business,
                                                                        by_service.get(service.name, ()))) is not None:
                table[service.name] = entry
        return table

    # queries ---------------------------------------------------------------------------------------------------
    def _business_service(self, name: str) -> Service:
        service = self._service(name)
        if service is None or not service.is_business_service:
            raise L.unknown_name(name, "service", NotFound(f"business service '{name}' not found", Hint.LIST_SERVICES))
        return service

    def access(self, name: str) -> ServiceAccessView:
        self._business_service(name)
        return self._access_view(name)

    def _access_view(self, name: str) -> ServiceAccessView:
        access = self.store.access(name) or ServiceAccess(name, AuthMode.NONE)
        keys = sum(1 for k in self.store.tenancy()[1] if k.service == name)
        used = (self._windows() if self._windows is not None else {}).get(f"s:{name}")
        return ServiceAccessView(service=name, auth=access.auth.value, limits=_limits_view(access.limits), keys=keys,
                                 used=_used(used))

    async def list_keys(self, name: str) -> list[ApiKeyView]:
        """Its keys, with when the data plane last saw each (read now and kept: a listing is when it matters)."""
        self._business_service(name)
        if self._last_used is not None:
            try:
                seen = await self._last_used()
            except Exception as exc:  # noqa: BLE001 (the listing stands without it)
                log.warning("could not read the keys' last use from the gateway: %s", exc)
            else:
                self.store.keys_used({k: datetime.fromtimestamp(t, timezone.utc) for k, t in seen.items()})
        return self.key_views(name)

    def _key(self, name: str, key_id: str) -> ApiKey:
        key = next((k for k in self.store.list_api_keys(name) if k.id == key_id), None)
        if key is None:
            raise NotFound(f"key '{key_id}' of business service '{name}' not found (revoked already, or never made)")
        return key

    def key_views(self, name: str) -> list[ApiKeyView]:
        """Its keys as stored (their last use as last read: `list_keys` reads it afresh)."""
        self._business_service(name)
        windows = self._windows() if self._windows is not None else {}
        return [ApiKeyView(id=k.id, name=k.name, prefix=k.prefix, createdAt=_iso(k.created_at),
                           lastUsedAt=_iso(k.last_used_at), expiresAt=_iso(k.expires_at), limits=_limits_view(k.limits),
                           weight=k.weight, used=_used(windows.get(f"k:{k.id}")))
                for k in self.store.list_api_keys(name)]

    # changes -----------------------------------------------------------------------------------------------------
    async def set_access(self, name: str, auth: AuthMode | None, limits: Limits | None) -> ServiceAccessView:
        self._business_service(name)
        before = self.store.access(name) or ServiceAccess(name, AuthMode.NONE)
        after = ServiceAccess(name, before.auth if auth is None else auth, before.limits if limits is None else limits)
        wire = {"auth": after.auth.value, "limits": after.limits.wire()}
        intent = Intent([HistoryDraft(Action.ACCESS, name, before={"auth": before.auth.value, "limits": before.limits.wire()},
                                      after=wire, message=f"auth {after.auth.value}")])
        async with self.intents.carrying_out(intent):
            self.store.set_access(after, intent)
            self._mark_dirty()
            await self.intents.confirm(intent)
        return self._access_view(name)

    async def create_key(self, name: str, key_name: object = None, expires_at: datetime | None = None,
                         limits: Limits | None = None, weight: object = None) -> ApiKeyCreated:
        self._business_service(name)
        label = check_key_name(key_name)
        share = check_weight(weight)
        expiry = check_expiry(expires_at, datetime.now(timezone.utc))
        if len(self.store.list_api_keys(name)) >= MAX_KEYS_PER_SERVICE:
            raise Conflict(f"business service '{name}' has {MAX_KEYS_PER_SERVICE} keys, the most it may have; "
                           "revoke one first")
        access = self.store.access(name)
        if access is None or access.auth is AuthMode.NONE:
            raise InvalidInput(f"business service '{name}' is open (auth: none): its keys would not be checked; "
                               "set its auth to keys first")
        made = new_key()
        key = ApiKey(id=made.id, service=name, prefix=made.prefix, digest=made.digest, name=label,
                     limits=limits or Limits(), expires_at=expiry, weight=share)
        shown = {"id": key.id, "prefix": key.prefix, "name": label, "expiresAt": _iso(expiry), "weight": share}
        intent = Intent([HistoryDraft(Action.API_KEY, name, after=shown, message=f"key {key.id} ({key.prefix}…) created")])
        async with self.intents.carrying_out(intent):
            self.store.add_api_key(key, intent)
            self._mark_dirty()
            await self.intents.confirm(intent)
        created = next((k for k in self.store.list_api_keys(name) if k.id == key.id), key)
        return ApiKeyCreated(id=key.id, key=made.key, name=label, prefix=key.prefix, createdAt=_iso(created.created_at),
                             expiresAt=_iso(expiry), limits=_limits_view(key.limits), weight=share)

    async def update_key(self, name: str, key_id: str, **changes: Any) -> ApiKeyView:
        """Change a key without re-issuing it (LiteLLM's `/key/update`): any of `key_name`, `expires_at`, `limits`
        (replaced whole) and `weight`; one not given keeps its value, None clears a name or an expiry and gives no
        limits or the default weight, as on create. All checked as on create before anything is written; in force
        at the gateway once this returns. Answers the key's listing view."""
        unknown = set(changes) - {"key_name", "expires_at", "limits", "weight"}
        if unknown:
            raise TypeError(f"update_key: unknown changes {sorted(unknown)}")
        self._business_service(name)
        key = self._key(name, key_id)
        wanted: dict[str, Any] = {}
        if "key_name" in changes:
            wanted["name"] = check_key_name(changes["key_name"])
        if "expires_at" in changes:
            wanted["expires_at"] = check_expiry(changes["expires_at"], datetime.now(timezone.utc))
        if "limits" in changes:
            limits = changes["limits"]
            wanted["limits"] = limits if isinstance(limits, Limits) else Limits.from_wire(limits)
        if "weight" in changes:
            wanted["weight"] = check_weight(changes["weight"])
        before, after = _key_wire(key), _key_wire(dataclasses.replace(key, **wanted))
        changed = [field for field in before if before[field] != after[field]]
        if changed:
            said = "; ".join(f"{field} {_said(before[field])} → {_said(after[field])}" for field in changed)
            intent = Intent([HistoryDraft(Action.API_KEY, name, before={f: before[f] for f in changed},
                                          after={f: after[f] for f in changed},
                                          message=f"key {key.id} ({key.prefix}…) updated: {said}")])
            fields = {field: value for field, value in wanted.items() if _WIRE_FIELD[field] in changed}
            async with self.intents.carrying_out(intent):
                self.store.update_api_key(name, key_id, intent=intent, **fields)
                self._mark_dirty()
                await self.intents.confirm(intent)
        view = next((v for v in self.key_views(name) if v.id == key_id), None)
        if view is None:  # revoked meanwhile
            raise NotFound(f"key '{key_id}' of business service '{name}' not found (revoked already, or never made)")
        return view

    async def revoke_key(self, name: str, key_id: str) -> ApiKeyRevoked:
        self._business_service(name)
        key = self._key(name, key_id)
        intent = Intent([HistoryDraft(Action.API_KEY, name, before={"id": key.id, "prefix": key.prefix, "name": key.name},
                                      message=f"key {key.id} ({key.prefix}…) revoked")])
        async with self.intents.carrying_out(intent):
            self.store.revoke_api_key(name, key_id, intent)
            self._mark_dirty()
            await self.intents.confirm(intent)
        return ApiKeyRevoked(revoked=key_id, service=name)
