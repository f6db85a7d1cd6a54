"""Issue 25, parts 1 and 2, on both data planes (the same contract): retries that are safe, and clients that
leave stop the work. Each data plane runs for real (the Python gateway under Corral's HTTP server in this
event loop; nginx as its own process) in front of stand-in replicas on real sockets, which count what they
receive and see when the gateway closes a connection.

- A replica that reads a request whole and drops the connection gets it once, never twice (the client gets
  502); one that refuses the connection is retried on another, within the retry budget.
- A client that disconnects while its replica has not answered yet (queueing, prefill, a long non-streamed
  completion), or mid-stream, has the replica's connection closed at once; a held request whose client
  left leaves the queue and is never sent on. Each counts in `client_cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import uvicorn

from corral.backends.local.process import free_port
from corral.domain.retries import AttemptFailure, RetryBudget
from corral.gateway.nginx_plane import NginxGateway, missing_parts, parse_stats
from corral.gateway.policies import LeastOutstanding
from corral.gateway.proxy import Gateway, GatewayLimits, budget_spent_suffix, not_retried
from corral.gateway.routing import Route, RoutingTable, Target
from corral.gateway.stats import TrafficStats
from corral.server import deadline_protocol
from tests.conftest import wait_for_async

SERVICE = "s-nlb"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
HOLD_TIMEOUT_S = 20.0  # far beyond what a test waits: a held request leaves only because its client did
SOON_S = 3.0  # what "at once" may take on a busy 2-core machine (the read timeout is 10 times that)
LIMITS = GatewayLimits(first_byte_timeout_s=60, hold_timeout_s=HOLD_TIMEOUT_S, hold_queue=10)


class FakeReplica:
    """A replica stand-in: reads each request whole (headers, then a Content-Length body), records it, then does
    what its `x-fake` header says — `ok`: answers 200 with JSON; `drop`: closes the connection without a byte;
    `hang`: never answers; `stream`: sends response headers and one server-sent event, then nothing. While a
    `hang` or `stream` request is open it is `pending`; when the gateway closes its connection it is `cancelled`.
    `/health` answers 200 and is not recorded (the Python plane probes ejected replicas)."""

    def __init__(self) -> None:
        self.requests: list[str] = []  # the mode of every request received, in order
        self.pending = 0
        self.cancelled = 0
        self._server: asyncio.Server | None = None
        self.endpoint = ""

    async def start(self) -> FakeReplica:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                if path == "/health":
                    _answer(writer, b"{}")
                    continue
                mode = headers.get("x-fake", "ok")
                self.requests.append(mode)
                if mode == "ok":
                    _answer(writer, json.dumps({"path": path}).encode())
                    continue
                if mode == "usage":
                    _answer(writer, json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 5}}).encode())
                    continue
                if mode in ENGINE_ERRORS:
                    status, content_type, body = ENGINE_ERRORS[mode]
                    writer.write(f"HTTP/1.1 {status} Oops\r\ncontent-type: {content_type}\r\ncontent-length: "
                                 f"{len(body)}\r\n\r\n".encode() + body)
                    continue
                if mode == "drop":
                    return
                if mode == "stream":
                    event = b'data: {"choices": [{"delta": {"content": "tok0"}}]}\n\n'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                                 + f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.pending += 1
                try:
                    while await reader.read(65536):  # b"": the gateway closed the connection
                        pass
                finally:
                    self.pending -= 1
                    self.cancelled += 1
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


# What engines answer that is not OpenAI-shaped (transformers serve is FastAPI), or names a local path.
ENGINE_ERRORS = {
    "detail400": (400, "application/json", b'{"detail": "Cannot apply chat template to an empty conversation"}'),
    "pinned404": (404, "application/json",
                  b'{"detail": "Server is pinned to \'/home/me/models/tiny-model\'; requested \'no-such-model\'"}'),
    "text500": (500, "text/plain", b"could not convert string to float: 'hot'"),
    "openai400": (400, "application/json", b'{"error": {"message": "The model `/models/x` is busy", "type": '
                                           b'"BadRequestError", "param": "model", "code": 400}}'),
}


def _answer(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)


def route(*targets: Target) -> RoutingTable:
    return {SERVICE: Route(SERVICE, "m", "b", "pool", targets)}


def refused(name: str) -> Target:
    """A replica whose port nobody listens on: the connection is refused."""
    return Target(name, f"http://127.0.0.1:{free_port()}")


class Plane:
    """One data plane, started in front of the stand-ins: `push` a table, read its counters."""

    def __init__(self, kind: str, url: str, gateway: Gateway | None = None, nginx: NginxGateway | None = None) -> None:
        self.kind, self.url, self._gateway, self._nginx = kind, url, gateway, nginx
        self._version = 0

    async def push(self, table: RoutingTable) -> None:
        self._version += 1
        plane = self._gateway or self._nginx
        assert plane is not None
        assert await plane.push(table, self._version) == self._version

    async def stats(self) -> TrafficStats:
        if self._gateway is not None:
            return self._gateway.stats
        assert self._nginx is not None
        return parse_stats(await self._nginx.read_stats())

    def prometheus(self) -> str:
        plane = self._gateway or self._nginx
        assert plane is not None
        return plane.stats.prometheus()

    async def cancelled(self) -> int:
        return (await self.stats()).client_cancelled.get(SERVICE, 0)

    async def in_flight(self) -> int:
        return sum((await self.stats()).in_flight_by_replica.values())

    async def held(self) -> int:
        return (await self.stats()).held.get(SERVICE, 0)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # pytest keeps its own
        yield


@contextlib.asynccontextmanager
async def running_plane(kind: str, tmp_path: Path, limits: GatewayLimits = LIMITS) -> AsyncIterator[Plane]:
    port = free_port()
    if kind == "nginx":
        if missing := missing_parts():
            pytest.skip("nginx data plane needs " + ", ".join(missing))
        nginx = NginxGateway(tmp_path / f"gateway-{port}", "127.0.0.1", port, connect_timeout_s=2, read_timeout_s=30,
                             drain_timeout_s=1, control_timeout_s=2, limits=limits)
        nginx.start()
        try:
            yield Plane(kind, f"http://127.0.0.1:{port}", nginx=nginx)
        finally:
            await nginx.close()
        return
    gateway = Gateway(LeastOutstanding(), connect_timeout_s=2, read_timeout_s=30, health_path=lambda _: "/health",
                      limits=limits)
    gateway.start()
    server = _Server(uvicorn.Config(gateway, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                    lifespan="off", http=deadline_protocol(limits)))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for_async(lambda: server.started, timeout=10, interval=0.01, what="the Python gateway")
        yield Plane(kind, f"http://127.0.0.1:{port}", gateway=gateway)
    finally:
        server.should_exit = True
        await task
        await gateway.close()


@pytest.fixture(params=["python", "nginx"])
async def plane(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Plane]:
    async with running_plane(request.param, tmp_path) as started:
        yield started


@pytest.fixture
async def replicas() -> AsyncIterator[list[FakeReplica]]:
    started = [await FakeReplica().start() for _ in range(2)]
    yield started
    for replica in started:
        await replica.close()


async def post(plane: Plane, mode: str = "ok", path: str = "/v1/chat/completions") -> tuple[int, dict, dict[str, str]]:
    async with aiohttp.ClientSession() as client, client.post(
        f"{plane.url}/s/{SERVICE}{path}", data=CHAT, headers={"content-type": "application/json", "x-fake": mode},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


async def open_request(plane: Plane, mode: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client on a raw connection that sends one chat request and reads nothing yet (the test closes it)."""
    host, port = plane.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /s/{SERVICE}/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json"
                 f"\r\ncontent-length: {len(CHAT)}\r\nx-fake: {mode}\r\n\r\n".encode() + CHAT)
    await writer.drain()
    return reader, writer


