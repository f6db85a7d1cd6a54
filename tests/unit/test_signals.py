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
