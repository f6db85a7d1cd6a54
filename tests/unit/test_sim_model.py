"""The simulator's engine model (corral.engines.sim_model) against its own formulas: timing, prompt
sizing, the prefix cache, the FIFO batch slots and the Prometheus exposition."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.engines.sim_model import (
    CHARS_PER_TOKEN,
    TTFT_BUCKETS,
    Histogram,
    PrefixCache,
    SlotQueue,
    TimingModel,
    block_hashes,
    chat_prompt,
    completion_prompt,
    prompt_tokens,
    render_counter,
    render_gauge,
    render_histogram,
)


# timing ----------------------------------------------------------------------------------------------------
def test_defaults_are_the_documented_figures_and_the_historical_speed() -> None:
    model = TimingModel()
    assert (model.ttft_base_s, model.decode_tokens_per_s, model.max_num_seqs) == (0.020, 200.0, 8)
    assert (model.prefill_tokens_per_s, model.itl_growth, model.block_size) == (10_000.0, 0.03, 16)
    # A short prompt alone costs what the simulator always answered with: 20 ms, then 5 ms a token.
    assert model.ttft_s(prompt_tokens=2) == pytest.approx(0.0202)
    assert model.inter_token_s(running=1) == pytest.approx(0.005)


def test_ttft_is_wait_plus_fixed_part_plus_uncached_prefill() -> None:
    model = TimingModel(ttft_base_s=0.01, prefill_tokens_per_s=1000)
    assert model.prefill_s(500) == pytest.approx(0.5)
    assert model.prefill_s(500, cached_tokens=400) == pytest.approx(0.1)
    assert model.prefill_s(500, cached_tokens=900) == 0.0  # never negative
    assert model.ttft_s(500, cached_tokens=100, wait_s=2.0) == pytest.approx(2.0 + 0.01 + 0.4)
    assert TimingModel(prefill_tokens_per_s=0).prefill_s(10**6) == 0.0  # 0: instant


@given(running=st.integers(min_value=1, max_value=512), growth=st.floats(min_value=0, max_value=2),
       rate=st.floats(min_value=1, max_value=1e6))
def test_inter_token_latency_grows_linearly_with_running_sequences(running: int, growth: float, rate: float) -> None:
    model = TimingModel(decode_tokens_per_s=rate, itl_growth=growth)
    assert model.inter_token_s(running) == pytest.approx((1 + growth * (running - 1)) / rate)
    assert model.inter_token_s(running + 1) >= model.inter_token_s(running)
    assert model.inter_token_s(0) == model.inter_token_s(1)  # nothing running counts as alone


def test_inter_token_latency_of_the_defaults_at_a_full_batch() -> None:
    assert TimingModel().inter_token_s(8) == pytest.approx(0.005 * 1.21)  # 8 running: +21%
    assert TimingModel(decode_tokens_per_s=0).inter_token_s(8) == 0.0  # 0: instant


def test_kv_cache_usage_counts_blocks_of_running_sequences_up_to_one() -> None:
    model = TimingModel(block_size=16, num_gpu_blocks=10)
    assert model.kv_cache_usage([]) == 0.0
    assert model.kv_cache_usage([1, 16, 17]) == pytest.approx((1 + 1 + 2) / 10)
    assert model.kv_cache_usage([16 * 100]) == 1.0


@pytest.mark.parametrize("field,value", [("decode_tokens_per_s", -1.0), ("itl_growth", math.nan), ("ttft_base_s", math.inf),
                                         ("max_num_seqs", 0), ("block_size", 0), ("num_gpu_blocks", 0), ("max_model_len", 0)])
def test_nonsense_parameters_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        TimingModel(**{field: value})  # type: ignore[arg-type]


# prompts ---------------------------------------------------------------------------------------------------
def test_prompt_tokens_are_ids_or_characters_over_four() -> None:
    assert prompt_tokens("a" * 4 * 25) == 25
    assert prompt_tokens("a" * 101) == 26  # rounded up
    assert prompt_tokens("") == 1
    assert prompt_tokens((1, 2, 3)) == 3
    assert completion_prompt([5, 6, 7]) == (5, 6, 7)
    assert completion_prompt(["a", "b"]) == "a\nb"
    assert completion_prompt(None) == ""


def test_chat_prompt_lays_out_roles_and_content_parts_so_shared_turns_share_a_prefix() -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(first) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert chat_prompt(parts) == "<|user|>ab\n<|assistant|>"
    longer = chat_prompt([*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}])
    assert longer.startswith(chat_prompt(first).removesuffix("<|assistant|>"))
    assert chat_prompt("not a list") == "" and chat_prompt([1, None]) == "<|assistant|>"


@given(prefix=st.text(min_size=0, max_size=400), a=st.text(min_size=0, max_size=200), b=st.text(min_size=0, max_size=200))
@settings(max_examples=80)
def test_block_hashes_are_chained_over_full_blocks(prefix: str, a: str, b: str) -> None:
    unit = 16 * CHARS_PER_TOKEN
    ha, hb = block_hashes(prefix + a, 16), block_hashes(prefix + b, 16)
    assert len(ha) == len(prefix + a) // unit  # full blocks only
    shared = len(prefix) // unit
    assert ha[:shared] == hb[:shared]  # the same prefix, the same leading blocks
    # A block's hash depends on everything before it: equal hashes at i mean equal text up to the end of block i.
    for i, (x, y) in enumerate(zip(ha, hb, strict=False)):
        if x == y:
            assert (prefix + a)[:(i + 1) * unit] == (prefix + b)[:(i + 1) * unit]


def test_token_id_prompts_are_blocked_by_ids() -> None:
    ids = tuple(range(40))
    assert len(block_hashes(ids, 16)) == 2
    assert block_hashes(ids, 16)[0] == block_hashes(ids[:16] + (99,), 16)[0]
    assert block_hashes(ids, 16)[1] != block_hashes(ids[:16] + (99,) * 16, 16)[1]


# prefix cache ----------------------------------------------------------------------------------------------
def test_prefix_cache_hits_whole_leading_blocks_and_always_computes_the_last_token() -> None:
    cache = PrefixCache(capacity=100, block_size=16)
    prompt = "x" * 64 * 3  # 48 tokens, 3 blocks
    hashes = block_hashes(prompt, 16)
    assert cache.lookup(hashes, 48) == 0  # cold
    cache.insert(hashes)
    assert cache.lookup(hashes, 48) == 47  # all 3 blocks cached, yet the last token is computed
    longer = block_hashes(prompt + "y" * 64, 16)
    assert cache.lookup(longer, 64) == 48  # the shared 3 blocks
    other = block_hashes("z" + prompt[1:], 16)
    assert cache.lookup(other, 48) == 0  # a different first block: no later block can match
    assert (cache.queries, cache.hits) == (48 + 48 + 64 + 48, 47 + 48)


def test_prefix_cache_evicts_the_least_recently_used_blocks() -> None:
    cache = PrefixCache(capacity=4, block_size=16)
    a, b = block_hashes("a" * 128, 16), block_hashes("b" * 128, 16)  # 2 blocks each
    cache.insert(a)
    cache.insert(b)
    assert len(cache) == 4
    cache.lookup(a, 32)  # touch a: b is now the oldest
    cache.insert(block_hashes("c" * 64, 16))
    assert len(cache) == 4
    assert cache.lookup(a, 33) == 32 and cache.lookup(b, 33) == 0  # b's first block went: b misses whole


# batch slots -----------------------------------------------------------------------------------------------
def test_slots_admit_up_to_the_limit_then_queue_in_arrival_order() -> None:
    slots = SlotQueue(2)
    assert [slots.submit(i) for i in range(5)] == [True, True, False, False, False]
    assert list(slots.waiting) == [2, 3, 4]
    assert slots.release(0) == [2]
    assert slots.release(3) == []  # gave up while waiting
    assert slots.release(1) == [4]
    assert slots.running == {2, 4} and not slots.waiting
    assert slots.release(99) == []  # unknown: nothing changes


@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=30)), max_size=120),
       st.integers(min_value=1, max_value=5))
def test_slots_never_exceed_the_limit_and_admit_fifo(ops: list[tuple[bool, int]], limit: int) -> None:
    slots, submitted, admitted_order, next_id = SlotQueue(limit), [], [], 0
    for submit, pick in ops:
        if submit or not submitted:
            if slots.submit(next_id):
                admitted_order.append(next_id)
            submitted.append(next_id)
            next_id += 1
        else:
            admitted_order += slots.release(submitted[pick % len(submitted)])
        assert len(slots.running) <= limit
        assert not slots.waiting or len(slots.running) == limit  # nobody waits beside a free slot
    # Admission follows arrival among the requests that were admitted at all.
    assert admitted_order == sorted(admitted_order)


# Prometheus exposition ---------------------------------------------------------------------------------------
def test_histogram_is_cumulative_with_sum_and_count() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.5, 5.0):
        histogram.observe(value)
    assert histogram.counts == [1, 2] and histogram.count == 3 and histogram.total == pytest.approx(5.55)


def test_exposition_parses_as_prometheus_text_with_vllm_names() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    labels = {"model_name": 'q"w\\en', "engine": "0"}
    histogram = Histogram(TTFT_BUCKETS)
    histogram.observe(0.03)
    text = "\n".join([*render_gauge("vllm:num_requests_running", "running", labels, 3),
                      *render_counter("vllm:prefix_cache_hits", "hits", labels, 7),
                      *render_histogram("vllm:time_to_first_token_seconds", "ttft", labels, histogram)]) + "\n"
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["vllm:num_requests_running"].samples[0].value == 3
    assert families["vllm:num_requests_running"].samples[0].labels == labels
    hits = families["vllm:prefix_cache_hits"]
    assert hits.type == "counter" and hits.samples[0].name == "vllm:prefix_cache_hits_total" and hits.samples[0].value == 7
    buckets = {s.labels["le"]: s.value for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets["0.02"] == 0 and buckets["0.04"] == 1 and buckets["+Inf"] == 1