async def leave(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def until(check: Callable[[], bool], what: str, timeout: float = SOON_S) -> None:
    """Poll `check` (a stand-in replica's record) until it holds."""
    await wait_for_async(check, timeout=timeout, interval=0.02, what=what)


async def until_value(read: Callable[[], Awaitable[int]], value: int, what: str, timeout: float = SOON_S) -> None:
    """Poll a plane's counter (read over a socket on nginx) until it is `value`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (last := await read()) != value:
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {last})")
        await asyncio.sleep(0.02)


# 1. retries that are safe ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_replica_that_read_the_request_and_dropped_the_connection_gets_it_once(
        plane: Plane, replicas: list[FakeReplica], method: str) -> None:
    """Both replicas drop every request after reading it: a retry would show as a second request."""
    await plane.push(route(*(Target(f"r{i}", r.endpoint) for i, r in enumerate(replicas))))
    async with aiohttp.ClientSession() as client, client.request(
        method, f"{plane.url}/s/{SERVICE}/v1/chat/completions", data=CHAT if method == "POST" else None,
        headers={"x-fake": "drop"}, timeout=aiohttp.ClientTimeout(total=30),
    ) as response:
        status, body = response.status, await response.json(content_type=None)
        replica = response.headers.get("x-corral-replica")
    assert sum(len(r.requests) for r in replicas) == 1, [r.requests for r in replicas]
    which = "r0" if replicas[0].requests else "r1"
    assert (status, body["error"]["message"]) == not_retried(which, AttemptFailure.DROPPED), body
    assert body["error"]["code"] == 502 and replica is None
    await until_value(plane.in_flight, 0, "no request left in flight")
    assert await plane.cancelled() == 0  # answered: its client did not leave


async def test_a_refused_connection_is_retried_on_another_replica(plane: Plane, replicas: list[FakeReplica]) -> None:
    good = replicas[0]
    # One request open on the good replica: least outstanding sends the next one to the refusing replica first.
    await plane.push(route(Target("good", good.endpoint)))
    _, busy = await open_request(plane, "hang")
    await until(lambda: good.pending == 1, "the good replica busy")
    await plane.push(route(refused("down"), Target("good", good.endpoint)))
    status, body, headers = await post(plane, "usage")
    assert status == 200 and headers["x-corral-replica"] == "good", body
    assert good.requests == ["hang", "usage"]
    if plane._gateway is not None:  # the fair order's charge is settled by the attempt that answered (once)
        from corral.domain.fairness import prompt_estimate

        # the held "hang" request's estimate, and this one's prompt and completion as the answering replica said
        assert plane._gateway._fair[SERVICE].counter("") == prompt_estimate(len(CHAT)) + 7 + 2 * 5
    assert await plane.cancelled() == 0
    await leave(busy)
    await until_value(plane.in_flight, 0, "no request left in flight")


async def test_no_retry_beyond_the_retry_budget(tmp_path: Path, replicas: list[FakeReplica], data_plane: str) -> None:
    limits = GatewayLimits(first_byte_timeout_s=60, retry_budget=RetryBudget(percent=0, min_retries=0))
    async with running_plane(data_plane, tmp_path, limits) as plane:
        good = replicas[0]
        await plane.push(route(Target("good", good.endpoint)))
        _, busy = await open_request(plane, "hang")
        await until(lambda: good.pending == 1, "the good replica busy")
        await plane.push(route(refused("down"), Target("good", good.endpoint)))
        status, body, _ = await post(plane)
        assert status == 503 and body["error"]["message"] == "replica 'down'" + budget_spent_suffix(limits.retry_budget)
        assert good.requests == ["hang"]
        await leave(busy)
        await until_value(plane.in_flight, 0, "no request left in flight")


@pytest.mark.parametrize("count", [1, 2])
async def test_every_replica_refusing_is_a_503_in_json(plane: Plane, count: int) -> None:
    """Nothing was sent: 503 with the service's reason (nginx answered its own 500 page when the balancer found
    no other replica for the retry), and the replicas' places given back."""
    await plane.push(route(*(refused(f"r{i}") for i in range(count))))
    status, body, _ = await post(plane)
    assert status == 503, body
    assert body["error"] == {"message": "no replica assigned to business 'b' of model 'm'",
                             "type": "service_unavailable_error", "code": 503}
    await until_value(plane.in_flight, 0, "no request left in flight")


