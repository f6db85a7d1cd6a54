"""The gateway: `/s/<service>/v1/...` → a ready replica the service selects, streamed through.

Raw ASGI rather than a web framework: this is the hot path, and it needs nothing but the path, the
body, and a streaming upstream call. Behaviour (the nginx data plane does the same, see nginx_plane.py):
- Only the OpenAI API goes through: `/s/<service>/v1/<segments>` of plain URL characters. A path with
  control characters (CR/LF: header injection) is refused with 400; dot segments, empty segments,
  percent-encoded leftovers and every other path (`/health`, `/metrics`, ...) with 404.
- The service's route comes from the current routing table; no route → 404.
- Keys and quotas (tenants.py, domain/tenancy.py): a key-protected business service's request without a valid
  key gets 401, one over its service's or key's quota 429 with Retry-After, before anything else is done for it
  (no body read, no replica picked, no hold); the verifier table comes with the route (no database call).
- Hold, don't drop (Knative's activator): a request that finds no free replica (none ready or all
  ejected, or every one at its batch limit, `Target.concurrency`) waits in its service's queue, bounded
  by `hold_queue`, until a replica is assigned or frees up, or `hold_timeout_s` passes. It is woken, not
  polled: a new routing table or a replica back in rotation wakes every held request, a request that
  ends wakes the first of its service's queue; a woken request checks again and keeps its place when
  none is free. Past the deadline, or when the queue is full, it gets 503 with `Retry-After`, naming
  the business. Held requests are counted per service (`TrafficStats.held`, with their wait in a
  histogram): demand the autopilot sees before any replica does.
- Replica picking (domain/replica_picking.py): among replicas not ejected and below their batch limit (and, for
  a request naming a LoRA adapter, those that report it loaded), a least-load service's policy takes the fewest
  in flight, a prefix-aware one the best score of prefix affinity, queue and KV cache (the engines' figures come
  by `push_inputs`, corral/replica_inputs.py); the nginx plane's `pick` decides alike.
- Outlier detection, not a trigger (domain/outliers.py): a
  replica is ejected after `consecutive_failures` gateway failures in a row (connection refused, reset or timed
  out, no answer in time, hung, cut mid-response, a 502/503/504 answer; any other answer resets the count), or
  after a failure and then `failed_probes` failed health checks in a row (a failed replica is checked every
  `probe_interval_s` until a check passes); for `base_ejection_s` times the ejections in a row (capped), then
  back after `passed_probes` passed checks in a row. At most `max_ejection_percent` % of a business's replicas
  are out at once. Each ejection, readmission and cap refusal goes to `on_outlier` (the history) and the
  ejected replicas are in `ejection_views()` (the pods view).
- Retries that are safe (domain/retries.py): a request goes to another replica only when none of it
  reached the first — the connection was refused, reset or timed out while connecting — and only within
  its service's retry budget (`GatewayLimits.retry_budget`: a share of its requests over the last 10 s,
  Envoy's idea); one retry at most. Any failure after the request was written (the replica reset or closed
  the connection, sent no response within the read timeout, or was found hung) is answered 502 or 504
  and never replayed: the replica may have run it, and generation costs GPU time and may have side
  effects. Nothing is ever retried after a response byte.
- A replica that accepts the connection but sends no response headers within the first-byte timeout
  is checked: one that fails `failed_probes` health checks in a row while showing no progress (no response
  byte from it on any request since, its engine's token counters in `/metrics` not moving) is hung (SIGSTOP, a
  wedged server): it is ejected (within the cap) and the request answered 504 (not retried: the request was
  sent to it); one that answers, or makes progress (a busy engine answers `/health` slowly), is busy (a long
  non-streaming completion has no first byte until it is done) and is waited for, re-checked every first-byte
  timeout, up to the read timeout.
- Request bodies: refused with 413 beyond `max_body_bytes` (from Content-Length before reading, or
  while streaming); read whole up to `BUFFERED_BODY_BYTES`, streamed to the replica beyond. Header and
  body read deadlines and the connection cap live in the HTTP server (corral/server.py).
- The response streams chunk by chunk (server-sent events included), with `x-corral-replica`. A
  replica that dies mid-response aborts the client's connection (no clean end: the client sees the
  cut, as with nginx).
- Dropped clients stop the work (`_ClientWatch`): from the moment its body is read until its response
  ends, a request's client connection is watched; when the client disconnects — while the request is
  held, while the replica queues or prefills it (no response headers yet), or mid-stream — the request
  is cancelled at once: a held request leaves its queue and is never sent, and a forwarded one has its
  replica connection closed (engines abort a request whose connection closed), so no GPU time goes to
  an answer nobody reads. Counted per service as `client_cancelled` (the load view, /api/metrics).
  nginx does the same (`proxy_ignore_client_abort off`, `lua_check_client_abort on`).
- The upstream client is aiohttp: profiled under load, httpx's pool spent 65% of the gateway's CPU
  scanning its connections on every request (bench/README.md).
- Errors the gateway answers itself are OpenAI-shaped, so SDKs show the reason:
  `{"error": {"message": "...", "type": "...", "code": <status>}}` (`error_body`; the same on nginx).
- A replica whose engine does not answer to the pool's tag (`Target.rewrite_model`, see routing.py)
  gets `"model": "<tag>"` as `"model": null` (bodies read whole only: one streamed beyond
  `BUFFERED_BODY_BYTES`, 1 MiB, is sent as is), and its answer's `model` back as the tag: a JSON body
  (buffered up to `max_body_bytes`) or each server-sent event. `GET /v1/models` on a route of only
  such replicas is answered here with the tag.
- In-flight counts per replica drive both least-outstanding balancing and draining: a removed
  replica leaves the table at once and is stopped only when its in-flight count reaches zero. The counters
  and outlier records of a replica (or service) that left every route are dropped `counters_retention_s` after
  it left, once nothing is in flight on it (domain/load.py: `prunable`).
- Each forwarded request adds to its (service, replica) counters: requests, errors, latency and, for a
  streamed response, time to the first body byte (histograms), completion tokens when the response
  reports usage (stats.py says exactly what counts; the Lua code counts the same).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_from_bytes

import aiohttp
from yarl import URL

from corral.aio import stop, within
from corral.domain.engine_errors import ERROR_BODY_MAX_BYTES, ERROR_TYPES, openai_error
from corral.domain.fairness import ANONYMOUS, Charge, VirtualCounters
from corral.domain.load import COUNTERS_RETENTION_S, Sample, departures, prunable
from corral.domain.outliers import (
    Outlier,
    OutlierEvent,
    OutlierPolicy,
    Reason,
    capped,
    capped_event,
    due,
    eject,
    ejected_event,
    failed,
    hung,
    may_eject,
    probed,
    progress_counter,
    readmitted_event,
    succeeded,
    wants_probe,
)
from corral.domain.replica_picking import (
    Affinity,
    PickRequest,
    ReplicaInputs,
    RoutingPolicy,
    adapter_holders,
    pick,
    read_request,
)
from corral.domain.retries import AttemptFailure, RetryBudget, RetryWindow, retryable
from corral.domain.tenancy import KEY_HEADERS, AuthMode, Usage
from corral.gateway.policies import Policy
from corral.gateway.routing import Route, RoutingTable, Target
from corral.gateway.stats import TrafficStats, UsageScan
from corral.gateway.tenants import ADMISSION, Admission, Refused, TenantWindows
from corral.views import EjectionView

if TYPE_CHECKING:
    from corral.config import Settings

log = logging.getLogger("corral.gateway")

ROUTED_PREFIX = "/s/"
# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those the client library sets.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"host", b"content-length"}
# (`date`: the gateway's HTTP server sends its own, as nginx does; two would be invalid)
RESPONSE_SKIP = {b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"upgrade", b"date"}
# Failures of an attempt before any response byte. Of them, only CONNECT_FAILURES happen before any byte of
# the request was written (connection refused, reset or timed out while connecting): the only retryable ones.
UNREACHABLE = (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError, asyncio.TimeoutError)
CONNECT_FAILURES = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
MAX_ATTEMPTS = 2  # the first try and one retry on another replica (nginx: proxy_next_upstream_tries 2)
BUFFERED_BODY_BYTES = 1024**2  # a body up to this is read whole; a larger one streams to the replica

# The paths that go through, on both data planes (the Lua code applies the same rules): `/v1/` then
# non-empty segments of unreserved and sub-delim characters — no `%` (nothing left to decode), no
# `.`/`..` segment. The path is the decoded one (the ASGI server and nginx decode it once).
API_PATH = re.compile(r"/s/[^/]+(?!.*/\.\.?(?:/|$))/v1(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@]+)+")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MSG_CONTROL_CHARS = "the request path contains control characters"
MSG_NOT_API = "only the OpenAI API is served here: /s/<service>/v1/..."
UNKNOWN_SERVICE = ""  # the counter label of requests for services that do not exist (names are the client's)


def path_error(path: str) -> tuple[int, str] | None:
    """Why a decoded `/s/<service>/<rest>` path may not go through, or None."""
    if API_PATH.fullmatch(path):
        return None
    if CONTROL_CHARS.search(path):
        return 400, MSG_CONTROL_CHARS
    return 404, MSG_NOT_API


# An error's OpenAI `type` by status: ERROR_TYPES (corral.domain.engine_errors, shared with engines' errors).


def error_body(status: int, message: str) -> dict[str, Any]:
    """A gateway error in the OpenAI shape (the OpenAI SDKs show `error.message`)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "code": status}}


