"""The autopilot across models over a real `corral serve` and simulator replicas (issue 31, items 3-4): two models
share two (fake) GPUs; a burst on the sleeping model is held by the gateway, which wakes it at once (a calm replica
of the other model is put to sleep to make room); every request is answered; the history says why."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from corral.gateway.nginx_plane import missing_parts
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer
from tests.integration.test_cli import cli
from tests.integration.test_sleeping import FAKE_NVML, SLEEPY

GPU = {"name": "NVIDIA H100 80GB HBM3", "total": 80 * 1024**3, "used": 0}


@pytest.fixture(params=["python", "nginx"])
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CorralServer]:
    """On both data planes: the Python gateway pokes the loop when it holds a request; nginx's held counters reach
    it with the counters' refresh (about a second)."""
    if request.param == "nginx" and missing_parts():
        pytest.skip("nginx data plane needs " + ", ".join(missing_parts()))
    data = tmp_path / "data"
    data.mkdir()
    corral = CorralServer(data, env={
        "CORRAL_GATEWAY_DATA_PLANE": request.param, "CORRAL_GATEWAY_HOLD_TIMEOUT_S": "20",
        "CORRAL_SLEEP_CALM_S": "0.5", "CORRAL_SLEEP_MIN_AWAKE_S": "0.5", "CORRAL_SLEEP_IDLE_S": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
        "CORRAL_TEST_NVML_DEVICES": json.dumps([{**GPU, "uuid": "GPU-0"}, {**GPU, "uuid": "GPU-1"}])})
    try:
        yield corral
    finally:
        corral.stop()
        corral.kill_replicas()


def deploy(server: CorralServer, tag: str, replicas: int = 2) -> list[str]:
    server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag,
                                           "replicas": replicas, "deployAsPool": True, "gpusPerReplica": 1,
                                           "sharedGpus": True, "engineArgs": SLEEPY})
    return sorted(p["name"] for p in server.wait_ready(f"simulator-{tag}-pool", replicas))


def states(server: CorralServer, pool: str) -> list[str]:
    return sorted(p["sleep"] for p in server.pods(pool))


def test_a_burst_on_a_sleeping_model_wakes_it_and_every_request_is_answered(server: CorralServer) -> None:
    server.start()
    a = deploy(server, "model-a")
    for name in a:
        server.ok("POST", f"/api/pods/{name}/sleep", json={"level": 1})
    b = deploy(server, "model-b")  # on the same two GPUs, where every replica sleeps
    for name in b:
        server.ok("POST", f"/api/pods/{name}/sleep", json={"level": 1})
    for name in a:
        server.ok("POST", f"/api/pods/{name}/wake")
    for model, names in (("model-a", a), ("model-b", b)):
        server.ok("POST", "/api/deploy-service", json={"serviceName": model, "modelPool": f"simulator-{model}-pool",
                                                       "businessTag": model})
        for name in names:
            server.ok("POST", "/api/assign-pod", json={"podName": name, "businessTag": model})
    assert states(server, "simulator-model-b-pool") == ["sleeping", "sleeping"]

    def ask(i: int) -> int:
        return httpx.post(f"{server.gateway_url}/s/model-b-nlb/v1/completions", timeout=30,
                          json={"model": "model-b", "prompt": f"burst {i}", "max_tokens": 2}).status_code

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [200] * 8  # held while model-b woke, none dropped
    assert "awake" in states(server, "simulator-model-b-pool")
    assert "sleeping" in states(server, "simulator-model-a-pool")  # the calm model gave its GPU
    rows = server.ok("GET", "/api/history?limit=200")
    rows = rows["items"] if isinstance(rows, dict) else rows
    woken = [r for r in rows if r["action"] == "wake" and r["target"] in b and "wakes on GPU" in (r["message"] or "")]
    slept = [r for r in rows if r["action"] == "sleep" and r["target"] in a and "wakes on GPU" in (r["message"] or "")]
    assert woken and slept and all(r["outcome"] == "success" for r in woken + slept), rows[:6]

    # Visible: each GPU with its awake replica and sleepers, the wake times measured, the metrics, `corral top`
    sharing = server.ok("GET", "/api/gpus/sharing")
    assert sorted(g["unit"] for g in sharing["gpus"]) == ["0", "1"]
    assert all(len(g["sleeping"]) == 1 and g["awake"] for g in sharing["gpus"])  # one awake and one asleep on each
    timing = next(m for m in sharing["models"] if m["model"] == "model-b")
    assert timing["wakes"] >= 1 and 0 < timing["wakeP50S"] <= timing["wakeP95S"]
    assert sharing["hostBytesUsed"] > 0
    metrics = server.http.get("/api/metrics").text
    assert 'corral_replicas_asleep{model="model-a"}' in metrics and 'action="wake"' in metrics
    top = cli(server.url, "top", "--once")
    assert top.returncode == 0 and "Shared GPUs" in top.stdout and "model-a" in top.stdout, top.stdout + top.stderr


@pytest.mark.parametrize("server", ["python"], indirect=True)
def test_a_model_asleep_nowhere_is_cold_started_on_a_gpu_where_nothing_is_awake(server: CorralServer) -> None:
    server.start()
    [a] = deploy(server, "model-a", replicas=1)  # GPU 0, awake
    [c] = deploy(server, "model-c", replicas=1)  # GPU 1 …
    assert sorted(p["gpuIds"][0] for p in server.pods()) == [0, 1]
    server.ok("POST", "/api/deploy-service", json={"serviceName": "model-c", "modelPool": "simulator-model-c-pool",
                                                   "businessTag": "model-c"})
    server.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": "simulator-model-c-pool", "targetReplicas": 0})
    wait_for(lambda: server.pods("simulator-model-c-pool") == [], what="model-c's replica gone")  # it sleeps nowhere

    answer = httpx.post(f"{server.gateway_url}/s/model-c-nlb/v1/completions", timeout=30,
                        json={"model": "model-c", "prompt": "cold", "max_tokens": 2})
    assert answer.status_code == 200, answer.text  # held through the cold start
    [started] = server.pods("simulator-model-c-pool")
    assert started["business"] == "model-c" and started["gpuIds"] != server.pods("simulator-model-a-pool")[0]["gpuIds"]
    rows = server.ok("GET", "/api/history?limit=100")
    rows = rows["items"] if isinstance(rows, dict) else rows
    assert any(r["action"] == "scale" and "cold start of model-c" in (r["message"] or "") for r in rows), rows[:5]
