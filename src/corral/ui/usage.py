"""The usage page (`/usage`): what each business used per hour — requests, tokens, GPU-seconds — with a chart per
business, from the same report as `GET /api/usage` (corral.metering).

Read when the page opens, when the window changes and on Refresh (the rows change once per metering flush, so a
live redraw would only repeat itself); the database work runs off the event loop (`Metering.report_now`).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from nicegui import ui

from corral.domain.usage import GroupBy, UsageRow
from corral.metering import rows_total
from corral.ui.live import ClientEvents, runtime

WINDOWS = {"24h": "last 24 hours", "7d": "last 7 days", "30d": "last 30 days"}
SPANS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
COLUMNS = [
    {"name": "business", "label": "Business", "field": "business", "align": "left", "sortable": True},
    {"name": "requests", "label": "Requests", "field": "requests", "sortable": True},
    {"name": "promptTokens", "label": "Prompt tokens", "field": "promptTokens", "sortable": True},
    {"name": "completionTokens", "label": "Completion tokens", "field": "completionTokens", "sortable": True},
    {"name": "errors", "label": "Errors", "field": "errors", "sortable": True},
    {"name": "held", "label": "Held", "field": "held", "sortable": True},
    {"name": "rejected", "label": "Rejected", "field": "rejected", "sortable": True},
    {"name": "gpuSeconds", "label": "GPU-seconds", "field": "gpuSeconds", "sortable": True},
    {"name": "replicaSeconds", "label": "Replica-seconds", "field": "replicaSeconds", "sortable": True},
]


def totals(rows: list[UsageRow]) -> list[dict[str, Any]]:
    """Hourly rows → one row per business for the table."""
    per: dict[str, list[UsageRow]] = {}
    for r in rows:
        per.setdefault(r.business or "", []).append(r)
    out = []
    for business, mine in sorted(per.items()):
        counts, held = rows_total(mine)
        out.append({"business": business, "requests": counts.requests, "promptTokens": counts.prompt_tokens,
                    "completionTokens": counts.completion_tokens, "errors": counts.errors, "held": counts.held,
                    "rejected": counts.rejected, "gpuSeconds": round(held.gpu_seconds), "replicaSeconds": round(held.replica_seconds)})
    return out


def chart_options(rows: list[UsageRow], start: datetime, end: datetime) -> dict[str, Any]:
    """ECharts options for one business over [start, end): requests per hour (bars, left axis) and GPU-seconds per
    hour (line, right); the axis spans the window, so one busy hour is one narrow bar, not the whole chart."""
    hours = sorted(r for r in rows if r.hour is not None)
    return {
        "animation": False,
        "grid": {"left": 52, "right": 60, "top": 26, "bottom": 22},
        "legend": {"top": 0, "itemWidth": 14, "itemHeight": 8, "textStyle": {"fontSize": 11}},
        "tooltip": {"trigger": "axis"},
        "xAxis": {"type": "time", "min": start.timestamp() * 1000, "max": end.timestamp() * 1000,
                  "axisLabel": {"fontSize": 10}},
        "yAxis": [
            {"type": "value", "name": "requests", "min": 0, "nameTextStyle": {"fontSize": 10}, "axisLabel": {"fontSize": 10}},
            {"type": "value", "name": "GPU-s", "min": 0, "nameTextStyle": {"fontSize": 10}, "axisLabel": {"fontSize": 10},
             "splitLine": {"show": False}},
        ],
        "series": [
            {"name": "requests", "type": "bar", "yAxisIndex": 0, "color": "#2f5d8a", "barMaxWidth": 12,
             "data": [[r.hour * 1000, r.counts.requests] for r in hours]},  # type: ignore[operator]
            {"name": "GPU-seconds", "type": "line", "step": "end", "yAxisIndex": 1, "color": "#e07b39",
             "data": [[r.hour * 1000, round(r.held.gpu_seconds, 1)] for r in hours]},  # type: ignore[operator]
        ],
    }


def page(events: ClientEvents) -> None:
    ui.page_title("Corral · Usage")
    with ui.row().classes("items-center gap-4"):
        ui.label("Usage per business").classes("text-lg font-bold")
        window = ui.select(WINDOWS, value="24h", label="Window").classes("w-48").props('data-testid="usage-window"')
        refresh_button = ui.button("Refresh", icon="refresh").props("flat")
        ui.link("CSV", "/api/usage?groupBy=hour&format=csv").classes("text-sm")
    ui.label("Requests and tokens are counted per hour by the gateway (flushed every few seconds); GPU-seconds are the "
             "GPUs of the replicas assigned to each business, integrated from the assignment history.") \
        .classes("text-sm text-grey-7")
    table = ui.table(columns=COLUMNS, rows=[], row_key="business").classes("w-full").props('dense flat data-testid="usage"')
    charts = ui.column().classes("w-full gap-2")

    async def refresh() -> None:
        end = datetime.now(timezone.utc)
        start = end - SPANS[window.value]
        rows = await runtime().metering.report_now(start, end, GroupBy.HOUR)
        table.rows = totals(rows)
        table.update()
        charts.clear()
        per: dict[str, list[UsageRow]] = {}
        for r in rows:
            per.setdefault(r.business or "", []).append(r)
        with charts:
            for business, mine in sorted(per.items()):
                with ui.card().classes("w-full").props(f'data-testid="usage-card-{business}"'):
                    ui.label(business).classes("font-bold")
                    ui.echart(chart_options(mine, start, end)).classes("w-full h-40").props(f'data-testid="usage-chart-{business}"')

    window.on_value_change(refresh)
    refresh_button.on_click(refresh)
    ui.timer(0.05, refresh, once=True)