# The `model` field rewrite for engines that do not answer to the tag (routing.py).
_RESPONSE_MODEL = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


def request_model_rewrite(body: bytes, tag: str) -> bytes | None:
    """`body` with its `"model": "<tag>"` as `"model": null`; None when it names no such model."""
    rewritten, count = re.subn(rb'"model"\s*:\s*"' + re.escape(tag.encode()) + rb'"', b'"model":null', body, count=1)
    return rewritten if count else None


def response_model_rewrite(data: bytes, tag: str, count: int = 0) -> bytes:
    """Every (`count`: the first `count`) `"model": "..."` of a response as the tag."""
    return _RESPONSE_MODEL.sub(b'"model":' + json.dumps(tag).encode(), data, count=count)


def too_large_message(limit: int) -> str:
    return f"request body larger than the gateway's limit of {limit} bytes (CORRAL_GATEWAY_MAX_BODY_BYTES)"


# A request the gateway could not hold, or held past its deadline, is told to come back after this many
# seconds: long enough for an autopilot tick and a routing push, short against a replica's start.
RETRY_AFTER_S = 5


def held_too_long_suffix(timeout_s: float) -> str:
    """Appended to the reason (no replica, or all busy) of a request held past its deadline (both planes)."""
    return f"; the request waited {timeout_s:g} s for a free replica (CORRAL_GATEWAY_HOLD_TIMEOUT_S)"


def hold_full_suffix(queue: int) -> str:
    """Appended to the reason of a request refused because its service's queue of held requests is full."""
    return f"; {queue} requests already wait for a free replica (CORRAL_GATEWAY_HOLD_QUEUE)"


# A request that failed at its replica after it was sent there: its answer and why it is not retried (both
# planes: the nginx configuration is rendered from this, keyed by status).
NOT_RETRIED = {
    AttemptFailure.DROPPED: (502, " closed the connection after the request was sent to it; the request is not "
                                  "retried on another replica, since this one may have run it"),
    AttemptFailure.SILENT: (504, " did not answer in time after the request was sent to it; the request is not "
                                 "retried on another replica, since this one may be running it"),
}


def not_retried(replica: str, failure: AttemptFailure) -> tuple[int, str]:
    """The status and message of a request that failed on `replica` after it was sent there."""
    status, suffix = NOT_RETRIED[failure]
    return status, f"replica '{replica}'" + suffix


def budget_spent_suffix(budget: RetryBudget) -> str:
    """After "replica '<name>'": a replica unreachable while its service's retry budget is spent (both planes)."""
    return (f" could not be reached, and the request is not retried on another replica: retries are over their "
            f"budget ({budget.describe()}; CORRAL_GATEWAY_RETRY_BUDGET_PERCENT)")


