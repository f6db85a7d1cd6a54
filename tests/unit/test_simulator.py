"""The simulator's HTTP behaviour, in process (no port, no child): vLLM's answers where a client can
tell (404 for an unknown model, finish_reason, usage), and the engine model under load (FIFO slots,
prefill, prefix cache, ITL growth, /metrics). Timings are asserted as lower bounds only: the model
sleeps at least what it computes, however loaded this machine is."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest

from corral.engines.sim_model import TimingModel
from corral.engines.simulator import build_app, main

FAST = TimingModel(ttft_base_s=0.001, decode_tokens_per_s=10_000)


def client(timing: TimingModel = FAST, **options: object) -> httpx.AsyncClient:
    app = build_app("qwen-06b", timing, **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim", timeout=30)


def events(text: str) -> list[dict]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def metric(text: str, name: str) -> float:
    return next(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + "{"))


async def test_an_unknown_model_is_a_404_in_vllms_shape_and_a_missing_one_is_the_served_one() -> None:
    async with client() as sim:
        for path in ("/v1/chat/completions", "/v1/completions"):
            refused = await sim.post(path, json={"model": "gpt-4o", "messages": [], "prompt": "x"})
            assert refused.status_code == 404
            assert refused.json() == {"error": {"message": "The model `gpt-4o` does not exist.", "type": "NotFoundError",
                                                "param": "model", "code": 404}}
        hi = [{"role": "user", "content": "hi"}]
        assert (await sim.post("/v1/chat/completions", json={"messages": hi, "max_tokens": 1})).status_code == 200
        assert (await sim.post("/v1/completions", json={"model": "qwen-06b", "prompt": "x", "max_tokens": 1})).status_code == 200
        bad = await sim.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"
        long = await sim.post("/v1/completions", json={"prompt": "x" * 4 * 40_000, "max_tokens": 1})
        assert long.status_code == 400 and "maximum context length is 32768 tokens" in long.json()["error"]["message"]
        assert (await sim.post("/v1/completions", content=b"{")).json()["error"]["code"] == 400


async def test_non_streamed_answers_carry_usage_and_finish_reason() -> None:
    async with client() as sim:
        body = (await sim.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 80}],
                                                            "max_tokens": 3})).json()
        prompt = len("<|user|>" + "a" * 80 + "\n<|assistant|>") // 4 + 1
        assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2"}
        unlimited = (await sim.post("/v1/completions", json={"prompt": "hi"})).json()
        assert unlimited["choices"][0]["finish_reason"] == "stop" and unlimited["usage"]["completion_tokens"] == 16


async def test_streams_end_with_finish_reason_and_an_optional_usage_chunk() -> None:
    async with client() as sim:
        plain = events((await sim.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                     "max_tokens": 3, "stream": True})).text)
        assert [c["choices"][0]["finish_reason"] for c in plain] == [None, None, "length"]
        assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": "tok0"}
        assert all("usage" not in c for c in plain)
        with_usage = events((await sim.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 2, "stream": True,
                                                                     "stream_options": {"include_usage": True}})).text)
        assert [c["choices"][0]["text"] for c in with_usage[:-1]] == ["tok0", " tok1"]
        assert with_usage[-2]["choices"][0]["finish_reason"] == "length"
        assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2,
                                                                                "total_tokens": 4}


async def test_requests_beyond_the_batch_slots_wait_fifo_and_metrics_show_it() -> None:
    timing = TimingModel(ttft_base_s=0.2, decode_tokens_per_s=0, max_num_seqs=1)  # each request holds its slot 0.2 s
    async with client(timing) as sim:
        async def timed(n: int) -> float:
            started = time.monotonic()
            assert (await sim.post("/v1/completions", json={"prompt": f"p{n}", "max_tokens": 1})).status_code == 200
            return time.monotonic() - started

        requests = [asyncio.create_task(timed(n)) for n in range(3)]
        seen = await wait_for_async_metrics(sim, lambda m: metric(m, "vllm:num_requests_waiting") == 2, what="2 waiting")
        assert metric(seen, "vllm:num_requests_running") == 1
        durations = sorted(await asyncio.gather(*requests))
        # TTFT = queue wait + fixed part: the last one waited for two before it.
        assert durations[0] >= 0.2 and durations[1] >= 0.4 and durations[2] >= 0.6
        after = (await sim.get("/metrics")).text
        assert metric(after, "vllm:num_requests_running") == 0 and metric(after, "vllm:num_requests_waiting") == 0
        assert metric(after, "vllm:time_to_first_token_seconds_count") == 3
        assert metric(after, "vllm:time_to_first_token_seconds_sum") >= 0.2 + 0.4 + 0.6


async def wait_for_async_metrics(sim: httpx.AsyncClient, ok: Callable[[str], bool], what: str) -> str:
    """Scrape /metrics until `ok(text)`, with a deadline (the requests under test run meanwhile)."""
    deadline = time.monotonic() + 10
    while not ok(text := (await sim.get("/metrics")).text):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {text[:500]}"
        await asyncio.sleep(0.01)
    return text


async def test_a_prefix_cache_hit_shortens_prefill() -> None:
    timing = TimingModel(ttft_base_s=0, prefill_tokens_per_s=1000, decode_tokens_per_s=0)
    prompt = "s" * 4 * 300  # 300 tokens: 0.3 s of prefill, cold
    async with client(timing, prefix_caching=True) as sim:
        async def ttft() -> float:
            started = time.monotonic()
            await sim.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            return time.monotonic() - started

        cold, warm = await ttft(), await ttft()
        assert cold >= 0.3
        assert warm < cold - 0.15  # 288 of 300 tokens cached: 12 computed, 12 ms
        text = (await sim.get("/metrics")).text
        assert metric(text, "vllm:prefix_cache_queries_total") == 600
        assert metric(text, "vllm:prefix_cache_hits_total") == 288
    async with client(timing) as sim:  # off by default: every prompt is prefilled whole
        await sim.post("/v1/completions", json={"prompt": "s" * 40, "max_tokens": 1})
        assert metric((await sim.get("/metrics")).text, "vllm:prefix_cache_queries_total") == 0


async def test_inter_token_latency_grows_with_running_sequences() -> None:
    timing = TimingModel(ttft_base_s=0, decode_tokens_per_s=200, itl_growth=1.0)  # 5 ms alone, 10 ms with two running
    async with client(timing) as sim:
        async def duration() -> float:
            started = time.monotonic()
            await sim.post("/v1/completions", json={"prompt": "x", "max_tokens": 11})
            return time.monotonic() - started

        assert await duration() >= 10 * 0.005
        pair = await asyncio.gather(duration(), duration())
        assert min(pair) >= 10 * 0.010 * 0.7  # side by side for most of their tokens (alone: 10 * 0.005)
        text = (await sim.get("/metrics")).text
        assert metric(text, "vllm:inter_token_latency_seconds_count") == 30
        assert metric(text, "vllm:generation_tokens_total") == 33


async def test_kv_cache_usage_follows_the_running_sequences() -> None:
    timing = TimingModel(ttft_base_s=0, decode_tokens_per_s=20, block_size=16, num_gpu_blocks=100)
    async with client(timing) as sim:
        request = asyncio.create_task(sim.post("/v1/completions", json={"prompt": "x" * 4 * 160, "max_tokens": 40}))
        text = await wait_for_async_metrics(sim, lambda m: metric(m, "vllm:num_requests_running") == 1, what="running")
        assert 0.10 <= metric(text, "vllm:kv_cache_usage_perc") <= 0.13  # 160-200 tokens: 10-13 of 100 blocks
        assert (await request).status_code == 200
        assert metric((await sim.get("/metrics")).text, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.parametrize(("path", "body", "param", "says"), [
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1 item"),
    ("/v1/chat/completions", {}, "messages", "valid list"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages", "needs a role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature",
     "valid number"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature",
     "temperature must be at least 0, got -1."),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p", "top_p must be in"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "n must be at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "boolean"),
    ("/v1/completions", {"prompt": ""}, "prompt", "must be provided and non-empty"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop", "valid string"),
])
async def test_the_simulator_refuses_what_vllm_refuses(path: str, body: dict, param: str, says: str) -> None:
    """Tests and benchmarks run against the simulator: a request vLLM answers with 400 (`messages: []`,
    `temperature: "hot"`) must not be answered 200 here, or the client errors real engines give go unnoticed."""
    async with client() as sim:
        answer = await sim.post(path, json={"max_tokens": 1, **body})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["type"] == "BadRequestError" and error["param"] == param and says in error["message"]


def test_the_command_line_refuses_nonsense() -> None:
    with pytest.raises(SystemExit):
        main(["--model", "m", "--port", "1", "--max-num-seqs", "0"])
    with pytest.raises(SystemExit):
        main(["--model", "m", "--port", "1", "--tokens-per-second", "-5"])
