"""easy-backfill's promise to the head, through the real queue on a simulated 2-GPU machine (tests/fake_nvml): a task
that wants both GPUs while one trains gets them reserved and a start-by time, in its reason and as `startBy`; the
promise survives a restart of the control plane (it is kept in the database, not recomputed from scratch) and is
cleared once the task starts."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import running_corral
from tests.integration.test_cli import cli
from tests.integration.test_finetune import dataset, submit, task, tiny_model  # noqa: F401 (fixtures)
from tests.integration.test_finetune_preemption import FAKE_NVML, GIB

pytest.importorskip("peft")


def test_the_head_is_promised_a_start_that_survives_a_restart(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    nvml = tmp_path / "nvml.json"
    nvml.write_text(json.dumps([{"name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB, "used": 0, "uuid": f"GPU-{i}"}
                                for i in range(2)]))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
           "CORRAL_TEST_NVML_FILE": str(nvml), "CORRAL_BACKFILL_SLACK_S": "600"}
    with running_corral(tmp_path / "data", env) as corral:
        long = submit(corral, tiny_model, dataset, gpus=1, timeoutSeconds=1800, hyperparameters={"epochs": 200})
        wait_for(lambda: task(corral, long["id"])["status"] in ("preparing", "training"), what="the 1-GPU task to start")
        started_at = datetime.fromisoformat(task(corral, long["id"])["startedAt"])
        wide = submit(corral, tiny_model, dataset, gpus=2, hyperparameters={"epochs": 1})
        head = wait_for(lambda: (t := task(corral, wide["id"]))["startBy"] and t, what="the head's promise")
        promised = datetime.fromisoformat(head["startBy"])
        # Reserved when the running task's timeout ends (or its trainer's ETA says sooner), plus the 600 s of slack.
        assert 0 < (promised - started_at).total_seconds() <= 1800 + 600 + 5
        assert head["status"] == "queued"
        assert f"reserved for it: it starts by {promised:%Y-%m-%d %H:%M} UTC at the latest" in head["reason"]
        assert task(corral, long["id"])["startBy"] is None  # running: nothing promised
        listed = cli(corral.url, "finetune", "list", "-o", "wide")
        assert listed.returncode == 0 and "Start by (UTC)" in listed.stdout and f"{promised:%Y-%m-%d %H:%M}" in listed.stdout

        corral.stop()
        corral.start()
        # The promise is the one made before: kept, not made again from the reservation of the moment (the trainer's
        # ETA by now). Two progress updates after the restart: a whole scheduling round ran between them.
        seen: set[int] = set()

        def two_updates() -> bool:
            seen.add(task(corral, long["id"])["progress"].get("step") or 0)
            return len(seen) > 2

        wait_for(two_updates, what="two progress updates after the restart")
        assert task(corral, wide["id"])["startBy"] == head["startBy"]

        corral.ok("POST", f"/api/finetune/tasks/{long['id']}/cancel")
        now = wait_for(lambda: (t := task(corral, wide["id"]))["status"] != "queued" and t, what="the head to start")
        assert now["startBy"] is None and sorted(now["units"]) == ["0", "1"]
        with sqlite3.connect(corral.data_dir / "corral.db") as db:  # kept no longer, not only hidden by the view
            assert db.execute("SELECT promised_start FROM finetune_tasks WHERE id = ?", (wide["id"],)).fetchone() == (None,)