@dataclass(frozen=True)
class GatewayLimits:
    """What a client and a replica may cost the gateway; both data planes apply them."""

    first_byte_timeout_s: float = 30.0
    max_body_bytes: int = 32 * 1024**2
    client_header_timeout_s: float = 60.0
    client_body_timeout_s: float = 60.0
    max_connections: int = 4096
    hold_timeout_s: float = 30.0  # how long a request waits for a free replica (0: not at all)
    hold_queue: int = 1000  # requests held at most per service (0: none)
    retry_budget: RetryBudget = RetryBudget()  # retries to another replica per service (domain/retries.py)
    outliers: OutlierPolicy = OutlierPolicy()  # when a replica is ejected, for how long, the cap (domain/outliers.py)
    probe_interval_s: float = 0.5  # suspected and ejected replicas are health-checked this often
    counters_retention_s: float = COUNTERS_RETENTION_S  # counters of a replica that left are kept this long

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayLimits:
        return cls(first_byte_timeout_s=settings.gateway_first_byte_timeout_s, max_body_bytes=settings.gateway_max_body_bytes,
                   client_header_timeout_s=settings.gateway_client_header_timeout_s,
                   client_body_timeout_s=settings.gateway_client_body_timeout_s,
                   max_connections=settings.gateway_max_connections,
                   hold_timeout_s=settings.gateway_hold_timeout_s, hold_queue=settings.gateway_hold_queue,
                   retry_budget=RetryBudget(percent=settings.gateway_retry_budget_percent,
                                            min_retries=settings.gateway_retry_budget_min),
                   outliers=OutlierPolicy(consecutive_failures=settings.gateway_eject_consecutive_failures,
                                          failed_probes=settings.health_failure_threshold,
                                          passed_probes=settings.health_success_threshold,
                                          base_ejection_s=settings.gateway_base_ejection_s,
                                          max_ejection_s=settings.gateway_max_ejection_s,
                                          max_ejection_percent=settings.gateway_max_ejection_percent))

    @property
    def holds(self) -> bool:
        return self.hold_timeout_s > 0 and self.hold_queue > 0

    @property
    def health_probe_timeout_s(self) -> float:
        """How long a replica silent past the first-byte timeout has to answer its health check."""
        return max(1.0, min(self.first_byte_timeout_s / 2, 5.0))


_IN_ROTATION = Outlier()


def ejection_view(state: Outlier, policy: OutlierPolicy) -> EjectionView:
    """An ejected replica's record as the pods view shows it (both planes)."""
    def iso(t: float | None) -> str:
        return datetime.fromtimestamp(t or 0.0, timezone.utc).isoformat(timespec="milliseconds")

    return EjectionView(since=iso(state.ejected_at), until=iso(state.until), count=state.ejections,
                        reason=policy.describe(state.reason or Reason.FAILURES))


class _ClientGone(Exception):
    """The client disconnected (or missed the body deadline) before its request body was complete."""


class _BodyTooLarge(Exception):
    pass


class _BodyStream:
    """A request body larger than `BUFFERED_BODY_BYTES`: what was read so far, then the rest as it
    arrives, counted against the limit. Sent once: a request whose body went out cannot be retried.
    `complete` is set once the client sent all of it (from then on `_ClientWatch` may read the connection)."""

    def __init__(self, receive: Callable, prefix: list[bytes], size: int, limit: int, content_length: int | None) -> None:
        self._receive, self._prefix, self._size, self._limit = receive, prefix, size, limit
        self.content_length = content_length
        self.failure: Exception | None = None
        self.complete = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._prefix:
            yield chunk
        self._prefix = []
        more = True
        while more:
            message = await self._receive()
            if message["type"] != "http.request":
                self.failure = _ClientGone()
                raise self.failure
            chunk = message.get("body", b"")
            self._size += len(chunk)
            if self._size > self._limit:
                self.failure = _BodyTooLarge()
                raise self.failure
            more = message.get("more_body", False)
            if not more:
                self.complete.set()
            if chunk:
                yield chunk


Body = bytes | _BodyStream


async def _read_body(receive: Callable, limit: int, content_length: int | None) -> Body:
    message = await receive()
    if message["type"] != "http.request":
        raise _ClientGone()
    body = message.get("body", b"")
    if not message.get("more_body", False):  # the common case: the whole body in one message
        if len(body) > limit:
            raise _BodyTooLarge()
        return body
    chunks, size = [body], len(body)
    while size <= BUFFERED_BODY_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone()
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge()
        if not message.get("more_body", False):
            return b"".join(chunks)
    return _BodyStream(receive, chunks, size, limit, content_length)


class _FirstByteWatch:
    """Armed while a request waits for its response headers. Every `first_byte_timeout_s` without
    them, the replica is checked (`Gateway.hung_check`: its health endpoint, and signs of progress since the
    period began); when it is hung, the waiting request is cancelled (`hung` tells the caller why)."""

    __slots__ = ("_gateway", "_target", "_task", "_handle", "_probe", "_chunks", "hung")

    def __init__(self, gateway: Gateway, target: Target) -> None:
        self._gateway, self._target = gateway, target
        self._task = asyncio.current_task()
        self._probe: asyncio.Task | None = None
        self._chunks = gateway.chunks.get(target.name, 0)  # progress is measured from here
        self.hung = False
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            gateway.limits.first_byte_timeout_s, self._expired)

    def _expired(self) -> None:
        self._handle = None
        self._probe = asyncio.ensure_future(self._check())

    async def _check(self) -> None:
        is_hung = await self._gateway.hung_check(self._target, self._chunks)
        self._probe = None
        if not is_hung:  # busy, not hung: keep waiting (the read timeout still bounds it)
            self._chunks = self._gateway.chunks.get(self._target.name, 0)
            self._handle = asyncio.get_running_loop().call_later(self._gateway.limits.first_byte_timeout_s, self._expired)
        elif self._task is not None:
            self.hung = True
            self._task.cancel()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._probe is not None:
            self._probe.cancel()