# 2. clients that leave stop the work ----------------------------------------------------------------------
async def test_a_client_that_leaves_before_the_first_byte_aborts_the_replicas_request(
        plane: Plane, replicas: list[FakeReplica]) -> None:
    replica = replicas[0]
    await plane.push(route(Target("r", replica.endpoint)))
    _, client = await open_request(plane, "hang")  # the replica queues or prefills: no response headers yet
    await until(lambda: replica.pending == 1, "the request at the replica")
    await leave(client)
    await until(lambda: replica.cancelled == 1, "the replica's connection closed")
    await until_value(plane.cancelled, 1, "client_cancelled counted")
    await until_value(plane.in_flight, 0, "no request left in flight")
    assert f'corral_gateway_client_cancelled_total{{service="{SERVICE}"}} 1.0' in plane.prometheus()


async def test_a_client_that_leaves_mid_stream_aborts_the_replicas_request(
        plane: Plane, replicas: list[FakeReplica]) -> None:
    replica = replicas[0]
    await plane.push(route(Target("r", replica.endpoint)))
    reader, client = await open_request(plane, "stream")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"x-corral-replica: r" in head.lower()
    assert b"tok0" in await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)  # the first event, then silence
    await leave(client)
    await until(lambda: replica.cancelled == 1, "the replica's connection closed")
    await until_value(plane.cancelled, 1, "client_cancelled counted")
    await until_value(plane.in_flight, 0, "no request left in flight")


