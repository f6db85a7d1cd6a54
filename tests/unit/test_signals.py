"""Engine signals out of real exposition formats: vLLM's names, SGLang's mapped, TTFT over a window."""

from __future__ import annotations

import pytest

from corral.signals import Scrape, parse, percentiles_ms, window_histogram

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen-06b"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen-06b"} 5.0
vllm:num_requests_waiting{engine="0",model_name="my-adapter"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen-06b"} 0.25
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="qwen-06b"} {a}
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="qwen-06b"} {b}
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="qwen-06b"} {c}
vllm:time_to_first_token_seconds_count{engine="0",model_name="qwen-06b"} {c}
vllm:time_to_first_token_seconds_sum{engine="0",model_name="qwen-06b"} 1.0
"""

SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.5
"""


def vllm(a: int, b: int, c: int) -> str:
    return VLLM.replace("{a}", str(a)).replace("{b}", str(b)).replace("{c}", str(c))


def test_vllm_gauges_summed_over_label_sets_and_the_ttft_histogram():
    scrape = parse(vllm(10, 18, 20), at=1.0)
    assert (scrape.running, scrape.waiting, scrape.kv_cache_usage) == (3.0, 6.0, 0.25)
    assert scrape.ttft == ((0.1, 10.0), (0.5, 18.0), (float("inf"), 20.0))


def test_sglang_names_are_mapped():
    scrape = parse(SGLANG, at=1.0)
    assert (scrape.running, scrape.waiting, scrape.kv_cache_usage) == (7.0, 2.0, 0.5)
    assert scrape.ttft == ()


def test_ttft_percentiles_are_over_the_window_between_two_scrapes():
    older, newer = parse(vllm(10, 10, 10), at=0.0), parse(vllm(10, 18, 20), at=5.0)
    # In the window: 8 first tokens in (0.1, 0.5], 2 above 0.5 s; none under 0.1 s.
    p50, p90, count = percentiles_ms([window_histogram(older, newer)])
    assert count == 10
    assert p50 == pytest.approx(100 + 400 * 5 / 8)  # rank 5 of the 8 in the second bucket
    assert p90 == pytest.approx(500)  # in +Inf: the highest finite bound, as histogram_quantile
    assert percentiles_ms([window_histogram(newer, newer)]) == (None, None, 0.0)


def test_malformed_text_is_an_error_the_scraper_catches():
    with pytest.raises(ValueError):
        parse("vllm:num_requests_running{ 3", at=0.0)
    assert parse("", at=0.0) == Scrape(0.0, None, None, None, ())


def reference_parse(text: str) -> Scrape:
    """The same figures through prometheus_client's general parser (what `parse` replaced for speed)."""
    from prometheus_client.parser import text_string_to_metric_families

    from corral.signals import KV_CACHE, RUNNING, TTFT, WAITING

    gauges: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in RUNNING + WAITING + KV_CACHE:
            gauges[family.name] = gauges.get(family.name, 0.0) + sum(x.value for x in family.samples)
        elif family.name in TTFT:
            for x in family.samples:
                if x.name.endswith("_bucket"):
                    le = float(x.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + x.value

    def first(names):
        return next((gauges[n] for n in names if n in gauges), None)

    return Scrape(0.0, first(RUNNING), first(WAITING), first(KV_CACHE), tuple(sorted(buckets.items())))


HOSTILE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a} b",engine="0"} 2.0 1700000000000
vllm:num_requests_running{model_name="say \\"hi\\"",engine="1"} 1.5
# TYPE vllm:num_requests_running_other gauge
vllm:num_requests_running_other 99.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc 0.5
"""


@pytest.mark.parametrize("page", ["vllm", "sglang", "hostile", "simulator", "bench"])
def test_the_fast_parser_reads_what_the_general_parser_reads(page: str) -> None:
    """`parse` finds its lines with str.find instead of parsing the whole page (0.5 → 0.15 ms a vLLM page, which
    took the GIL from the event loop 1,000 times a tick); it must read the same figures, labels with braces,
    quotes and timestamps included, and not mistake a longer family name for one of its own."""
    if page == "simulator":
        from corral.engines.sim_model import TimingModel
        from corral.engines.simulator import SimEngine

        text = SimEngine("m", TimingModel(), prefix_caching=True).metrics()
    elif page == "bench":
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
        from control_plane import vllm_page

        text = vllm_page()
    else:
        text = {"vllm": vllm(2, 5, 9), "sglang": SGLANG, "hostile": HOSTILE}[page]
    assert parse(text, 0.0) == reference_parse(text)


async def test_a_scrape_round_cancelled_by_a_stop_leaves_no_scrape_running() -> None:
    """bench/control_plane.py: stopping the autopilot mid-round left its scrapes running; `close` then shut their
    session under them and each ended in "Task exception was never retrieved" (Session is closed)."""
    import asyncio

    from aiohttp import web

    from corral.domain.models import Pod
    from corral.signals import EngineSignals

    asked, release = asyncio.Event(), asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        asked.set()
        await release.wait()
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/metrics", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    signals = EngineSignals(timeout_s=3600, round_timeout_s=3600)
    pods = [Pod(f"r{i}", "pool", {}, ready=True, endpoint=f"http://127.0.0.1:{port}") for i in range(3)]
    round_ = asyncio.ensure_future(signals.scrape(pods))
    await asyncio.wait_for(asked.wait(), 10)
    round_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await round_
    await signals.close()
    left = [t for t in asyncio.all_tasks() if "_scrape_one" in repr(t.get_coro())]
    assert all(t.done() for t in left) and not [t for t in left if not t.cancelled()]
    release.set()
    await runner.cleanup()
