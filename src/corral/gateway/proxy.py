"""The gateway: `/s/<service>/v1/...` → a ready replica the service selects, streamed through.

Raw ASGI rather than a web framework: this is the hot path, and it needs nothing but the path, the
body, and a streaming upstream call. Behaviour:
- The service's route comes from the current routing table; no route → 404, no ready replica → 503.
- The policy picks among replicas not ejected. A replica that refuses the connection or times out is
  ejected (probed in the background until healthy again) and the request is retried once on another
  replica — only possible because nothing has been sent to the client yet.
- The response streams chunk by chunk (server-sent events included), with `x-corral-replica`.
- The upstream client is aiohttp: profiled under load, httpx's pool spent 65% of the gateway's CPU
  scanning its connections on every request (bench/README.md).
- In-flight counts per replica drive both least-outstanding balancing and draining: a removed
  replica leaves the table at once and is stopped only when its in-flight count reaches zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from corral.gateway.policies import Policy
from corral.gateway.routing import Route, RoutingTable, Target
from corral.gateway.stats import TrafficStats

log = logging.getLogger("corral.gateway")

ROUTED_PREFIX = "/s/"
# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those the client library sets.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"host", b"content-length"}
RESPONSE_SKIP = {b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"upgrade"}
# Failures that mean "this replica cannot take the request" before anything was sent to the client.
UNREACHABLE = (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError, asyncio.TimeoutError)


class Gateway:
    def __init__(self, policy: Policy, connect_timeout_s: float, read_timeout_s: float, health_path: Callable[[str], str]) -> None:
        self.policy = policy
        self.table: RoutingTable = {}
        self.version = 0  # of `table`, as given by `push`
        self.stats = TrafficStats()
        self.ejected: dict[str, Target] = {}
        self._health_path = health_path
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._prober: asyncio.Task | None = None
        self._drained = asyncio.Condition()

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=self._timeout,
            auto_decompress=False,  # pass bodies through byte for byte
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        self._prober = asyncio.create_task(self._probe_ejected(), name="gateway-ejection-prober")

    async def close(self) -> None:
        if self._prober:
            self._prober.cancel()
            try:
                await self._prober
            except asyncio.CancelledError:
                pass
        if self._session:
            await self._session.close()

    async def push(self, table: RoutingTable, version: int) -> int:
        """Serve `table` from the next request on (an in-memory swap); returns the version served. A
        version older than the one served changes nothing."""
        if version > self.version:
            self.set_table(table)
            self.version = version
        return self.version

    async def served_version(self) -> int:
        return self.version

    def set_table(self, table: RoutingTable) -> None:
        self.table = table
        live = {t.name for route in table.values() for t in route.targets}
        for name in [n for n in self.ejected if n not in live]:
            del self.ejected[name]  # a replica gone from every route needs no probing

    async def drain(self, replica: str, timeout_s: float) -> None:
        """Return once no request is in flight on `replica`, or after `timeout_s`."""
        try:
            async with self._drained:
                await asyncio.wait_for(
                    self._drained.wait_for(lambda: self.stats.in_flight_by_replica.get(replica, 0) == 0), timeout_s
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
            await _json(send, 404, {"error": f"no route for '{path}'; business services live under /s/<service>/v1/..."})
            return
        service, _, rest = path[len(ROUTED_PREFIX):].partition("/")
        route = self.table.get(service)
        if route is None:
            self.stats.rejected[(service, 404)] += 1
            await _json(send, 404, {"error": f"service '{service}' not found"})
            return
        body = await _read_body(receive)
        await self._forward(route, scope, "/" + rest, body, send)

    async def _forward(self, route: Route, scope: dict[str, Any], path: str, body: bytes, send: Callable) -> None:
        tried: set[str] = set()
        for _attempt in range(2):  # the first try, and one retry on another replica
            candidates = [t for t in route.targets if t.name not in self.ejected and t.name not in tried]
            if not candidates:
                break
            target = self.policy.choose(candidates, self.stats.in_flight_by_replica)
            tried.add(target.name)
            if await self._try(route, target, scope, path, body, send):
                return
        self.stats.rejected[(route.service, 503)] += 1
        await _json(send, 503, {"error": route.no_replica_message()})

    async def _try(self, route: Route, target: Target, scope: dict[str, Any], path: str, body: bytes, send: Callable) -> bool:
        """Forward once. False when the replica could not be reached and nothing was sent (retry-able)."""
        assert self._session is not None, "Gateway.start() was not called"
        url = target.endpoint + path + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        started = time.perf_counter()
        self.stats.start(route.service, target.name)
        error = True
        try:
            try:
                upstream = await self._session.request(scope["method"], url, headers=headers, data=body, allow_redirects=False)
            except UNREACHABLE as exc:
                self._eject(target, exc)
                return False
            async with upstream:
                response_headers = [(k, v) for k, v in upstream.raw_headers if k.lower() not in RESPONSE_SKIP]
                response_headers.append((b"x-corral-replica", target.name.encode()))
                await send({"type": "http.response.start", "status": upstream.status, "headers": response_headers})
                try:
                    async for chunk in upstream.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # died mid-response: nothing left to retry
                    self._eject(target, exc)
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                error = upstream.status >= 500
                return True
        finally:
            self.stats.finish(route.service, target.name, time.perf_counter() - started, error)
            async with self._drained:
                self._drained.notify_all()

    # ejection ----------------------------------------------------------------------------------
    def _eject(self, target: Target, reason: Exception) -> None:
        if target.name not in self.ejected:
            log.warning("ejecting replica %s: %s", target.name, reason.__class__.__name__)
        self.ejected[target.name] = target

    async def _probe_ejected(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for name, target in list(self.ejected.items()):
                try:
                    async with self._session.get(  # type: ignore[union-attr]
                        target.endpoint + self._health_path(name), timeout=aiohttp.ClientTimeout(total=1.0)
                    ) as response:
                        healthy = response.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    healthy = False
                if healthy:
                    log.info("replica %s is healthy again; back in rotation", name)
                    self.ejected.pop(name, None)


async def _read_body(receive: Callable) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(send: Callable, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
