"""Issue 25, parts 3 and 5, on both data planes (the same contract): outlier detection, not a trigger, and bounded
memory. Each data plane runs for real (the Python gateway under Corral's HTTP server in this event loop; nginx as
its own process) in front of stand-in engines on real sockets (`Engine`: its health check, its `/metrics` and its
answers are the test's to set), or ports nobody listens on (the connection is refused).

- A replica is ejected at the threshold of gateway failures in a row, and an answer in between starts the count
  again; a failed replica whose health checks fail is ejected too.
- At most `max_ejection_percent` of a business's replicas are out at once, however many are faulty; the one the
  cap keeps in rotation is reported.
- Ejection time grows with repeats (base × ejections in a row), and a replica comes back only after passed
  health checks in a row, after its time.
- A busy replica whose `/health` is slow is not hung while it makes progress (tokens streaming, its engine's
  counters moving): Python plane, the one with a first-byte watch.
- Counters and records of replicas and services that left are pruned (after the retention, never with requests
  in flight); nginx's counters are read incrementally, and reading them never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from corral.domain.outliers import Change, OutlierEvent, OutlierPolicy
from corral.domain.retries import AttemptFailure, RetryBudget
from corral.gateway.nginx_plane import NginxGateway, parse_stats
from corral.gateway.proxy import Gateway, GatewayLimits, not_retried
from corral.gateway.routing import Route, RoutingTable, Target
from corral.gateway.stats import TrafficStats
from corral.views import EjectionView
from tests.conftest import wait_for_async
from tests.integration.test_gateway_safety import CHAT, SERVICE, Plane, leave, refused, running_plane
from tests.integration.test_routing_sync import nginx_pids, stopped

OTHER = "s-other"
GENEROUS = RetryBudget(percent=100, min_retries=1000)  # retries are not under test here


def limits(**policy: float) -> GatewayLimits:
    """Fast checks (every 0.1 s, 1 s timeouts), a generous retry budget, and `policy`'s outlier numbers."""
    return GatewayLimits(first_byte_timeout_s=60, hold_timeout_s=0, retry_budget=GENEROUS, probe_interval_s=0.1,
                         outliers=OutlierPolicy(**policy))  # type: ignore[arg-type]


