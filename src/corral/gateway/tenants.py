"""The Python data plane's key check and quota windows (the decisions are domain/tenancy.py's; the nginx plane does
the same in Lua, `check_access` in nginx/corral_gateway.lua).

At a request's entry, before its body is read or any replica picked: a key-protected service's request must present
one of its keys (`presented_key`), found by its SHA-256 in the verifier table the routing push brought (no database);
then the service's quotas and the key's are checked against their windows, and the request counted. Its tokens are
added when it ends (`Admission.scan`). The windows live in this process: a restart of the data plane starts them
empty (the minute windows lose at most a minute of counts; the day's token count is lost: see the README).

An admitted request carries its `Admission` in the ASGI scope (`scope[ADMISSION]`): the business, the key id and the
tokens it used once it ends. That is the hook for metering per key.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.domain.tenancy import (
    AuthMode,
    KeyEntry,
    Refusal,
    RouteAccess,
    TokenScan,
    Usage,
    add_tokens,
    key_digest,
    key_scope,
    presented_key,
    refusal,
    service_scope,
)

ADMISSION = "corral.admission"  # the ASGI scope's key of a request's Admission
MSG_NO_KEY = ("this business service needs an API key: send `Authorization: Bearer <key>` (or an `api-key` header); "
              "its owner creates keys with `corral keys create`")
MSG_BAD_KEY = "invalid API key: unknown, revoked or expired"


def unauthorized_body(message: str) -> dict[str, Any]:
    """OpenAI's 401 shape (the SDKs raise AuthenticationError and show the message)."""
    return {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key", "param": None}}


def rate_limited_body(refused: Refusal) -> dict[str, Any]:
    """OpenAI's 429 shape; `limit` says which one (the SDKs raise RateLimitError and retry after Retry-After)."""
    return {"error": {"message": refused.message(), "type": "rate_limit_error", "code": "rate_limit_exceeded",
                      "param": refused.kind.value}}


@dataclass
class Admission:
    service: str
    business: str | None
    key_id: str | None  # None on an open service with quotas
    counts_tokens: bool
    weight: int = 1  # the key's share when the business's keys compete for its replicas (domain/fairness.py)
    scan: TokenScan = field(default_factory=TokenScan)


@dataclass(frozen=True)
class Refused:
    status: int
    body: dict[str, Any]
    retry_after_s: int | None = None


class TenantWindows:
    """The verifier tables (indexed per routing table) and every scope's quota windows."""

    def __init__(self) -> None:
        self._index: dict[int, tuple[RouteAccess, dict[str, KeyEntry]]] = {}  # id(access) → digest index
        self.usage: dict[str, Usage] = {}  # "s:<service>" / "k:<key id>" → its windows
        self.last_used: dict[str, float] = {}  # key id → when a request last presented it (epoch seconds)

    def set_table(self, accesses: Iterable[RouteAccess]) -> None:
        self._index = {id(a): (a, {k.digest: k for k in a.keys}) for a in accesses}
        live = {k.id for a, _ in self._index.values() for k in a.keys}
        for scope in [s for s in self.usage if s.startswith("k:") and s[2:] not in live]:
            del self.usage[scope]  # a revoked key's windows
        self.last_used = {k: t for k, t in self.last_used.items() if k in live}

    def _keys(self, access: RouteAccess) -> dict[str, KeyEntry]:
        found = self._index.get(id(access))
        if found is None or found[0] is not access:
            found = self._index[id(access)] = (access, {k.digest: k for k in access.keys})
        return found[1]

    def admit(self, service: str, access: RouteAccess, headers: Iterable[tuple[bytes, bytes]],
              now: float | None = None) -> Admission | Refused:
        now = time.time() if now is None else now
        entry: KeyEntry | None = None
        if access.auth is AuthMode.KEYS:
            key = presented_key(headers)
            if key is None:
                return Refused(401, unauthorized_body(MSG_NO_KEY))
            digest = key_digest(key)
            entry = self._keys(access).get(digest)
            if entry is None or not hmac.compare_digest(entry.digest, digest) or entry.expired(now):
                return Refused(401, unauthorized_body(MSG_BAD_KEY))
            self.last_used[entry.id] = now
        scopes = [(f"s:{service}", access.limits, service_scope(service))]
        if entry is not None and entry.limits.any:
            scopes.append((f"k:{entry.id}", entry.limits, key_scope(entry.id)))
        for name, limits, label in scopes:
            if limits.any and (refused := refusal(limits, self.usage.setdefault(name, Usage()), now, label)) is not None:
                return Refused(429, rate_limited_body(refused), refused.retry_after_s)
        counts_tokens = False
        for name, limits, _ in scopes:
            if limits.any:
                self.usage[name].requests += 1
                counts_tokens = counts_tokens or limits.counts_tokens
        return Admission(service, access.business, entry.id if entry else None, counts_tokens,
                         entry.weight if entry else 1)

    def finish(self, admission: Admission, now: float | None = None) -> None:
        """The request ended: its tokens count in its scopes' windows."""
        if not admission.counts_tokens:
            return
        now = time.time() if now is None else now
        tokens = admission.scan.tokens
        for name in (f"s:{admission.service}", f"k:{admission.key_id}"):
            if (usage := self.usage.get(name)) is not None:
                add_tokens(usage, tokens, now)
