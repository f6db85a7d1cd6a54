"""Load over a sliding window: the pure half of performance monitoring (spec 01, phase 4).

Both data planes keep *cumulative* counters per (service, replica): requests, errors, a latency
histogram, a time-to-first-byte histogram for streamed responses, and completion tokens where the
engine reported `usage`. The control plane samples them once a second; the difference between two
samples is a `Tick`, and every window figure is a sum of ticks: rates are counts over the ticks'
seconds, percentiles are interpolated in the summed histogram as Prometheus' `histogram_quantile`
does. Why differences of cumulative counters rather than events pushed to the control plane: the
data plane's hot path only increments numbers (nginx keeps them in shared memory, where a push per
request would cost a round trip), a missed sample loses no request (the next difference has it), and
the same counters feed `/api/metrics`, so Prometheus and Corral's own view cannot disagree.

Histograms are kept as counts per bucket (not cumulative, sparse: bucket index → count), so a tick
stores only the buckets that moved; `BUCKETS` are the upper bounds, the same on both data planes
(the nginx configuration is rendered from this tuple).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Upper bounds (seconds) of the latency and first-byte histograms; +Inf last. Fine-grained from 1 ms to
# 60 s so that percentiles interpolated inside one bucket stay within ~25-50% of the truth anywhere in
# the range a chat completion lives in (a few ms through the gateway to a minute of generation).
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, math.inf,
)
WINDOW_DEFAULT_S = 30
WINDOW_MIN_S = 5
WINDOW_MAX_S = 300  # also how much history the control plane keeps (one tick a second)
SERIES_STEP_S = 5  # one chart point per 5 s over the last WINDOW_MAX_S

Pair = tuple[str, str]  # (service, replica)


def bucket_index(seconds: float, bounds: Sequence[float] = BUCKETS) -> int:
    """The bucket an observation falls in: the first whose upper bound is >= it (Prometheus' `le`)."""
    return bisect_left(bounds, seconds)


def histogram_quantile(q: float, counts: Mapping[int, int], bounds: Sequence[float] = BUCKETS) -> float | None:
    """The q-quantile (0 <= q <= 1) of a histogram given as counts per bucket index, interpolated
    linearly inside the bucket it falls in, exactly as Prometheus' `histogram_quantile`: the lowest
    bucket starts at 0; a quantile in the +Inf bucket is the highest finite bound. None when empty."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} outside [0, 1]")
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = q * total
    below = 0
    for index in sorted(counts):
        count = counts[index]
        if count <= 0:
            continue
        if below + count >= rank:
            upper = bounds[index]
            if math.isinf(upper):
                return bounds[-2] if len(bounds) > 1 else None
            lower = bounds[index - 1] if index > 0 else 0.0
            return lower + (upper - lower) * max(rank - below, 0.0) / count
        below += count
    return None  # unreachable: the counts add up to total


def _merged(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass(frozen=True, slots=True)
class Counts:
    """Counters of one (service, replica): cumulative as read from a data plane, or a difference."""

    requests: int = 0
    errors: int = 0
    latency: Mapping[int, int] = field(default_factory=dict)  # bucket index → requests, time to the response's end
    ttfb: Mapping[int, int] = field(default_factory=dict)  # bucket index → streamed responses, time to their first byte
    tokens: int = 0  # completion tokens of the responses that reported usage
    usage: int = 0  # responses that reported usage

    def since(self, earlier: Counts) -> Counts:
        """What happened between `earlier` and these counters. Counters only grow; any that went back means
        the data plane restarted (nginx's shared memory starts empty), so everything counted is new."""
        if (self.requests < earlier.requests or self.errors < earlier.errors or self.tokens < earlier.tokens
                or self.usage < earlier.usage or sum(self.ttfb.values()) < sum(earlier.ttfb.values())):
            return self
        return Counts(self.requests - earlier.requests, self.errors - earlier.errors,
                      _difference(self.latency, earlier.latency), _difference(self.ttfb, earlier.ttfb),
                      self.tokens - earlier.tokens, self.usage - earlier.usage)

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors, _merged(self.latency, other.latency),
                      _merged(self.ttfb, other.ttfb), self.tokens + other.tokens, self.usage + other.usage)


def _difference(now: Mapping[int, int], before: Mapping[int, int]) -> dict[int, int]:
    return {k: d for k, v in now.items() if (d := v - before.get(k, 0)) > 0}


def total(counts: Iterable[Counts]) -> Counts:
    out = Counts()
    for c in counts:
        out = out + c
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of a data plane: cumulative counts and the requests in flight now, per pair."""

    counts: Mapping[Pair, Counts]
    in_flight: Mapping[Pair, int]
    # service → requests the gateway answered itself for want of a replica (503/504), cumulative: demand
    # that no replica saw, which the autopilot must see (a business with traffic and no replica)
    unserved: Mapping[str, int] = field(default_factory=dict)
    # service → requests the gateway holds now, waiting for a replica to be assigned or to free up (the
    # activator): demand no replica has seen yet
    held: Mapping[str, int] = field(default_factory=dict)
    # service → how long held requests waited (bucket index → requests, cumulative), counted when they leave
    # the hold: served, refused past the deadline, or their service gone
    held_wait: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    # service → requests whose client disconnected before their response ended, cumulative
    client_cancelled: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Tick:
    """What happened between two samples: `seconds` long, ending at unix time `t`."""

    t: float
    seconds: float
    deltas: Mapping[Pair, Counts]  # only the pairs that moved
    in_flight: Mapping[Pair, int]  # at `t`, nonzero only
    capacity: Mapping[str, int]  # ready replicas each service routed to at `t`
    unserved: Mapping[str, int] = field(default_factory=dict)  # service → requests answered 503/504 by the gateway
    held: Mapping[str, int] = field(default_factory=dict)  # service → requests held at `t`, nonzero only
    held_wait: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # service → waits ended, per bucket
    client_cancelled: Mapping[str, int] = field(default_factory=dict)  # service → requests whose client left first


def tick(previous: Sample | None, current: Sample, t: float, seconds: float, capacity: Mapping[str, int]) -> Tick:
    """The tick between two samples (the first sample only starts the count: no tick of history before it)."""
    deltas: dict[Pair, Counts] = {}
    if previous is not None:
        for pair, now in current.counts.items():
            before = previous.counts.get(pair)
            if before is None:
                if now.requests or now.ttfb or now.usage:
                    deltas[pair] = now
            elif now != before:
                moved = now.since(before)
                if moved.requests or moved.ttfb or moved.usage or moved.errors:
                    deltas[pair] = moved
    unserved = _moved(previous.unserved, current.unserved) if previous is not None else {}
    cancelled = _moved(previous.client_cancelled, current.client_cancelled) if previous is not None else {}
    held_wait: dict[str, dict[int, int]] = {}
    if previous is not None:
        for service, now_wait in current.held_wait.items():
            before_wait = previous.held_wait.get(service, {})
            if sum(now_wait.values()) < sum(before_wait.values()):  # went back: the data plane restarted
                moved_wait = dict(now_wait)
            else:
                moved_wait = _difference(now_wait, before_wait)
            if moved_wait:
                held_wait[service] = moved_wait
    return Tick(t, seconds, deltas, {p: n for p, n in current.in_flight.items() if n > 0}, capacity, unserved,
                {s: n for s, n in current.held.items() if n > 0}, held_wait, cancelled)


# Counters of replicas and services that left (issue 25: bounded memory) --------------------------------------
# A data plane keeps cumulative counters per (service, replica); the load window is made of the differences
# between samples (`Tick`), so once a replica left every route and its last requests ended, the next sample has
# its final counts and its counters serve nothing more: after `COUNTERS_RETENTION_S` they are dropped (a pair
# missing from a sample adds nothing to a tick; one that comes back starts from zero, a new pair).
COUNTERS_RETENTION_S = 60.0


def departures(before: Collection[str], after: Collection[str], departed: Mapping[str, float],
               now: float) -> dict[str, float]:
    """Who is gone (name → when it left) once `after` replaces `before`: those that left now, and those that left
    earlier and did not come back."""
    out = {name: at for name, at in departed.items() if name not in after}
    for name in before:
        if name not in after and name not in out:
            out[name] = now
    return out


def prunable(departed: Mapping[str, float], now: float, retention_s: float = COUNTERS_RETENTION_S,
             busy: Container[str] = ()) -> list[str]:
    """Those gone for at least `retention_s` and with nothing in flight (`busy`): their counters may go."""
    return sorted(name for name, at in departed.items() if now - at >= retention_s and name not in busy)


def _moved(before: Mapping[str, int], now: Mapping[str, int]) -> dict[str, int]:
    """Per-service counters' growth between two samples (one that went back: the data plane restarted)."""
    out = {}
    for service, now_n in now.items():
        before_n = before.get(service, 0)
        moved_n = now_n if now_n < before_n else now_n - before_n
        if moved_n > 0:
            out[service] = moved_n
    return out


def client_cancelled(ticks: Sequence[Tick]) -> dict[str, int]:
    """Service → requests whose client disconnected before their response ended, over these ticks."""
    totals: dict[str, int] = {}
    for t in ticks:
        for service, n in t.client_cancelled.items():
            totals[service] = totals.get(service, 0) + n
    return totals


def unserved_per_second(ticks: Sequence[Tick]) -> dict[str, float]:
    """Service → requests per second the gateway answered itself for want of a replica, over these ticks."""
    seconds = sum(t.seconds for t in ticks)
    totals: dict[str, int] = {}
    for t in ticks:
        for service, n in t.unserved.items():
            totals[service] = totals.get(service, 0) + n
    return {service: n / seconds for service, n in totals.items()} if seconds > 0 else {}


def held_wait_ms(ticks: Sequence[Tick]) -> dict[str, tuple[float | None, float | None]]:
    """Service → (p50, p95) in milliseconds of how long its held requests waited, over these ticks (only the
    services whose held requests left the hold in them)."""
    summed: dict[str, dict[int, int]] = {}
    for t in ticks:
        for service, waits in t.held_wait.items():
            summed[service] = _merged(summed.get(service, {}), waits)
    return {service: (_ms(histogram_quantile(0.5, waits)), _ms(histogram_quantile(0.95, waits)))
            for service, waits in summed.items()}


def in_window(ticks: Sequence[Tick], seconds: float) -> Sequence[Tick]:
    """The ticks that end within the last `seconds` before the newest one (a sampling period's tolerance:
    a 30 s window of 1 s ticks is 30 ticks, not 29 or 31)."""
    if not ticks:
        return ticks
    newest = ticks[-1].t
    start = len(ticks)
    while start > 0 and ticks[start - 1].t > newest - seconds + 0.5:
        start -= 1
    return ticks[start:]


@dataclass(frozen=True, slots=True)
class Figures:
    """Window figures of a service or a replica (latency and first byte in milliseconds)."""

    requests_per_s: float
    errors_per_s: float
    latency_ms: tuple[float | None, float | None, float | None]  # p50, p95, p99; None without requests
    ttfb_ms: tuple[float | None, float | None]  # p50, p95; None without streamed responses
    tokens_per_s: float | None  # None when no response in the window reported usage


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def figures(counts: Counts, seconds: float) -> Figures:
    """Rates over `seconds` (0 when no time elapsed yet) and percentiles of `counts`."""
    per_s = (lambda n: round(n / seconds, 3)) if seconds > 0 else (lambda n: 0.0)
    return Figures(
        requests_per_s=per_s(counts.requests),
        errors_per_s=per_s(counts.errors),
        latency_ms=(_ms(histogram_quantile(0.5, counts.latency)), _ms(histogram_quantile(0.95, counts.latency)),
                    _ms(histogram_quantile(0.99, counts.latency))),
        ttfb_ms=(_ms(histogram_quantile(0.5, counts.ttfb)), _ms(histogram_quantile(0.95, counts.ttfb))),
        tokens_per_s=per_s(counts.tokens) if counts.usage else None,
    )


@dataclass(frozen=True, slots=True)
class Point:
    """One chart point of a service: the `SERIES_STEP_S` seconds ending at `t`."""

    t: int
    requests_per_s: float
    p95_ms: float | None
    capacity: int


def step_end(t: float, step: int = SERIES_STEP_S) -> int:
    """The end of the chart step a tick ending at `t` belongs to: steps are aligned to multiples of `step`
    of wall clock, so a point keeps its place from one redraw to the next."""
    return math.ceil(t / step) * step


class Step:
    """The ticks of one chart step, summed per service as they arrive (a tick is added once, so the chart
    of the last 5 minutes costs one pass over each tick, not one per redraw)."""

    __slots__ = ("end", "seconds", "requests", "latency", "capacity")

    def __init__(self, end: int) -> None:
        self.end = end
        self.seconds = 0.0
        self.requests: dict[str, int] = {}
        self.latency: dict[str, dict[int, int]] = {}
        self.capacity: Mapping[str, int] = {}

    def add(self, tick: Tick) -> None:
        self.seconds += tick.seconds
        self.capacity = tick.capacity
        for (service, _), delta in tick.deltas.items():
            self.requests[service] = self.requests.get(service, 0) + delta.requests
            histogram = self.latency.setdefault(service, {})
            for k, v in delta.latency.items():
                histogram[k] = histogram.get(k, 0) + v

    def point(self, service: str) -> Point:
        """The service's point; a step still filling is rated over the seconds it has so far."""
        requests = self.requests.get(service, 0)
        rate = round(requests / self.seconds, 3) if self.seconds > 0 else 0.0
        return Point(self.end, rate, _ms(histogram_quantile(0.95, self.latency.get(service, {}))),
                     self.capacity.get(service, 0))


def steps(ticks: Iterable[Tick], step: int = SERIES_STEP_S) -> list[Step]:
    """`ticks` (oldest first) grouped into chart steps."""
    out: list[Step] = []
    for t in ticks:
        end = step_end(t.t, step)
        if not out or out[-1].end != end:
            out.append(Step(end))
        out[-1].add(t)
    return out