class Engine:
    """A stand-in engine on a real socket. `/health` as `health` says (`ok`: 200, `fail`: 503, `hang`: no answer);
    `/metrics` reports `tokens` as vLLM's generation counter; every other request is answered as the next entry
    of `script` says, then as `mode`: `ok` (200 JSON), `e503` (503 JSON), `hang` (200 once `release` is set),
    `stream` (server-sent events every `tick_s` until `release`), `cut` (headers and one event, then the
    connection closed). Health checks and metrics reads are not requests."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode, self.script, self.health = mode, list[str](), "ok"
        self.requests = 0
        self.health_checks = 0
        self.tokens = 0
        self.tick_s = 0.2
        self.release = asyncio.Event()
        self.pending = 0
        self._server: asyncio.Server | None = None
        self.endpoint = ""

    async def start(self) -> Engine:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                if path == "/health":
                    self.health_checks += 1
                    if self.health == "hang":
                        await reader.read()  # until the checker gives up and closes
                        return
                    _answer(writer, 200 if self.health == "ok" else 503, b"{}")
                    continue
                if path == "/metrics":
                    _answer(writer, 200, f'vllm:generation_tokens_total{{model_name="m"}} {self.tokens}\n'.encode(),
                            "text/plain")
                    continue
                mode = self.script.pop(0) if self.script else self.mode
                self.requests += 1
                if mode in ("ok", "e503"):
                    _answer(writer, 200 if mode == "ok" else 503, json.dumps({"mode": mode}).encode())
                    continue
                self.pending += 1
                try:
                    if mode == "hang":
                        await self.release.wait()
                        _answer(writer, 200, b'{"mode": "hang"}')
                        continue
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    while True:
                        event = b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'
                        writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                        await writer.drain()
                        if mode == "cut":
                            return
                        if self.release.is_set():
                            writer.write(b"0\r\n\r\n")
                            break
                        await asyncio.sleep(self.tick_s)
                finally:
                    self.pending -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def _answer(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str = "application/json") -> None:
    reason = "OK" if status == 200 else "Service Unavailable"
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
                 .encode() + body)


@pytest.fixture
async def engines() -> AsyncIterator[list[Engine]]:
    started = [await Engine().start() for _ in range(4)]
    yield started
    for engine in started:
        engine.release.set()
        await engine.close()


def routes(*targets: Target, other: tuple[Target, ...] | None = None) -> RoutingTable:
    table = {SERVICE: Route(SERVICE, "m", "b", "pool", targets)}
    if other is not None:
        table[OTHER] = Route(OTHER, "m", "c", "pool", other)
    return table


def plane_of(plane: Plane) -> Gateway | NginxGateway:
    found = plane._gateway or plane._nginx  # noqa: SLF001 (the test's own harness)
    assert found is not None
    return found


def recording(plane: Plane) -> list[OutlierEvent]:
    events: list[OutlierEvent] = []
    plane_of(plane).on_outlier = events.append
    return events


async def ejected(plane: Plane) -> dict[str, EjectionView]:
    """The replicas out of rotation now, as the pods view shows them (nginx: after reading its counters)."""
    if plane._nginx is not None:  # noqa: SLF001
        await plane._nginx.read_stats()  # noqa: SLF001
    return plane_of(plane).ejection_views()


async def chat(plane: Plane, service: str = SERVICE) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as client, client.post(
        f"{plane.url}/s/{service}/v1/chat/completions", data=CHAT, headers={"content-type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as response:
        await response.read()
        return response.status, response.headers.get("x-corral-replica")


async def drive(plane: Plane, done: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Send requests one after the other until `done()`; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        try:
            await chat(plane)
        except aiohttp.ClientPayloadError:
            pass  # a response cut mid-way reaches the client cut


async def drive_until_ejected(plane: Plane, name: str, timeout: float = 15) -> dict[str, EjectionView]:
    deadline = time.monotonic() + timeout
    while name not in (out := await ejected(plane)):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {name} to be ejected"
        await chat(plane)
    return out


def seconds_out(view: EjectionView) -> float:
    return (datetime.fromisoformat(view.until) - datetime.fromisoformat(view.since)).total_seconds()


# 3. outlier detection, not a trigger ---------------------------------------------------------------------------
async def test_failures_in_a_row_eject_at_the_threshold_and_an_answer_starts_the_count_again(
        data_plane: str, tmp_path: Path, engines: list[Engine]) -> None:
    good, bad = engines[0], engines[1]
    bad.script = ["e503", "e503", "ok"] * 3  # two failures, then an answer: never three in a row
    bad.mode = "e503"  # then failures only
    async with running_plane(data_plane, tmp_path, limits(consecutive_failures=3, base_ejection_s=60)) as plane:
        events = recording(plane)
        await plane.push(routes(Target("good", good.endpoint), Target("bad", bad.endpoint)))
        # Least outstanding, random ties: about every other request goes to it.
        await drive(plane, lambda: bad.requests >= 9, "the scripted requests at the replica")
        assert await ejected(plane) == {} and events == []
        await drive(plane, lambda: bad.requests >= 12, "three failures in a row")
        # The third failure in a row ejected it: every later request goes to the other replica.
        statuses = [await chat(plane) for _ in range(12)]
        assert statuses == [(200, "good")] * 12 and bad.requests == 12
        view = (await ejected(plane))["bad"]
        assert view.count == 1 and seconds_out(view) == 60 and view.reason == "3 gateway failures in a row"
        assert [(e.replica, e.change) for e in events] == [("bad", Change.EJECTED)]
        assert events[0].message.startswith("ejected from rotation by the gateway: 3 gateway failures in a row")
        assert 'corral_gateway_ejected{replica="bad"} 1.0' in (await refreshed(plane)).prometheus()


async def refreshed(plane: Plane) -> TrafficStats | object:
    stats = plane_of(plane).stats
    await stats.refresh()
    return stats


async def test_a_failed_replica_that_fails_its_health_checks_is_ejected_without_more_traffic(
        data_plane: str, tmp_path: Path, engines: list[Engine]) -> None:
    """One failure makes the gateway check the replica; `failed_probes` failed checks in a row eject it, whatever
    the traffic (no second request reaches it)."""
    good, sick = engines[0], engines[1]
    sick.mode, sick.health = "e503", "fail"
    async with running_plane(data_plane, tmp_path, limits(consecutive_failures=100, failed_probes=3,
                                                         base_ejection_s=60)) as plane:
        await plane.push(routes(Target("good", good.endpoint), Target("sick", sick.endpoint)))
        await drive(plane, lambda: sick.requests >= 1, "a request at the sick replica")
        deadline = time.monotonic() + 10
        while "sick" not in (found := await ejected(plane)):
            assert time.monotonic() < deadline, "not ejected after its failed health checks"
            await asyncio.sleep(0.05)
        assert found["sick"].reason == "a failure, then 3 failed health checks in a row"
        assert sick.requests == 1 and sick.health_checks >= 3
        # A replica that passed its checks after a failure is not suspected any more: no ejection.
        assert "good" not in found


@pytest.mark.parametrize("fault", ["refused", "e503"])
async def test_the_cap_holds_with_several_faulty_replicas(data_plane: str, tmp_path: Path, engines: list[Engine],
                                                          fault: str) -> None:
    """Three faulty replicas of four, 50 % at most out: two are ejected, the third stays in rotation (reported
    once), and the healthy one is never ejected."""
    good = engines[0]
    if fault == "refused":
        faulty = [refused(f"f{i}") for i in range(3)]
    else:
        for engine in engines[1:]:
            engine.mode = "e503"
        faulty = [Target(f"f{i}", engine.endpoint) for i, engine in enumerate(engines[1:])]
    async with running_plane(data_plane, tmp_path, limits(consecutive_failures=2, failed_probes=2,
                                                         base_ejection_s=60, max_ejection_percent=50)) as plane:
        events = recording(plane)
        await plane.push(routes(Target("good", good.endpoint), *faulty))
        most = 0
        for _ in range(40):
            await chat(plane)
            most = max(most, len(await ejected(plane)))
        out = await ejected(plane)
        assert len(out) == 2 and "good" not in out
        # Checks go on every 0.1 s (the refused replicas keep failing theirs): still two out.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            most = max(most, len(await ejected(plane)))
            await asyncio.sleep(0.05)
        assert most == 2 and set(await ejected(plane)) == set(out)
        kept = ({t.name for t in faulty} - set(out)).pop()
        capped = [e for e in events if e.change is Change.CAPPED]
        assert [e.replica for e in capped] == [kept], events
        assert "CORRAL_GATEWAY_MAX_EJECTION_PERCENT" in capped[0].message
        assert sorted(e.replica for e in events if e.change is Change.EJECTED) == sorted(out)


async def test_ejection_time_grows_with_repeats_and_a_replica_comes_back_after_passed_checks(
        data_plane: str, tmp_path: Path, engines: list[Engine]) -> None:
    good, flaky = engines[0], engines[1]
    flaky.mode = "e503"
    async with running_plane(data_plane, tmp_path, limits(consecutive_failures=2, passed_probes=2, base_ejection_s=1.0,
                                                         max_ejection_s=10)) as plane:
        events = recording(plane)
        await plane.push(routes(Target("good", good.endpoint), Target("flaky", flaky.endpoint)))
        views = []
        for ejection in (1, 2):
            out = await drive_until_ejected(plane, "flaky")
            views.append(out["flaky"])
            assert out["flaky"].count == ejection and seconds_out(out["flaky"]) == ejection * 1.0
            if ejection == 2:  # past its time, failed checks keep it out; passed ones in a row bring it back
                flaky.health = "fail"
                since = datetime.fromisoformat(out["flaky"].since).timestamp()
                while time.time() < since + 2.0 + 0.5:
                    assert "flaky" in await ejected(plane)
                    await asyncio.sleep(0.05)
                flaky.health = "ok"
            flaky.mode = "ok"
            checks = flaky.health_checks
            deadline = time.monotonic() + 10
            while "flaky" in await ejected(plane):
                assert time.monotonic() < deadline, "not back in rotation"
                await asyncio.sleep(0.05)
            assert flaky.health_checks >= checks + 2
            back = time.time()
            assert back >= datetime.fromisoformat(out["flaky"].until).timestamp()
            served = flaky.requests
            await drive(plane, lambda served=served: flaky.requests > served, "a request served by it")  # in rotation again
            flaky.mode = "e503"
        changes = [(e.replica, e.change) for e in events]
        assert changes == [("flaky", Change.EJECTED), ("flaky", Change.READMITTED)] * 2
        assert "ejection 2 in a row" in events[2].message and "out for 2 s" in events[2].message


async def test_a_replica_cut_mid_response_counts_as_a_failure(data_plane: str, tmp_path: Path,
                                                              engines: list[Engine]) -> None:
    good, cutting = engines[0], engines[1]
    cutting.mode = "cut"
    async with running_plane(data_plane, tmp_path, limits(consecutive_failures=2, base_ejection_s=60)) as plane:
        await plane.push(routes(Target("good", good.endpoint), Target("cutting", cutting.endpoint)))
        await drive(plane, lambda: cutting.requests >= 2, "two cut responses")
        assert "cutting" in await ejected(plane)


# A busy replica is not hung (Python plane: nginx has one read timeout and no first-byte watch) -----------------
FIRST_BYTE_S = 1.0


@pytest.fixture
async def python_plane(tmp_path: Path) -> AsyncIterator[Plane]:
    async with running_plane("python", tmp_path, GatewayLimits(
            first_byte_timeout_s=FIRST_BYTE_S, hold_timeout_s=0, retry_budget=GENEROUS, probe_interval_s=0.1,
            outliers=OutlierPolicy(failed_probes=3, base_ejection_s=60, max_ejection_percent=100))) as plane:
        yield plane


async def test_a_slow_health_check_is_not_hung_while_the_replica_streams(python_plane: Plane,
                                                                         engines: list[Engine]) -> None:
    busy = engines[0]
    busy.health = "hang"  # its /health waits behind its work
    busy.script, busy.mode = ["stream"], "hang"  # tokens keep coming on one request (one every 0.2 s) ...
    await python_plane.push(routes(Target("busy", busy.endpoint)))  # (ejectable: the cap is 100% here)
    _, stream = await _open(python_plane)
    await wait_for_async(lambda: busy.pending == 1, timeout=5, what="the stream at the replica")
    waiting = asyncio.ensure_future(chat(python_plane))  # ... and a non-streamed one waits for its answer
    await wait_for_async(lambda: busy.pending == 2, timeout=5, what="both requests at the replica")
    # Past the first-byte timeout and three checks' time (1 s each): still waited for, since tokens stream.
    deadline = time.monotonic() + FIRST_BYTE_S + 3 * 1.0 + 1.5
    while time.monotonic() < deadline:
        assert not waiting.done(), waiting.result()
        await asyncio.sleep(0.1)
    assert busy.health_checks >= 2 and await ejected(python_plane) == {}
    busy.release.set()
    assert await waiting == (200, "busy")
    await leave(stream)


async def test_a_slow_health_check_is_not_hung_while_the_engine_counts_tokens(python_plane: Plane,
                                                                              engines: list[Engine]) -> None:
    """No byte streams through the gateway (a long non-streamed completion), but `/metrics` moves."""
    busy = engines[0]
    busy.health, busy.mode = "hang", "hang"
    await python_plane.push(routes(Target("busy", busy.endpoint)))

    async def generating() -> None:
        while True:
            busy.tokens += 1
            await asyncio.sleep(0.05)

    counting = asyncio.ensure_future(generating())
    try:
        waiting = asyncio.ensure_future(chat(python_plane))
        deadline = time.monotonic() + FIRST_BYTE_S + 3 * 1.0 + 1.5
        while time.monotonic() < deadline:
            assert not waiting.done(), waiting.result()
            await asyncio.sleep(0.1)
        assert busy.health_checks >= 2 and await ejected(python_plane) == {}
        busy.release.set()
        assert await waiting == (200, "busy")
    finally:
        counting.cancel()


async def test_a_silent_replica_with_failed_checks_and_no_progress_is_hung(python_plane: Plane,
                                                                           engines: list[Engine]) -> None:
    hung_engine = engines[0]
    hung_engine.health, hung_engine.mode = "hang", "hang"  # SIGSTOP-like: nothing answers, nothing moves
    await python_plane.push(routes(Target("hung", hung_engine.endpoint)))
    events = recording(python_plane)
    started = time.monotonic()
    assert await chat(python_plane) == (504, None)
    elapsed = time.monotonic() - started
    assert hung_engine.requests == 1
    assert FIRST_BYTE_S + 2 * 1.0 < elapsed < FIRST_BYTE_S + 3 * 1.0 + 3, elapsed  # three failed checks, 1 s each
    assert (await ejected(python_plane))["hung"].reason.startswith("no response in time, 3 failed health checks")
    assert [e.change for e in events] == [Change.EJECTED]
    assert not_retried("hung", AttemptFailure.SILENT)[0] == 504


async def _open(plane: Plane) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = plane.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /s/{SERVICE}/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json"
                 f"\r\ncontent-length: {len(CHAT)}\r\n\r\n".encode() + CHAT)
    await writer.drain()
    return reader, writer


# 5. bounded memory ----------------------------------------------------------------------------------------------
RETENTION_S = 0.3


async def counters(plane: Plane) -> TrafficStats:
    """The plane's counters now; on nginx, as its shared memory holds them (a full read, not the kept copy)."""
    if plane._nginx is not None:  # noqa: SLF001
        answer = await plane._nginx._control("GET", "/stats")  # noqa: SLF001
        return parse_stats({k: v for values in answer["units"].values() for k, v in values.items()})
    return plane_of(plane).stats  # type: ignore[return-value]


