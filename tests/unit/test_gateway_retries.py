"""Issue 25, parts 1 and 2, the pure half: which failures may go to another replica, the retry budget over its
window (checked against a plain recount of the events), the nginx plane's rendering of both, and the
`client_cancelled` counter from either plane through a tick into the load view and the exposition."""

from __future__ import annotations

import math
from pathlib import Path

import aiohttp
from hypothesis import given
from hypothesis import strategies as st

from corral.domain.load import Counts, Sample, client_cancelled, tick
from corral.domain.retries import AttemptFailure, RetryBudget, RetryWindow, retryable
from corral.gateway.nginx_plane import parse_stats, render_config
from corral.gateway.policies import LeastOutstanding
from corral.gateway.proxy import NOT_RETRIED, Gateway, GatewayLimits, budget_spent_suffix, not_retried
from corral.gateway.stats import TrafficStats


def test_only_a_failure_before_any_byte_was_written_is_retryable() -> None:
    assert [f for f in AttemptFailure if retryable(f)] == [AttemptFailure.CONNECT]
    # every other failure has its answer, and says why it is not retried
    assert {f for f in AttemptFailure if not retryable(f)} == set(NOT_RETRIED)
    assert not_retried("r1", AttemptFailure.DROPPED)[0] == 502 and not_retried("r1", AttemptFailure.SILENT)[0] == 504
    assert not_retried("r1", AttemptFailure.SILENT)[1].startswith("replica 'r1' did not answer in time")


def test_the_budget_is_a_share_of_the_requests_with_a_floor() -> None:
    budget = RetryBudget(percent=20, min_retries=3)
    assert budget.allows(0, 2) and not budget.allows(0, 3)  # a quiet service still gets its few retries
    assert budget.allows(100, 19) and not budget.allows(100, 20)  # 20% of 100
    assert not RetryBudget(percent=0, min_retries=0).allows(10**6, 0)  # never
    assert "20% of requests retried over 10 s, or 3" in budget_spent_suffix(budget)


def test_the_window_forgets_what_is_older_than_it() -> None:
    window = RetryWindow(RetryBudget(percent=0, min_retries=2, window_s=10))
    assert window.try_retry(100.2) and window.try_retry(105.0) and not window.try_retry(109.9)
    assert window.counts(109.9) == (0, 2)
    assert window.try_retry(110.0)  # the retry of second 100 left the window
    assert window.counts(125.0) == (0, 0)


@given(percent=st.sampled_from([0.0, 10.0, 20.0, 50.0, 100.0]), min_retries=st.integers(0, 4),
       window_s=st.integers(1, 12),
       events=st.lists(st.tuples(st.floats(0, 3, allow_nan=False), st.booleans()), max_size=80))
def test_a_retry_is_allowed_exactly_when_the_recount_of_the_window_allows_it(
        percent: float, min_retries: int, window_s: int, events: list[tuple[float, bool]]) -> None:
    """Against a plain recount of every event in the window (the current second and the `window_s - 1` before it):
    the same decisions, and so never more retries in a window than the budget allows."""
    budget = RetryBudget(percent=percent, min_retries=min_retries, window_s=window_s)
    window = RetryWindow(budget)
    now = 1000.0
    seen: list[tuple[int, bool]] = []  # (second, is a retry) of every request counted and retry granted
    for step, is_retry in events:
        now += step
        second = math.floor(now)
        recent = [r for s, r in seen if second - window_s < s <= second]
        if not is_retry:
            window.request(now)
            seen.append((second, False))
            continue
        expected = sum(recent) < max(min_retries, percent / 100 * (len(recent) - sum(recent)))
        assert window.try_retry(now) == expected
        if expected:
            seen.append((second, True))
            assert sum(recent) + 1 <= max(min_retries, math.ceil(percent / 100 * (len(recent) - sum(recent))))


def test_the_nginx_plane_gets_the_same_budget_and_words(tmp_path: Path) -> None:
    budget = RetryBudget(percent=12.5, min_retries=7)
    conf = render_config(tmp_path, "127.0.0.1", 8000, tmp_path / "c.sock", 2.0, 600.0, 5.0, 1,
                         GatewayLimits(retry_budget=budget))
    assert "percent = 12.5, min = 7, window = 10" in conf
    assert budget_spent_suffix(budget) in conf and all(suffix in conf for _, suffix in NOT_RETRIED.values())
    # nginx itself never passes a POST on once sent; clients that leave end held requests and upstream ones
    assert "proxy_next_upstream error timeout;" in conf and "non_idempotent" not in conf
    assert "lua_check_client_abort on;" in conf and "proxy_ignore_client_abort" not in conf


async def test_the_python_plane_never_lets_aiohttp_replay_a_get() -> None:
    """aiohttp resends an idempotent request on a new connection when the first was reset after the request was
    written; the gateway turns that off through the attribute aiohttp reads (this guards its name)."""
    gateway = Gateway(LeastOutstanding(), 1.0, 1.0, lambda _: "/health")
    gateway.start()
    try:
        assert isinstance(gateway._session, aiohttp.ClientSession)
        assert "_retry_connection" in aiohttp.ClientSession.ATTRS
        assert gateway._session._retry_connection is False
    finally:
        await gateway.close()


def test_client_cancelled_is_counted_per_service_on_both_planes() -> None:
    stats = TrafficStats()
    stats.cancel("a-nlb")
    before = stats.sample()
    stats.cancel("a-nlb")
    stats.cancel("b-nlb")
    after = stats.sample()
    assert after.client_cancelled == {"a-nlb": 2, "b-nlb": 1}
    moved = tick(before, after, 10.0, 1.0, {})
    assert moved.client_cancelled == {"a-nlb": 1, "b-nlb": 1}
    assert client_cancelled([moved, tick(Sample({}, {}), before, 9.0, 1.0, {})]) == {"a-nlb": 2, "b-nlb": 1}
    # a data plane that restarted (nginx's shared memory starts empty): what it counted since is new
    assert tick(after, Sample({}, {}, client_cancelled={"a-nlb": 1}), 11.0, 1.0, {}).client_cancelled == {"a-nlb": 1}
    assert 'corral_gateway_client_cancelled_total{service="a-nlb"} 2.0' in stats.prometheus()
    # nginx's keys (corral_gateway.lua) read the same
    nginx = parse_stats({"cc:a-nlb": 2, "cc:b-nlb": 1, "rq:a-nlb|r1": 3})
    assert nginx.sample().client_cancelled == after.client_cancelled
    assert nginx.by_pair[("a-nlb", "r1")].counts() == Counts(3)


async def test_the_load_view_shows_client_cancelled() -> None:
    from corral.events import EventBus
    from corral.gateway.monitor import LoadMonitor
    from corral.views import BusinessServiceView

    readings = [Sample({}, {}), Sample({}, {}, client_cancelled={"a-nlb": 2})]

    async def read() -> Sample:
        return readings.pop(0)

    view = BusinessServiceView(name="a-nlb", displayName="a-nlb", businessTag="b", modelName="m", modelPool="pool",
                               baseUrl=None, isExternal=False, llmRouting=False, type="ClusterIP", selector={}, labels={},
                               replicas=1, readyReplicas=1, createdAt=None)
    monitor = LoadMonitor(read, dict, lambda: [view], EventBus())
    await monitor.step()
    await monitor.step()
    assert monitor.service("a-nlb", 30).clientCancelled == 2
