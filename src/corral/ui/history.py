"""The history page (`/history`): every scheduling action with before → after and outcome, filterable.

Laid out for a 1280 px screen: the table has a fixed layout (every column keeps its share of the width,
none is pushed off-screen by a long value), before → after is summarised to what changed
(`business: unassigned → production`) with the full JSON in a tooltip, and long values wrap instead of
widening the table. Rows whose change was refused or failed are tinted, so they are found at a glance.
"""

from __future__ import annotations

import json
from typing import Any

from nicegui import ui

from corral.domain.history import Action, Outcome
from corral.events import EventType
from corral.ui.live import ClientEvents, live, runtime

ACTIONS = [a.value for a in Action]  # cutover and scale-verify: Kubernetes backend
WRAP = "white-space: normal; overflow-wrap: anywhere"
COLUMNS = [
    {"name": "timestamp", "label": "When", "field": "timestamp", "sortable": True, "align": "left", "headerStyle": "width: 10.5rem"},
    {"name": "action", "label": "Action", "field": "action", "sortable": True, "align": "left", "headerStyle": "width: 7.5rem"},
    {"name": "target", "label": "Target", "field": "target", "sortable": True, "align": "left", "headerStyle": "width: 15rem",
     "style": WRAP},
    {"name": "change", "label": "Before → after", "field": "change", "align": "left", "style": WRAP},
    {"name": "outcome", "label": "Outcome", "field": "outcome", "sortable": True, "align": "left", "headerStyle": "width: 7rem"},
    {"name": "message", "label": "Message", "field": "message", "align": "left", "style": WRAP, "headerStyle": "width: 30%"},
]
BAD = (Outcome.FAILED.value, Outcome.ROLLED_BACK.value, Outcome.TIMEOUT.value)
OUTCOME_COLOURS = {Outcome.SUCCESS.value: "positive", Outcome.REFUSED.value: "warning", Outcome.PENDING.value: "grey-7",
                   Outcome.RESTARTING.value: "blue-grey", Outcome.CORRECTED.value: "blue-grey",
                   **{o: "negative" for o in BAD}}
# Refused rows amber, failed ones red: a Quasar row-class function (evaluated in the browser, no per-row Python).
ROW_CLASS = (":table-row-class-fn=\"row => row.outcome === 'refused' ? 'bg-amber-1' : "
             f"[{', '.join(repr(o) for o in BAD)}].includes(row.outcome) ? 'bg-red-1' : ''\"")
# At most two lines a cell (a long trainer error or a created deployment's fields would make a tall row);
# the whole text in a tooltip: the full before/after JSON for a change, the message when it was cut.
CLAMP = "display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; overflow: hidden"
CHANGE_CELL = r"""
<q-td :props="props">
  <span style="CLAMP">{{ props.value }}</span>
  <q-tooltip v-if="props.row.full" max-width="40rem" class="text-body2">
    <pre class="m-0" style="white-space: pre-wrap">{{ props.row.full }}</pre>
  </q-tooltip>
</q-td>
""".replace("CLAMP", CLAMP)
MESSAGE_CELL = r"""
<q-td :props="props">
  <span style="CLAMP">{{ props.value }}</span>
  <q-tooltip v-if="props.value.length > 90" max-width="40rem" class="text-body2">{{ props.value }}</q-tooltip>
</q-td>
""".replace("CLAMP", CLAMP)
OUTCOME_CELL = r"""
<q-td :props="props">
  <q-badge :color="props.row.colour" :label="props.value" :data-testid="'outcome-' + props.row.id" />
</q-td>
"""
MAX_CHANGES = 6  # keys listed in a summary; the rest are counted ("+3 more") and in the tooltip


def page(events: ClientEvents) -> None:
    ui.page_title("Corral · History")
    with ui.row().classes("items-center gap-4"):
        action = ui.select(ACTIONS, label="Action", clearable=True).classes("w-48").props('data-testid="history-action"')
        target = ui.input("Target", placeholder="a deployment, pod, service or task").props("clearable").classes("w-72")
        search = ui.input("Search", placeholder="any text").props("clearable").classes("w-72")
    table = ui.table(columns=COLUMNS, rows=[], row_key="id", pagination={"rowsPerPage": 50, "sortBy": "timestamp", "descending": True}) \
        .classes("w-full").props('dense flat data-testid="history" table-style="table-layout: fixed"').props(ROW_CLASS)
    table.add_slot("body-cell-change", CHANGE_CELL)
    table.add_slot("body-cell-outcome", OUTCOME_CELL)
    table.add_slot("body-cell-message", MESSAGE_CELL)
    table.bind_filter_from(search, "value")

    def redraw() -> None:
        records = runtime().store.history(action=action.value or None, target=(target.value or "").strip() or None, limit=2000)
        rows = [history_row(r) for r in records]
        if rows != table.rows:
            table.rows = rows
            table.update()

    action.on_value_change(redraw)
    target.on_value_change(redraw)
    redraw()
    live(events, (EventType.HISTORY,), redraw)


def history_row(record: dict[str, Any]) -> dict[str, Any]:
    before, after = record["before"], record["after"]
    full = "" if before is None and after is None else \
        f"before: {json.dumps(before, indent=1, sort_keys=True)}\nafter: {json.dumps(after, indent=1, sort_keys=True)}"
    return {"id": record["id"], "timestamp": record["timestamp"][:19].replace("T", " "), "action": record["action"],
            "target": record["target"], "change": change_summary(before, after), "full": full,
            "outcome": record["outcome"], "colour": OUTCOME_COLOURS.get(record["outcome"], "grey-7"),
            "message": record["message"] or ""}


def change_summary(before: Any, after: Any) -> str:
    """What changed, one `key: old → new` per changed key (`business: unassigned → production`); a creation
    lists what was created, a removal what was removed. Unchanged keys are left out."""
    if before is None and after is None:
        return "–"
    if isinstance(before, dict) or isinstance(after, dict):
        old = before if isinstance(before, dict) else {}
        new = after if isinstance(after, dict) else {}
        if before is None:
            parts = [f"{k}: {_brief(v)}" for k, v in new.items()]
            return _joined(parts, "created ")
        if after is None:
            parts = [f"{k}: {_brief(v)}" for k, v in old.items()]
            return _joined(parts, "removed ")
        parts = [f"{k}: {_brief(old.get(k))} → {_brief(new.get(k))}" for k in {**old, **new} if old.get(k) != new.get(k)]
        return _joined(parts, "") if parts else "no change"
    return f"{_brief(before)} → {_brief(after)}"


def _brief(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 60 else text[:59] + "…"


def _joined(parts: list[str], prefix: str) -> str:
    more = f" (+{len(parts) - MAX_CHANGES} more)" if len(parts) > MAX_CHANGES else ""
    return prefix + ", ".join(parts[:MAX_CHANGES]) + more