class _ClientWatch:
    """A request's client connection, watched from the moment its body was read until its response ended:
    when the client disconnects, the request's task is cancelled at once — while it is held, while the
    replica queues or prefills it (no response headers yet: a long non-streamed completion sends none
    until it is done), or mid-stream. Cancelling closes the replica's connection (aiohttp closes one whose
    request or response was cut short), and engines abort a request whose connection closed: the GPU time
    of an answer nobody reads is saved, and under overload client timeouts do not multiply the engines'
    work. A body streamed beyond `BUFFERED_BODY_BYTES` is watched from its end on (until then its own reads
    notice the client leaving; a held request with such a body is noticed when it is sent on).

    Requests pass their responses through `send`: after the last body message the client leaving is no
    longer a cancellation (the ASGI server answers `http.disconnect` to every read once a response ended)."""

    __slots__ = ("_send", "_task", "_watcher", "left", "answered")

    def __init__(self, receive: Callable, send: Callable, body: Body) -> None:
        self._send = send
        self._task = asyncio.current_task()
        self.left = False  # the client disconnected before its response ended: the task was cancelled
        self.answered = False
        self._watcher = asyncio.ensure_future(self._watch(receive, body))

    async def _watch(self, receive: Callable, body: Body) -> None:
        if isinstance(body, _BodyStream):
            await body.complete.wait()
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.answered and self._task is not None:
            self.left = True
            self._task.cancel()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.answered = True
        await self._send(message)

    def stop(self) -> None:
        self._watcher.cancel()


