"""The history page (`/history`): every scheduling action with before → after and outcome, filterable."""

from __future__ import annotations

import json
from typing import Any

from nicegui import ui

from corral.domain.history import Action
from corral.events import EventType
from corral.ui.live import ClientEvents, live, runtime

ACTIONS = [a.value for a in Action]  # cutover and scale-verify: Kubernetes backend
COLUMNS = [
    {"name": "timestamp", "label": "When", "field": "timestamp", "sortable": True, "align": "left"},
    {"name": "action", "label": "Action", "field": "action", "sortable": True, "align": "left"},
    {"name": "target", "label": "Target", "field": "target", "sortable": True, "align": "left"},
    {"name": "change", "label": "Before → after", "field": "change", "align": "left"},
    {"name": "outcome", "label": "Outcome", "field": "outcome", "sortable": True, "align": "left"},
    {"name": "message", "label": "Message", "field": "message", "align": "left", "style": "white-space: normal"},
]


def page(events: ClientEvents) -> None:
    ui.page_title("Corral · History")
    with ui.row().classes("items-center gap-4"):
        action = ui.select(ACTIONS, label="Action", clearable=True).classes("w-48").props('data-testid="history-action"')
        target = ui.input("Target", placeholder="a deployment, pod or service").props("clearable").classes("w-72")
        search = ui.input("Search", placeholder="any text").props("clearable").classes("w-72")
    table = ui.table(columns=COLUMNS, rows=[], row_key="id", pagination={"rowsPerPage": 50, "sortBy": "timestamp", "descending": True}) \
        .classes("w-full").props('dense flat data-testid="history"')
    table.bind_filter_from(search, "value")

    def redraw() -> None:
        rows = runtime().store.history(action=action.value or None, target=(target.value or "").strip() or None, limit=2000)
        table.rows = [history_row(r) for r in rows]
        table.update()

    action.on_value_change(redraw)
    target.on_value_change(redraw)
    redraw()
    live(events, (EventType.HISTORY,), redraw)


def history_row(record: dict[str, Any]) -> dict[str, Any]:
    def brief(value: Any) -> str:
        return json.dumps(value, separators=(",", ":")) if value not in (None, {}) else "–"

    return {"id": record["id"], "timestamp": record["timestamp"][:19].replace("T", " "), "action": record["action"],
            "target": record["target"], "change": f"{brief(record['before'])} → {brief(record['after'])}",
            "outcome": record["outcome"], "message": record["message"] or ""}
