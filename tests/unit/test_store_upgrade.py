"""A database written by an older Corral opens with the newer schema and keeps its rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from corral.finetune.store import TaskStore
from corral.store.state import StateStore


def test_missing_columns_are_added_and_rows_kept(tmp_path: Path) -> None:
    path = tmp_path / "corral.db"
    StateStore(path).close()
    with sqlite3.connect(path) as db:  # what a release before the reclaim policy wrote
        db.execute("ALTER TABLE finetune_tasks DROP COLUMN reclaimed")
        db.execute("ALTER TABLE finetune_tasks DROP COLUMN bypassed")
        db.execute("ALTER TABLE finetune_tasks DROP COLUMN preemptible")  # and before preemption
        db.execute("ALTER TABLE finetune_tasks DROP COLUMN preempted_by")
        db.execute("INSERT INTO finetune_tasks (id, status, reason, base_model, dataset_path, method, priority, gpus, memory_gb,"
                   " timeout_s, hyperparameters, examples, progress, units, created_at) VALUES ('ft-old', 'completed', '', 'm',"
                   " 'd.jsonl', 'lora', 'normal', 0, 0.0, 60.0, '{}', 3, '{}', '[]', '2026-01-01 00:00:00')")
    store = StateStore(path)
    task = TaskStore(store).get("ft-old")
    assert task is not None and task.status == "completed" and task.reclaimed is None and task.bypassed == 0 and isinstance(task.bypassed, int)
    assert task.preemptible is True and task.preempted_by is None
    store.close()