class _Waiter:
    """A held request's place in its service's queue. `wake` resolves its future; the request then checks
    for a free replica and, when none is, re-arms (`arm`) and keeps its place. `key`: whose request it is
    (its API key's id; "" without one), for the fair order (domain/fairness.py); `model`: the model it names,
    which may be a LoRA adapter only some replicas hold (read again at each wake: adapters load while it waits)."""

    __slots__ = ("future", "key", "model")

    def __init__(self, key: str, model: str | None = None) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.key = key
        self.model = model

    def arm(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def wake(self) -> bool:
        """Wake it; False when it was already woken or gave up (its deadline passed)."""
        if self.future.done():
            return False
        self.future.set_result(None)
        return True

    @property
    def woken(self) -> bool:
        return self.future.done() and not self.future.cancelled()


class Gateway:
    def __init__(self, policy: Policy, connect_timeout_s: float, read_timeout_s: float, health_path: Callable[[str], str],
                 limits: GatewayLimits | None = None) -> None:
        self.policy = policy
        self.limits = limits or GatewayLimits()
        self.table: RoutingTable = {}
        self.version = 0  # of `table`, as given by `push`
        self.stats = TrafficStats()
        self.ejected: dict[str, Target] = {}  # the replicas of the table out of rotation now
        self.stats.ejected = self.ejected.keys()  # a live view, for /api/metrics
        self.outliers: dict[str, Outlier] = {}  # replica → its outlier record (domain/outliers.py)
        # Ejections, readmissions and cap refusals, as they happen (the runtime records them in the history).
        self.on_outlier: Callable[[OutlierEvent], None] | None = None
        self.chunks: dict[str, int] = defaultdict(int)  # replica → response chunks received from it: its progress
        self._health_path = health_path
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._prober: asyncio.Task | None = None
        self._hung_checks: dict[str, asyncio.Future[bool]] = {}  # one hung check at a time per replica
        self._live: set[str] = set()  # the replicas of the table
        self._members: dict[str, frozenset[str]] = {}  # service → its replicas (the ejection cap)
        self._departed: dict[str, float] = {}  # replica → when it left every route (pruning)
        self._services_departed: dict[str, float] = {}  # service → when it left the table
        self._drained = asyncio.Condition()
        self._held: dict[str, deque[_Waiter]] = {}  # service → its held requests, in arrival order
        # service → its keys' virtual token counters: which held request goes next (domain/fairness.py)
        self._fair: dict[str, VirtualCounters] = {}
        self.on_held: Callable[[str], None] | None = None  # a request of this service is held (model swaps wake one)
        self._retries: dict[str, RetryWindow] = {}  # service → its requests and retries, for the retry budget
        self.tenants = TenantWindows()  # key checks and quota windows (tenants.py)
        # Replica picking (domain/replica_picking.py): prefix key → replica, and the engines' figures per replica
        self.affinity = Affinity()
        self.inputs: Mapping[str, ReplicaInputs] = {}

    # lifecycle ---------------------------------------------------------------------------------
    @property
    def counters_from_zero(self) -> bool:
        """The counters start at zero with this process (the load monitor's first reading: `LoadMonitor.start`)."""
        return True

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=self._timeout,
            auto_decompress=False,  # pass bodies through byte for byte
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        # aiohttp sends a GET (any idempotent method) again, on a new connection to the same replica, when the
        # first connection was reset or closed after the request was written: a replay the gateway never makes
        # (domain/retries.py). No public switch: the attribute aiohttp reads (a test guards it).
        self._session._retry_connection = False
        self._prober = asyncio.create_task(self._watch_outliers(), name="gateway-outlier-prober")

    async def close(self) -> None:
        await stop(self._prober)
        if self._session:
            await self._session.close()

    async def push(self, table: RoutingTable, version: int, replace: bool = False) -> int:
        """Serve `table` from the next request on (an in-memory swap); returns the version served. A
        version older than the one served changes nothing, unless `replace` (see `sync.DataPlane`)."""
        if replace or version > self.version:
            self.set_table(table)
            self.version = version
        return self.version

    async def served_version(self) -> int:
        return self.version

    async def keys_last_used(self) -> dict[str, float]:
        """Key id → when a request last presented it (epoch seconds)."""
        return dict(self.tenants.last_used)

    def quota_windows(self) -> dict[str, Usage]:
        """Each quota scope's current windows (`s:<service>`, `k:<key id>`)."""
        now = time.time()
        return {scope: usage.copy().roll(now) for scope, usage in self.tenants.usage.items()}

    async def push_inputs(self, inputs: Mapping[str, ReplicaInputs]) -> None:
        """The engines' figures per replica, for replica picking (a swap: the next request reads them)."""
        self.inputs = dict(inputs)

    async def read_counters(self) -> Sample:
        """The traffic counters now (the load monitor's once-a-second reading; see stats.py)."""
        return self.stats.sample()

    def set_table(self, table: RoutingTable) -> None:
        now = time.time()
        services_before, live_before = set(self.table), self._live
        self.table = table
        targets = {t.name: t for route in table.values() for t in route.targets}
        self._live = set(targets)
        self._members = {name: frozenset(t.name for t in route.targets) for name, route in table.items()}
        self._departed = departures(live_before, self._live, self._departed, now)
        self._services_departed = departures(services_before, table.keys(), self._services_departed, now)
        # Out of rotation: the replicas of the table whose record says so (one that left while ejected and came
        # back is still out); one gone from every route is neither shown nor checked (its record stays until
        # pruned). In place: `stats.ejected` is a view of the keys.
        self.ejected.clear()
        self.ejected.update({name: targets[name] for name, state in self.outliers.items()
                             if state.ejected and name in targets})
        self.tenants.set_table(route.access for route in table.values() if route.access is not None)
        for service in [s for s in self._retries if s not in table]:
            del self._retries[service]
        for service in [s for s in self._fair if s not in table]:
            del self._fair[service]
        self._wake_all()  # a replica may have been assigned (or its service removed)

    # holding -----------------------------------------------------------------------------------
    def free_targets(self, route: Route, tried: Iterable[str] = (), only: frozenset[str] | None = None) -> list[Target]:
        """The replicas of `route` that may take a request now: in rotation, not tried, below their batch
        limit, and among `only` when given (those holding the LoRA adapter the request names)."""
        in_flight = self.stats.in_flight_by_replica
        skip = set(tried)
        return [t for t in route.targets if t.name not in self.ejected and t.name not in skip
                and (t.concurrency is None or in_flight.get(t.name, 0) < t.concurrency)
                and (only is None or t.name in only)]

    def _wake_all(self) -> None:
        for queue in self._held.values():
            for waiter in queue:
                waiter.wake()

    def _wake_first(self, service: str) -> None:
        """One replica of `service` freed a place: wake the held request that goes next among those not already
        woken and able to take a free place: the first of the key with the smallest virtual token counter
        (domain/fairness.py). One that may only go to replicas holding its adapter is passed over while none of
        those is free, rather than woken for a place it cannot take (the place would idle while others wait)."""
        queue = self._held.get(service)
        if not queue:
            return
        waiting = [w for w in queue if not w.future.done()]
        if not waiting:
            return
        route = self.table.get(service)
        if route is not None and any(w.model for w in waiting):
            if free := {t.name for t in self.free_targets(route)}:
                waiting = [w for w in waiting if (only := self._holders(route, w.model)) is None
                           or not free.isdisjoint(only)]
                if not waiting:
                    return  # nobody held can take the free place
        fair = self._fair.get(service)
        first = fair.first(w.key for w in waiting) if fair is not None and len(waiting) > 1 else 0
        waiting[first or 0].wake()

    def _holders(self, route: Route, model: str | None) -> frozenset[str] | None:
        """The replicas of `route` holding `model` as a LoRA adapter; None: any replica (domain/replica_picking.py)."""
        return adapter_holders(model, (t.name for t in route.targets), self.inputs) if model else None

    def _fairness(self, service: str) -> VirtualCounters:
        fair = self._fair.get(service)
        if fair is None:
            fair = self._fair[service] = VirtualCounters()
        return fair

    def _waiting_reason(self, route: Route) -> str:
        if any(t.name not in self.ejected for t in route.targets):
            return route.busy_message()
        return route.no_replica_message()

    async def _hold(self, route: Route, send: Callable, model: str | None = None, key: str = ANONYMOUS,
                    free: list[Target] | None = None) -> tuple[Route, list[Target]] | None:
        """Wait for a free replica of `route`'s service: the route as it is then and its free replicas; or
        None once the request was answered here (503 past the deadline or with the queue full; 404 when
        its service is gone meanwhile). Between finding a replica free and the caller counting it in
        flight there is no await, so two woken requests never take the same place. `free`: the replicas free
        now, for a request that queues behind held ones (their order is fair, not first come): it goes at
        once when the queue is full or holds are off. `model`: the model the request names (a LoRA adapter only
        some replicas may hold: `_holders`, read at each wake)."""
        service, limits = route.service, self.limits
        queue = self._held.get(service)
        if not limits.holds or (queue is not None and len(queue) >= limits.hold_queue):
            if free:
                return route, free
            reason = self._waiting_reason(route)
            self.stats.rejected[(service, 503)] += 1
            await _error(send, 503, reason + hold_full_suffix(limits.hold_queue) if limits.holds else reason,
                         retry_after=True)
            return None
        if queue is None:
            queue = self._held[service] = deque()
        self._fairness(service).join(key, {w.key for w in queue})
        waiter = _Waiter(key, model)
        queue.append(waiter)
        self.stats.hold(service)
        if free:
            self._wake_first(service)  # a place is free now: whoever goes next takes it
        if self.on_held is not None:
            self.on_held(service)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + limits.hold_timeout_s
        admitted = False
        try:
            while True:
                try:
                    await within(max(deadline - loop.time(), 0.0), waiter.future)
                except TimeoutError:
                    break
                current = self.table.get(service)
                if current is None:
                    self.stats.rejected[(UNKNOWN_SERVICE, 404)] += 1
                    await _error(send, 404, f"service '{service}' not found")
                    return None
                route = current
                if candidates := self.free_targets(route, only=self._holders(route, model)):
                    admitted = True
                    return route, candidates
                waiter.arm()
        finally:
            queue.remove(waiter)
            if not queue and self._held.get(service) is queue:
                del self._held[service]
            self.stats.unhold(service, loop.time() - started)
            if not admitted and waiter.woken:
                self._wake_first(service)  # the place it was woken for goes to the next one
        self.stats.rejected[(service, 503)] += 1
        await _error(send, 503, self._waiting_reason(route) + held_too_long_suffix(limits.hold_timeout_s),
                     retry_after=True)
        return None

    async def drain(self, replica: str, timeout_s: float) -> None:
        """Return once no request is in flight on `replica`, or after `timeout_s`."""
        try:
            async with self._drained:
                await within(
                    timeout_s, self._drained.wait_for(lambda: self.stats.in_flight_by_replica.get(replica, 0) == 0)
                )
        except TimeoutError:
            log.warning("replica %s still had %d request(s) in flight after %.0f s of draining",
                        replica, self.stats.in_flight_by_replica.get(replica, 0), timeout_s)

    # ASGI --------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if not path.startswith(ROUTED_PREFIX):
            if CONTROL_CHARS.search(path):
                await _error(send, 400, MSG_CONTROL_CHARS)
            else:
                await _error(send, 404, f"no route for '{path}'; business services live under /s/<service>/v1/...")
            return
        service = path[len(ROUTED_PREFIX):].partition("/")[0]
        route = self.table.get(service)
        if (refusal := path_error(path)) is not None:
            self.stats.rejected[(service if route else UNKNOWN_SERVICE, refusal[0])] += 1
            await _error(send, refusal[0], refusal[1])
            return
        if route is None:
            self.stats.rejected[(UNKNOWN_SERVICE, 404)] += 1
            await _error(send, 404, f"service '{service}' not found")
            return
        if route.access is not None:  # keys and quotas, before anything else is done for it (tenants.py)
            admitted = self.tenants.admit(service, route.access, scope["headers"])
            if isinstance(admitted, Refused):
                self.stats.rejected[(service, admitted.status)] += 1
                retry = [(b"retry-after", str(admitted.retry_after_s).encode())] if admitted.retry_after_s else None
                await _json(send, admitted.status, admitted.body, retry)
                return
            scope[ADMISSION] = admitted
        rest = path[len(ROUTED_PREFIX) + len(service):]
        if rest == "/v1/models" and scope["method"] == "GET" and route.answers_models():
            await _json(send, 200, route.models_list())
            return
        headers: list[tuple[str, str]] = []
        content_length: int | None = None
        # A tenant's key stops here: the replica needs none, and must never see (or log) one.
        skip = HOP_BY_HOP | KEY_HEADERS if route.access is not None and route.access.auth is AuthMode.KEYS else HOP_BY_HOP
        for k, v in scope["headers"]:
            if k == b"content-length":
                content_length = int(v)  # the HTTP server checked it is digits
            elif k not in skip:
                headers.append((k.decode("latin-1"), v.decode("latin-1")))
        limit = self.limits.max_body_bytes
        watch: _ClientWatch | None = None
        try:
            if content_length is not None and content_length > limit:
                raise _BodyTooLarge()
            body = await _read_body(receive, limit, content_length)
            watch = _ClientWatch(receive, send, body)
            await self._forward(route, scope, rest, headers, body, watch.send)
        except _BodyTooLarge:
            self.stats.rejected[(service, 413)] += 1
            await _error(send, 413, too_large_message(limit))
        except _ClientGone:
            # Left before its body was complete (or missed the body deadline: the HTTP server answered 408).
            self.stats.cancel(service)
        except asyncio.CancelledError:
            if watch is None or not watch.left:
                raise  # the gateway stops
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.stats.cancel(service)  # nobody to answer
        finally:
            if watch is not None:
                watch.stop()

    def _retry_window(self, service: str) -> RetryWindow:
        window = self._retries.get(service)
        if window is None:
            window = self._retries[service] = RetryWindow(self.limits.retry_budget)
        return window

    async def _forward(self, route: Route, scope: dict[str, Any], path: str, headers: list[tuple[str, str]], body: Body,
                       send: Callable) -> None:
        """Hold the request until a replica is free, send it there, and retry it once on another only when
        the first failed before any byte of it was written, within the retry budget (domain/retries.py)."""
        window = self._retry_window(route.service)
        window.request(time.monotonic())
        tried: set[str] = set()
        want = self._pick_request(route, body)
        model = want.model if want else None
        only = self._holders(route, model)
        admission: Admission | None = scope.get(ADMISSION)
        key = admission.key_id or ANONYMOUS if admission is not None else ANONYMOUS
        charge: Charge | None = None
        for attempt in range(MAX_ATTEMPTS):
            candidates = self.free_targets(route, tried, only)
            # Behind held requests a new one queues too: who goes next is decided by the fair order.
            if attempt == 0 and (not candidates or route.service in self._held):
                if (admitted := await self._hold(route, send, model, key, candidates)) is None:
                    return
                route, candidates = admitted
                only = self._holders(route, model)  # the route as it is now, the adapters as loaded now
            if not candidates:
                break
            target = self._choose(route, candidates, want)
            tried.add(target.name)
            if charge is None:  # charged once, settled by the attempt that answers (domain/fairness.py)
                charge = self._fairness(route.service).dispatch(
                    key, admission.weight if admission is not None else 1,
                    len(body) if isinstance(body, bytes) else body.content_length or 0)
            failure = await self._try(route, target, scope, path, headers, body, send, charge)
            if failure is None:
                return
            if not retryable(failure):  # the replica may have run it: never replayed
                status, message = not_retried(target.name, failure)
                self.stats.rejected[(route.service, status)] += 1
                await _error(send, status, message)
                return
            if (attempt + 1 < MAX_ATTEMPTS and self.free_targets(route, tried, only)
                    and not window.try_retry(time.monotonic())):
                self.stats.rejected[(route.service, 503)] += 1
                await _error(send, 503, f"replica '{target.name}'" + budget_spent_suffix(self.limits.retry_budget))
                return
        self.stats.rejected[(route.service, 503)] += 1
        await _error(send, 503, route.no_replica_message())

    def _pick_request(self, route: Route, body: Body) -> PickRequest | None:
        """The request's model and prompt prefix, read only when picking needs them: a prefix-aware service, or
        replicas that report LoRA adapters. A body that streams (over 1 MiB) is not read: least load."""
        if not isinstance(body, bytes):
            return None
        if route.routing.policy is RoutingPolicy.LEAST_LOAD and not any(
                (i := self.inputs.get(t.name)) is not None and i.adapters for t in route.targets):
            return None
        return read_request(body)

    def _choose(self, route: Route, candidates: list[Target], want: PickRequest | None) -> Target:
        if want is None or route.routing.policy is RoutingPolicy.LEAST_LOAD:
            return self.policy.choose(candidates, self.stats.in_flight_by_replica)
        chosen = pick([t.name for t in candidates], route.routing, self.stats.in_flight_by_replica, self.inputs,
                      want.keys, self.affinity)
        return next(t for t in candidates if t.name == chosen)

    async def _try(self, route: Route, target: Target, scope: dict[str, Any], path: str, headers: list[tuple[str, str]],
                   body: Body, send: Callable, charge: Charge | None = None) -> AttemptFailure | None:
        """Forward once. None when answered (or cut mid-response); else how the attempt failed with nothing
        sent to the client yet (the caller answers, or retries a `CONNECT` failure)."""
        assert self._session is not None, "Gateway.start() was not called"
        query = scope.get("query_string")
        if query and not query.isascii():
            query = quote_from_bytes(query, safe="/?&=%+:@!$'()*,;~").encode()
        url = URL(target.endpoint + path + ("?" + query.decode() if query else ""), encoded=True)
        data: Any = body
        rewrite = False  # the answer's `model` goes back to the tag
        if target.rewrite_model and isinstance(body, bytes) and (mapped := request_model_rewrite(body, route.model)):
            data, rewrite = mapped, True
        if isinstance(body, _BodyStream):
            data = body.chunks()
            if body.content_length is not None:
                headers = [*headers, ("Content-Length", str(body.content_length))]
        started = time.perf_counter()
        self.stats.start(route.service, target.name)
        error = True
        first_byte: float | None = None  # a streamed response's first body byte (stats.py)
        usage: UsageScan | None = None
        admission: Admission | None = scope.get(ADMISSION)  # the key check's (tenants.py): its tokens count at the end
        tally = None
        events_seen = 0  # a stream's events: its completion tokens when it reports no usage (the Lua code counts alike)
        attempt_failed = False  # returned a failure: the request is answered (and its charge settled) elsewhere
        watch = _FirstByteWatch(self, target)
        try:
            try:
                upstream = await self._session.request(scope["method"], url, headers=headers, data=data, allow_redirects=False)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not watch.hung or (task is not None and task.uncancel() > 0):
                    error = False  # the client left (aiohttp closed the replica's connection), or the gateway stops
                    raise
                log.warning("replica %s is hung: no response within %.0f s, %d failed health checks in a row and no "
                            "progress", target.name, self.limits.first_byte_timeout_s, self.limits.outliers.failed_probes)
                if not self._eject(target, Reason.HUNG):
                    self._failed(target)
                attempt_failed = True
                return AttemptFailure.SILENT
            except CONNECT_FAILURES:  # nothing of the request was written
                self._failed(target)
                attempt_failed = True
                return AttemptFailure.CONNECT
            except UNREACHABLE as exc:  # written (at least in part): the replica may have it
                if isinstance(body, _BodyStream) and body.failure is not None:
                    error = False
                    raise body.failure from None  # the client's fault, not the replica's
                self._failed(target)
                attempt_failed = True
                return AttemptFailure.SILENT if isinstance(exc, TimeoutError) else AttemptFailure.DROPPED
            finally:
                watch.stop()
            gateway_failure = 502 <= upstream.status <= 504  # behind the replica, or the engine refusing work
            if gateway_failure:
                self._failed(target)
            chunks = self.chunks
            async with upstream:
                skip = RESPONSE_SKIP | {b"content-length"} if rewrite else RESPONSE_SKIP
                response_headers = [(k, v) for k, v in upstream.raw_headers if k.lower() not in skip]
                response_headers.append((b"x-corral-replica", target.name.encode()))
                try:
                    if upstream.status >= 400 and upstream.content_type != "text/event-stream":
                        # An engine's error: in OpenAI's shape with its reason, no local path (domain.engine_errors).
                        raw = await upstream.content.read(ERROR_BODY_MAX_BYTES + 1)
                        if len(raw) <= ERROR_BODY_MAX_BYTES and upstream.content.at_eof():
                            payload = json.dumps(openai_error(upstream.status, raw, route.model)).encode()
                            kept = [(k, v) for k, v in response_headers if k.lower() not in (b"content-type", b"content-length")]
                            await send({"type": "http.response.start", "status": upstream.status, "headers": [
                                *kept, (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
                            await send({"type": "http.response.body", "body": payload, "more_body": False})
                            error = upstream.status >= 500
                            return None
                        await send({"type": "http.response.start", "status": upstream.status, "headers": response_headers})
                        await send({"type": "http.response.body", "body": raw, "more_body": True})
                    else:
                        await send({"type": "http.response.start", "status": upstream.status, "headers": response_headers})
                    body_chunks = upstream.content.iter_any()
                    events = upstream.content_type == "text/event-stream"
                    if rewrite:
                        body_chunks = _rewritten(body_chunks, route.model, events, self.limits.max_body_bytes)
                    if events or upstream.content_type == "application/json":
                        usage = UsageScan()
                        tally = admission.scan if admission is not None and admission.counts_tokens else None
                    async for chunk in body_chunks:
                        chunks[target.name] += 1
                        if events:
                            events_seen += chunk.count(b"data: {")
                        if usage is not None:
                            if events and first_byte is None and chunk:
                                first_byte = time.perf_counter() - started
                            usage.feed(chunk)
                            if tally is not None:  # the tokens of a quota (domain.tenancy.TokenScan)
                                tally.feed(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # Died mid-response: nothing left to retry. Returning without ending the response makes
                    # the HTTP server close the connection, so the client sees an incomplete response.
                    self._failed(target)
                    log.warning("replica %s failed mid-response (%s); the client's connection is aborted",
                                target.name, exc.__class__.__name__)
                    return None
                except asyncio.CancelledError:
                    upstream.close()  # the client left: the replica's connection closes now, not at its next chunk
                    error = False
                    raise
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                error = upstream.status >= 500
                if not gateway_failure and target.name in self.outliers:
                    self._succeeded(target.name)  # a whole answer: its failures in a row start again
                return None
        finally:
            if admission is not None:
                self.tenants.finish(admission)
            if charge is not None and not attempt_failed and (fair := self._fair.get(route.service)) is not None:
                completion = usage.tokens if usage is not None else None
                fair.settle(charge, usage.prompt_tokens if usage is not None else None,
                            completion if completion is not None else events_seen)
            self.stats.finish(route.service, target.name, time.perf_counter() - started, error, first_byte,
                              usage.tokens if usage is not None else None,
                              prompt_tokens=usage.prompt_tokens if usage is not None else None,
                              key_id=admission.key_id if admission is not None else None)
            if self._held:
                self._wake_first(route.service)
            async with self._drained:
                self._drained.notify_all()

    # outlier detection (domain/outliers.py) ------------------------------------------------------
    def _report(self, event: OutlierEvent) -> None:
        if self.on_outlier is not None:
            try:
                self.on_outlier(event)
            except Exception:  # noqa: BLE001 (recording it must not break the request that caused it)
                log.exception("could not record the outlier event of %s", event.replica)

    def _failed(self, target: Target) -> None:
        """A gateway failure on `target`: counted; ejected once due (and checked until a check passes)."""
        state = self.outliers[target.name] = failed(self.outliers.get(target.name, _IN_ROTATION))
        if (reason := due(state, self.limits.outliers)) is not None:
            self._eject(target, reason)

    def _succeeded(self, name: str) -> None:
        state = self.outliers.get(name)
        if state is not None and (state.failures or state.capped):
            self.outliers[name] = succeeded(state)

    def _eject(self, target: Target, reason: Reason) -> bool:
        """Take `target` out of rotation unless a business it serves would pass the cap; whether it is out."""
        policy = self.limits.outliers
        state = self.outliers.get(target.name, _IN_ROTATION)
        if state.ejected:
            return True
        if not may_eject(target.name, self._members.values(), self.ejected, policy):
            if not state.capped:  # reported once a streak
                self.outliers[target.name] = capped(state)
                log.warning("not ejecting replica %s (%s): its business is at the ejection cap (%g%%)", target.name,
                            policy.describe(reason), policy.max_ejection_percent)
                self._report(capped_event(target.name, state, reason, policy))
            return False
        state = self.outliers[target.name] = eject(state, policy, time.time(), reason)
        if target.name in self._live:
            self.ejected[target.name] = target
        log.warning("ejecting replica %s: %s; out for %g s", target.name, policy.describe(reason),
                    (state.until or 0.0) - (state.ejected_at or 0.0))
        self._report(ejected_event(target.name, state, policy))
        return True

    def ejection_views(self) -> dict[str, EjectionView]:
        """The replicas out of rotation now, for the pods view."""
        return {name: ejection_view(self.outliers[name], self.limits.outliers) for name in self.ejected
                if name in self.outliers}

    def hung_check(self, target: Target, chunks: int) -> asyncio.Future[bool]:
        """Whether `target`, silent past the first-byte timeout, is hung; `chunks`: its `chunks` count when the
        waiting began. One check at a time per replica, shared by the requests waiting on it."""
        future = self._hung_checks.get(target.name)
        if future is None or future.done():
            future = asyncio.ensure_future(self._hung(target, chunks))
            self._hung_checks[target.name] = future
            future.add_done_callback(
                lambda f, name=target.name: self._hung_checks.pop(name, None) if self._hung_checks.get(name) is f else None)
        return asyncio.shield(future)

    async def _hung(self, target: Target, chunks: int) -> bool:
        """Hung after `failed_probes` failed health checks in a row (`probe_interval_s` apart at least) with no sign
        of progress: no response chunk from it since `chunks` was read, its engine's token counters still."""
        policy, timeout = self.limits.outliers, self.limits.health_probe_timeout_s
        loop = asyncio.get_running_loop()
        failures, counter = 0, None
        while True:
            started = loop.time()
            ok, reading = await asyncio.gather(self._healthy(target, timeout), self._progress(target, timeout))
            if ok:
                return False
            failures += 1
            progressed = self.chunks.get(target.name, 0) != chunks or (
                reading is not None and counter is not None and reading != counter)
            if progressed:
                return False
            if hung(failures, progressed, policy):
                return True
            counter = reading if reading is not None else counter
            await asyncio.sleep(max(0.0, self.limits.probe_interval_s - (loop.time() - started)))

    async def _healthy(self, target: Target, timeout_s: float) -> bool:
        try:
            async with self._session.get(  # type: ignore[union-attr]
                target.endpoint + self._health_path(target.name), timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _progress(self, target: Target, timeout_s: float) -> float | None:
        """The engine's token counters (`/metrics`), or None (no answer in time, none reported)."""
        try:
            async with self._session.get(  # type: ignore[union-attr]
                target.endpoint + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                if response.status != 200:
                    return None
                return progress_counter(await response.text(errors="replace"))
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeError):
            return None

    async def _watch_outliers(self) -> None:
        while True:
            await asyncio.sleep(self.limits.probe_interval_s)
            try:
                await self.probe_round()
                self.prune()
            except Exception:  # noqa: BLE001 (one bad round must not end the checks)
                log.exception("outlier checks failed")

    async def probe_round(self) -> None:
        """Health-check the suspected replicas and the ejected ones past their time, and apply the results."""
        now = time.time()
        targets = {t.name: t for route in self.table.values() for t in route.targets}
        checked = [targets[name] for name, state in self.outliers.items()
                   if name in targets and wants_probe(state, now)]
        if not checked:
            return
        results = await asyncio.gather(*(self._healthy(t, self.limits.health_probe_timeout_s) for t in checked))
        now, policy = time.time(), self.limits.outliers
        for target, ok in zip(checked, results, strict=True):
            before = self.outliers.get(target.name)
            if before is None:
                continue  # pruned meanwhile
            after = self.outliers[target.name] = probed(before, policy, now, ok)
            if before.ejected and not after.ejected:
                self.ejected.pop(target.name, None)
                log.info("replica %s is healthy again; back in rotation", target.name)
                self._report(readmitted_event(target.name, after, now - (before.ejected_at or now), policy))
                self._wake_all()
            elif (reason := due(after, policy)) is not None:
                self._eject(target, reason)

    def prune(self) -> None:
        """Drop the counters and records of replicas and services gone for `counters_retention_s` (nothing in
        flight on them)."""
        now, keep = time.time(), self.limits.counters_retention_s
        replicas = prunable(self._departed, now, keep, self.stats.in_flight_by_replica)
        services = prunable(self._services_departed, now, keep, {s for s, n in self.stats.held.items() if n > 0})
        if not replicas and not services:
            return
        self.stats.prune(replicas, services)
        for name in replicas:
            del self._departed[name]
            self.outliers.pop(name, None)
            self.chunks.pop(name, None)
        for service in services:
            del self._services_departed[service]


async def _rewritten(chunks: AsyncIterator[bytes], tag: str, events: bool, limit: int) -> AsyncIterator[bytes]:
    """A response whose `model` goes back to the tag: server-sent events line by line; a JSON body
    whole (up to `limit`, beyond which the rest passes as is)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        if events:
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield response_model_rewrite(pending[:cut], tag)
                pending = pending[cut:]
        elif len(pending) > limit:
            yield pending
            pending = b""
            async for rest in chunks:
                yield rest
            return
    if pending:
        yield response_model_rewrite(pending, tag, count=0 if events else 1)


async def _error(send: Callable, status: int, message: str, retry_after: bool = False) -> None:
    extra = [(b"retry-after", str(RETRY_AFTER_S).encode())] if retry_after else []
    await _json(send, status, error_body(status, message), extra)


async def _json(send: Callable, status: int, payload: dict[str, Any],
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra or ())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
