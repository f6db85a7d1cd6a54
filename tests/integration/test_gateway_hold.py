"""Hold, don't drop (issue 24, the activator), on both data planes: a request that finds no free replica
of its business (none assigned, or every one at its batch limit) is held until one is assigned or frees
up, and answered then, with no failed request; past the deadline it gets 503 with Retry-After, and a
full queue refuses at once. The held requests show in the load view, `/api/metrics` and `corral top`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.gateway.proxy import RETRY_AFTER_S, held_too_long_suffix, hold_full_suffix
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral
from tests.integration.test_load import corral_cli

HOLD_TIMEOUT_S = 6.0  # long enough to assign a replica through the API while a request waits
HOLD_QUEUE = 2
POOL, SLOW_POOL = "simulator-m-pool", "simulator-slow-pool"
# business "cold": no replica until a test assigns one; "busy": one replica, a batch of 1
COLD, BUSY = "cold-nlb", "busy-nlb"
SHORT_S = HOLD_TIMEOUT_S / 2  # what a poll for the held requests may take
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module", params=["python", "nginx"])
def hold(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """A Corral per data plane with a short hold deadline and a queue of 2: a pool of one unassigned
    replica and a business service with none (`cold`), and a pool whose one replica runs one request
    at a time (`--max-num-seqs 1`) assigned to `busy`."""
    from corral.gateway.nginx_plane import missing_parts

    if request.param == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    env = {"CORRAL_GATEWAY_DATA_PLANE": request.param, "CORRAL_GATEWAY_HOLD_TIMEOUT_S": str(HOLD_TIMEOUT_S),
           "CORRAL_GATEWAY_HOLD_QUEUE": str(HOLD_QUEUE)}
    with running_corral(tmp_path_factory.mktemp(f"hold-{request.param}") / "data", env) as server:
        assert server.ok("GET", "/api/health")["gatewayDataPlane"] == request.param
        for tag, args in [("m", "--ttft-ms 1 --tokens-per-second 2000"),
                          ("slow", "--ttft-ms 1 --tokens-per-second 20 --max-num-seqs 1")]:
            server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag,
                                                   "replicas": 1, "deployAsPool": True, "engineArgs": args})
        server.wait_ready(POOL, 1)
        slow = server.wait_ready(SLOW_POOL, 1)[0]["name"]
        for name, pool in [("cold", POOL), ("busy", SLOW_POOL)]:
            body = {"serviceName": name, "modelPool": pool, "businessTag": name}
            server.ok("POST", "/api/deploy-service", json=body)
        server.ok("POST", "/api/assign-pod", json={"podName": slow, "businessTag": "busy"})
        yield server


class Call:
    """One chat completion in a thread: `response` and how long it took, once `done` is set."""

    def __init__(self, url: str, body: dict | None = None) -> None:
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.finished_at = 0.0  # monotonic
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(url, body or CHAT), daemon=True).start()

    def _run(self, url: str, body: dict) -> None:
        try:
            self.response = httpx.post(url, json=body, timeout=HOLD_TIMEOUT_S + 30)
        except Exception as exc:  # reported by result()
            self.error = exc
        self.finished_at = time.monotonic()
        self.done.set()

    def result(self) -> httpx.Response:
        assert self.done.wait(HOLD_TIMEOUT_S + 30), "no answer"
        assert self.error is None, self.error
        assert self.response is not None
        return self.response


def chat_url(server: CorralServer, service: str) -> str:
    return f"{server.gateway_url}/s/{service}/v1/chat/completions"


def metric(server: CorralServer, family: str, sample: str, service: str) -> float:
    """A sample of the gateway's metrics for `service` (0 when absent)."""
    for fam in text_string_to_metric_families(server.http.get("/api/metrics").text):
        if fam.name == family:
            for s in fam.samples:
                if s.name == sample and s.labels.get("service") == service:
                    return s.value
    return 0.0


def in_flight(server: CorralServer) -> int:
    """Requests in flight on every replica."""
    families = text_string_to_metric_families(server.http.get("/api/metrics").text)
    return int(sum(s.value for f in families if f.name == "corral_gateway_in_flight" for s in f.samples))


def held(server: CorralServer, service: str) -> int:
    return int(metric(server, "corral_gateway_held", "corral_gateway_held", service))


def cold_pod(server: CorralServer) -> str:
    return server.pods(POOL)[0]["name"]


def assign(server: CorralServer, pod: str, business: str) -> None:
    server.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": business})


