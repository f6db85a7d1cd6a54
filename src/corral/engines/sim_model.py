"""The simulator's engine model: pure, deterministic formulas and state machines, no I/O, no clock.

`corral.engines.simulator` (the HTTP server) asks this module how long things take and keeps its
books here; the formulas are unit-tested against themselves (tests/unit/test_sim_model.py). The model
is deliberately simple, one knob per effect, so that a benchmark or an autopilot test can predict what
it will see:

- **Batch slots and a FIFO queue** (`SlotQueue`): at most `max_num_seqs` requests run at once (vLLM's
  `--max-num-seqs`); the rest wait in arrival order. A request holds its slot from admission until its
  last token. KV-cache space does not gate admission (vLLM would also wait for free blocks and preempt);
  it is only reported.
- **Time to first token** = queue wait + `ttft_base_s` (scheduling and the first forward pass) +
  uncached prompt tokens / `prefill_tokens_per_s` (prefill is compute-bound: time proportional to the
  tokens computed).
- **Inter-token latency** with `n` running sequences = `1 / decode_tokens_per_s` × (1 + `itl_growth` ×
  (n − 1)): decode is memory-bound, so a batch step costs little more than one sequence's step until the
  batch is large; each extra running sequence adds a constant fraction.
- **Prefix cache** (`PrefixCache`, vLLM's automatic prefix caching): the prompt is cut into blocks of
  `block_size` tokens, each identified by a hash chained over all blocks before it (so a block matches
  only with the same whole prefix); an LRU over `num_gpu_blocks` block hashes. A hit skips the prefill
  of the cached leading blocks; like vLLM, at least the prompt's last token is always computed.
  Queries and hits are counted in tokens, as vLLM's `vllm:prefix_cache_queries` / `_hits` are.
- **KV-cache usage** = blocks held by running sequences (prompt + generated tokens, rounded up to
  blocks) / `num_gpu_blocks`, capped at 1 (vLLM's `vllm:kv_cache_usage_perc`). Shared prefix blocks are
  counted once per sequence (vLLM shares them), so this over-estimates when prompts share prefixes.

The simulator has no tokenizer: a text prompt counts one token per `CHARS_PER_TOKEN` characters
(OpenAI's rule of thumb for English, "1 token ≈ 4 characters"); token-id prompts count their ids.

Default figures, from published vLLM measurements (each the middle of what was seen, not a fit to one
GPU; every one is a flag):

- `decode_tokens_per_s` = 200 (5 ms per token for one sequence alone): vLLM 0.23 on an L4 with
  Qwen2.5-0.5B measured ITL p50 5.1 ms at concurrency 1 (ai.wmx.dev/benchmarks, 256 in / 128 out);
  vLLM 0.21 on an H100 with Llama-3.1-8B, TPOT p50 6.48 ms at concurrency 1 (InferenceBench's
  concurrency-sweep recipe, yobitelcomm.github.io/bench/recipes/concurrency-sweep/). It is also the
  simulator's historical default, so existing callers see the same speed.
- `itl_growth` = 0.03 per extra running sequence: fitting ITL(n) = ITL(1)·(1 + g·(n − 1)) to those
  sweeps gives g ≈ 0.011-0.013 for the 0.5B model on an L4 (5.1 → 5.5 ms at 8, → 7.1 ms at 32),
  g ≈ 0.006-0.046 for the 8B model on an H100 (6.48 → 6.59 ms at 4, → 10.94 ms at 16), and g ≈ 0.03 for
  Llama-3.1-8B on an A100-40GB with vLLM 0.23 (about 75 tokens/s alone and 6.6× the throughput at 8
  concurrent, so 13.3 → 16.2 ms per token; johnmusgrave.com/p/vllm-throughput-latency-sweep-on).
- `max_num_seqs` = 8: the same A100 sweep puts the knee of the throughput-latency curve at 8
  concurrent requests ("batching buys throughput almost for free up to a concurrency of 8"); issue 14
  asks for 8. (vLLM's own default is much larger; set it per pool.)
- `prefill_tokens_per_s` = 10,000: published TTFTs imply roughly 10,000-40,000 prompt tokens/s for
  small models (27 ms TTFT p50 for 256 tokens on the L4 above; 84 ms for 1,024 tokens with a 32B FP8
  model on four DGX Spark nodes in NVIDIA's developer forum, thread "6x Spark setup"); the low end
  keeps prompt length visible in a benchmark.
- `ttft_base_s` = 20 ms: the simulator's historical default (the L4 sweep's 27 ms TTFT less its
  prefill is in the same range).
- `block_size` = 16 tokens (vLLM's default block size); `num_gpu_blocks` = 2,048 (32,768 tokens of
  KV cache: a small GPU's worth, so that usage moves visibly under a simulated load).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CHARS_PER_TOKEN = 4

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that a dashboard or the autopilot reads the same
# quantiles from the simulator as from vLLM.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


@dataclass(frozen=True)
class TimingModel:
    """The simulator's engine parameters (see the module docstring for the formulas and defaults)."""

    ttft_base_s: float = 0.020
    decode_tokens_per_s: float = 200.0
    prefill_tokens_per_s: float = 10_000.0
    itl_growth: float = 0.03
    max_num_seqs: int = 8
    block_size: int = 16
    num_gpu_blocks: int = 2048
    max_model_len: int = 32_768

    def __post_init__(self) -> None:
        for name in ("ttft_base_s", "decode_tokens_per_s", "prefill_tokens_per_s", "itl_growth"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        for name in ("max_num_seqs", "block_size", "num_gpu_blocks", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)!r}")

    def prefill_s(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """Prefill time of the prompt tokens the prefix cache did not cover (0 when the rate is 0: instant)."""
        computed = max(prompt_tokens - cached_tokens, 0)
        return computed / self.prefill_tokens_per_s if self.prefill_tokens_per_s > 0 else 0.0

    def ttft_s(self, prompt_tokens: int, cached_tokens: int = 0, wait_s: float = 0.0) -> float:
        """Time to first token: queue wait + fixed part + prefill."""
        return wait_s + self.ttft_base_s + self.prefill_s(prompt_tokens, cached_tokens)

    def inter_token_s(self, running: int) -> float:
        """Time between two output tokens of one sequence while `running` sequences decode together."""
        if self.decode_tokens_per_s <= 0:
            return 0.0
        return (1.0 + self.itl_growth * (max(running, 1) - 1)) / self.decode_tokens_per_s

    def blocks(self, tokens: int) -> int:
        return -(-max(tokens, 0) // self.block_size)

    def kv_cache_usage(self, sequence_tokens: Iterable[int]) -> float:
        """Fraction of KV blocks held by the running sequences (each its prompt + generated tokens), ≤ 1."""
        used = sum(self.blocks(t) for t in sequence_tokens)
        return min(used / self.num_gpu_blocks, 1.0)


# Prompts ------------------------------------------------------------------------------------------------------
Prompt = str | tuple[int, ...]


MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# (name, lowest, highest, lowest excluded): vLLM's range checks of its sampling parameters, with its wording.
_NUMBERS = (("temperature", 0.0, None, False), ("top_p", 0.0, 1.0, True), ("presence_penalty", -2.0, 2.0, False),
            ("frequency_penalty", -2.0, 2.0, False), ("repetition_penalty", 0.0, None, True))
_INTEGERS = (("n", 1), ("seed", None), ("top_k", None))


def request_problem(body: Mapping[str, object], *, chat: bool) -> tuple[str, str] | None:
    """What vLLM refuses with a 400 in a request body, as (message, parameter), or None. The simulator is what
    tests and benchmarks run against: a client error that a real engine gives must not pass here unnoticed
    (`messages: []` and `temperature: "hot"` did)."""
    kind = "ChatCompletionRequest" if chat else "CompletionRequest"

    def invalid(name: str, expected: str, value: object, error_type: str) -> tuple[str, str]:
        return (f"1 validation error for {kind}\n{name}\n  {expected} [type={error_type}, input_value={value!r}, "
                f"input_type={type(value).__name__}]"[:1000], name)

    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return invalid("messages", "Input should be a valid list", messages, "list_type")
        if not messages:
            return "messages: List should have at least 1 item after validation, not 0", "messages"
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or message.get("role") not in MESSAGE_ROLES:
                return (f"messages.{i}: a message needs a role, one of {', '.join(sorted(MESSAGE_ROLES))}", "messages")
            content = message.get("content")
            if content is not None and not isinstance(content, (str, list)):
                return invalid(f"messages.{i}.content", "Input should be a valid string", content, "string_type")
    else:
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            return "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
        if not isinstance(prompt, (str, list)):
            return invalid("prompt", "Input should be a valid string", prompt, "string_type")
    for name, low, high, exclusive in _NUMBERS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return invalid(name, "Input should be a valid number, unable to parse string as a number", value,
                           "float_parsing")
        if (value <= low if exclusive else value < low) or (high is not None and value > high):
            interval = f"{'(' if exclusive else '['}{low:g}, {high:g}]" if high is not None else (
                f"{'greater than' if exclusive else 'at least'} {low:g}")
            return f"{name} must be {'in ' if high is not None else ''}{interval}, got {value}.", name
    for name, minimum in _INTEGERS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            return invalid(name, "Input should be a valid integer", value, "int_type")
        if minimum is not None and value < minimum:
            return f"{name} must be at least {minimum}, got {value}.", name
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        return invalid("stream", "Input should be a valid boolean", body["stream"], "bool_type")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
        return invalid("stop", "Input should be a valid string", stop, "string_type")
    return None


def chat_prompt(messages: object) -> str:
    """A chat request's messages as one text, the way a chat template lays them out (role, then content),
    so that two conversations sharing their first turns share a text prefix."""
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text of text parts, other parts as JSON
            content = "".join(p.get("text", "") if isinstance(p, Mapping) and p.get("type") == "text"
                              else json.dumps(p, sort_keys=True) for p in content)
        parts.append(f"<|{message.get('role', '')}|>{content if isinstance(content, str) else ''}\n")
    return "".join(parts) + "<|assistant|>"


def completion_prompt(prompt: object) -> Prompt:
    """`/v1/completions`' prompt: a text, token ids, or a list of either (taken together)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    if isinstance(prompt, list):
        return "\n".join(p if isinstance(p, str) else json.dumps(p) for p in prompt)
    return ""


def prompt_tokens(prompt: Prompt) -> int:
    """Tokens of a prompt: its ids, or one per CHARS_PER_TOKEN characters of text (at least 1)."""
    count = len(prompt) if isinstance(prompt, tuple) else -(-len(prompt) // CHARS_PER_TOKEN)
    return max(count, 1)


def block_hashes(prompt: Prompt, block_size: int) -> list[bytes]:
    """One hash per full block of the prompt, each chained over every block before it (vLLM's scheme:
    a block is reused only under the same whole prefix). A partial last block is not cached."""
    if isinstance(prompt, tuple):
        unit, data = block_size, [str(t).encode() + b"," for t in prompt]
        chunks = [b"".join(data[i:i + unit]) for i in range(0, len(data) - unit + 1, unit)]
    else:
        unit = block_size * CHARS_PER_TOKEN
        chunks = [prompt[i * unit:(i + 1) * unit].encode("utf-8", "surrogatepass") for i in range(len(prompt) // unit)]
    hashes, previous = [], b""
    for chunk in chunks:
        previous = hashlib.blake2b(previous + chunk, digest_size=16).digest()
        hashes.append(previous)
    return hashes


@dataclass
class PrefixCache:
    """An LRU of prompt-block hashes (at most `capacity`), counted in tokens like vLLM's metrics."""

    capacity: int
    block_size: int
    _blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found cached

    def lookup(self, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Cached tokens at the start of a prompt (whole leading blocks found, at most prompt − 1: the
        last token is always computed); counts the query and touches the blocks found."""
        found = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            found += 1
        cached = min(found * self.block_size, max(prompt_tokens - 1, 0))
        self.queries += prompt_tokens
        self.hits += cached
        return cached

    def insert(self, hashes: Sequence[bytes]) -> None:
        """Remember a prefilled prompt's blocks, evicting the least recently used beyond capacity."""
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)


# Batch slots ---------------------------------------------------------------------------------------------------
@dataclass
class SlotQueue:
    """`slots` batch slots and a FIFO queue of request ids. The server awaits its admission; this only
    decides who runs."""

    slots: int
    running: set[Hashable] = field(default_factory=set)
    waiting: deque[Hashable] = field(default_factory=deque)

    def submit(self, rid: Hashable) -> bool:
        """True: admitted now. False: queued behind the others (FIFO); `release` admits it later."""
        if len(self.running) < self.slots and not self.waiting:
            self.running.add(rid)
            return True
        self.waiting.append(rid)
        return False

    def release(self, rid: Hashable) -> list[Hashable]:
        """A request ended (or gave up while waiting): the ids admitted in its place, in arrival order."""
        if rid in self.running:
            self.running.discard(rid)
        else:
            try:
                self.waiting.remove(rid)
            except ValueError:
                pass
        admitted = []
        while self.waiting and len(self.running) < self.slots:
            nxt = self.waiting.popleft()
            self.running.add(nxt)
            admitted.append(nxt)
        return admitted


# Prometheus exposition ------------------------------------------------------------------------------------------
@dataclass
class Histogram:
    """A cumulative histogram with fixed upper bounds, as Prometheus exposes one."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


def _number(value: float) -> str:
    """prometheus_client's float format: 1.0, 0.001, +Inf."""
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), chr(92) + "n")}"'
               for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def render_gauge(name: str, doc: str, labels: Mapping[str, str], value: float) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name}{_labels(labels)} {_number(value)}"]


def render_counter(name: str, doc: str, labels: Mapping[str, str], value: float) -> list[str]:
    """A counter as prometheus_client exposes one: `vllm:x` declared in vLLM's source is `vllm:x_total` on the wire."""
    return [f"# HELP {name}_total {doc}", f"# TYPE {name}_total counter", f"{name}_total{_labels(labels)} {_number(value)}"]


def render_histogram(name: str, doc: str, labels: Mapping[str, str], histogram: Histogram) -> list[str]:
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} histogram"]
    for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
        lines.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {_number(count)}")
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {_number(histogram.count)}")
    lines.append(f"{name}_count{_labels(labels)} {_number(histogram.count)}")
    lines.append(f"{name}_sum{_labels(labels)} {_number(histogram.total)}")
    return lines
