"""Usage rows in SQLite: the hourly traffic per business and key, the flush cursor, and the reads GPU-seconds are
integrated from (the history's assignment rows, the finetune tasks' runs). How the rows are kept exact across a
crash is `corral.domain.usage`'s docstring; `flush` is the one transaction that makes it so."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, select

from corral.domain.history import Outcome
from corral.domain.tasks import ACTIVE
from corral.domain.usage import (
    MeterKey,
    TaskRun,
    UsageCounts,
    UsageKey,
    billed_runs,
    by_business,
    deltas,
    hour_of,
    legacy_runs,
)
from corral.store.schema import DeploymentRow, FinetuneTaskRow, HistoryRow, UsageCursorRow, UsageHourlyRow
from corral.store.state import StateStore, _entry, aware

GATEWAY = "gateway"  # the one data plane a control plane meters today (the cursor's `plane`)
_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors", "held", "rejected")  # UsageCounts' order


class UsageStore:
    def __init__(self, state: StateStore) -> None:
        self.state = state

    def flush(self, epoch: str, counters: Mapping[MeterKey, UsageCounts], business_of: Mapping[str, str],
              at: datetime, plane: str = GATEWAY) -> dict[UsageKey, UsageCounts]:
        """Add what the plane counted since the last flush to the hour of `at`, and store `counters` as the new
        cursor, in one transaction: either both are written or neither, so no count is ever added twice.
        `counters` are the plane's cumulative counters in run `epoch`; the cursor of another epoch is ignored
        (the plane restarted from zero). Returns what was added, per (business, key id)."""
        hour = hour_of(at)
        with self.state.session() as s:
            cursor_row = s.get(UsageCursorRow, plane)
            cursor: dict[MeterKey, UsageCounts] = {}
            if cursor_row is not None and cursor_row.epoch == epoch:
                cursor = {(c[0], c[1]): UsageCounts.of(c[2]) for c in cursor_row.counters}
            added = by_business(deltas(cursor, counters), business_of)
            existing = {(r.business, r.key_id): r for r in s.scalars(select(UsageHourlyRow).where(UsageHourlyRow.hour == hour))
                        } if added else {}
            for (business, key_id), counts in added.items():
                row = existing.get((business, key_id or ""))
                if row is None:
                    row = UsageHourlyRow(hour=hour, business=business, key_id=key_id or "",
                                         **dict.fromkeys(_FIELDS, 0))
                    s.add(row)
                for name, value in zip(_FIELDS, counts.values(), strict=True):
                    setattr(row, name, getattr(row, name) + value)
            wire = [[service, key_id, list(c.values())] for (service, key_id), c in sorted(
                counters.items(), key=lambda item: (item[0][0], item[0][1] or "")) if c]
            if cursor_row is None:
                s.add(UsageCursorRow(plane=plane, epoch=epoch, counters=wire, flushed_at=at))
            else:
                cursor_row.epoch, cursor_row.counters, cursor_row.flushed_at = epoch, wire, at
        return added

    def traffic(self, start: datetime, end: datetime) -> dict[tuple[float, str, str | None], UsageCounts]:
        """(hour's start as unix time, business, key id) → traffic, for the hours that overlap [start, end)."""
        query = select(UsageHourlyRow).where(UsageHourlyRow.hour > start - timedelta(hours=1), UsageHourlyRow.hour < end)
        with self.state.session() as s:
            return {(aware(r.hour).timestamp(), r.business, r.key_id or None):  # type: ignore[union-attr]
                    UsageCounts(*(getattr(r, name) for name in _FIELDS)) for r in s.scalars(query)}

    def assignment_rows(self, until: datetime) -> list[dict[str, Any]]:
        """The history's `assign` and `delete` rows that took effect before `until`, oldest first (what GPU-seconds
        are integrated from: every assignment since the start, since the one in effect at a window's start may be
        old)."""
        query = (select(HistoryRow).where(HistoryRow.action.in_(("assign", "delete")), HistoryRow.timestamp < until,
                                          HistoryRow.outcome == Outcome.SUCCESS.value).order_by(HistoryRow.id))
        with self.state.session() as s:
            return [_entry(r) for r in s.scalars(query)]

    def gpus_of_pools(self) -> dict[str, int]:
        """Pool → GPUs per replica, for assignment rows that did not record their replica's GPUs."""
        with self.state.session() as s:
            return {name: gpus for name, gpus in s.execute(select(DeploymentRow.name, DeploymentRow.gpus_per_replica))}

    def task_runs(self, start: datetime, end: datetime) -> list[TaskRun]:
        """The runs of the finetune tasks that may overlap [start, end): every run of each task (before and after a
        preemption, a resume or a restart), each from its start to its end, or to now while it runs (a task waiting in
        the queue is not billed for its wait). Billed to the task's business tag, or to `FINETUNE` without one. A task
        written before runs were recorded has its last run only (`legacy_runs`)."""
        query = select(FinetuneTaskRow).where(FinetuneTaskRow.created_at < end,
                                              FinetuneTaskRow.finished_at.is_(None) | (FinetuneTaskRow.finished_at > start))
        active = {state.value for state in ACTIVE}
        out: list[TaskRun] = []
        with self.state.session() as s:
            for r in s.scalars(query):
                runs = r.runs if r.runs is not None else legacy_runs(
                    aware(r.started_at), aware(r.finished_at), r.status in active, r.gpus)
                out += [run for run in billed_runs(runs, r.business_tag)
                        if run.start < end.timestamp() and (run.end is None or run.end > start.timestamp())]
        return out

    def prune(self, older_than: datetime) -> int:
        """Drop the hourly rows of hours before `older_than` (the retention setting); how many went."""
        with self.state.session() as s:
            result = s.execute(delete(UsageHourlyRow).where(UsageHourlyRow.hour < hour_of(older_than)))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)
