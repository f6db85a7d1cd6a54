"""Resume and multi-process training with the real trainer on the tiny model, on the CPU.

- A task cancelled after a checkpoint is resumed (`POST .../resume`): it continues from that checkpoint (the first
  step after the resume is the checkpoint's next one, not 1), completes, and its curves show every step once even
  though the steps after the checkpoint ran twice. Resuming is refused (409) with the reason when the task has no
  checkpoint or its state does not allow it.
- Two data-parallel processes (the launch path of `gpus: 2`: torch.distributed.run, gloo on the CPU) both train,
  and only rank 0 writes progress and the result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from corral.domain.hyperparameters import validate
from corral.finetune.runners import ProcessRunner
from corral.finetune.store import TaskRecord
from tests.conftest import wait_for, wait_for_async
from tests.integration.conftest import CorralServer
from tests.integration.test_cli import cli
from tests.integration.test_finetune import dataset, finished, submit, task, tiny_model  # noqa: F401 (fixtures)

pytest.importorskip("peft")


def progress_events(corral: CorralServer, task_id: str) -> list[dict]:
    path = corral.data_dir / "finetune" / task_id / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_cancelled_task_resumes_from_its_checkpoint(corral: CorralServer, tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    # Refusals first: a task cancelled before its first checkpoint, and one that is not over.
    early = submit(corral, tiny_model, dataset, hyperparameters={"epochs": 200})["id"]
    queued = submit(corral, tiny_model, dataset)["id"]
    assert corral.ok("POST", f"/api/finetune/tasks/{queued}/cancel")["status"] == "cancelled"
    refused = corral.http.post(f"/api/finetune/tasks/{queued}/resume")
    assert refused.status_code == 409 and "has no checkpoint to resume from" in refused.json()["error"]
    running = corral.http.post(f"/api/finetune/tasks/{early}/resume")
    assert running.status_code == 409 and "only a cancelled, timed-out or failed task can be resumed" in running.json()["error"]
    assert corral.http.post("/api/finetune/tasks/ft-nope/resume").status_code == 404
    corral.ok("POST", f"/api/finetune/tasks/{early}/cancel")

    hp = {"epochs": 3, "saveSteps": 5}  # 50 examples, batch 4: 13 steps an epoch, 39 in all
    task_id = submit(corral, tiny_model, dataset, hyperparameters=hp)["id"]
    checkpoints = corral.data_dir / "finetune" / task_id / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-10" / "trainer_state.json").exists(), timeout=120, what="checkpoint 10")
    cancelled = corral.ok("POST", f"/api/finetune/tasks/{task_id}/cancel")
    assert cancelled["status"] == "cancelled"
    stopped_at = max(e["step"] for e in progress_events(corral, task_id) if e["event"] == "step")
    newest = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists())

    resumed = cli(corral.url, "finetune", "resume", task_id)  # the CLI's way; the API's answer is the task
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from checkpoint-{newest}" in corral.http.get(f"/api/finetune/tasks/{task_id}/logs", params={"tail": 5000}).text
    done = finished(corral, task_id, timeout=180)
    assert done["status"] == "completed", done["reason"]
    assert done["progress"]["step"] == done["progress"]["totalSteps"] == 39

    events = progress_events(corral, task_id)
    second_run = events[next(i for i, e in enumerate(events) if e["event"] == "preparing" and e["resume"]):]
    assert [e["step"] for e in second_run if e["event"] == "step"][0] == newest + 1, "continued from the checkpoint, not step 1"
    replayed = stopped_at - newest  # steps after the checkpoint ran twice, and are in the progress file twice
    assert sum(1 for e in events if e["event"] == "step") == 39 + replayed
    curves = corral.ok("GET", f"/api/finetune/tasks/{task_id}/curves")
    assert [step for step, _ in curves["loss"]] == list(range(1, 40))  # each step once
    assert [step for step, _ in curves["learningRate"]] == list(range(1, 40)) and curves["evalLoss"] == []
    log = corral.http.get(f"/api/finetune/tasks/{task_id}/logs", params={"tail": 5000}).text
    assert f"[trainer] resuming from checkpoint-{newest}" in log
    again = corral.http.post(f"/api/finetune/tasks/{task_id}/resume")
    assert again.status_code == 409 and "it completed; its checkpoints were removed" in again.json()["error"]
    history = corral.ok("GET", "/api/history", params={"target": task_id})
    assert any(h.get("target") == task_id and "resumed" in (h.get("message") or "") for h in history), history[:5]


async def test_two_data_parallel_processes_on_the_cpu(tmp_path: Path, tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    """The launch path of a 2-GPU task, on the CPU: the runner starts torch.distributed.run with 2 processes."""
    directory = tmp_path / "ft-ddp"
    directory.mkdir()
    hp = validate({"epochs": 1, "batchSize": 4, "saveSteps": 2})
    (directory / "task.json").write_text(json.dumps({"baseModel": str(tiny_model), "datasetPath": str(dataset), "method": "lora",
                                                     "hyperparameters": hp}))
    record = TaskRecord(id="ft-ddp", status="preparing", base_model=str(tiny_model), dataset_path=str(dataset), method="lora",
                        priority="normal", hyperparameters=hp, gpus=2)
    runner = ProcessRunner(stop_grace_s=5)
    started = runner.launch(record, directory, [])  # no CUDA device visible: gloo
    record = TaskRecord(**{**record.__dict__, **started})
    try:
        await wait_for_async(lambda: not runner.alive(record), timeout=150, what="the 2-process trainer to end")
    finally:
        await runner.stop(record)
    log = (directory / "train.log").read_text()
    assert "torch.distributed.run" in log and sys.executable in log
    assert "[trainer] rank 0 of 2 started" in log and "[trainer] rank 1 of 2 started" in log, log[-3000:]
    assert "data parallel over 2 processes (gloo)" in log
    events = [json.loads(line) for line in (directory / "progress.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "step"]
    # 50 examples, 4 a process, 2 processes: 7 steps (not 13: each process trains half of every epoch), reported once each.
    assert steps == list(range(1, 8)), steps
    assert [e["event"] for e in events].count("completed") == 1 and [e["event"] for e in events].count("dataset") == 1
    assert (directory / "output" / "adapter_model.safetensors").exists() and not (directory / "checkpoints").exists()
