"""Businesses as tenants: API keys and quotas, as pure decisions (issue 28, items 1, 2 and 5).

Keys. A key is `crl-` and 32 URL-safe characters from `secrets` (192 random bits), shown once when it is
created. Corral keeps its SHA-256 (`key_digest`), never the key. Why a fast unsalted hash and not a slow or
keyed one: the key is not a password a person chose, it is 192 random bits, so nobody can guess a key from
its digest (2^191 tries on average) whatever the hash costs; a slow hash would cost every request that
much; and a keyed hash (HMAC with a server secret) would need that secret on the data plane beside the
digests, where it protects nothing they do not. Both data planes compute SHA-256 cheaply: Python's
`hashlib`, and the nginx plane through LuaJIT's FFI into the OpenSSL that nginx is linked with (Debian
packages no `resty.sha256`; `ngx.hmac_sha1` is the only digest ngx_lua offers itself).

Checking a key in constant time: the data plane looks a presented key up by its digest. What a lookup's
timing could tell an attacker is about the digest of the key they sent, which they can compute anyway; it
tells nothing about the digest of a key they do not have (finding a key whose digest shares a prefix with
another's is a preimage search). The Python plane compares the digest found with `hmac.compare_digest`
as well, belt and braces. No database call on the request path: the control plane pushes the verifier table
(`RouteAccess`: digest → key id and limits, the service's own limits) with the routing table, so a revoked
key stops working within the push that follows the revocation.

Quotas. Per business service (the tenant: one business's endpoint of one model) and, optionally, per key:
requests per minute, tokens per minute (prompt + completion) and tokens per UTC day. A limit of 0 refuses
everything; None is no limit. Windows are fixed: the minute starting at a whole minute of the epoch, the UTC
day (Envoy's rate limit service and Kong's `fixed` policy count the same way); a client can pass a minute's
limit twice over across a window's edge, which is the usual price of counting in O(1) memory. A request is
counted when admitted; its tokens when it ends, from the usage the engine reports (`total_tokens`, prompt +
completion), or, when it reports none, one token per streamed event (`TokenScan`). So token limits are checked
before a request with the tokens already used: the request's own completion is unknown until it ends, and a
request admitted just under the limit may end over it; the next one is refused.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from corral.domain.errors import InvalidInput

KEY_PREFIX = "crl-"
KEY_RANDOM_BYTES = 24  # 192 bits; token_urlsafe gives 32 characters
KEY_MAX_CHARS = 128  # what a data plane reads from a header before refusing it as no key of ours
SHOWN_PREFIX_CHARS = 10  # `crl-` and 6 characters: tells keys apart in a listing, useless to a guesser
KEY_NAME_MAX = 63
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}")
LIMIT_MAX = 10**12  # any larger limit is no limit; a JSON number both planes hold exactly
MAX_KEYS_PER_SERVICE = 1000  # the verifier table rides on every routing push
MINUTE_S = 60
DAY_S = 86400
MAX_EXPIRY_S = 10 * 366 * DAY_S
WEIGHT_MIN = 1  # a key's share when its business's keys compete for the business's replicas
WEIGHT_MAX = 1000
WEIGHT_DEFAULT = 1


class AuthMode(StrEnum):
    """Who may call a business service: anyone who reaches the gateway, or holders of one of its keys."""

    NONE = "none"
    KEYS = "keys"


def default_auth(is_external: bool) -> AuthMode:
    """A new service reachable from outside (`isExternal`) is key-protected unless asked otherwise; an internal one
    is open. Services that existed before keys did stay open (no access row: `AuthMode.NONE`)."""
    return AuthMode.KEYS if is_external else AuthMode.NONE


class LimitKind(StrEnum):
    """Which limit refused a request (the 429's message, and the `limit` of its error)."""

    REQUESTS_PER_MINUTE = "requestsPerMinute"
    TOKENS_PER_MINUTE = "tokensPerMinute"
    TOKENS_PER_DAY = "tokensPerDay"


@dataclass(frozen=True)
class Limits:
    """A tenant's (or a key's) limits; None: no limit of that kind, 0: refuse everything."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day))

    @property
    def counts_tokens(self) -> bool:
        return self.tokens_per_minute is not None or self.tokens_per_day is not None

    def wire(self) -> dict[str, int | None]:
        return {LimitKind.REQUESTS_PER_MINUTE.value: self.requests_per_minute,
                LimitKind.TOKENS_PER_MINUTE.value: self.tokens_per_minute,
                LimitKind.TOKENS_PER_DAY.value: self.tokens_per_day}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any] | None) -> Limits:
        data = data or {}
        return cls(**{name: check_limit(data.get(kind.value), kind.value) for name, kind in _LIMIT_FIELDS.items()})


_LIMIT_FIELDS = {"requests_per_minute": LimitKind.REQUESTS_PER_MINUTE, "tokens_per_minute": LimitKind.TOKENS_PER_MINUTE,
                 "tokens_per_day": LimitKind.TOKENS_PER_DAY}


# validation (bad input: a clear 400 naming the field, nothing changed) --------------------------------------
def check_limit(value: object, field_name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field_name} must be a whole number from 0 to {LIMIT_MAX} (0 refuses all), or null for no limit")
    if not 0 <= value <= LIMIT_MAX:
        raise InvalidInput(f"{field_name} must be from 0 to {LIMIT_MAX} (0 refuses all), or null for no limit; got {value}")
    return value


def check_weight(value: object) -> int:
    """A key's weight: None is the default (1); a key of weight 2 gets twice the tokens of a key of weight 1 when
    they compete for the business's replicas."""
    if value is None:
        return WEIGHT_DEFAULT
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"weight must be a whole number from {WEIGHT_MIN} to {WEIGHT_MAX} (default {WEIGHT_DEFAULT})")
    if not WEIGHT_MIN <= value <= WEIGHT_MAX:
        raise InvalidInput(f"weight must be from {WEIGHT_MIN} to {WEIGHT_MAX} (default {WEIGHT_DEFAULT}); got {value}")
    return value


