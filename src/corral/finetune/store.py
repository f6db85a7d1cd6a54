"""Finetune tasks in the same SQLite database as everything else: they survive a restart."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from sqlalchemy import select

from corral.domain.tasks import TaskState
from corral.store.schema import FinetuneTaskRow
from corral.store.state import StateStore, aware


@dataclass(frozen=True)
class TaskRecord:
    id: str
    status: TaskState
    base_model: str
    dataset_path: str
    method: str
    priority: str
    hyperparameters: dict[str, Any]
    reason: str = ""
    gpus: int = 0
    memory_gb: float = 0.0
    timeout_s: float = 6 * 3600.0
    examples: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    units: list[str] = field(default_factory=list)
    pid: int | None = None
    pid_start: str | None = None
    bypassed: int = 0
    output: str | None = None
    reclaimed: dict[str, int] | None = None  # pool → replicas scaled in for this task, restored when it ends
    preemptible: bool = True  # a higher-priority business may take its GPUs (it checkpoints, re-queues, resumes)
    preempted_by: dict[str, Any] | None = None  # {"business", "priority", "pool"}, or {"task", "priority"}, until it restarts
    datasets: list[dict[str, Any]] | None = None  # a mix's sources: path, ratio, examples, taken (None: datasetPath alone)
    promised_start: datetime | None = None  # easy-backfill: GPUs reserved for it, it starts by then (while queued)
    business_tag: str | None = None  # the business its GPU-seconds are billed to (None: `(finetune)`)
    runs: list[dict[str, Any]] | None = None  # every run: {startedAt, endedAt, gpus} (None: written before runs were kept)
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


_COLUMNS = [f.name for f in fields(TaskRecord)]


def _record(row: FinetuneTaskRow) -> TaskRecord:
    values = {name: getattr(row, name) for name in _COLUMNS}
    for name in ("created_at", "started_at", "finished_at", "promised_start"):
        values[name] = aware(values[name])
    values["status"] = TaskState(values["status"])  # the column holds its value; the record holds the enum
    return TaskRecord(**values)


class TaskStore:
    def __init__(self, state: StateStore) -> None:
        self.state = state

    def add(self, task: TaskRecord) -> None:
        with self.state.session() as s:
            s.add(FinetuneTaskRow(**{k: v for k, v in task.__dict__.items() if v is not None or k == "pid"}))

    def get(self, task_id: str) -> TaskRecord | None:
        with self.state.session() as s:
            row = s.get(FinetuneTaskRow, task_id)
            return _record(row) if row else None

    def list(self, statuses: tuple[str, ...] | None = None) -> list[TaskRecord]:
        query = select(FinetuneTaskRow).order_by(FinetuneTaskRow.created_at, FinetuneTaskRow.id)
        if statuses:
            query = query.where(FinetuneTaskRow.status.in_(statuses))
        with self.state.session() as s:
            return [_record(r) for r in s.scalars(query)]

    def list_reclaiming(self) -> list[TaskRecord]:
        """Tasks holding replicas reclaimed from pools (to restore once they end)."""
        query = select(FinetuneTaskRow).where(FinetuneTaskRow.reclaimed.is_not(None)).order_by(FinetuneTaskRow.created_at)
        with self.state.session() as s:
            return [_record(r) for r in s.scalars(query)]

    def update(self, task_id: str, **columns: Any) -> TaskRecord:
        with self.state.session() as s:
            row = s.get_one(FinetuneTaskRow, task_id)
            for key, value in columns.items():
                setattr(row, key, value)
            s.flush()
            return _record(row)
