"""What the engines say about their own load: each ready replica's `/metrics`, scraped every second.

The gateway sees requests; only the engine sees its batch: how many sequences run, how many wait for
a slot, how full the KV cache is, and how long prefill took (TTFT). Those are the autopilot's
signals (waiting requests are the earliest sign that a business needs another replica: they grow
before any latency does). vLLM and Corral's simulator share vLLM's metric names; SGLang's are mapped.
An engine without `/metrics` (`transformers serve`) gives no engine signals: its replicas count as
unknown, and the business is judged on the gateway's figures alone.

Counters and histograms are cumulative, so a window figure (TTFT p50/p90) is the difference of two
scrapes, interpolated as Prometheus' `histogram_quantile` (`corral.domain.load`). Gauges are averaged over
the autopilot's stable and panic windows (Knative KPA's idea), each figure with the age of its newest reading.

Cheap at scale: a page is cut down to the families used before it is parsed, and parsed in a worker thread
(a vLLM page is ~10 ms of CPU: 100 of them on the event loop stalled the API and the gateway for seconds);
scrapes run at most `concurrency` at once and a whole round ends within `round_timeout_s` (a replica that
has not answered by then keeps its older readings, which age out into *unknown*).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp

from corral.domain.load import histogram_quantile
from corral.domain.models import Pod

# engine metric name → what it means (vLLM first; older vLLM and SGLang names map to the same figures)
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
TTFT = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")
MAX_METRICS_BYTES = 2 * 1024 * 1024  # an engine's exposition is tens of KB; a bigger answer is not read
USED = RUNNING + WAITING + KV_CACHE + TTFT
FRESH_FOR_S = 3.0  # a reading older than this (or 3 scrape timeouts) is stale: the replica's load is unknown


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
    age_s: float | None = None  # how old its newest reading is (None: never read)


# The rest of a sample line after its family's name: suffix, labels (quoted values may hold any character), value.
_REST = re.compile(r"(_bucket|_sum|_count|_created)?(?:\{((?:[^}\"]|\"(?:[^\"\\]|\\.)*\")*)\})?[ \t]+(\S+)")
_SUFFIX = re.compile(r"_(?:bucket|sum|count|created)(?=[{ \t])")
_LE = re.compile(r'(?:^|,)\s*le\s*=\s*"([^"]*)"')
_GAUGES = RUNNING + WAITING + KV_CACHE


def _samples(page: str, name: str) -> Iterable[tuple[str, str, float]]:
    """(suffix, labels, value) of each sample line of the family `name` in `page` (which starts with a newline).
    Lines are found with `str.find`, in C: the general parser (prometheus_client) took 0.5 ms a vLLM page holding the
    GIL, and 1,000 pages a tick on the parsing thread kept the event loop's thread waiting for it (bench/
    control_plane.py: a 30 ms loop stall per tick at 1,000 replicas). Only the few lines Corral reads are parsed."""
    needle, at = "\n" + name, 0
    while (at := page.find(needle, at)) != -1:
        end = page.find("\n", at + 1)
        line = page[at + len(needle): end if end != -1 else len(page)]
        at = end if end != -1 else len(page)
        if line[:1] not in ("_", "{", " ", "\t") or (line[:1] == "_" and not _SUFFIX.match(line)):
            continue  # another family whose name starts with this one's
        sample = _REST.match(line)
        if sample is None:
            raise ValueError(f"malformed sample line of {name}: {line[:80]!r}")
        suffix, labels, value = sample.groups()
        yield suffix or "", labels or "", float(value)


def parse(text: str, at: float) -> Scrape:
    """The figures Corral uses out of a Prometheus exposition; gauges and buckets summed over label sets
    (one engine may serve a base model and its adapters under several `model_name` labels). A malformed line of a
    family it reads is a ValueError (the scraper drops that scrape)."""
    page = "\n" + text
    gauges: dict[str, float] = {}
    for name in _GAUGES:
        for suffix, _, value in _samples(page, name):
            if not suffix:
                gauges[name] = gauges.get(name, 0.0) + value
    buckets: dict[float, float] = {}
    for name in TTFT:
        for suffix, labels, value in _samples(page, name):
            if suffix == "_bucket":
                le = _LE.search(labels)
                bound = float(le.group(1).replace("+Inf", "inf")) if le else math.inf
                buckets[bound] = buckets.get(bound, 0.0) + value

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
    """Scrapes the ready replicas it is given and keeps their scrapes over the TTFT window. A business's load
    over the autopilot's stable and panic windows is kept per business (`domain.autopilot.LoadWindows`), not
    here per replica."""

    def __init__(self, *, window_s: float = 10.0, timeout_s: float = 0.8, clock=time.monotonic,
                 concurrency: int = 32, round_timeout_s: float = 2.0) -> None:
        self.window_s = window_s  # the TTFT percentiles' window, and how long scrapes are kept
        self.timeout_s = timeout_s
        self.round_timeout_s = round_timeout_s
        self.clock = clock
        self._scrapes: dict[str, deque[Scrape]] = {}
        self._histograms: dict[str, tuple[Scrape | None, Scrape, Histogram]] = {}  # replica → (older, newer, answer)
        # aiohttp, not httpx: with 1,000 replicas httpx's connection pool rescanned every connection for each
        # request handed out (1.8 s of loop time a tick in bench/control_plane.py); aiohttp's connector does not.
        self._session: aiohttp.ClientSession | None = None
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        # Pages are parsed off the loop on ONE thread: parsing is Python holding the GIL, and the loop's thread
        # waits a switch interval (5 ms) for each thread ahead of it; asyncio's default pool (6+ threads here)
        # stalled the loop ~40 ms at a time while 1,000 pages were parsed (bench/control_plane.py).
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-metrics")

    async def scrape(self, pods: Iterable[Pod]) -> None:
        """One scrape of every ready replica with an endpoint, at most `concurrency` at once and within
        `round_timeout_s` in all; replicas no longer given are forgotten. A replica that does not answer
        keeps its old scrapes until they age out."""
        targets = [p for p in pods if p.ready and p.endpoint]
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency), trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        tasks = [asyncio.ensure_future(self._scrape_one(p)) for p in targets]
        if tasks:
            late = set(tasks)
            try:
                _, late = await asyncio.wait(tasks, timeout=self.round_timeout_s)
            finally:
                # Past the round's time, and when the round itself is cancelled (the autopilot stopping): a scrape
                # left running would use the session that `close` then shuts ("Session is closed", unretrieved).
                for task in late:
                    task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        alive = {p.name for p in targets}
        for name in [n for n in self._scrapes if n not in alive]:
            del self._scrapes[name]
            self._histograms.pop(name, None)

    async def _scrape_one(self, pod: Pod) -> None:
        assert self._session is not None
        try:
            async with self._slots:
                async with self._session.get(f"{pod.endpoint}/metrics") as answer:
                    if answer.status != 200:
                        return
                    body = await answer.content.read(MAX_METRICS_BYTES + 1)
                if len(body) > MAX_METRICS_BYTES:
                    return
                at = self.clock()
                text = body.decode("utf-8", errors="replace")
                scrape = await asyncio.get_running_loop().run_in_executor(self._parser, parse, text, at)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return  # no engine signals from it this time; the gateway's figures still count
        ring = self._scrapes.setdefault(pod.name, deque())
        ring.append(scrape)
        while ring and scrape.at - ring[0].at > self.window_s:
            ring.popleft()

    def _fresh(self, replica: str) -> deque[Scrape] | None:
        ring = self._scrapes.get(replica)
        if not ring or self.clock() - ring[-1].at > max(FRESH_FOR_S, 3 * self.timeout_s):
            return None
        return ring

    def _ttft_window(self, ring: deque[Scrape]) -> tuple[Scrape | None, Scrape]:
        newest = ring[-1]
        older = next((s for s in ring if newest.at - s.at <= self.window_s), None)
        return (older if older is not newest else None), newest

    def histogram(self, replica: str) -> Histogram:
        """The replica's first tokens over the TTFT window; the same two scrapes give the same answer, so it is
        kept until a new scrape comes (every tick reads each replica's twice: its own figures and its business's)."""
        ring = self._fresh(replica)
        if ring is None:
            return (), {}
        older, newer = self._ttft_window(ring)
        cached = self._histograms.get(replica)
        if cached is not None and cached[0] is older and cached[1] is newer:
            return cached[2]
        answer = window_histogram(older, newer)
        self._histograms[replica] = (older, newer, answer)
        return answer

    def of(self, replica: str) -> ReplicaSignal:
        ring = self._fresh(replica)
        if ring is None:
            last = self._scrapes.get(replica)
            return ReplicaSignal(age_s=self.clock() - last[-1].at if last else None)
        newest = ring[-1]
        p50, p90, count = percentiles_ms([self.histogram(replica)])
        return ReplicaSignal(newest.running, newest.waiting, newest.kv_cache_usage, p50, p90, count, scraped=True,
                             age_s=self.clock() - newest.at)

    def ttft_of(self, replicas: Iterable[str]) -> tuple[float | None, float | None, float]:
        """TTFT (p50 ms, p90 ms, count) over the window of several replicas together: a business's."""
        return percentiles_ms(self.histogram(r) for r in replicas)

    def all(self) -> Mapping[str, ReplicaSignal]:
        return {name: self.of(name) for name in self._scrapes}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._parser.shutdown(wait=False, cancel_futures=True)