def names(stats: TrafficStats) -> set[str]:
    """Every replica and service the counters mention."""
    found = {part for pair in [*stats.by_pair, *stats.in_flight_by_pair] for part in pair}
    found |= {s for s, _ in stats.rejected} | set(stats.in_flight_by_replica) | set(stats.held_wait)
    return found


async def test_counters_of_replicas_and_services_that_left_are_pruned(data_plane: str, tmp_path: Path,
                                                                      engines: list[Engine]) -> None:
    stays, leaves = engines[0], engines[1]
    bounded = GatewayLimits(first_byte_timeout_s=60, hold_timeout_s=0, retry_budget=GENEROUS, probe_interval_s=0.1,
                            counters_retention_s=RETENTION_S)
    async with running_plane(data_plane, tmp_path, bounded) as plane:
        await plane.push(routes(Target("stays", stays.endpoint), Target("leaves", leaves.endpoint), other=()))
        await drive(plane, lambda: leaves.requests >= 2 and stays.requests >= 2, "requests on both replicas")
        assert await chat(plane, OTHER) == (503, None)  # a service with no replica: a rejection counted for it
        # One request still in flight on the replica that leaves: its counters stay until it ends.
        leaves.mode = "hang"
        await plane.push(routes(Target("leaves", leaves.endpoint), other=()))
        waiting = asyncio.ensure_future(chat(plane))
        await wait_for_async(lambda: leaves.pending == 1, timeout=5, what="the request at the replica")
        await plane.push(routes(Target("stays", stays.endpoint)))  # it leaves, and so does the other service
        await until_counted(plane, lambda found: OTHER not in found, "the service's counters pruned")
        assert "leaves" in names(await counters(plane))  # busy: kept
        leaves.release.set()
        assert await waiting == (200, "leaves")
        await until_counted(plane, lambda found: "leaves" not in found, "the replica's counters pruned")
        kept = await counters(plane)
        assert kept.by_pair[(SERVICE, "stays")].requests == stays.requests
        assert names(kept) == {SERVICE, "stays"}


