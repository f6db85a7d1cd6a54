"""Live load per business service and per replica: the data plane's counters sampled once a second.

`LoadMonitor` reads the active data plane's cumulative counters (`read_counters()`, the same on both
planes, see stats.py) every `interval_s`, keeps the differences for the last 5 minutes (`Tick`s, one a
second, only the pairs that moved), and derives window figures and the chart series from them with
the pure functions of `corral.domain.load`. Reading is cheap (the Python plane copies its counters;
the nginx plane answers one local HTTP call on its control socket, the read it made anyway for
`/api/metrics`), and it runs whether anyone looks or not: the window must already hold the last
minutes when someone opens the page.

While at least one client watches (`/ws`, a UI page), each sample is also published on the bus as a
`load` event carrying `snapshot()` (window 30 s): building the views costs something, sampling nearly
nothing. With `CORRAL_LOAD_SAMPLING=false` nothing is sampled and every figure is zero (the
benchmark's "monitoring off").

What it shows is the traffic through Corral's gateway: on the Kubernetes backend, clients that reach a
business service's Service directly bypass it and are not counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from corral.aio import stop, within
from corral.domain.errors import Hint, InvalidInput, NotFound
from corral.domain.load import (
    SERIES_STEP_S,
    WINDOW_DEFAULT_S,
    WINDOW_MAX_S,
    WINDOW_MIN_S,
    Counts,
    Figures,
    Pair,
    Sample,
    Step,
    Tick,
    client_cancelled,
    figures,
    held_wait_ms,
    in_window,
    step_end,
    tick,
    total,
    unserved_per_second,
)
from corral.events import EventBus, EventType
from corral.gateway.routing import RoutingTable
from corral.views import (
    BusinessServiceView,
    HeldWaitMs,
    LatencyMs,
    LoadOverview,
    LoadPoint,
    ReplicaLoad,
    ServiceLoad,
    TtfbMs,
)

log = logging.getLogger("corral.gateway.monitor")


@dataclass(frozen=True, slots=True)
class BusinessTraffic:
    """What the gateway saw of one business service over a window: the autopilot's figures, without the
    per-replica breakdown and the chart series of a `ServiceLoad` view."""

    figures: Figures
    unserved_per_s: float = 0.0  # requests the gateway answered itself (503/504): demand no replica saw
    in_flight: int = 0  # requests in flight at the newest sample
    held: int = 0  # requests the gateway held at the newest sample (no replica free): demand no replica sees yet


def check_window(window: int) -> int:
    if not WINDOW_MIN_S <= window <= WINDOW_MAX_S:
        raise InvalidInput(f"window must be between {WINDOW_MIN_S} and {WINDOW_MAX_S} seconds, not {window}")
    return window


class LoadMonitor:
    def __init__(self, read: Callable[[], Awaitable[Sample]], routes: Callable[[], RoutingTable],
                 services: Callable[[], Sequence[BusinessServiceView]], bus: EventBus, enabled: bool = True,
                 interval_s: float = 1.0) -> None:
        """`read`: the data plane's counters; `routes`: its routing table now (who serves what: capacity,
        replicas with no traffic yet); `services`: the business services to show."""
        self._read, self._routes, self._services, self._bus = read, routes, services, bus
        self.enabled = enabled
        self.interval_s = interval_s
        self._ticks: deque[Tick] = deque(maxlen=int(WINDOW_MAX_S / interval_s) + 5)
        self._steps: deque[Step] = deque(maxlen=WINDOW_MAX_S // SERIES_STEP_S + 2)
        self._previous: Sample | None = None
        self._previous_at = 0.0
        self._watchers = 0
        self._task: asyncio.Task | None = None
        self._failing = False
        # `traffic`'s last answer and what it was computed from: (window, routing table, newest tick, answer)
        self._traffic: tuple[int, RoutingTable, Tick | None, Mapping[str, BusinessTraffic]] | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def start(self, counters_from_zero: bool = True) -> None:
        """`counters_from_zero`: the data plane's counters started at zero with this control plane (the Python
        gateway, a fresh nginx), so they count from an empty reading taken now: traffic served before the first
        successful reading (one delayed by a loaded machine or a slow data plane) is in the window, not in the
        baseline. An adopted nginx counted before we came: its first reading is the baseline."""
        if self.enabled and self._task is None:
            if counters_from_zero and self._previous is None:
                self._previous, self._previous_at = Sample({}, {}), time.monotonic()
            self._task = asyncio.create_task(self._run(), name="load-monitor")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.interval_s
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due, loop.time() - self.interval_s)  # after a stall, carry on rather than catch up in a burst
            await self.step()

    async def step(self) -> None:
        """One period: a sample, then the `load` event if anyone watches."""
        await self.sample()
        if self._watchers:
            try:
                self._bus.publish(EventType.LOAD, self.snapshot())
            except Exception:  # noqa: BLE001 (a bad snapshot must not stop the sampling)
                log.exception("could not publish the load")

    async def sample(self) -> None:
        """Read the counters once and record what happened since the last reading."""
        try:
            current = await within(max(self.interval_s, 0.25), self._read())
        except Exception as exc:  # noqa: BLE001 (the data plane restarting, hung: the next reading covers the gap)
            if not self._failing:
                log.warning("cannot read the data plane's counters (%s); load figures pause", exc.__class__.__name__)
            self._failing = True
            return
        self._failing = False
        at = time.monotonic()
        if self._previous is not None:
            capacity = {name: len(route.targets) for name, route in self._routes().items()}
            if self._ticks and self._ticks[-1].capacity == capacity:
                capacity = self._ticks[-1].capacity  # unchanged: the 5 minutes of ticks share one dict
            self.record(tick(self._previous, current, time.time(), at - self._previous_at, capacity))
        self._previous, self._previous_at = current, at

    def record(self, t: Tick) -> None:
        self._ticks.append(t)
        end = step_end(t.t)
        if not self._steps or self._steps[-1].end != end:
            self._steps.append(Step(end))
        self._steps[-1].add(t)

    # watchers ----------------------------------------------------------------------------------
    def watch(self) -> Callable[[], None]:
        """Ask for a `load` event on the bus after every sample (once a second) until the returned function
        is called. For a NiceGUI page: `stop = runtime.load.watch()`, `client.on_delete(stop)`, and redraw on
        `load` events (corral.ui.live). Calling the function again does nothing."""
        self._watchers += 1
        released = False

        def stop() -> None:
            nonlocal released
            if not released:
                released = True
                self._watchers -= 1

        return stop

    @contextmanager
    def watching(self) -> Iterator[None]:
        stop = self.watch()
        try:
            yield
        finally:
            stop()

    @property
    def watchers(self) -> int:
        return self._watchers

    # views -------------------------------------------------------------------------------------
    def snapshot(self, window: int = WINDOW_DEFAULT_S) -> LoadOverview:
        """The load of every business service over the last `window` seconds (5..300): what
        `GET /api/load` answers and the `load` event carries. Reads memory only (no I/O)."""
        window = check_window(window)
        return LoadOverview(windowSeconds=window, services=self._views(list(self._services()), window))

    def in_flight_by_replica(self) -> dict[str, int] | None:
        """Requests in flight per replica at the newest sample (at most a second old); None before the first."""
        if not self._ticks:
            return None
        counts: dict[str, int] = {}
        for (_, replica), n in self._ticks[-1].in_flight.items():
            counts[replica] = counts.get(replica, 0) + n
        return counts

    def traffic(self, window: int = WINDOW_MIN_S) -> Mapping[str, BusinessTraffic]:
        """Business service → its traffic over the last `window` seconds, from the samples and the routing
        table alone: the autopilot's per-tick read. Not through `snapshot`, which builds every service's view
        (each replica's figures, the chart series) out of the controller's service listing: 10 pools read
        that each tick, 0.5 s of loop time a tick at 1,000 replicas. The answer changes only with a new
        sample (once a second) or a new routing table, so between those it is the same object."""
        window = check_window(window)
        table = self._routes()
        newest = self._ticks[-1] if self._ticks else None
        last = self._traffic
        if last is not None and last[0] == window and last[1] is table and last[2] is newest:
            return last[3]
        ticks = in_window(list(self._ticks), window)
        seconds = sum(t.seconds for t in ticks)
        counts: dict[str, list[Counts]] = {}
        for t in ticks:
            for (service, _), delta in t.deltas.items():
                counts.setdefault(service, []).append(delta)
        unserved = unserved_per_second(ticks)
        in_flight: dict[str, int] = {}
        for (service, _), n in (newest.in_flight.items() if newest is not None else ()):
            in_flight[service] = in_flight.get(service, 0) + n
        held = newest.held if newest is not None else {}
        answer = {name: BusinessTraffic(figures(total(counts.get(name, ())), seconds),
                                        unserved.get(name, 0.0), in_flight.get(name, 0), held.get(name, 0))
                  for name, route in table.items() if route.business is not None}
        self._traffic = (window, table, newest, answer)
        return answer

    def service(self, name: str, window: int = WINDOW_DEFAULT_S) -> ServiceLoad:
        """One business service's load (`GET /api/business-services/{name}/load`); NotFound when unknown."""
        window = check_window(window)
        found = [s for s in self._services() if s.name == name]
        if not found:
            raise NotFound(f"business service '{name}' not found", Hint.LIST_SERVICES)
        return self._views(found, window)[0]

    def _views(self, services: list[BusinessServiceView], window: int) -> list[ServiceLoad]:
        ticks = in_window(list(self._ticks), window)
        seconds = sum(t.seconds for t in ticks)
        by_service: dict[str, dict[str, Counts]] = {}
        for t in ticks:
            for (service, replica), delta in t.deltas.items():
                replicas = by_service.setdefault(service, {})
                replicas[replica] = replicas[replica] + delta if replica in replicas else delta
        in_flight: dict[Pair, int] = dict(self._ticks[-1].in_flight) if self._ticks else {}
        flying: dict[str, dict[str, int]] = {}
        for (service, replica), n in in_flight.items():
            flying.setdefault(service, {})[replica] = n
        table = self._routes()
        held = self._ticks[-1].held if self._ticks else {}
        waits = held_wait_ms(ticks)
        cancelled = client_cancelled(ticks)
        newest = self._ticks[-1].t if self._ticks else 0.0
        steps = [s for s in self._steps if s.end > newest - WINDOW_MAX_S]
        views = []
        for s in services:
            counts = by_service.get(s.name, {})
            busy = flying.get(s.name, {})
            route = table.get(s.name)
            names = sorted({*(t.name for t in route.targets), *counts, *busy} if route else {*counts, *busy})
            replicas = [ReplicaLoad(pod=r, inFlight=busy.get(r, 0), **_figures(figures(counts.get(r, Counts()), seconds)))
                        for r in names]
            points = [s_.point(s.name) for s_ in steps]
            views.append(ServiceLoad(
                service=s.name, pool=s.modelPool, windowSeconds=window, inFlight=sum(busy.values()),
                **_figures(figures(total(counts.values()), seconds)), readyReplicas=s.readyReplicas, replicas=replicas,
                series=[LoadPoint(t=p.t, requestsPerSecond=p.requests_per_s, p95Ms=p.p95_ms, capacity=p.capacity)
                        for p in points],
                held=held.get(s.name, 0), heldWaitMs=HeldWaitMs(p50=waits.get(s.name, (None, None))[0],
                                                                p95=waits.get(s.name, (None, None))[1]),
                clientCancelled=cancelled.get(s.name, 0),
            ))
        return views


def _figures(f: Figures) -> dict:
    return {"requestsPerSecond": f.requests_per_s, "errorsPerSecond": f.errors_per_s,
            "latencyMs": LatencyMs(p50=f.latency_ms[0], p95=f.latency_ms[1], p99=f.latency_ms[2]),
            "ttfbMs": TtfbMs(p50=f.ttfb_ms[0], p95=f.ttfb_ms[1]), "tokensPerSecond": f.tokens_per_s}
