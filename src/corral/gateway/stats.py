"""Traffic counters per service and replica, the same on both data planes, exposed through `prometheus_client`.

What each forwarded request adds to its (service, replica) (the Lua code of the nginx data plane adds
the same, under the keys `NginxStats` reads):
- `requests`, and `errors` (a 5xx answer, a replica unreachable or cut mid-response);
- its time from the gateway choosing the replica to the response's end, in the latency histogram;
- a streamed response (`text/event-stream`): its time to the first byte of the body, in the
  first-byte histogram (headers come at once; the first event is the first token);
- `completion_tokens` when the response reports `usage` (a JSON body's `usage`; a stream's usage chunk,
  which engines send when asked with `stream_options.include_usage`; with continuous usage stats, the
  largest, i.e. final, count). Responses without usage add nothing, and `usage` counts those that had it.
  Per (service, API key) for metering (`meter()`): requests, errors, completion and `prompt_tokens`.
Requests in flight are counted per replica (balancing, draining) and per pair (the load view).
Requests the gateway holds for want of a free replica (proxy.py's activator) are counted per service while
held, and their wait goes into a per-service histogram when they leave the hold (served, refused past the
deadline, or their service gone): `held`, `held_wait`, `held_wait_sum`.
Requests whose client disconnected before their response ended (held, waiting for the replica's answer, or
mid-stream; the gateway then stops the replica's work) are counted per service: `client_cancelled`.

The histograms' buckets are `corral.domain.load.BUCKETS`. The load monitor reads `sample()` once a
second; `/api/metrics` renders `prometheus()` from a registry of this object's own (never the
process-wide default one, which would mix the counters of every gateway a process or test creates).
"""

from __future__ import annotations

import re
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from functools import cached_property

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from corral.domain.load import BUCKETS, Counts, Pair, Sample, bucket_index
from corral.domain.usage import MeterKey, UsageCounts

_LE = [floatToGoString(b) for b in BUCKETS]
UNSERVED_CODES = frozenset({503, 504})  # the gateway's own answers for want of a (live) replica


class PairStats:
    """The cumulative counters of one (service, replica). Histograms count per bucket (not cumulative):
    one increment per observation on the hot path; the exposition sums them."""

    __slots__ = ("requests", "errors", "latency", "latency_sum", "ttfb", "ttfb_sum", "tokens", "usage")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.ttfb = [0] * len(BUCKETS)
        self.ttfb_sum = 0.0
        self.tokens = 0
        self.usage = 0

    def counts(self) -> Counts:
        return Counts(self.requests, self.errors, {i: n for i, n in enumerate(self.latency) if n},
                      {i: n for i, n in enumerate(self.ttfb) if n}, self.tokens, self.usage)