async def test_a_held_request_whose_client_left_is_not_sent_on(plane: Plane, replicas: list[FakeReplica]) -> None:
    replica = replicas[0]
    await plane.push(route())  # no replica: requests are held
    _, client = await open_request(plane, "ok")
    await until_value(plane.held, 1, "the request held")
    await leave(client)
    await until_value(plane.held, 0, "the held request gone with its client")
    await until_value(plane.cancelled, 1, "client_cancelled counted")
    # A replica arrives: a request that still waited would be sent first (the queue is first come, first served).
    waiting = asyncio.ensure_future(post(plane))
    await until_value(plane.held, 1, "the next request held")
    await plane.push(route(Target("r", replica.endpoint)))
    status, body, _ = await waiting
    assert status == 200, body
    assert replica.requests == ["ok"]


# Issue 30, item 1: engine errors reach OpenAI SDKs with the engine's reason ----------------------------------
@pytest.mark.parametrize(("mode", "status", "message", "kind", "param"), [
    ("detail400", 400, "Cannot apply chat template to an empty conversation", "invalid_request_error", None),
    ("pinned404", 404, "Server is pinned to 'm'; requested 'no-such-model'", "not_found_error", None),
    ("text500", 500, "could not convert string to float: 'hot'", "server_error", None),
    ("openai400", 400, "The model `m` is busy", "BadRequestError", "model"),
])
async def test_an_engine_error_reaches_the_client_in_openai_shape_without_a_local_path(
        plane: Plane, replicas: list[FakeReplica], mode: str, status: int, message: str, kind: str,
        param: str | None) -> None:
    """The openai SDK printed only "Error code: 400" for transformers serve's `{"detail": …}`, and an unknown model
    answered with the server's local path: on both planes the body is OpenAI's, the reason kept, the tag named."""
    await plane.push(route(Target("r0", replicas[0].endpoint)))
    got, body, headers = await post(plane, mode)
    assert got == status and headers.get("x-corral-replica") == "r0"
    assert body == {"error": {"message": message, "type": kind, "param": param, "code": status}}, body
    assert "/home/me" not in json.dumps(body)
    await until_value(plane.in_flight, 0, "no request left in flight")
