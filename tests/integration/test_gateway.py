"""Business-service traffic through the gateway: only assigned replicas serve, changes apply at once,
in-flight requests survive reassignment and scale-down, failures are ejected and retried."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from corral.backends.local.process import process_start_time
from corral.gateway.proxy import RETRY_AFTER_S, held_too_long_suffix
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, deploy_sim_pool, running_corral

POOL = "simulator-qwen-06b-pool"
HOLD_TIMEOUT_S = 1.5  # a business with no replica holds a request this long, then answers 503
pytestmark = pytest.mark.usefixtures("data_plane")


@pytest.fixture
def corral(tmp_path: Path, data_plane: str) -> Iterator[CorralServer]:
    """`corral serve` on the data plane under test, with a short hold deadline (test_gateway_hold.py tests
    holding itself) and room for the retries of a killed replica: it is ejected after 5 failures in a row (issue
    25), each retried on another replica, more than the retry budget's floor of 3 in 10 s at this low traffic."""
    env = {"CORRAL_GATEWAY_DATA_PLANE": data_plane, "CORRAL_GATEWAY_HOLD_TIMEOUT_S": str(HOLD_TIMEOUT_S),
           "CORRAL_GATEWAY_RETRY_BUDGET_MIN": "10"}
    with running_corral(tmp_path / "data", env) as server:
        yield server


# No "model": the replicas of several tags answer it (a simulator, like vLLM, refuses a model it does not serve
# with 404 and takes a request without one as for its own).
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def two_businesses(corral: CorralServer) -> CorralServer:
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 5,
                                           "deployAsPool": True, "engineArgs": "--ttft-ms 2 --tokens-per-second 2000"})
    corral.wait_ready(POOL, 5)
    for name, business in [("a", "production"), ("b", "testing")]:
        corral.ok("POST", "/api/deploy-service", json={"serviceName": name, "modelPool": POOL, "businessTag": business})
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "counts": {"production": 2, "testing": 2}})
    return corral


def served_by(corral: CorralServer, service: str, n: int = 40, path: str = "/chat/completions") -> Counter:
    replicas: Counter = Counter()
    with httpx.Client(base_url=f"{corral.gateway_url}/s/{service}/v1", timeout=30) as client:
        for _ in range(n):
            response = client.post(path, json=CHAT)
            assert response.status_code == 200, response.text
            replica = response.headers["x-corral-replica"]
            assert response.json()["system_fingerprint"] == f"corral-simulator:{replica}"  # the header tells the truth
            replicas[replica] += 1
    return replicas


def members(corral: CorralServer, business: str) -> set[str]:
    return {p["name"] for p in corral.pods(POOL) if p["business"] == business}


def test_traffic_reaches_only_the_assigned_replicas_and_follows_reassignment(two_businesses: CorralServer, data_plane: str) -> None:
    corral = two_businesses
    assert corral.ok("GET", "/api/health")["gatewayDataPlane"] == data_plane
    services = {s["name"]: s for s in corral.ok("GET", "/api/business-services")}
    assert services["a-nlb"]["baseUrl"] == f"{corral.gateway_url}/s/a-nlb/v1"

    production, testing = members(corral, "production"), members(corral, "testing")
    seen_a, seen_b = served_by(corral, "a-nlb"), served_by(corral, "b-nlb")
    assert set(seen_a) == production and set(seen_b) == testing  # only, and every one of them (least outstanding, random ties)

    # Move one replica from A to B: the very next requests follow.
    moved = sorted(production)[0]
    corral.ok("POST", "/api/assign-pod", json={"podName": moved, "businessTag": "testing", "modelName": "qwen-06b"})
    after_a, after_b = served_by(corral, "a-nlb"), served_by(corral, "b-nlb", n=60)
    assert set(after_a) == production - {moved}
    assert set(after_b) == testing | {moved}

    # The other endpoints pass through too; the engine's own /v1/models answers.
    models = httpx.get(f"{corral.gateway_url}/s/a-nlb/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "qwen-06b"
    assert models.headers["x-corral-replica"] in production

    # Counters per service and replica, in Prometheus text and in the pool status.
    metrics = corral.http.get("/api/metrics").text
    assert f'corral_gateway_requests_total{{replica="{moved}",service="a-nlb"}} ' in metrics
    assert 'corral_pool_pods{deployment="simulator-qwen-06b-pool",business="testing",ready="true"} 3' in metrics
    traffic = corral.ok("GET", f"/api/pool-status/{POOL}")["traffic"]
    assert traffic[moved]["requests"] == seen_a[moved] + after_b[moved] + (models.headers["x-corral-replica"] == moved)
    assert traffic[moved]["errors"] == 0


def test_503_and_404_bodies(two_businesses: CorralServer) -> None:
    corral = two_businesses
    for pod in members(corral, "testing"):
        corral.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "unassigned"})
    # A business with no replica: the request is held (issue 24) until the deadline, then 503, Retry-After.
    started = time.monotonic()
    empty = httpx.post(f"{corral.gateway_url}/s/b-nlb/v1/chat/completions", json=CHAT)
    assert empty.status_code == 503 and time.monotonic() - started >= HOLD_TIMEOUT_S - 0.5
    assert empty.headers["retry-after"] == str(RETRY_AFTER_S)
    assert empty.json() == {"error": {"message": "no replica assigned to business 'testing' of model "
                                                 "'qwen-06b'" + held_too_long_suffix(HOLD_TIMEOUT_S),
                                      "type": "service_unavailable_error", "code": 503}}
    unknown = httpx.post(f"{corral.gateway_url}/s/nope-nlb/v1/chat/completions", json=CHAT)
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "service 'nope-nlb' not found", "type": "not_found_error", "code": 404}}
    assert httpx.get(f"{corral.gateway_url}/elsewhere").status_code == 404