def check_key_name(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not KEY_NAME.fullmatch(value):
        raise InvalidInput(f"name must be 1 to {KEY_NAME_MAX} letters, digits, spaces, '.', '_' or '-', starting with "
                           "a letter or digit")
    return value


def check_expiry(value: datetime | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise InvalidInput("expiresAt needs a time zone (e.g. 2027-01-01T00:00:00Z)")
    if value <= now:
        raise InvalidInput("expiresAt must be in the future")
    if (value - now).total_seconds() > MAX_EXPIRY_S:
        raise InvalidInput("expiresAt must be within 10 years")
    return value.astimezone(timezone.utc)


def check_auth(value: object) -> AuthMode:
    try:
        return AuthMode(value)
    except ValueError:
        raise InvalidInput(f"auth must be one of {', '.join(m.value for m in AuthMode)}") from None


# keys --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewKey:
    """A key as created: the secret (`key`, shown once) and what Corral keeps of it."""

    id: str
    key: str
    prefix: str
    digest: str


def new_key() -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    return NewKey(id="key-" + secrets.token_hex(6), key=key, prefix=key[:SHOWN_PREFIX_CHARS], digest=key_digest(key))


def key_digest(key: str) -> str:
    """The hex SHA-256 of the key: what is stored, pushed and compared (see the module's docstring for why)."""
    return hashlib.sha256(key.encode()).hexdigest()


KEY_HEADERS = frozenset({b"authorization", b"api-key", b"x-api-key"})  # where a key may come; never passed on


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>` (the OpenAI SDKs), or `api-key` (Azure's SDKs)
    or `x-api-key`. Anything not shaped like one of ours is no key (None): refused without hashing."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"bearer":
                continue
            value = token.strip()
        elif name not in (b"api-key", b"x-api-key"):
            continue
        if value.startswith(KEY_PREFIX.encode()) and len(value) <= KEY_MAX_CHARS and not any(c in value for c in b" \t"):
            return value.decode("latin-1")
    return None


@dataclass(frozen=True)
class KeyEntry:
    """What a data plane knows of one key: its id (the meter's label; never the key), when it expires (epoch
    seconds; None: never), its own limits and its weight (its share when its business's keys compete)."""

    id: str
    digest: str
    expires_at: float | None = None
    limits: Limits = field(default_factory=Limits)
    weight: int = WEIGHT_DEFAULT

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class RouteAccess:
    """A key-protected service's verifier table and limits, pushed with its route (no database on the request
    path). An open service has none (`Route.access` None)."""

    business: str | None
    keys: tuple[KeyEntry, ...] = ()
    limits: Limits = field(default_factory=Limits)
    auth: AuthMode = AuthMode.KEYS  # NONE: open, but with quotas (counted per service; no key scope)


# quotas: fixed windows -------------------------------------------------------------------------------------------
@dataclass
class Usage:
    """One scope's counts (a service's, or a key's) in the current minute and UTC day. Mutable: a data plane keeps
    one per scope and `roll`s it forward before reading it."""

    minute: int = 0  # epoch minute (`int(now // 60)`) the minute counts are of
    requests: int = 0
    tokens: int = 0
    day: int = 0  # epoch day
    day_tokens: int = 0

    def copy(self) -> Usage:
        return replace(self)

    def roll(self, now: float) -> Usage:
        minute, day = int(now // MINUTE_S), int(now // DAY_S)
        if minute != self.minute:
            self.minute, self.requests, self.tokens = minute, 0, 0
        if day != self.day:
            self.day, self.day_tokens = day, 0
        return self


@dataclass(frozen=True)
class Refusal:
    kind: LimitKind
    limit: int
    retry_after_s: int
    scope: str  # "business service '<name>'" or "key '<id>'"

    def message(self) -> str:
        what = {LimitKind.REQUESTS_PER_MINUTE: "requests per minute", LimitKind.TOKENS_PER_MINUTE: "tokens per minute",
                LimitKind.TOKENS_PER_DAY: "tokens per day (UTC)"}[self.kind]
        return (f"rate limit exceeded: {self.scope} allows {self.limit} {what} ({self.kind.value}); "
                f"retry after {self.retry_after_s} s")


def seconds_left(now: float, span_s: int) -> int:
    """Whole seconds until the fixed window of `span_s` containing `now` ends (at least 1: Retry-After's meaning)."""
    return max(1, math.ceil((math.floor(now / span_s) + 1) * span_s - now))


def refusal(limits: Limits, usage: Usage, now: float, scope: str) -> Refusal | None:
    """The first limit `usage` (rolled to `now`) has reached, or None: this request may go. Requests are compared
    before this one counts (`requests >= limit`); tokens with those already used (see the module's docstring)."""
    usage.roll(now)
    if limits.requests_per_minute is not None and usage.requests >= limits.requests_per_minute:
        return Refusal(LimitKind.REQUESTS_PER_MINUTE, limits.requests_per_minute, seconds_left(now, MINUTE_S), scope)
    if limits.tokens_per_minute is not None and usage.tokens >= limits.tokens_per_minute:
        return Refusal(LimitKind.TOKENS_PER_MINUTE, limits.tokens_per_minute, seconds_left(now, MINUTE_S), scope)
    if limits.tokens_per_day is not None and usage.day_tokens >= limits.tokens_per_day:
        return Refusal(LimitKind.TOKENS_PER_DAY, limits.tokens_per_day, seconds_left(now, DAY_S), scope)
    return None


def add_tokens(usage: Usage, tokens: int, now: float) -> None:
    usage.roll(now)
    usage.tokens += tokens
    usage.day_tokens += tokens


def service_scope(service: str) -> str:
    return f"business service '{service}'"


def key_scope(key_id: str) -> str:
    return f"key '{key_id}'"


# tokens of a response ----------------------------------------------------------------------------------------------
_TOTAL_KEY = b'"total_tokens"'
_TOTAL_VALUE = re.compile(rb'"total_tokens"\s*:\s*(\d{1,12})')
_EVENT = b"data: {"
_TAIL = 64


class TokenScan:
    """The tokens a response used, read from its chunks as they pass: the largest `total_tokens` the engine reports
    (prompt + completion; a stream with continuous usage repeats a growing count), or, when it reports none, one per
    server-sent event that carries data (a completion's chunk is about one token; the prompt is then uncounted).
    The last bytes are kept to find a count split across two chunks. The Lua code counts the same."""

    __slots__ = ("tail", "total", "events")

    def __init__(self) -> None:
        self.tail = b""
        self.total: int | None = None
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        data = self.tail + chunk
        self.events += chunk.count(_EVENT)
        if _TOTAL_KEY in data:
            for match in _TOTAL_VALUE.finditer(data):
                value = int(match.group(1))
                if self.total is None or value > self.total:
                    self.total = value
        self.tail = data[-_TAIL:]

    @property
    def tokens(self) -> int:
        return self.total if self.total is not None else self.events


# what the store keeps ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceAccess:
    service: str
    auth: AuthMode
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class ApiKey:
    """A key as stored: everything but the key itself."""

    id: str
    service: str
    prefix: str
    digest: str
    name: str | None = None
    limits: Limits = field(default_factory=Limits)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    weight: int = WEIGHT_DEFAULT

    def entry(self) -> KeyEntry:
        return KeyEntry(self.id, self.digest, self.expires_at.timestamp() if self.expires_at else None, self.limits,
                        self.weight)


def route_access(access: ServiceAccess | None, business: str | None, keys: Iterable[ApiKey]) -> RouteAccess | None:
    """What the data plane needs of a service's access: None for an open service without limits (nothing to check);
    a key-protected one gets its keys' verifier entries (an empty tuple: every request refused)."""
    if access is None or (access.auth is AuthMode.NONE and not access.limits.any):
        return None
    entries = tuple(k.entry() for k in sorted(keys, key=lambda k: k.id)) if access.auth is AuthMode.KEYS else ()
    return RouteAccess(business=business, keys=entries, limits=access.limits, auth=access.auth)
