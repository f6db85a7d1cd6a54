"""`corral serve`: the API server and the gateway server in one process, over one Runtime.

One process keeps the routing table in memory next to the controller that changes it (no second
source of truth, no propagation delay). The gateway gets its own port so that business traffic and
control traffic can be bound, firewalled and scaled apart.

Slow clients: both servers give a client `gateway_client_header_timeout_s` to send its request
headers and at most `gateway_client_body_timeout_s` of silence while it sends a body (nginx's
client_header_timeout and client_body_timeout), answering 408 and closing the connection; headers
still arriving past `MAX_HEADER_BYTES` get a 400; a body still arriving after its request was
answered (a 413) is read and discarded before the connection closes, so the client reads the answer
(nginx's lingering close); and each server caps its connections (503 beyond, uvicorn's
`limit_concurrency`). uvicorn's own 400 for a malformed request becomes JSON too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from corral.api.app import create_app
from corral.config import Settings
from corral.gateway.nginx_plane import NginxGateway
from corral.gateway.proxy import GatewayLimits
from corral.runtime import Runtime

# Request line and headers, counted over the reads that end within them (a read is at most 256 KiB);
# nginx allows 4 x 8 KiB by default.
MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 30.0  # how long a body may still arrive after its request was answered (nginx's lingering_time)
API_MAX_CONNECTIONS = 1024  # the API and UI port (WebSocket clients included)


class _Flow(FlowControl):
    """uvicorn's flow control, telling the protocol when it resumes reading: time spent paused (the
    application not reading the body yet) is not the client's silence."""

    def __init__(self, transport: asyncio.Transport, on_resume: Any) -> None:
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        if self.read_paused:
            self._on_resume()
        super().resume_reading()


