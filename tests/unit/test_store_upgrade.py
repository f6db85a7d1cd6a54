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
        db.execute("ALTER TABLE finetune_tasks DROP COLUMN business_tag")  # and before finetune billing by business
        db.execute("ALTER TABLE finetune_tasks DROP COLUMN runs")
        db.execute("INSERT INTO finetune_tasks (id, status, reason, base_model, dataset_path, method, priority, gpus, memory_gb,"
                   " timeout_s, hyperparameters, examples, progress, units, created_at) VALUES ('ft-old', 'completed', '', 'm',"
                   " 'd.jsonl', 'lora', 'normal', 0, 0.0, 60.0, '{}', 3, '{}', '[]', '2026-01-01 00:00:00')")
    store = StateStore(path)
    task = TaskStore(store).get("ft-old")
    assert task is not None and task.status == "completed" and task.reclaimed is None and task.bypassed == 0 and isinstance(task.bypassed, int)
    assert task.preemptible is True and task.preempted_by is None
    assert task.business_tag is None and task.runs is None  # billed under (finetune), its last run only (`legacy_runs`)
    store.close()


def test_an_old_key_reads_weight_1(tmp_path: Path) -> None:
    path = tmp_path / "corral.db"
    StateStore(path).close()
    with sqlite3.connect(path) as db:  # what a release before key weights wrote
        db.execute("ALTER TABLE api_keys DROP COLUMN weight")
        db.execute("INSERT INTO api_keys (id, service, name, prefix, digest, limits, created_at) VALUES ('key-old',"
                   " 'acme-nlb', NULL, 'crl-abcdef', 'd1', '{}', '2026-01-01 00:00:00')")
    StateStore(path).close()
    with sqlite3.connect(path) as db:  # a NULL weight, whatever wrote it, reads as the default too
        db.execute("INSERT INTO api_keys (id, service, name, prefix, digest, limits, created_at, weight) VALUES"
                   " ('key-null', 'acme-nlb', NULL, 'crl-ghijkl', 'd2', '{}', '2026-01-02 00:00:00', NULL)")
    store = StateStore(path)
    assert {k.id: k.weight for k in store.list_api_keys("acme-nlb")} == {"key-old": 1, "key-null": 1}
    store.close()