def test_a_request_is_held_until_a_replica_is_assigned(hold: CorralServer) -> None:
    waiting = Call(chat_url(hold, COLD))
    wait_for(lambda: held(hold, COLD) == 1, timeout=SHORT_S, interval=0.05, what="the request held")
    assert not waiting.done.is_set()
    # The load view counts it as demand (sampled once a second), and so does `corral top`.
    view = wait_for(lambda: (v := hold.ok("GET", f"/api/business-services/{COLD}/load"))["held"] == 1 and v,
                    timeout=SHORT_S, interval=0.1, what="the held request in the load view")
    assert view["readyReplicas"] == 0 and view["heldWaitMs"] == {"p50": None, "p95": None}
    top = corral_cli(hold, "top", "--once")
    assert top.returncode == 0 and "Held" in top.stdout, top.stderr
    pod = cold_pod(hold)
    assign(hold, pod, "cold")  # while it waits
    try:
        answer = waiting.result()
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-corral-replica"] == pod
        assert held(hold, COLD) == 0
        assert metric(hold, "corral_gateway_held_seconds", "corral_gateway_held_seconds_count", COLD) >= 1
        assert metric(hold, "corral_gateway_rejected", "corral_gateway_rejected_total", COLD) == 0
        def waited() -> dict | None:
            services = hold.ok("GET", "/api/load")["services"]
            cold = next(s for s in services if s["service"] == COLD)  # type: ignore[index]
            return cold if cold["heldWaitMs"]["p50"] else None

        view = wait_for(waited, timeout=10, interval=0.2, what="the wait in the load view")
        wait_ms = view["heldWaitMs"]
        assert view["held"] == 0 and 0 < wait_ms["p50"] <= wait_ms["p95"] <= HOLD_TIMEOUT_S * 1000
    finally:
        assign(hold, pod, "unassigned")


def test_a_request_held_past_its_deadline_gets_503_with_retry_after(hold: CorralServer) -> None:
    started = time.monotonic()
    answer = httpx.post(chat_url(hold, COLD), json=CHAT, timeout=HOLD_TIMEOUT_S + 30)
    assert time.monotonic() - started >= HOLD_TIMEOUT_S - 0.5
    assert answer.status_code == 503 and answer.headers["retry-after"] == str(RETRY_AFTER_S)
    assert answer.json() == {"error": {
        "message": "no replica assigned to business 'cold' of model 'm'"
                   + held_too_long_suffix(HOLD_TIMEOUT_S),
        "type": "service_unavailable_error", "code": 503}}


def test_a_full_queue_refuses_at_once_and_the_held_are_served(hold: CorralServer) -> None:
    waiting = [Call(chat_url(hold, COLD)) for _ in range(HOLD_QUEUE)]
    wait_for(lambda: held(hold, COLD) == HOLD_QUEUE, timeout=SHORT_S, interval=0.05, what="a full queue")
    started = time.monotonic()
    refused = httpx.post(chat_url(hold, COLD), json=CHAT, timeout=HOLD_TIMEOUT_S + 30)
    assert time.monotonic() - started < SHORT_S
    assert refused.status_code == 503 and refused.headers["retry-after"] == str(RETRY_AFTER_S)
    assert refused.json()["error"] == {
        "message": "no replica assigned to business 'cold' of model 'm'" + hold_full_suffix(HOLD_QUEUE),
        "type": "service_unavailable_error", "code": 503}
    pod = cold_pod(hold)
    assign(hold, pod, "cold")
    try:
        assert [w.result().status_code for w in waiting] == [200] * HOLD_QUEUE
    finally:
        assign(hold, pod, "unassigned")


def test_a_request_waits_for_a_replica_at_its_batch_limit(hold: CorralServer) -> None:
    """`--max-num-seqs 1`: while one request runs on the only replica, the next is held at the gateway, and
    sent when the first ends."""
    first = Call(chat_url(hold, BUSY), CHAT | {"max_tokens": 40})  # 2 s at 20 tokens/s
    wait_for(lambda: in_flight(hold) == 1, timeout=SHORT_S, interval=0.05, what="the first request in flight")
    second = Call(chat_url(hold, BUSY))
    wait_for(lambda: held(hold, BUSY) == 1, timeout=SHORT_S, interval=0.05, what="the second request held")
    assert first.result().status_code == 200
    answer = second.result()
    assert answer.status_code == 200, answer.text
    assert second.finished_at >= first.finished_at  # it waited for the first one's place
    assert answer.headers["x-corral-replica"] == first.result().headers["x-corral-replica"]
    assert metric(hold, "corral_gateway_rejected", "corral_gateway_rejected_total", BUSY) == 0