def test_standard_deployment_service_is_reachable(corral: CorralServer) -> None:
    deployed = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "llama-8b", "replicas": 2})
    corral.wait_ready("simulator-llama-8b", 2)
    base = deployed["deployment"]["baseUrl"]
    assert base == f"{corral.gateway_url}/s/simulator-llama-8b/v1"
    assert set(served_by(corral, "simulator-llama-8b", n=20)) == {p["name"] for p in corral.pods("simulator-llama-8b")}


class Stream:
    """A long streaming request in a thread; `first` is set once its first chunk arrived."""

    def __init__(self, url: str, tokens: int) -> None:
        self.first = threading.Event()
        self.chunks: list[dict] = []
        self.done = False
        self.replica = ""
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(url, tokens), daemon=True)
        self._thread.start()

    def _run(self, url: str, tokens: int) -> None:
        try:
            with httpx.stream("POST", url, json={**CHAT, "max_tokens": tokens, "stream": True}, timeout=60) as response:
                self.replica = response.headers["x-corral-replica"]
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line[6:]))
                        self.first.set()
        except Exception as exc:  # reported by join()
            self.error = exc
            self.first.set()

    def join(self) -> None:
        self._thread.join(timeout=60)
        assert self.error is None, self.error
        assert self.done, "stream ended without [DONE]"


def test_streams_in_flight_survive_reassignment_and_scale_down(two_businesses: CorralServer) -> None:
    corral = two_businesses
    # A slow stream: ~60 tokens at 40 tokens/s on a dedicated slow pool, served through business A.
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "slow", "replicas": 1,
                                           "deployAsPool": True, "engineArgs": "--ttft-ms 1 --tokens-per-second 40"})
    slow = corral.wait_ready("simulator-slow-pool", 1)[0]["name"]
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "slow-a", "modelPool": "simulator-slow-pool", "businessTag": "production"})
    corral.ok("POST", "/api/assign-pod", json={"podName": slow, "businessTag": "production"})

    stream = Stream(f"{corral.gateway_url}/s/slow-a-nlb/v1/chat/completions", tokens=60)
    assert stream.first.wait(10) and stream.replica == slow
    # Mid-stream: unassign it (new requests are held, then get 503) and scale its pool down to 0 (removes it).
    corral.ok("POST", "/api/assign-pod", json={"podName": slow, "businessTag": "unassigned"})
    with ThreadPoolExecutor(1) as pool:  # (held while the stream goes on)
        refused = pool.submit(httpx.post, f"{corral.gateway_url}/s/slow-a-nlb/v1/chat/completions", json=CHAT)
        down = corral.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": "simulator-slow-pool",
                                                                     "targetReplicas": 0})
        assert down["removed"] == [slow]
        pid = corral.replica_pid(slow)
        assert process_start_time(pid) is not None and not stream.done, "the replica drains before it stops"
        assert refused.result().status_code == 503
    stream.join()
    assert [c["choices"][0]["delta"]["content"].strip() for c in stream.chunks] == [f"tok{i}" for i in range(60)]
    wait_for(lambda: process_start_time(pid) is None, what="the drained replica to stop")
    history = corral.ok("GET", "/api/history", params={"action": "scale", "target": "simulator-slow-pool"})
    assert history[0]["outcome"] == "success" and slow in history[0]["message"]


def test_killed_replica_is_ejected_and_requests_succeed_on_the_others(two_businesses: CorralServer) -> None:
    corral = two_businesses
    production = members(corral, "production")
    victim = sorted(production)[0]
    os.killpg(corral.replica_pid(victim), signal.SIGKILL)
    wait_for(lambda: process_start_time(corral.replica_pid(victim)) is None, what="the victim to die")
    # Right away, before the supervisor notices: every request still succeeds (retried once on the other replica,
    # until 5 refused connections in a row, or 3 failed health checks, eject it).
    seen = served_by(corral, "a-nlb", n=30)
    assert set(seen) == production - {victim}
    metrics = corral.http.get("/api/metrics").text
    assert f'corral_gateway_errors_total{{replica="{victim}",service="a-nlb"}} ' in metrics
    # The supervisor restarts it; once healthy it is back in rotation, with its business.
    wait_for(lambda: next(p for p in corral.pods(POOL) if p["name"] == victim)["ready"], timeout=30, what="the restart")
    wait_for(lambda: victim in served_by(corral, "a-nlb", n=20), timeout=15, what="the victim back in rotation")


def test_nginx_data_plane_comes_back_after_nginx_dies(corral: CorralServer, data_plane: str) -> None:
    if data_plane != "nginx":
        pytest.skip("nginx only")
    pool = deploy_sim_pool(corral, tag="m", replicas=1)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "a", "modelPool": pool, "businessTag": "a"})
    master = int((corral.data_dir / "gateway" / "nginx.pid").read_text())
    workers = [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    for pid in [*workers, master]:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(process_start_time(pid) is None for pid in [*workers, master]), what="nginx to die")
    # The next change restarts it with the current table; the change itself succeeds.
    pod = corral.pods(pool)[0]["name"]
    corral.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "a"})
    assert set(served_by(corral, "a-nlb", n=5)) == {pod}