async def until_counted(plane: Plane, check: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check(found := names(await counters(plane))):  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {sorted(found)}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def nginx_plane(tmp_path: Path) -> AsyncIterator[Plane]:
    async with running_plane("nginx", tmp_path, limits()) as plane:
        yield plane


async def test_nginx_counters_are_read_incrementally(nginx_plane: Plane, engines: list[Engine]) -> None:
    nginx = nginx_plane._nginx  # noqa: SLF001
    assert nginx is not None
    nginx._stats_task.cancel()  # noqa: SLF001 (only this test's reads: each takes what changed since the one before)
    await nginx_plane.push(routes(Target("r0", engines[0].endpoint), Target("r1", engines[1].endpoint)))
    for _ in range(6):
        await chat(nginx_plane)
    await nginx.read_stats()
    await nginx.read_stats()
    assert nginx.last_read == (False, frozenset())  # nothing changed: nothing read
    engines[1].mode = "hang"
    await nginx_plane.push(routes(Target("r1", engines[1].endpoint)))
    waiting = asyncio.ensure_future(chat(nginx_plane))
    await wait_for_async(lambda: engines[1].pending == 1, timeout=5, what="the request at the replica")
    raw = await nginx.read_stats()
    assert nginx.last_read == (False, frozenset({f"p:{SERVICE}|r1", "r:r1"}))  # that replica's units only
    assert raw["if:r1"] == 1 and raw[f"ip:{SERVICE}|r1"] == 1 and raw["if:r0"] == 0
    engines[1].release.set()
    assert await waiting == (200, "r1")
    raw = await nginx.read_stats()
    # (and the service's usage unit, keyless here, counted once the request ended: metering)
    assert raw["if:r1"] == 0 and nginx.last_read[1] == frozenset({f"p:{SERVICE}|r1", "r:r1", f"m:{SERVICE}|"})
    # The copy agrees with nginx's own memory (a full read).
    assert parse_stats(raw).sample() == (await counters(nginx_plane)).sample()


async def test_reading_nginx_counters_never_blocks_the_event_loop(nginx_plane: Plane, engines: list[Engine]) -> None:
    nginx = nginx_plane._nginx  # noqa: SLF001
    assert nginx is not None and nginx._process is not None  # noqa: SLF001
    await nginx_plane.push(routes(Target("r0", engines[0].endpoint)))
    assert await chat(nginx_plane) == (200, "r0")
    await nginx.stats.refresh()
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def ticking() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            gaps.append(loop.time() - last)
            last = loop.time()

    ticker = asyncio.ensure_future(ticking())
    await wait_for_async(lambda: len(gaps) >= 3, timeout=5, interval=0.01, what="the ticker going")
    try:
        with stopped(nginx_pids(nginx._process.pid)):  # noqa: SLF001 (nginx hung)
            for _ in range(3):  # what /api/metrics and the pool status read (from the copy), and their refresh
                assert 'corral_gateway_requests_total{replica="r0",service="s-nlb"} 1.0' in nginx.stats.prometheus()
                assert nginx.stats.replica_summary({"r0"})["r0"]["requests"] == 1
                await nginx.stats.refresh()  # awaited: times out (0.25 s) without holding the loop
                await asyncio.sleep(0.02)
    finally:
        ticker.cancel()
    assert gaps and max(gaps) < 0.1, max(gaps)
