"""Sleeping replicas and shared GPUs over a real `corral serve` with simulator replicas (issue 31, items 1-2): two
models share one (fake) GPU, one awake at a time; sleep and wake are recorded intent first; a crash between the
intent and the engine call, and a replica process that dies while asleep, end with the replica asleep as recorded."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import SIM_ARGS, CorralServer

FAKE_NVML = Path(__file__).parents[1] / "fake_nvml"
SLEEPY = [*SIM_ARGS, "--enable-sleep-mode", "--weights-gb", "0.6"]  # level-1 wake: 0.16 s + 0.6 GB / 12 GB/s = 0.21 s


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CorralServer]:
    data = tmp_path / "data"
    data.mkdir()
    corral = CorralServer(data, env={
        "CORRAL_GATEWAY_DATA_PLANE": "python", "CORRAL_GATEWAY_HOLD_TIMEOUT_S": "0.3",
        # one simulated GPU (tests/fake_nvml) for both models
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
        "CORRAL_TEST_NVML_DEVICES": json.dumps([{"name": "NVIDIA H100 80GB HBM3", "total": 80 * 1024**3, "used": 0,
                                                 "uuid": "GPU-0"}])})
    try:
        yield corral
    finally:
        corral.stop()
        corral.kill_replicas()


def deploy(server: CorralServer, tag: str, *, shared: bool = True, gpus: int = 1) -> httpx.Response:
    return server.http.post("/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag, "replicas": 1,
                                                 "deployAsPool": True, "gpusPerReplica": gpus, "sharedGpus": shared,
                                                 "engineArgs": SLEEPY})


def serve(server: CorralServer, pool: str, business: str) -> str:
    """A business service for `pool` with its one replica assigned; the service's name."""
    service = server.ok("POST", "/api/deploy-service", json={"serviceName": business, "modelPool": pool,
                                                             "businessTag": business})["service"]["name"]  # type: ignore[index]
    server.ok("POST", "/api/assign-pod", json={"podName": server.pods(pool)[0]["name"], "businessTag": business})
    return service


def ask(server: CorralServer, service: str, model: str) -> int:
    return httpx.post(f"{server.gateway_url}/s/{service}/v1/completions", json={"model": model, "prompt": "hi",
                                                                                "max_tokens": 2}, timeout=30).status_code


def pod(server: CorralServer, pool: str) -> dict:
    return server.pods(pool)[0]


def test_two_models_share_one_gpu_one_awake_at_a_time(server: CorralServer) -> None:
    server.start()
    assert deploy(server, "model-a").status_code == 201
    a = server.wait_ready("simulator-model-a-pool", 1)[0]["name"]
    refused = deploy(server, "model-b")  # model-a is awake on the only GPU
    assert refused.status_code == 409 and f"replica {a} is awake there: put it to sleep first" in refused.json()["error"]
    assert server.http.post(f"/api/pods/{a}/sleep", json={"level": 3}).status_code == 400
    assert server.http.post("/api/pods/nobody-here/sleep", json={}).status_code == 404
    no_sleep = server.http.post("/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "plain",
                                                     "deployAsPool": True, "sharedGpus": True, "engineArgs": SIM_ARGS})
    assert no_sleep.status_code == 400 and "--enable-sleep-mode" in no_sleep.json()["error"]

    slept = server.ok("POST", f"/api/pods/{a}/sleep", json={"level": 1})
    assert slept["sleep"] == "sleeping" and slept["sleepLevel"] == 1 and slept["historyId"]
    assert deploy(server, "model-b").status_code == 201
    b = server.wait_ready("simulator-model-b-pool", 1)[0]["name"]
    assert pod(server, "simulator-model-a-pool")["gpuIds"] == pod(server, "simulator-model-b-pool")["gpuIds"] == [0]
    assert (pod(server, "simulator-model-a-pool")["sleep"], pod(server, "simulator-model-a-pool")["sleepLevel"]) == ("sleeping", 1)
    assert pod(server, "simulator-model-b-pool")["sleep"] == "awake"

    service_a, service_b = serve(server, "simulator-model-a-pool", "alpha"), serve(server, "simulator-model-b-pool", "beta")
    wait_for(lambda: ask(server, service_b, "model-b") == 200, timeout=15, what="model-b answering through the gateway")
    assert ask(server, service_a, "model-a") != 200  # asleep: no routing target (held, then refused)

    # At most one awake on the GPU: model-a wakes only once model-b sleeps.
    busy = server.http.post(f"/api/pods/{a}/wake")
    assert busy.status_code == 409 and "awake there" in busy.json()["error"]
    server.ok("POST", f"/api/pods/{b}/sleep", json={"level": 2})
    woke = server.ok("POST", f"/api/pods/{a}/wake")
    assert woke["sleep"] == "awake" and woke["sleepLevel"] is None and woke["seconds"] >= 0.2  # the modelled 0.21 s
    wait_for(lambda: ask(server, service_a, "model-a") == 200, timeout=15, what="model-a answering once awake")
    assert pod(server, "simulator-model-b-pool")["sleep"] == "sleeping"

    history = server.ok("GET", "/api/history", params={"limit": 50})
    rows = [(h["action"], h["target"], h["outcome"]) for h in history if h["action"] in ("sleep", "wake")]  # type: ignore[index]
    assert rows == [("wake", a, "success"), ("sleep", b, "success"), ("sleep", a, "success")]


