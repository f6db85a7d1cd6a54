"""The simulator's sleep mode answers like vLLM's (`/sleep?level=`, `/wake_up[?tags=]`, `/is_sleeping`), refuses
requests while asleep, and takes the modelled times; the engines declare their sleep support. One test runs a real
simulator process over real HTTP; the others run it in process. Times are asserted as lower bounds only."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from corral.domain.sleep import SleepLevel, SleepTiming
from corral.engines import get_engine
from corral.engines.sim_model import TimingModel
from corral.engines.simulator import build_app
from tests.conftest import wait_for

FAST = TimingModel(ttft_base_s=0.001, decode_tokens_per_s=10_000)
# 0.6 GB at 12 GB/s + 0.16 s: level-1 wake 0.21 s; level 2: 0.55 s + 0.6 / 4 = 0.70 s.
TIMING = SleepTiming(weights_gb=0.6)


def client(sleep_mode: SleepTiming | None = TIMING) -> httpx.AsyncClient:
    app = build_app("qwen-06b", FAST, sleep_mode=sleep_mode)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim", timeout=30)


ASK = {"prompt": "hi", "max_tokens": 1}


def test_modelled_times_follow_the_published_figures() -> None:
    """Issue 31's vLLM figures (A100): level 1 woke 0.6B (1.2 GB) in 0.26 s and ~4B (8 GB) in 0.82 s; level 2 in
    0.85 s and 2.58 s."""
    small, large = SleepTiming(weights_gb=1.2), SleepTiming(weights_gb=8)
    assert small.wake_s(SleepLevel.OFFLOAD) == pytest.approx(0.26, abs=0.02)
    assert large.wake_s(SleepLevel.OFFLOAD) == pytest.approx(0.82, abs=0.02)
    assert small.wake_s(SleepLevel.DISCARD) == pytest.approx(0.85, abs=0.02)
    assert large.wake_s(SleepLevel.DISCARD) == pytest.approx(2.58, abs=0.05)
    with pytest.raises(ValueError, match="weights size"):
        SleepTiming(weights_gb=-1)


async def test_sleep_refuses_requests_and_wake_up_brings_them_back() -> None:
    async with client() as sim:
        assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert (await sim.post("/v1/completions", json=ASK)).status_code == 200
        started = time.monotonic()
        slept = await sim.post("/sleep", params={"level": "1"})
        assert slept.status_code == 200 and slept.content == b""
        assert time.monotonic() - started >= TIMING.sleep_s(SleepLevel.OFFLOAD)
        assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": True}
        assert (await sim.get("/health")).json()["sleeping"] is True  # alive: the process and its kernels stay
        refused = await sim.post("/v1/completions", json=ASK)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "ServiceUnavailableError"
        assert "sleeping" in refused.json()["error"]["message"]
        started = time.monotonic()
        assert (await sim.post("/wake_up")).status_code == 200
        assert time.monotonic() - started >= TIMING.wake_s(SleepLevel.OFFLOAD)
        assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert (await sim.post("/v1/completions", json=ASK)).status_code == 200


async def test_level_two_wakes_by_parts_as_vllms_sequence_does() -> None:
    """vLLM's level-2 wake: `?tags=weights`, `collective_rpc reload_weights`, `?tags=kv_cache` (engines/servers.py):
    asleep until the last part wakes, and the weights' part costs the modelled reload."""
    support = get_engine("simulator").sleep_support(["--enable-sleep-mode"])
    assert support is not None
    async with client() as sim:
        call = support.sleep_call(SleepLevel.DISCARD)
        assert (await sim.request(call.method, call.path, params=dict(call.params))).status_code == 200
        timed, asleep_after = [], []
        for call in support.wake_calls(SleepLevel.DISCARD):
            started = time.monotonic()
            answer = await sim.request(call.method, call.path, params=dict(call.params), json=call.json)
            timed.append(time.monotonic() - started)
            assert answer.status_code == 200, answer.text
            asleep_after.append((await sim.get("/is_sleeping")).json()["is_sleeping"])
        assert asleep_after == [True, True, False]  # weights, reload_weights, kv_cache
        assert timed[0] >= TIMING.wake_s(SleepLevel.DISCARD, kv_cache=False)
        assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert (await sim.post("/v1/completions", json=ASK)).status_code == 200


async def test_bad_calls_are_refused_and_change_nothing() -> None:
    async with client() as sim:
        assert (await sim.post("/sleep", params={"level": "3"})).status_code == 400
        assert (await sim.post("/sleep", params={"level": "x" * 1000})).status_code == 400
        assert (await sim.post("/wake_up", params={"tags": "everything"})).status_code == 400
        assert (await sim.post("/collective_rpc", json={"method": "rm -rf"})).status_code == 400
        assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": False}
    async with client(sleep_mode=None) as plain:  # without --enable-sleep-mode the endpoints do not exist (as vLLM)
        assert (await plain.post("/sleep")).status_code == 404
        assert "sleeping" not in (await plain.get("/health")).json()


def test_engines_declare_sleep_support() -> None:
    vllm = get_engine("vllm")
    assert vllm.sleep_support([]) is None and "--enable-sleep-mode" in vllm.sleep_refusal([])
    support = vllm.sleep_support(["--enable-sleep-mode"])
    assert support is not None and support.state is not None and support.state.path == "/is_sleeping"
    assert support.sleep_call(SleepLevel.OFFLOAD).params == (("level", "1"),)
    spec = vllm.launch(model_id="m", model_tag="t", port=1, host="127.0.0.1", gpus=1, extra=["--enable-sleep-mode"],
                       replica="r")
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in vllm.launch(model_id="m", model_tag="t", port=1, host="127.0.0.1", gpus=1,
                                                     extra=[], replica="r").env
    sglang = get_engine("sglang")
    assert sglang.sleep_support(["--enable-memory-saver"]) is None
    both = sglang.sleep_support(["--enable-memory-saver", "--enable-weights-cpu-backup"])
    assert both is not None and both.refusal(SleepLevel.DISCARD) and both.state is None
    assert get_engine("transformers").sleep_support(["--enable-sleep-mode"]) is None


def test_a_real_simulator_process_sleeps_and_wakes_over_http(unused_tcp_port: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.engines.simulator", "--model", "m", "--port", str(unused_tcp_port),
         "--enable-sleep-mode", "--weights-gb", "0.6"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{unused_tcp_port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=20, what="the simulator's /health")
        assert httpx.post(f"{base}/sleep?level=2", timeout=10).status_code == 200
        assert httpx.get(f"{base}/is_sleeping", timeout=5).json() == {"is_sleeping": True}
        assert httpx.post(f"{base}/v1/completions", json=ASK, timeout=5).status_code == 503
        assert httpx.post(f"{base}/wake_up", timeout=10).status_code == 200
        assert httpx.post(f"{base}/v1/completions", json=ASK, timeout=5).status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "simulated engine" in out and "sleep mode on" in out and "sleeping at level 2" in out
