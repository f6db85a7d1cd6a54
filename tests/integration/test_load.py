"""Live load per business service and replica (issue 13), on both data planes: traffic through a business
service shows up in `/api/business-services/{name}/load`, `/api/load`, `/ws`, `/api/metrics` and `corral top`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from corral.domain.load import BUCKETS
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, deploy_sim_pool, running_corral

SERVICE = "chat-nlb"
CHAT = {"model": "qwen-06b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module", params=["python", "nginx"])
def busy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """A Corral per data plane with a business service of two simulator replicas that has had traffic:
    40 plain completions and 10 streamed ones, all reporting usage (the streams ask for a usage chunk)."""
    from corral.gateway.nginx_plane import missing_parts

    if request.param == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    with running_corral(tmp_path_factory.mktemp(f"load-{request.param}") / "data",
                        {"CORRAL_GATEWAY_DATA_PLANE": request.param}) as server:
        assert server.ok("GET", "/api/health")["gatewayDataPlane"] == request.param
        pool = deploy_sim_pool(server, replicas=2)
        server.ok("POST", "/api/deploy-service", json={"serviceName": "chat", "modelPool": pool, "businessTag": "production"})
        server.ok("POST", "/api/distribute-pods", json={"deploymentName": pool, "ratios": {"production": 1}})
        with httpx.Client(base_url=f"{server.gateway_url}/s/{SERVICE}/v1", timeout=30) as client:
            for _ in range(40):
                assert client.post("/chat/completions", json=CHAT).status_code == 200
            for _ in range(10):
                body = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
                with client.stream("POST", "/chat/completions", json=body) as response:
                    assert response.status_code == 200 and b"[DONE]" in response.read()
        yield server


def load(server: CorralServer, window: int = 60) -> dict:
    return server.ok("GET", f"/api/business-services/{SERVICE}/load", params={"window": window})  # type: ignore[return-value]


def test_the_load_shows_rates_percentiles_tokens_and_the_split_per_replica(busy: CorralServer) -> None:
    pods = sorted(p["name"] for p in busy.pods())

    last: list[dict] = []

    def sampled() -> dict | None:
        # the monitor samples once a second: wait until its samples hold the traffic (every kind of it)
        now = load(busy)
        last[:] = [now]
        return now if (len(now["replicas"]) == 2 and all(r["requestsPerSecond"] > 0 for r in now["replicas"])
                       and now["ttfbMs"]["p50"] is not None and now["tokensPerSecond"] is not None
                       and now["inFlight"] == 0) else None  # (a sample may have caught the last request in flight)

    try:
        now = wait_for(sampled, timeout=20, what="the traffic in the load window")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last load read: {last}") from None
    assert now["service"] == SERVICE and now["pool"] == "simulator-qwen-06b-pool" and now["windowSeconds"] == 60
    assert now["readyReplicas"] == 2 and now["errorsPerSecond"] == 0 and now["inFlight"] == 0
    assert now["requestsPerSecond"] > 0
    latency, ttfb = now["latencyMs"], now["ttfbMs"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] < 1000
    assert ttfb["p50"] is not None and 0 < ttfb["p50"] <= ttfb["p95"] < 1000  # the 10 streamed responses
    assert now["tokensPerSecond"] > 0  # the simulator's plain completions report usage (4 tokens each)
    assert [r["pod"] for r in now["replicas"]] == pods  # both replicas, each with its share (random ties)
    assert all(r["requestsPerSecond"] > 0 and r["latencyMs"]["p50"] is not None for r in now["replicas"])
    assert sum(r["requestsPerSecond"] for r in now["replicas"]) == pytest.approx(now["requestsPerSecond"], abs=0.01)
    assert now["series"] and now["series"][-1]["capacity"] == 2
    assert sum(p["requestsPerSecond"] for p in now["series"]) > 0 and any(p["p95Ms"] for p in now["series"])
    assert all(p["t"] % 5 == 0 for p in now["series"])

    everything = busy.ok("GET", "/api/load", params={"window": 60})
    assert everything["windowSeconds"] == 60 and [s["service"] for s in everything["services"]] == [SERVICE]


def test_a_slow_stream_is_in_flight_until_it_ends(busy: CorralServer) -> None:
    stop = threading.Event()

    def stream() -> None:
        body = CHAT | {"stream": True, "max_tokens": 30_000}  # 30 s at 1,000 tokens/s: ended by the test
        with httpx.Client(timeout=30) as client, client.stream(
                "POST", f"{busy.gateway_url}/s/{SERVICE}/v1/chat/completions", json=body) as response:
            for _ in response.iter_bytes():
                if stop.is_set():
                    return

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        busy_now = wait_for(lambda: (now := load(busy, 5))["inFlight"] == 1 and now, timeout=20, what="the stream in flight")
        assert sorted(r["inFlight"] for r in busy_now["replicas"]) == [0, 1]
    finally:
        stop.set()
        thread.join(10)
    wait_for(lambda: load(busy, 5)["inFlight"] == 0, timeout=20, what="the aborted stream no longer in flight")


def test_ws_pushes_load_while_someone_listens(busy: CorralServer) -> None:
    with connect(busy.url.replace("http://", "ws://") + "/ws", open_timeout=10) as ws:
        def next_load() -> dict | None:
            message = json.loads(ws.recv(timeout=10))
            return message if message["type"] == "load" else None

        message = wait_for(next_load, timeout=15, interval=0, what="a load message on /ws")
    assert message["timestamp"] and message["data"]["windowSeconds"] == 30
    assert [s["service"] for s in message["data"]["services"]] == [SERVICE]
    assert set(message["data"]["services"][0]) >= {"requestsPerSecond", "inFlight", "latencyMs", "ttfbMs", "replicas", "series"}


def test_metrics_are_prometheus_histograms(busy: CorralServer) -> None:
    text = busy.http.get("/api/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the whole exposition parses
    for name in ("corral_gateway_request_seconds", "corral_gateway_ttfb_seconds"):
        assert families[name].type == "histogram"
        buckets = [s for s in families[name].samples if s.name == name + "_bucket" and s.labels["service"] == SERVICE]
        assert len(buckets) == 2 * len(BUCKETS)  # one histogram per replica, every bucket
        counts = [s for s in families[name].samples if s.name == name + "_count" and s.labels["service"] == SERVICE]
        assert sum(s.value for s in counts) >= (50 if name == "corral_gateway_request_seconds" else 10)
    requests = [s for s in families["corral_gateway_requests"].samples if s.labels.get("service") == SERVICE]
    assert sum(s.value for s in requests) >= 50
    tokens = [s for s in families["corral_gateway_completion_tokens"].samples if s.labels.get("service") == SERVICE]
    assert sum(s.value for s in tokens) >= 200  # 50 responses of 4 tokens: JSON bodies and streams' usage chunks
    assert families["corral_gateway_in_flight"].type == "gauge" and families["corral_pool_pods"].type == "gauge"


def corral_cli(server: CorralServer, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_URL": server.url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent)


def test_corral_top(busy: CorralServer) -> None:
    as_json = corral_cli(busy, "top", "--once", "-o", "json", "--window", "60")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["windowSeconds"] == 60 and data["services"][0]["service"] == SERVICE
    table = corral_cli(busy, "top", "--once")
    assert table.returncode == 0, table.stderr
    pods = [p["name"] for p in busy.pods()]
    assert SERVICE in table.stdout and all(f"  {pod}" in table.stdout for pod in pods) and "p95 ms" in table.stdout
    bad = corral_cli(busy, "top", "--once", "--window", "3")
    assert bad.returncode == 2 and "--window" in bad.stderr and "greater than or equal to 5" in bad.stderr


def test_bad_window_and_unknown_service(busy: CorralServer) -> None:
    for window in ("4", "301", "abc", "-1"):
        response = busy.http.get(f"/api/business-services/{SERVICE}/load", params={"window": window})
        assert response.status_code == 400 and "window" in response.json()["error"], response.text
        assert busy.http.get("/api/load", params={"window": window}).status_code == 400
    missing = busy.http.get("/api/business-services/nope-nlb/load")
    assert missing.status_code == 404 and "nope-nlb" in missing.json()["error"]
