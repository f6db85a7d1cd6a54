"""The load math: histogram quantiles as Prometheus interpolates them, differences of cumulative counters
(resets included), window selection, figures and the chart steps; and the counters' exposition."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from corral.domain.load import (
    BUCKETS,
    Counts,
    Sample,
    Tick,
    bucket_index,
    departures,
    figures,
    held_wait_ms,
    histogram_quantile,
    in_window,
    prunable,
    step_end,
    steps,
    tick,
)
from corral.gateway.nginx_plane import parse_stats
from corral.gateway.stats import TrafficStats, UsageScan

BOUNDS = (0.1, 0.2, 0.4, math.inf)


def test_bucket_index_follows_le() -> None:
    assert bucket_index(0.0, BOUNDS) == 0
    assert bucket_index(0.1, BOUNDS) == 0  # le: an observation equal to a bound is in that bucket
    assert bucket_index(0.1000001, BOUNDS) == 1
    assert bucket_index(1e9, BOUNDS) == 3
    assert BUCKETS[0] == 0.001 and BUCKETS[-2] == 60.0 and math.isinf(BUCKETS[-1])
    assert list(BUCKETS) == sorted(BUCKETS) and len(set(BUCKETS)) == len(BUCKETS)


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    # 10 in (0, 0.1], 10 in (0.1, 0.2]: the median is the top of the first bucket; p75 halfway up the second
    counts = {0: 10, 1: 10}
    assert histogram_quantile(0.5, counts, BOUNDS) == pytest.approx(0.1)
    assert histogram_quantile(0.75, counts, BOUNDS) == pytest.approx(0.15)
    assert histogram_quantile(0.25, counts, BOUNDS) == pytest.approx(0.05)  # the lowest bucket starts at 0
    assert histogram_quantile(1.0, counts, BOUNDS) == pytest.approx(0.2)
    # empty buckets in between are skipped
    assert histogram_quantile(0.9, {0: 1, 2: 9}, BOUNDS) == pytest.approx(0.2 + 0.2 * (0.9 * 10 - 1) / 9)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, {0: 1, 3: 99}, BOUNDS) == 0.4


def test_quantile_of_nothing_is_none_and_q_is_checked() -> None:
    assert histogram_quantile(0.5, {}, BOUNDS) is None
    assert histogram_quantile(0.5, {1: 0}, BOUNDS) is None
    with pytest.raises(ValueError):
        histogram_quantile(1.5, {0: 1}, BOUNDS)


@given(st.dictionaries(st.integers(0, len(BUCKETS) - 1), st.integers(1, 1000), min_size=1),
       st.floats(0, 1), st.floats(0, 1))
def test_quantiles_are_monotonic_and_within_the_observed_buckets(counts, q1, q2) -> None:
    lo, hi = sorted((q1, q2))
    a, b = histogram_quantile(lo, counts), histogram_quantile(hi, counts)
    assert a is not None and b is not None and a <= b + 1e-12
    top = max(counts)
    assert 0 <= a and b <= (BUCKETS[top] if not math.isinf(BUCKETS[top]) else BUCKETS[-2])


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=200), st.floats(0.01, 0.99))
def test_quantile_lands_in_the_bucket_of_the_true_quantile(values, q) -> None:
    counts: dict[int, int] = {}
    for v in values:
        counts[bucket_index(v)] = counts.get(bucket_index(v), 0) + 1
    estimate = histogram_quantile(q, counts)
    ordered = sorted(values)
    true = ordered[max(0, math.ceil(q * len(values)) - 1)]
    index = bucket_index(true)
    lower = BUCKETS[index - 1] if index else 0.0
    upper = BUCKETS[index] if not math.isinf(BUCKETS[index]) else BUCKETS[-2]
    assert lower - 1e-9 <= estimate <= upper + 1e-9


def test_differences_of_cumulative_counts_and_a_reset() -> None:
    before = Counts(10, 1, {0: 8, 3: 2}, {1: 4}, 100, 5)
    after = Counts(15, 1, {0: 12, 3: 3}, {1: 5}, 130, 7)
    assert after.since(before) == Counts(5, 0, {0: 4, 3: 1}, {1: 1}, 30, 2)
    restarted = Counts(2, 0, {0: 2}, {}, 0, 0)  # nginx restarted: its shared memory starts empty
    assert restarted.since(before) == restarted
    assert (before + after).latency == {0: 20, 3: 5}


def sample(counts: dict, in_flight: dict | None = None) -> Sample:
    return Sample(counts, in_flight or {})


def test_tick_keeps_only_pairs_that_moved() -> None:
    a, b = ("s", "r1"), ("s", "r2")
    first = sample({a: Counts(1, 0, {0: 1}), b: Counts(3, 0, {0: 3})})
    second = sample({a: Counts(1, 0, {0: 1}), b: Counts(5, 1, {0: 4, 2: 1}), ("s", "r3"): Counts(1, 0, {1: 1})},
                    {a: 2, b: 0})
    t = tick(first, second, 1000.0, 1.0, {"s": 3})
    assert t.deltas == {b: Counts(2, 1, {0: 1, 2: 1}), ("s", "r3"): Counts(1, 0, {1: 1})}
    assert t.in_flight == {a: 2} and t.capacity == {"s": 3}
    assert tick(None, second, 1000.0, 1.0, {}).deltas == {}  # the first reading has no past to compare with


def ticks_every_second(n: int, start: float = 1000.0) -> list[Tick]:
    return [Tick(start + i, 1.0, {("s", "r"): Counts(i, 0, {0: i})}, {}, {"s": 1}) for i in range(1, n + 1)]


def test_window_takes_the_ticks_of_the_last_seconds() -> None:
    ticks = ticks_every_second(100)
    assert len(in_window(ticks, 30)) == 30 and in_window(ticks, 30)[-1] is ticks[-1]
    assert len(in_window(ticks, 300)) == 100  # no more than there is
    assert in_window([], 30) == []


def test_figures_rates_percentiles_and_tokens() -> None:
    f = figures(Counts(30, 3, {bucket_index(0.012): 30}, {bucket_index(0.004): 10}, 600, 30), 30.0)
    assert f.requests_per_s == 1.0 and f.errors_per_s == 0.1 and f.tokens_per_s == 20.0
    assert 10.0 <= f.latency_ms[0] <= 15.0 and f.latency_ms[0] <= f.latency_ms[1] <= f.latency_ms[2] <= 15.0
    assert 2.5 <= f.ttfb_ms[0] <= 5.0
    quiet = figures(Counts(), 30.0)
    assert quiet.requests_per_s == 0.0 and quiet.latency_ms == (None, None, None) and quiet.ttfb_ms == (None, None)
    assert quiet.tokens_per_s is None  # no usage seen: unknown, not zero
    assert figures(Counts(5), 0.0).requests_per_s == 0.0


def test_steps_group_ticks_by_wall_clock_multiples_of_five() -> None:
    assert step_end(1000.0) == 1000 and step_end(1000.2) == 1005 and step_end(1004.9) == 1005
    grouped = steps(ticks_every_second(12, start=999.0))  # ticks end at 1000 .. 1011
    assert [s.end for s in grouped] == [1000, 1005, 1010, 1015]
    point = grouped[1].point("s")  # ticks at 1001..1005: 2+3+4+5+6 requests over 5 s
    assert point.t == 1005 and point.requests_per_s == 4.0 and point.capacity == 1 and point.p95_ms is not None
    assert grouped[1].point("unknown").requests_per_s == 0.0


def test_python_counters_and_their_exposition() -> None:
    stats = TrafficStats()
    stats.start("a-nlb", "r1")
    stats.start("a-nlb", "r1")
    stats.finish("a-nlb", "r1", 0.012, False, ttfb=0.004, tokens=7)
    stats.rejected[("a-nlb", 503)] += 1
    stats.ejected = {"r2"}
    s = stats.sample()
    assert s.in_flight == {("a-nlb", "r1"): 1}
    assert s.counts[("a-nlb", "r1")] == Counts(1, 0, {bucket_index(0.012): 1}, {bucket_index(0.004): 1}, 7, 1)
    families = {f.name: f for f in text_string_to_metric_families(stats.prometheus())}
    assert set(families) >= {"corral_gateway_requests", "corral_gateway_errors", "corral_gateway_in_flight",
                             "corral_gateway_request_seconds", "corral_gateway_ttfb_seconds",
                             "corral_gateway_completion_tokens", "corral_gateway_ejected", "corral_gateway_rejected"}
    assert families["corral_gateway_request_seconds"].type == "histogram"
    buckets = [x for x in families["corral_gateway_request_seconds"].samples if x.name.endswith("_bucket")]
    assert len(buckets) == len(BUCKETS) and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1
    assert {x.labels["le"]: x.value for x in buckets}["0.015"] == 1 and {x.labels["le"]: x.value for x in buckets}["0.01"] == 0
    text = stats.prometheus()
    assert 'corral_gateway_requests_total{replica="r1",service="a-nlb"} 1.0' in text  # prometheus_client sorts labels
    assert 'corral_gateway_rejected_total{code="503",service="a-nlb"} 1.0' in text
    assert 'corral_gateway_ejected{replica="r2"} 1.0' in text


def test_nginx_counters_read_the_same() -> None:
    """The Lua keys (corral_gateway.lua) parse into the same counters as the Python plane keeps."""
    raw = {"rq:a-nlb|r1": 2, "er:a-nlb|r1": 1, "lt:a-nlb|r1": 0.03, "lb:a-nlb|r1|5": 2, "tb:a-nlb|r1|2": 1,
           "ts:a-nlb|r1": 0.004, "tk:a-nlb|r1": 9, "tu:a-nlb|r1": 1, "if:r1": 1, "ip:a-nlb|r1": 1, "ip:b-nlb|r1": 0,
           "ej:r2": True, "rj:|404": 3, "lb:a-nlb|r1|999": 5}
    stats = parse_stats(raw)
    s = stats.sample()
    assert s.counts[("a-nlb", "r1")] == Counts(2, 1, {5: 2}, {2: 1}, 9, 1)
    assert s.in_flight == {("a-nlb", "r1"): 1}
    assert stats.in_flight_by_replica == {"r1": 1} and set(stats.ejected) == {"r2"} and stats.rejected == {("", 404): 3}
    assert stats.replica_summary({"r1"}) == {"r1": {"requests": 2, "errors": 1, "inFlight": 1, "meanLatencyMs": 15.0}}


@given(st.binary(max_size=300), st.integers(0, 10**9), st.lists(st.integers(1, 80), max_size=20))
def test_usage_is_found_however_the_body_is_cut(prefix, tokens, cuts) -> None:
    body = prefix.replace(b"completion_tokens", b"") + b'{"usage": {"completion_tokens": ' + str(tokens).encode() + b"}}"
    scan = UsageScan()
    at = 0
    for size in cuts:
        scan.feed(body[at:at + size])
        at += size
    scan.feed(body[at:])
    assert scan.tokens == tokens


def test_usage_in_a_stream_takes_the_largest_count() -> None:
    scan = UsageScan()
    for n in (1, 2, 3):  # continuous usage stats: a growing count in every event
        scan.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": %d}}\n\n' % n)
    scan.feed(b"data: [DONE]\n\n")
    assert scan.tokens == 3
    nothing = UsageScan()
    nothing.feed(b'{"usage": null, "completion_tokens_details": {"reasoning_tokens": 5}}')
    assert nothing.tokens is None


def test_the_grafana_dashboard_queries_metrics_that_exist() -> None:
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[2] / "deploy/grafana/corral-dashboard.json").read_text())
    queried = {name for p in dashboard["panels"] for t in p["targets"] for name in re.findall(r"corral_[a-z_]+", t["expr"])}
    stats = TrafficStats()
    stats.finish("s", "r", 0.1, True, ttfb=0.01, tokens=1)
    stats.start("s", "r")
    stats.ejected, stats.rejected[("s", 503)] = {"r"}, 1
    exposed = {sample.name for f in text_string_to_metric_families(stats.prometheus()) for sample in f.samples}
    assert queried <= exposed | {"corral_pool_pods"}
    assert {"corral_gateway_request_seconds_bucket", "corral_gateway_ttfb_seconds_bucket", "corral_gateway_in_flight",
            "corral_gateway_rejected_total", "corral_gateway_errors_total"} <= queried


async def test_the_monitor_builds_the_views_from_its_samples() -> None:
    """Samples from a fake data plane: the service's figures, the replicas it routes to (idle ones too) and
    those that served it in the window, in-flight, the series, and `load` events only while watched."""
    from corral.domain.errors import InvalidInput, NotFound
    from corral.events import EventBus
    from corral.gateway.monitor import LoadMonitor
    from corral.gateway.routing import Route, Target
    from corral.views import BusinessServiceView

    readings: list[Sample] = []

    async def read() -> Sample:
        return readings.pop(0)

    def service(name: str) -> BusinessServiceView:
        return BusinessServiceView(name=name, displayName=name, businessTag="b", modelName="m", modelPool="pool", baseUrl=None,
                                   isExternal=False, llmRouting=False, type="ClusterIP", selector={}, labels={}, replicas=2,
                                   readyReplicas=2, createdAt=None)

    table = {"a-nlb": Route("a-nlb", "m", "b", "pool", (Target("r1", "http://x:1"), Target("r2", "http://x:2")))}
    bus = EventBus()
    monitor = LoadMonitor(read, lambda: table, lambda: [service("a-nlb"), service("b-nlb")], bus)
    fast = bucket_index(0.012)
    readings += [Sample({}, {}),
                 Sample({("a-nlb", "r1"): Counts(10, 1, {fast: 10}, {}, 40, 10), ("b-nlb", "old"): Counts(2, 0, {fast: 2})},
                        {("a-nlb", "r1"): 3})]
    with bus.subscribe() as queue:
        await monitor.step()
        await monitor.step()
        assert queue.empty()  # nobody watches: no event
        stop = monitor.watch()
        readings.append(Sample({("a-nlb", "r1"): Counts(10, 1, {fast: 10}, {}, 40, 10)}, {}))
        await monitor.step()
        stop()
        stop()  # twice changes nothing
        assert monitor.watchers == 0
        message = queue.get_nowait()
    assert message["type"] == "load" and [s["service"] for s in message["data"]["services"]] == ["a-nlb", "b-nlb"]
    a = monitor.service("a-nlb", 30)
    assert a.requestsPerSecond > 0 and a.errorsPerSecond > 0 and a.tokensPerSecond is not None and a.inFlight == 0
    assert 10 <= a.latencyMs.p50 <= 15 and a.ttfbMs.p50 is None and a.readyReplicas == 2 and a.pool == "pool"
    assert [r.pod for r in a.replicas] == ["r1", "r2"] and a.replicas[1].requestsPerSecond == 0.0
    assert a.series and a.series[-1].capacity == 2 and sum(p.requestsPerSecond for p in a.series) > 0
    b = monitor.snapshot(30).services[1]
    assert [r.pod for r in b.replicas] == ["old"]  # not routed to any more, but it served b-nlb in the window
    assert b.series[-1].capacity == 0
    with pytest.raises(NotFound):
        monitor.service("nope", 30)
    with pytest.raises(InvalidInput):
        monitor.snapshot(4)


def test_held_requests_are_counted_now_and_their_wait_in_a_histogram() -> None:
    """The activator's counters (proxy.py): held now per service, their wait once they leave the hold; the
    same from nginx's keys; through a tick into the window's p50/p95 and the exposition."""
    stats = TrafficStats()
    stats.hold("a-nlb")
    stats.hold("a-nlb")
    stats.unhold("a-nlb", 0.3)
    before = stats.sample()
    assert before.held == {"a-nlb": 1} and before.held_wait == {"a-nlb": {bucket_index(0.3): 1}}
    stats.unhold("a-nlb", 2.0)
    after = stats.sample()
    assert after.held == {}
    moved = tick(before, after, 10.0, 1.0, {})
    assert moved.held == {} and moved.held_wait == {"a-nlb": {bucket_index(2.0): 1}}
    assert tick(before, before, 9.0, 1.0, {}).held == {"a-nlb": 1}
    p50, p95 = held_wait_ms([tick(Sample({}, {}), before, 9.0, 1.0, {}), moved])["a-nlb"]
    assert p50 is not None and p95 is not None and 200 <= p50 <= p95 <= 2000
    text = stats.prometheus()
    assert 'corral_gateway_held_seconds_count{service="a-nlb"} 2.0' in text
    assert 'corral_gateway_held_seconds_sum{service="a-nlb"} 2.3' in text
    stats.hold("b-nlb")
    assert 'corral_gateway_held{service="b-nlb"} 1.0' in stats.prometheus()
    # nginx's keys (corral_gateway.lua) read the same
    raw = {"hq:b-nlb": 1, "hq:a-nlb": 0, f"hb:a-nlb|{bucket_index(0.3)}": 1,
           f"hb:a-nlb|{bucket_index(2.0)}": 1, "hs:a-nlb": 2.3, "hb:a-nlb|999": 4}
    nginx = parse_stats(raw).sample()
    assert nginx.held == stats.sample().held and nginx.held_wait == stats.sample().held_wait
    # a data plane that restarted (nginx's shared memory starts empty): what it counted since is new
    restarted = Sample({}, {}, held_wait={"a-nlb": {bucket_index(0.01): 1}})
    assert tick(after, restarted, 11.0, 1.0, {}).held_wait == {"a-nlb": {bucket_index(0.01): 1}}


# counters of replicas and services that left (issue 25, part 5) ------------------------------------------------
@given(tables=st.lists(st.sets(st.sampled_from("abcdef")), min_size=1, max_size=8), retention=st.integers(0, 3))
def test_who_left_is_pruned_after_the_retention_unless_busy_or_back(tables: list[set[str]], retention: int) -> None:
    """One table a second: a name is prunable once it has been out of every table for `retention` seconds in a row
    (checked against a recount), and never while busy."""
    departed: dict[str, float] = {}
    before: set[str] = set()
    for now, table in enumerate(tables):
        departed = departures(before, table, departed, float(now))
        before = table
        for name in "abcdef":
            seen = [i for i, t in enumerate(tables[:now + 1]) if name in t]
            out_since = seen[-1] + 1 if seen and seen[-1] < now else None  # left at the table after its last one
            assert (name in departed) == (out_since is not None)
            if out_since is not None:
                assert departed[name] == out_since
        assert prunable(departed, float(now), retention) == sorted(n for n, at in departed.items() if now - at >= retention)
        assert prunable(departed, float(now), retention, busy=set("abcdef")) == []


def test_pruned_counters_leave_the_samples_and_add_nothing_to_a_tick() -> None:
    stats = TrafficStats()
    for service, replica in [("a", "r1"), ("a", "r2"), ("b", "r1")]:
        stats.start(service, replica)
        stats.finish(service, replica, 0.01, False)
    stats.rejected[("b", 503)] += 2
    stats.hold("b")
    stats.unhold("b", 0.5)
    stats.cancel("b")
    before = stats.sample()
    stats.prune(replicas={"r2"}, services={"b"})
    after = stats.sample()
    assert set(after.counts) == {("a", "r1")} and after.unserved == {} and after.held_wait == {}
    assert after.client_cancelled == {} and stats.rejected == {} and stats.held_wait_sum == {}
    assert tick(before, after, 1.0, 1.0, {}).deltas == {}  # gone, not negative
    stats.start("a", "r2")  # back: counted from zero, a new pair
    stats.finish("a", "r2", 0.01, True)
    assert tick(after, stats.sample(), 2.0, 1.0, {}).deltas[("a", "r2")].errors == 1


@pytest.mark.parametrize("from_zero", [True, False])
async def test_traffic_before_a_late_first_reading_is_in_the_window_when_the_counters_started_with_us(
        from_zero: bool) -> None:
    """A data plane whose first reading comes late (a loaded machine, a slow nginx: the reading failed or was not
    due yet) has already served traffic. Counters that started at zero with this control plane count from an
    empty reading taken at start; an adopted nginx's counters ran before, so its first reading is the baseline."""
    from corral.events import EventBus
    from corral.gateway.monitor import LoadMonitor

    readings = [Sample({("a-nlb", "r1"): Counts(50, 0, {bucket_index(0.012): 50})}, {})]

    async def read() -> Sample:
        return readings[0]

    monitor = LoadMonitor(read, dict, lambda: [], EventBus(), interval_s=60)  # no reading of its own in the test
    monitor.start(counters_from_zero=from_zero)
    await monitor.close()
    await monitor.step()  # the first reading, after the 50 requests
    counted = sum(d.requests for t in monitor._ticks for d in t.deltas.values())
    assert counted == (50 if from_zero else 0)