class TrafficStats:
    def __init__(self) -> None:
        self.by_pair: dict[Pair, PairStats] = defaultdict(PairStats)
        self.in_flight_by_replica: dict[str, int] = defaultdict(int)
        self.in_flight_by_pair: dict[Pair, int] = defaultdict(int)
        # (service, status) of requests never forwarded; a service that does not exist counts as "" (the
        # name is the client's: one label per name would grow without bound)
        self.rejected: dict[tuple[str, int], int] = defaultdict(int)
        self.ejected: Collection[str] = ()  # replicas taken out of rotation by the data plane (failing or hung)
        self.held: dict[str, int] = defaultdict(int)  # service → requests held now, waiting for a replica
        self.held_wait: dict[str, list[int]] = {}  # service → held requests per wait bucket (not cumulative)
        self.held_wait_sum: dict[str, float] = defaultdict(float)  # service → seconds waited, summed
        self.client_cancelled: dict[str, int] = defaultdict(int)  # service → requests whose client left first
        # (service, API key id or None) → [requests, prompt tokens, completion tokens, errors], for metering (`meter`):
        # per key, and kept when a replica's counters are dropped. Bounded: a service's keys are the control plane's.
        self.metered: dict[tuple[str, str | None], list[int]] = {}
        # Which run of the data plane these counters belong to (they only grow within one): metering's cursor is
        # kept per epoch (corral.metering). The nginx plane's view carries nginx's own ("" before its first read).
        self.epoch = f"python-{time.time():.6f}-{secrets.token_hex(4)}"

    # the hot path ------------------------------------------------------------------------------
    def start(self, service: str, replica: str) -> None:
        self.in_flight_by_replica[replica] += 1
        self.in_flight_by_pair[(service, replica)] += 1

    def finish(self, service: str, replica: str, seconds: float, error: bool, ttfb: float | None = None,
               tokens: int | None = None, prompt_tokens: int | None = None, key_id: str | None = None) -> None:
        """One forwarded request ended: `ttfb` for a streamed response that sent a byte, `tokens` (completion)
        and `prompt_tokens` when it reported usage; `key_id`: the API key it was admitted with (metering)."""
        pair = (service, replica)
        c = self.by_pair[pair]
        c.requests += 1
        c.errors += error
        c.latency[bucket_index(seconds)] += 1
        c.latency_sum += seconds
        if ttfb is not None:
            c.ttfb[bucket_index(ttfb)] += 1
            c.ttfb_sum += ttfb
        if tokens is not None:
            c.tokens += tokens
            c.usage += 1
        m = self.metered.get((service, key_id))
        if m is None:
            m = self.metered[(service, key_id)] = [0, 0, 0, 0]
        m[0] += 1
        m[1] += prompt_tokens or 0
        m[2] += tokens or 0
        m[3] += error
        _decrement(self.in_flight_by_replica, replica)
        _decrement(self.in_flight_by_pair, pair)

    def hold(self, service: str) -> None:
        """A request of `service` starts waiting for a free replica."""
        self.held[service] += 1

    def unhold(self, service: str, seconds: float) -> None:
        """A held request of `service` left the hold after `seconds` (served, refused, its service gone)."""
        _decrement(self.held, service)
        waits = self.held_wait.get(service)
        if waits is None:
            waits = self.held_wait[service] = [0] * len(BUCKETS)
        waits[bucket_index(seconds)] += 1
        self.held_wait_sum[service] += seconds

    def cancel(self, service: str) -> None:
        """A request of `service` lost its client before its response ended (its work was stopped)."""
        self.client_cancelled[service] += 1

    def prune(self, replicas: Collection[str] = (), services: Collection[str] = ()) -> None:
        """Drop the counters of `replicas` and `services` that left (domain/load.py: `prunable` says when)."""
        gone_r, gone_s = set(replicas), set(services)
        for table in (self.by_pair, self.in_flight_by_pair):
            for pair in [p for p in table if p[0] in gone_s or p[1] in gone_r]:
                del table[pair]
        for replica in gone_r:
            self.in_flight_by_replica.pop(replica, None)
        for key in [k for k in self.rejected if k[0] in gone_s]:
            del self.rejected[key]
        for table in (self.held, self.held_wait, self.held_wait_sum, self.client_cancelled):
            for service in gone_s:
                table.pop(service, None)  # type: ignore[attr-defined]
        for key in [k for k in self.metered if k[0] in gone_s]:
            del self.metered[key]

    # readers -----------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Nothing to read: these are the live counters (the nginx plane's `NginxStats.refresh` reads nginx's)."""

    def snapshot(self) -> TrafficStats:
        """These counters (the nginx plane's `NginxStats.snapshot` answers its last copy of nginx's)."""
        return self

    def meter(self) -> dict[MeterKey, UsageCounts]:
        """The counters metering flushes (corral.domain.usage), cumulative since `epoch`: per (service, key id) what
        was forwarded; per (service, None) also what the gateway held or answered itself (a refusal comes before
        or without a key; requests to a service that does not exist are nobody's)."""
        out: dict[MeterKey, UsageCounts] = {key: UsageCounts(*m, 0, 0) for key, m in self.metered.items()}
        rejected: dict[str, int] = {}
        for (service, _), n in self.rejected.items():
            if service:
                rejected[service] = rejected.get(service, 0) + n
        for service in {*rejected, *self.held_wait}:
            gateway = UsageCounts(held=sum(self.held_wait.get(service, ())), rejected=rejected.get(service, 0))
            out[(service, None)] = out[(service, None)] + gateway if (service, None) in out else gateway
        return out

    def sample(self) -> Sample:
        """The counters as they are now (the load monitor's reading)."""
        unserved: dict[str, int] = {}
        for (service, code), n in self.rejected.items():
            if code in UNSERVED_CODES:
                unserved[service] = unserved.get(service, 0) + n
        held_wait = {service: {i: n for i, n in enumerate(waits) if n}
                     for service, waits in self.held_wait.items()}
        held = {service: n for service, n in self.held.items() if n > 0}
        counts = {pair: c.counts() for pair, c in self.by_pair.items()}
        return Sample(counts, dict(self.in_flight_by_pair), unserved, held, held_wait, dict(self.client_cancelled))

    def replica_summary(self, replicas: set[str]) -> dict[str, dict[str, float | int]]:
        """Counters since start per replica (all its services): the pool status' `traffic`."""
        merged: dict[str, list[float]] = {}
        for (_, replica), c in self.by_pair.items():
            if replica in replicas:
                m = merged.setdefault(replica, [0, 0, 0.0])
                m[0] += c.requests
                m[1] += c.errors
                m[2] += c.latency_sum
        return {name: {"requests": int(requests), "errors": int(errors), "inFlight": self.in_flight_by_replica.get(name, 0),
                       "meanLatencyMs": round(1000 * latency / requests, 3) if requests else 0.0}
                for name, (requests, errors, latency) in sorted(merged.items())}

    @cached_property
    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(TrafficCollector(lambda: self))
        return registry

    def prometheus(self) -> str:
        return generate_latest(self.registry).decode()