def test_a_crash_after_the_sleep_intent_ends_asleep_and_a_restarted_replica_sleeps_again(server: CorralServer) -> None:
    server.extra_env["CORRAL_FAILPOINTS"] = "sleep.intent-recorded"
    server.start()
    assert deploy(server, "model-a", shared=False, gpus=0).status_code == 201
    replica = server.wait_ready("simulator-model-a-pool", 1)[0]
    with pytest.raises(httpx.HTTPError):  # the server dies between the recorded intent and the engine call
        server.http.post(f"/api/pods/{replica['name']}/sleep", json={"level": 1})
    assert server.process is not None and server.process.wait(timeout=30) == -9
    assert httpx.get(f"{replica['endpoint']}/is_sleeping").json() == {"is_sleeping": False}  # the call never came
    server.extra_env.pop("CORRAL_FAILPOINTS")
    server.start()

    def asleep() -> bool:
        return httpx.get(f"{replica['endpoint']}/is_sleeping").json()["is_sleeping"] and \
            pod(server, "simulator-model-a-pool")["sleep"] == "sleeping"

    wait_for(asleep, timeout=20, what="the reconciler putting the replica to sleep after the restart")
    history = server.ok("GET", "/api/history", params={"action": "sleep"})
    assert [h["outcome"] for h in history] == ["success"] and "after a control-plane restart" in history[0]["message"]  # type: ignore[index]

    # A replica process that dies while asleep is restarted awake, then put back to sleep once ready.
    os.killpg(server.replica_pid(replica["name"]), signal.SIGKILL)
    wait_for(lambda: pod(server, "simulator-model-a-pool")["restarts"] >= 1, timeout=20, what="the replica restarted")
    endpoint = pod(server, "simulator-model-a-pool")["endpoint"]

    def asleep_again() -> bool:
        try:
            return httpx.get(f"{endpoint}/is_sleeping").json()["is_sleeping"] and pod(server, "simulator-model-a-pool")["sleep"] == "sleeping"
        except httpx.HTTPError:
            return False

    wait_for(asleep_again, timeout=30, what="the restarted replica asleep again")

    # An engine without its sleep mode: 409, saying what it needs.
    plain = server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "plain",
                                                   "deployAsPool": True, "engineArgs": SIM_ARGS})["deployment"]["name"]  # type: ignore[index]
    refused = server.http.post(f"/api/pods/{server.wait_ready(plain, 1)[0]['name']}/sleep", json={"level": 1})
    assert refused.status_code == 409 and "--enable-sleep-mode" in refused.json()["error"], refused.text
