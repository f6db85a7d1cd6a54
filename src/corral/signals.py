"""What the engines say about their own load: each ready replica's `/metrics`, scraped every second.

The gateway sees requests; only the engine sees its batch: how many sequences run, how many wait for
a slot, how full the KV cache is, and how long prefill took (TTFT). Those are the autopilot's
signals (waiting requests are the earliest sign that a business needs another replica: they grow
before any latency does). vLLM and Corral's simulator share vLLM's metric names; SGLang's are mapped.
An engine without `/metrics` (`transformers serve`) gives no engine signals: its replicas count as
unknown, and the business is judged on the gateway's figures alone.

Counters and histograms are cumulative, so a window figure (TTFT p50/p90) is the difference of two
scrapes, interpolated as Prometheus' `histogram_quantile` (`corral.domain.load`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from corral.domain.load import histogram_quantile
from corral.domain.models import Pod

# engine metric name → what it means (vLLM first; older vLLM and SGLang names map to the same figures)
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
TTFT = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")
MAX_METRICS_BYTES = 2 * 1024 * 1024  # an engine's exposition is tens of KB; a bigger answer is not read


@dataclass(frozen=True)
class Scrape:
    """One replica's figures at one moment; `ttft` is the cumulative histogram as (upper bound, count)."""

    at: float
    running: float | None
    waiting: float | None
    kv_cache_usage: float | None
    ttft: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ReplicaSignal:
    """A replica's engine figures now (gauges) and over the window (TTFT percentiles, milliseconds)."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    ttft_count: float = 0.0  # first tokens in the window: how much the percentiles rest on
    scraped: bool = False  # False: no (recent) answer from its /metrics

    def as_wire(self) -> dict[str, float | bool | None]:
        return {"running": self.running, "waiting": self.waiting, "kvCacheUsage": self.kv_cache_usage,
                "ttftP50Ms": self.ttft_p50_ms, "ttftP90Ms": self.ttft_p90_ms, "scraped": self.scraped}


def parse(text: str, at: float) -> Scrape:
    """The figures Corral uses out of a Prometheus exposition; gauges and buckets summed over label sets
    (one engine may serve a base model and its adapters under several `model_name` labels)."""
    gauges: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in RUNNING + WAITING + KV_CACHE:
            gauges[family.name] = gauges.get(family.name, 0.0) + sum(s.value for s in family.samples)
        elif family.name in TTFT:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels.get("le", "inf").replace("+Inf", "inf"))
                    buckets[le] = buckets.get(le, 0.0) + sample.value

    def first(names: Iterable[str]) -> float | None:
        return next((gauges[n] for n in names if n in gauges), None)

    return Scrape(at, first(RUNNING), first(WAITING), first(KV_CACHE), tuple(sorted(buckets.items())))


Histogram = tuple[tuple[float, ...], dict[int, int]]  # (upper bounds with +Inf last, count per bucket index)


def window_histogram(older: Scrape | None, newer: Scrape) -> Histogram:
    """The first tokens between two scrapes (all of them without `older`), as counts per bucket."""
    before = dict(older.ttft) if older is not None else {}
    bounds = [le for le, _ in newer.ttft]
    cumulative = [max(0.0, count - before.get(le, 0.0)) for le, count in newer.ttft]
    per_bucket = {i: max(0, int(round(c - (cumulative[i - 1] if i else 0.0)))) for i, c in enumerate(cumulative)}
    if bounds and not math.isinf(bounds[-1]):
        bounds.append(math.inf)
    return tuple(bounds), per_bucket


def percentiles_ms(histograms: Iterable[Histogram]) -> tuple[float | None, float | None, float]:
    """(p50 ms, p90 ms, count) of several replicas' histograms together (those sharing the first's
    bounds: one pool runs one engine, so they all do)."""
    merged: dict[int, int] = {}
    bounds: tuple[float, ...] = ()
    for these, counts in histograms:
        if not these:
            continue
        bounds = bounds or these
        if these != bounds:
            continue
        for i, n in counts.items():
            merged[i] = merged.get(i, 0) + n
    if not bounds:
        return None, None, 0.0
    p50, p90 = histogram_quantile(0.5, merged, bounds), histogram_quantile(0.9, merged, bounds)
    return (None if p50 is None else p50 * 1000), (None if p90 is None else p90 * 1000), float(sum(merged.values()))


class EngineSignals:
    """Scrapes the ready replicas it is given and keeps `window_s` of scrapes per replica."""

    def __init__(self, *, window_s: float = 10.0, timeout_s: float = 0.8, clock=time.monotonic) -> None:
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._scrapes: dict[str, deque[Scrape]] = {}
        self._client: httpx.AsyncClient | None = None

    async def scrape(self, pods: Iterable[Pod]) -> None:
        """One scrape of every ready replica with an endpoint, concurrently; replicas no longer given
        are forgotten. A replica that does not answer keeps its old scrapes until they age out."""
        targets = [p for p in pods if p.ready and p.endpoint]
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
        await asyncio.gather(*(self._scrape_one(p) for p in targets))
        alive = {p.name for p in targets}
        for name in [n for n in self._scrapes if n not in alive]:
            del self._scrapes[name]

    async def _scrape_one(self, pod: Pod) -> None:
        assert self._client is not None
        try:
            answer = await self._client.get(f"{pod.endpoint}/metrics")
            if answer.status_code != 200 or len(answer.content) > MAX_METRICS_BYTES:
                return
            scrape = parse(answer.text, self.clock())
        except (httpx.HTTPError, ValueError):
            return  # no engine signals from it this time; the gateway's figures still count
        ring = self._scrapes.setdefault(pod.name, deque())
        ring.append(scrape)
        while ring and scrape.at - ring[0].at > self.window_s:
            ring.popleft()

    def _fresh(self, replica: str) -> deque[Scrape] | None:
        ring = self._scrapes.get(replica)
        if not ring or self.clock() - ring[-1].at > max(3.0, 3 * self.timeout_s):
            return None
        return ring

    def histogram(self, replica: str) -> Histogram:
        ring = self._fresh(replica)
        if ring is None:
            return (), {}
        return window_histogram(ring[0] if len(ring) > 1 else None, ring[-1])

    def of(self, replica: str) -> ReplicaSignal:
        ring = self._fresh(replica)
        if ring is None:
            return ReplicaSignal()
        newest = ring[-1]
        p50, p90, count = percentiles_ms([self.histogram(replica)])
        return ReplicaSignal(newest.running, newest.waiting, newest.kv_cache_usage, p50, p90, count, scraped=True)

    def ttft_of(self, replicas: Iterable[str]) -> tuple[float | None, float | None, float]:
        """TTFT (p50 ms, p90 ms, count) over the window of several replicas together: a business's."""
        return percentiles_ms(self.histogram(r) for r in replicas)

    def all(self) -> Mapping[str, ReplicaSignal]:
        return {name: self.of(name) for name in self._scrapes}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
