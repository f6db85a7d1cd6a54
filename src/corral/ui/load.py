"""Load on the pages (spec 01's performance monitoring): per business service and per replica, live.

How it stays live, cheaply:
- a page that shows load holds a `watch` of the runtime's load monitor for as long as it is open (the
  `LoadWatch` element, released when the page or the browser goes away); while anyone watches, the
  monitor publishes its snapshot on the bus once a second as a `load` event — built once for every
  watcher, whatever the number of browsers;
- the sections redraw from that event through `live` (corral.ui.live keeps the newest `load` data per
  browser), parsed once per event for every browser (`overview`);
- nothing is rebuilt: the sections keep the elements they created (a figure label, a chart) and only set
  what changed (`set_text` of a label whose text moved, `update` of a chart whose points moved), so an
  idle service costs a comparison and sends nothing. Which services and pods exist still follows the
  serving events, as every other section.

The figures are the gateway's (both data planes measure the same things the same way, over a sliding
window of WINDOW_S): requests/s, in flight, errors/s, latency p50/p95/p99, time to first byte p50/p95
(streamed responses), completion tokens/s where the engine reports usage; and per service a 5-minute
series of requests/s, p95 latency and capacity (its ready replicas), one point per 5 s, for the chart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nicegui import ui

from corral.domain.load import WINDOW_DEFAULT_S
from corral.events import EventType
from corral.ui.live import ClientEvents, runtime
from corral.views import LoadOverview, ServiceLoad

WINDOW_S = WINDOW_DEFAULT_S  # the window of the `load` event's snapshot (and the API's default)
CHART_SPAN_S = 300  # the chart's last 5 minutes
EVENTS = (EventType.LOAD,)
_parsed: list[Any] = [None, None]  # [the event data last parsed, its LoadOverview]: one parse per event for all browsers
_direct: list[Any] = [None, -1.0, None]  # [monitor, monotonic time, LoadOverview] of the last direct read (before the first event)


class LoadWatch(ui.element):
    """Invisible: while it exists, the load monitor publishes a `load` event once a second."""

    def __init__(self) -> None:
        super().__init__()
        self.classes("hidden")
        self._stop = runtime().load.watch()

    def _handle_delete(self) -> None:  # the page was left or the browser went away (NiceGUI calls it for both)
        self._stop()
        super()._handle_delete()


def overview(events: ClientEvents) -> LoadOverview:
    """The newest load: the last `load` event's snapshot; before the first one (a page just opened), a read of
    the monitor, shared by every browser for a second."""
    data = events.latest.get(EventType.LOAD.value)
    if data is None:
        monitor, now = runtime().load, time.monotonic()
        if _direct[0] is not monitor or now - _direct[1] >= 1.0:
            _direct[:] = [monitor, now, monitor.snapshot(WINDOW_S)]
        return _direct[2]
    if _parsed[0] is not data:
        _parsed[:] = [data, LoadOverview.model_validate(data)]
    return _parsed[1]


@dataclass(frozen=True)
class PodLoad:
    """A replica's load summed over the services it served in the window (one, unless it just moved)."""

    requests_per_s: float = 0.0
    in_flight: int = 0


def by_pod(load: LoadOverview | None) -> dict[str, PodLoad]:
    out: dict[str, PodLoad] = {}
    for service in load.services if load else ():
        for replica in service.replicas:
            seen = out.get(replica.pod, PodLoad())
            out[replica.pod] = PodLoad(round(seen.requests_per_s + replica.requestsPerSecond, 3), seen.in_flight + replica.inFlight)
    return out


def by_service(load: LoadOverview | None) -> dict[str, ServiceLoad]:
    return {s.service: s for s in load.services} if load else {}


# formatting -----------------------------------------------------------------------------------
def rate(value: float | None, unit: str = "req/s") -> str:
    if value is None:
        return "–"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def ms(value: float | None) -> str:
    if value is None:
        return "–"
    # Thresholds at what the rounding shows: 999.7 ms is `1.00 s`, never `1000 ms`.
    return f"{value:.1f} ms" if value < 9.95 else f"{value:.0f} ms" if value < 999.5 else f"{value / 1000:.2f} s"


def percentiles(values: tuple[float | None, ...]) -> str:
    """`5.0 ms / 2.60 s / 2.92 s`: each figure in the unit that fits it (ms below a second), so a fast p50 next to a
    slow tail never reads `0.00 s`; – for a missing one."""
    return " / ".join(ms(v) for v in values)