class _LingeringTransport:
    """The transport as one request-response cycle sees it. Closing it while the client is still
    sending that request's body (answered early: a 413, a refusal) waits until the body has been read
    (discarded), within the body deadlines — nginx's lingering close — so the client reads the answer
    rather than a connection reset."""

    def __init__(self, transport: asyncio.Transport, protocol: DeadlineHttpProtocol, cycle: Any) -> None:
        self._transport, self._protocol, self._cycle = transport, protocol, cycle
        self.write, self.is_closing = transport.write, transport.is_closing

    def close(self) -> None:
        if self._cycle.more_body and not self._transport.is_closing():
            self._protocol.close_after_body = True
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read deadlines for slow clients (uvicorn has none: a client
    sending one header byte a minute, or a body trickle, holds its connection forever).

    A deadline is armed only once a read ends mid-request (most requests arrive in one read and cost
    nothing): the header deadline counts from the connection (first request) or the request's first
    byte; the body deadline is a silence, reset by every body read and by time the application spends
    not reading (flow control)."""

    header_timeout_s = 60.0
    body_timeout_s = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _Flow(transport, self._body_progress)
        self._phase = 0  # 0: between requests, 1: reading headers, 2: reading a body
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._first = True
        self._begun_at = self.loop.time()  # of the headers being read (the connection, for the first request)
        self._body_last = 0.0
        self._answered_at = 0.0
        self.close_after_body = False
        self._arm(self.header_timeout_s, self._headers_late)  # a connection that never sends is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        phase = self._phase
        if not phase or self.transport.is_closing():
            return
        if phase == 1:  # the read ended within the headers: all of it counts towards MAX_HEADER_BYTES
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self.send_400_response("headers too large")
            elif self._deadline is None:
                self._arm(max(0.0, self._begun_at + self.header_timeout_s - self.loop.time()), self._headers_late)
            return
        self._body_last = self.loop.time()  # the read ended within a body
        if self._deadline is None and self.cycle is not None:
            # The answer may come before the rest of the body (413): closing then waits for the body.
            self.cycle.transport = _LingeringTransport(self.transport, self, self.cycle)  # type: ignore[assignment]
            self._answered_at = 0.0
            self._arm(self.body_timeout_s, self._body_check)

    def _arm(self, delay: float, callback: Any) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # parser callbacks ----------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._first:  # a keep-alive connection's next request
            self._begun_at = self.loop.time()
        self._phase, self._header_bytes, self._first = 1, 0, False

    def on_headers_complete(self) -> None:
        if self._deadline is not None:
            self._disarm()
        super().on_headers_complete()
        # (a WebSocket has no body, and its connection is handed to another protocol)
        self._phase = 0 if self.parser.should_upgrade() and self._should_upgrade() else 2

    def on_message_complete(self) -> None:
        self._phase = 0
        if self._deadline is not None:
            self._disarm()
        super().on_message_complete()
        if self.close_after_body:
            self.transport.close()

    # deadlines -----------------------------------------------------------------------------------
    def _body_progress(self) -> None:
        self._body_last = self.loop.time()

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase == 1 and (self.cycle is None or self.cycle.response_complete):
            self._refuse(f"request headers not received within {self.header_timeout_s:g} s")
        self.transport.close()  # nothing received: an idle connection, closed like a keep-alive timeout

    def _body_check(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        now = self.loop.time()
        if not cycle.response_complete and (self.flow.read_paused or cycle.waiting_for_100_continue):
            self._body_last = now  # waiting on the application, not on the client
        idle = now - self._body_last
        # (answered already: the rest of the body is read and discarded, for LINGER_S at most)
        if cycle.response_complete and not self._answered_at:
            self._answered_at = now
        lingered_out = cycle.response_complete and now - self._answered_at > LINGER_S
        if idle < self.body_timeout_s and not lingered_out:
            self._arm(min(self.body_timeout_s - idle, LINGER_S), self._body_check)
            return
        if not cycle.response_started:
            self._refuse(f"request body not received within {self.body_timeout_s:g} s")
        cycle.disconnected = True  # the application's receive() answers http.disconnect, its send() is dropped
        cycle.message_event.set()
        self.transport.close()

    def _refuse(self, message: str) -> None:
        self._answer(b"408 Request Timeout", message)

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused (malformed, or headers over MAX_HEADER_BYTES): JSON, then closed."""
        self._answer(b"400 Bad Request", f"malformed request (request line or headers, at most {MAX_HEADER_BYTES} bytes)")
        self.transport.close()

    def _answer(self, status: bytes, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def deadline_protocol(limits: GatewayLimits) -> type[DeadlineHttpProtocol]:
    return type("CorralHttpProtocol", (DeadlineHttpProtocol,),
                {"header_timeout_s": limits.client_header_timeout_s, "body_timeout_s": limits.client_body_timeout_s})


class _GatewayServer(uvicorn.Server):
    """The second server leaves signal handling to the API server, which stops both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(settings: Settings, log_level: str = "info") -> None:
    runtime = Runtime(settings)
    if isinstance(runtime.gateway, NginxGateway) and settings.backend == "local" and not settings.stop_replicas_on_exit:
        # The data plane outlives its control plane: replicas keep serving after `corral serve` exits, and so does
        # nginx in front of them, adopted by the next `corral serve` (no refused connection, no 404 on a restart).
        runtime.gateway.outlive_control_plane = True
    limits = runtime.gateway.limits
    protocol = deadline_protocol(limits)
    # A shutdown waits for open connections only so long: API calls are short (a stuck one must not keep
    # Corral from stopping); the Python gateway gives in-flight streams the drain timeout.
    api = uvicorn.Server(uvicorn.Config(create_app(runtime=runtime), host=settings.host, port=settings.port, log_level=log_level,
                                        http=protocol, limit_concurrency=API_MAX_CONNECTIONS, timeout_graceful_shutdown=10))
    if runtime.data_plane == "nginx":  # nginx serves the gateway port itself
        await api.serve()
        return
    gateway = _GatewayServer(uvicorn.Config(
        runtime.gateway, host=settings.host, port=settings.gateway_port, log_level=log_level,
        access_log=False, lifespan="off", timeout_keep_alive=30, proxy_headers=False, server_header=False,
        http=protocol, limit_concurrency=limits.max_connections, timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    ))
    gateway_task = asyncio.create_task(gateway.serve())
    try:
        await api.serve()
    finally:
        gateway.should_exit = True
        await gateway_task


def run(settings: Settings, log_level: str = "info") -> None:
    asyncio.run(serve(settings, log_level))
