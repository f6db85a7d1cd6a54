"""The gateway under bad input, slow clients and replica faults, over a real `corral serve` with
simulator replicas, on both data planes: paths outside the OpenAI API and header injections are
refused, bodies are capped, slow clients are cut, a replica dying mid-stream aborts the client's
response, and a hung replica is ejected (Python plane; its requests get 504, never a replay; the ejection shows
in the pods view and the history) without cutting a busy one."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from corral.backends.local.process import process_start_time
from corral.domain.retries import AttemptFailure
from corral.gateway.nginx_plane import missing_parts
from corral.gateway.proxy import MSG_CONTROL_CHARS, MSG_NOT_API, not_retried, too_large_message
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral

FIRST_BYTE_S = 2.0  # each health check then gets max(1, 2 / 2) = 1 s
HEALTH_FAILURES = 3  # failed health checks in a row: a replica is not ready (supervisor), or hung (gateway)
CLIENT_TIMEOUT_S = 2
MAX_BODY = 4 * 1024**2
MAX_CONNECTIONS = 16
FAST, SLOW = "simulator-fast", "simulator-slow"
# No "model": the replicas of several tags answer it (a simulator, like vLLM, refuses a model it does not serve
# with 404 and takes a request without one as for its own).
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module", params=["python", "nginx"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """One `corral serve` per data plane with low limits, a fast deployment (2 replicas) and a slow
    one (1 replica: 2.5 s to the first token, then 20 tokens/s)."""
    if request.param == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    env = {"CORRAL_GATEWAY_DATA_PLANE": request.param, "CORRAL_GATEWAY_FIRST_BYTE_TIMEOUT_S": str(FIRST_BYTE_S),
           "CORRAL_GATEWAY_CLIENT_HEADER_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
           "CORRAL_GATEWAY_CLIENT_BODY_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
           "CORRAL_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY), "CORRAL_GATEWAY_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    with running_corral(tmp_path_factory.mktemp(request.param) / "data", env) as server:
        server.plane = request.param  # type: ignore[attr-defined]
        for tag, replicas, args in [("fast", 2, "--ttft-ms 1 --tokens-per-second 5000"),
                                    ("slow", 1, "--ttft-ms 2500 --tokens-per-second 20")]:
            server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag, "replicas": replicas,
                                                   "engineArgs": args})
        server.wait_ready(FAST, 2)
        server.wait_ready(SLOW, 1)
        yield server


def raw_request(port: int, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, http.client.HTTPMessage, bytes]:
    """The request target sent exactly as given (httpx would normalise dot segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def error_of(body: bytes) -> str:
    """The message of a gateway error (OpenAI's shape: {"error": {"message", "type", "code"}})."""
    return json.loads(body)["error"]["message"]


def chat(gw: CorralServer, service: str = FAST, **extra: object) -> httpx.Response:
    return httpx.post(f"{gw.gateway_url}/s/{service}/v1/chat/completions", json={**CHAT, **extra}, timeout=30)


# bad input ------------------------------------------------------------------------------------------
def test_only_openai_paths_go_through_and_header_injection_is_refused(gw: CorralServer) -> None:
    before = gw.snapshot()
    status, headers, body = raw_request(gw.gateway_port, "GET", f"/s/{FAST}/v1/models%0d%0aX-Evil:%201")
    assert status == 400 and error_of(body) == MSG_CONTROL_CHARS
    assert "x-evil" not in {k.lower() for k in headers}
    status, _, body = raw_request(gw.gateway_port, "GET", "/elsewhere%0d%0aX-Evil:%201")
    assert status == 400 and error_of(body) == MSG_CONTROL_CHARS

    # The replica's own endpoints, by name, by dot segments (plain or encoded) and double encoding.
    for target in [f"/s/{FAST}/health", f"/s/{FAST}/metrics", f"/s/{FAST}/..%2F..%2Fhealth", f"/s/{FAST}/v1/..%2Fhealth",
                   f"/s/{FAST}/v1/../health", f"/s/{FAST}/v1/%2e%2e/health", f"/s/{FAST}/v1/%252e%252e/health",
                   f"/s/{FAST}/v1/./models", f"/s/{FAST}/v1//models", f"/s/{FAST}/v1/", f"/s/{FAST}/v1", f"/s/{FAST}/"]:
        status, headers, body = raw_request(gw.gateway_port, "GET", target)
        assert status == 404, (target, status, body)
        assert headers["content-type"] == "application/json" and "x-corral-replica" not in headers, target
        assert error_of(body) == MSG_NOT_API, target
    status, _, body = raw_request(gw.gateway_port, "GET", "/s/nope/v1/models")
    assert status == 404 and error_of(body) == "service 'nope' not found"

    # The API itself still goes through, query string included.
    status, headers, body = raw_request(gw.gateway_port, "GET", f"/s/{FAST}/v1/models?x=%0d%0a")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "fast" and headers["x-corral-replica"]
    assert gw.snapshot() == before


def test_request_bodies_are_capped_and_large_ones_stream(gw: CorralServer) -> None:
    url = f"{gw.gateway_url}/s/{FAST}/v1/chat/completions"
    expected = too_large_message(MAX_BODY)
    # Declared too large: refused before it is read.
    response = httpx.post(url, content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and response.json()["error"] == {"message": expected, "type": "invalid_request_error", "code": 413}

    # Chunked (no Content-Length): refused once it passes the limit.
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    response = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and response.json()["error"] == {"message": expected, "type": "invalid_request_error", "code": 413}

    # Under the limit but over the in-memory size: streamed to the replica, answered as usual.
    padding = "p" * (3 * 1024**2)
    big = chat(gw, user=padding)
    assert big.status_code == 200 and big.json()["choices"][0]["message"]["content"] == "tok0 tok1"
    assert chat(gw).status_code == 200


@pytest.mark.parametrize("port_of", ["gateway", "api"])
def test_slow_clients_are_cut(gw: CorralServer, port_of: str) -> None:
    if port_of == "api" and gw.plane == "nginx":  # type: ignore[attr-defined]
        pytest.skip("the API port is the same server on both planes")
    port = gw.gateway_port if port_of == "gateway" else gw.port
    path = f"/s/{FAST}/v1/chat/completions" if port_of == "gateway" else "/api/deploy"
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    # At once (the deadlines run side by side): headers that never end, a connection that sends
    # nothing, a body that stops half-way.
    sends = [head.encode(), b"", (head + 'Content-Length: 100\r\n\r\n{"a"').encode()]
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in sends]
    try:
        for sock, data in zip(sockets, sends, strict=True):
            sock.sendall(data)
        started = time.monotonic()
        answers = [read_until_closed(sock, CLIENT_TIMEOUT_S + 3) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert time.monotonic() - started < CLIENT_TIMEOUT_S + 3  # all closed by the server
    if gw.plane == "nginx":  # type: ignore[attr-defined]
        assert answers[2] == b""  # nginx closes without an answer
        return
    status, _, body = answers[2].partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408"), answers[2]
    assert json.loads(body) == {"error": f"request body not received within {CLIENT_TIMEOUT_S} s"}


def read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    sock.settimeout(limit_s)
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_python_gateway_caps_connections(gw: CorralServer) -> None:
    if gw.plane != "python":  # type: ignore[attr-defined]
        pytest.skip("nginx caps connections with worker_connections")
    idle = [socket.create_connection(("127.0.0.1", gw.gateway_port)) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_for(lambda: raw_request(gw.gateway_port, "GET", f"/s/{FAST}/v1/models")[0] == 503, timeout=5, what="the cap")
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: raw_request(gw.gateway_port, "GET", f"/s/{FAST}/v1/models")[0] == 200, timeout=5, what="room again")


# replica faults -------------------------------------------------------------------------------------
def test_busy_replica_is_not_cut_at_the_first_byte_timeout(gw: CorralServer) -> None:
    """A non-streaming completion sends nothing until it is done: past the first-byte timeout, a
    replica that answers its health check is waited for, not ejected and retried."""
    started = time.monotonic()
    response = chat(gw, SLOW)
    assert response.status_code == 200 and time.monotonic() - started > FIRST_BYTE_S
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1"
    assert f'corral_gateway_ejected{{replica="{response.headers["x-corral-replica"]}"}}' not in gw.http.get("/api/metrics").text


def test_replica_killed_mid_stream_aborts_the_clients_response(gw: CorralServer) -> None:
    openai = pytest.importorskip("openai")
    victim = gw.pods(SLOW)[0]["name"]
    client = openai.OpenAI(base_url=f"{gw.gateway_url}/s/{SLOW}/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                            stream=True)
    received = []
    with pytest.raises((httpx.TransportError, openai.APIError)):  # noqa: PT012 (the error comes while iterating)
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
            if len(received) == 3:
                os.killpg(gw.replica_pid(victim), signal.SIGKILL)
    assert 3 <= len(received) < 200
    # The replica failed, not the client: no client_cancelled (nginx completes such a request, cutting the client).
    assert f'corral_gateway_client_cancelled_total{{service="{SLOW}"}}' not in gw.http.get("/api/metrics").text
    # The supervisor brings it back.
    wait_for(lambda: gw.pods(SLOW)[0]["ready"] and process_start_time(gw.replica_pid(victim)), timeout=30, what="the restart")


def test_hung_replica_is_ejected_and_requests_complete_on_the_other(gw: CorralServer) -> None:
    pods = gw.pods(FAST)
    victim, healthy = pods[0]["name"], pods[1]["name"]
    pid = gw.replica_pid(victim)
    os.killpg(pid, signal.SIGSTOP)  # connections are still accepted; nothing answers
    try:
        if gw.plane == "nginx":  # type: ignore[attr-defined]
            # nginx has one read timeout for the first byte and between chunks (nginx_plane.render_config):
            # a hung replica leaves rotation through its failed health checks (3 in a row, 2 s each at most, half a
            # second apart); new requests avoid it.
            wait_for(lambda: not next(p for p in gw.pods(FAST) if p["name"] == victim)["ready"], timeout=20, what="not ready")
            responses = concurrent_chats(gw, 4)
            assert {r.status_code for r in responses} == {200}
            assert {r.headers["x-corral-replica"] for r in responses} == {healthy}
            return
        # Right away (before the supervisor notices): 4 requests at once, so some go to the hung replica. Those
        # get 504, never a retry: the request was sent to the replica, which may run it once resumed (issue 25).
        started = time.monotonic()
        responses = concurrent_chats(gw, 4)
        elapsed = time.monotonic() - started
        hung = [r for r in responses if r.status_code == 504]
        assert all(r.json()["error"]["message"] == not_retried(victim, AttemptFailure.SILENT)[1] for r in hung)
        served = [r for r in responses if r.status_code != 504]
        assert {r.status_code for r in served} <= {200}, [r.text for r in responses]
        assert {r.headers["x-corral-replica"] for r in served} <= {healthy}
        # First-byte timeout, then three failed health checks of 1 s (a margin for this 2-core machine).
        assert elapsed < FIRST_BYTE_S + HEALTH_FAILURES * 1 + 2.5, elapsed
        metrics = gw.http.get("/api/metrics").text
        assert f'corral_gateway_ejected{{replica="{victim}"}} 1' in metrics
        assert f'corral_gateway_errors_total{{replica="{victim}",service="{FAST}"}} ' in metrics
        assert "ejecting replica " + victim in (gw.data_dir / "serve.log").read_text()
        # Visible in the pods view and the history (issue 25).
        ejection = next(p for p in gw.pods(FAST) if p["name"] == victim)["ejection"]
        assert ejection["count"] == 1 and ejection["reason"].startswith("no response in time, 3 failed health checks")
        assert next(p for p in gw.pods(FAST) if p["name"] == healthy)["ejection"] is None
        rows = gw.ok("GET", "/api/history", params={"action": "eject", "target": victim})
        assert rows[0]["message"].startswith("ejected from rotation by the gateway") and rows[0]["outcome"] == "success"
        assert rows[0]["after"]["inRotation"] is False
        # Ejected: the next requests go to the other replica only.
        responses = concurrent_chats(gw, 4)
        assert {r.status_code for r in responses} == {200} and {r.headers["x-corral-replica"] for r in responses} == {healthy}
    finally:
        os.killpg(pid, signal.SIGCONT)
    # Once it answers again it is back in rotation.
    wait_for(lambda: victim in {r.headers["x-corral-replica"] for r in concurrent_chats(gw, 4)}, timeout=15,
             what="the replica back in rotation")


def concurrent_chats(gw: CorralServer, n: int) -> list[httpx.Response]:
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(chat(gw))) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == n
    return results