def _decrement(counts: dict, key: object) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


class TrafficCollector(Collector):
    """The gateway's metric families, built at each scrape from a `TrafficStats` (the live counters of the
    Python data plane, or a snapshot of nginx's shared memory)."""

    def __init__(self, source: Callable[[], TrafficStats]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        stats = self._source()
        pairs = sorted(stats.by_pair.items())
        labels = ["service", "replica"]
        requests = CounterMetricFamily("corral_gateway_requests", "Requests forwarded to a replica.", labels=labels)
        errors = CounterMetricFamily("corral_gateway_errors", "Forwarded requests that failed (5xx, unreachable, cut "
                                                              "mid-response).", labels=labels)
        tokens = CounterMetricFamily("corral_gateway_completion_tokens", "Completion tokens of the responses that "
                                                                         "reported usage.", labels=labels)
        latency = HistogramMetricFamily("corral_gateway_request_seconds", "Time from choosing the replica to the end of "
                                                                          "the response.", labels=labels)
        ttfb = HistogramMetricFamily("corral_gateway_ttfb_seconds", "Streamed responses: time from choosing the replica "
                                                                    "to the first byte of the body.", labels=labels)
        for (service, replica), c in pairs:
            values = [service, replica]
            requests.add_metric(values, c.requests)
            errors.add_metric(values, c.errors)
            tokens.add_metric(values, c.tokens)
            latency.add_metric(values, _cumulative(c.latency), c.latency_sum)
            if any(c.ttfb):
                ttfb.add_metric(values, _cumulative(c.ttfb), c.ttfb_sum)
        in_flight = GaugeMetricFamily("corral_gateway_in_flight", "Requests in flight on a replica.", labels=["replica"])
        for replica, n in sorted(stats.in_flight_by_replica.items()):
            in_flight.add_metric([replica], n)
        ejected = GaugeMetricFamily("corral_gateway_ejected", "Replicas the data plane took out of rotation (failures "
                                    "in a row, failed health checks, hung) until their ejection time passed and they "
                                    "passed their health checks.", labels=["replica"])
        for replica in sorted(stats.ejected):
            ejected.add_metric([replica], 1)
        rejected = CounterMetricFamily("corral_gateway_rejected", "Requests answered by the gateway itself (400, 404, "
                                                                  "413, 503, 504).", labels=["service", "code"])
        for (service, code), n in sorted(stats.rejected.items()):
            rejected.add_metric([service, str(code)], n)
        held = GaugeMetricFamily("corral_gateway_held", "Requests held now for want of a free replica (no "
                                 "ready replica, or every one at its batch limit).", labels=["service"])
        for service, n in sorted(stats.held.items()):
            held.add_metric([service], n)
        held_wait = HistogramMetricFamily("corral_gateway_held_seconds", "How long held requests waited for a "
                                          "free replica (served, or refused past the deadline).", labels=["service"])
        for service, waits in sorted(stats.held_wait.items()):
            held_wait.add_metric([service], _cumulative(waits), stats.held_wait_sum.get(service, 0.0))
        cancelled = CounterMetricFamily("corral_gateway_client_cancelled", "Requests whose client disconnected before "
                                        "the response ended (held, waiting for the replica's answer, or streaming); "
                                        "the gateway stopped the replica's work.", labels=["service"])
        for service, n in sorted(stats.client_cancelled.items()):
            cancelled.add_metric([service], n)
        yield from (requests, errors, in_flight, latency, ttfb, tokens, ejected, rejected, held, held_wait, cancelled)


def _cumulative(per_bucket: list[int]) -> list[tuple[str, int]]:
    out, running = [], 0
    for le, n in zip(_LE, per_bucket, strict=True):
        running += n
        out.append((le, running))
    return out


# completion tokens in a response (JSON body or server-sent events) ---------------------------------
_KEY = b'"completion_tokens"'
_PROMPT_KEY = b'"prompt_tokens"'
_VALUE = re.compile(rb"\s*:\s*(\d{1,12})")
_TAIL = 64  # a `"completion_tokens": N` split across two chunks is found in the last bytes + the next ones
_JOIN = 4096  # chunks up to this are searched joined to the tail (one search); larger ones are not copied


class UsageScan:
    """The completion tokens a response reports, read from its chunks as they pass (nothing is buffered:
    the last `_TAIL` bytes are kept to find a key split across two chunks). The largest count wins: a
    stream with continuous usage stats repeats a growing count in every event. The Lua code does the same."""

    __slots__ = ("prompt_tokens", "tail", "tokens")

    def __init__(self) -> None:
        self.tail = b""
        self.tokens: int | None = None
        self.prompt_tokens: int | None = None  # likewise `"prompt_tokens"` (metering)

    def feed(self, chunk: bytes) -> None:
        if len(chunk) <= _JOIN:  # the usual chunk (an event, a small JSON body): one search over tail + chunk
            data = self.tail + chunk
            self._scan(data)
            self.tail = data[-_TAIL:]
            return
        self._scan(self.tail + chunk[:_TAIL])
        self._scan(chunk)
        self.tail = chunk[-_TAIL:]

    def _scan(self, text: bytes) -> None:
        at = text.find(_KEY)  # (a plain search first: most chunks of a stream hold no usage)
        if at < 0:
            return
        # A usage object holds both counts, the prompt's a few bytes from the completion's (within the kept tail when
        # a chunk splits them): looked for only where the completion count is, so other chunks cost one search.
        self.prompt_tokens = _largest(text, _PROMPT_KEY, self.prompt_tokens)
        while at >= 0:
            match = _VALUE.match(text, at + len(_KEY))
            if match is not None:
                value = int(match.group(1))
                if self.tokens is None or value > self.tokens:
                    self.tokens = value
            at = text.find(_KEY, at + len(_KEY))


def _largest(text: bytes, key: bytes, best: int | None) -> int | None:
    at = text.find(key)
    while at >= 0:
        match = _VALUE.match(text, at + len(key))
        if match is not None and (best is None or int(match.group(1)) > best):
            best = int(match.group(1))
        at = text.find(key, at + len(key))
    return best