def figures(load: ServiceLoad | None) -> dict[str, str]:
    """The texts of a service's figures (what the page shows, and what the tests read)."""
    if load is None:
        return {"rps": rate(0.0), "inflight": "0", "errors": rate(0.0, "err/s"), "latency": "– / – / –", "ttfb": "– / –",
                "tokens": "–"}
    return {
        "rps": rate(load.requestsPerSecond), "inflight": str(load.inFlight), "errors": rate(load.errorsPerSecond, "err/s"),
        "latency": percentiles((load.latencyMs.p50, load.latencyMs.p95, load.latencyMs.p99)),
        "ttfb": percentiles((load.ttfbMs.p50, load.ttfbMs.p95)),
        "tokens": rate(load.tokensPerSecond, "tok/s"),
    }


FIGURES = (("rps", "requests"), ("inflight", "in flight"), ("errors", "errors"), ("latency", "latency p50 / p95 / p99"),
           ("ttfb", "first byte p50 / p95"), ("tokens", "tokens"))


class ServiceFigures:
    """A service's figures and chart, created once; `show` sets only what changed."""

    def __init__(self, service: str) -> None:
        self.labels: dict[str, ui.label] = {}
        with ui.row().classes("w-full gap-x-6 gap-y-1 items-start no-wrap"):
            # Captions as wide as they need, the figures the rest: `123 ms / 2.60 s / 12.34 s` stays on one line.
            with ui.grid(columns="auto 1fr").classes("gap-x-3 gap-y-0 text-sm shrink-0 w-96"):
                for key, caption in FIGURES:
                    ui.label(caption).classes("text-grey-7")
                    self.labels[key] = ui.label().classes("font-mono").props(f'data-testid="load-{service}-{key}"')
            self.chart = ui.echart(chart_options([], None)).classes("grow h-36 min-w-0").props(f'data-testid="load-chart-{service}"')
        self._points: list[Any] = []

    def show(self, load: ServiceLoad | None) -> None:
        for key, text in figures(load).items():
            if self.labels[key].text != text:
                self.labels[key].set_text(text)
        points = [(p.t, p.requestsPerSecond, p.p95Ms, p.capacity) for p in load.series] if load else []
        if points != self._points:
            self._points = points
            self.chart.options.update(chart_options(points, load.series[-1].t if load and load.series else None))
            self.chart.update()


def chart_options(points: list[tuple[int, float, float | None, int]], newest: int | None) -> dict[str, Any]:
    """ECharts options: requests/s (left axis), p95 latency (right axis) and capacity — the ready replicas, a
    step line on an axis of its own — over the last 5 minutes (unix seconds → ms, as ECharts' time axis)."""
    end = (newest or int(time.time())) * 1000
    capacity_max = max((p[3] for p in points), default=1)
    return {
        "animation": False,
        "grid": {"left": 44, "right": 52, "top": 26, "bottom": 22},
        "legend": {"top": 0, "itemWidth": 14, "itemHeight": 8, "textStyle": {"fontSize": 11}},
        "tooltip": {"trigger": "axis"},
        "xAxis": {"type": "time", "min": end - CHART_SPAN_S * 1000, "max": end, "axisLabel": {"fontSize": 10}},
        "yAxis": [
            {"type": "value", "name": "req/s", "min": 0, "nameTextStyle": {"fontSize": 10}, "axisLabel": {"fontSize": 10}},
            {"type": "value", "name": "p95 ms", "min": 0, "nameTextStyle": {"fontSize": 10}, "axisLabel": {"fontSize": 10},
             "splitLine": {"show": False}},
            {"type": "value", "show": False, "min": 0, "max": capacity_max * 1.25 + 0.5},
        ],
        "series": [
            {"name": "requests/s", "type": "line", "showSymbol": False, "yAxisIndex": 0, "color": "#2f5d8a",
             "data": [[t * 1000, rps] for t, rps, _, _ in points]},
            {"name": "p95 latency", "type": "line", "showSymbol": False, "yAxisIndex": 1, "color": "#e07b39", "connectNulls": False,
             "data": [[t * 1000, p95] for t, _, p95, _ in points]},
            {"name": "ready replicas", "type": "line", "step": "end", "showSymbol": False, "yAxisIndex": 2, "color": "#7a9a5a",
             "lineStyle": {"type": "dashed"}, "areaStyle": {"opacity": 0.08},
             "data": [[t * 1000, capacity] for t, _, _, capacity in points]},
        ],
    }
