"""Real LoRA finetunes of a tiny model built here, on the CPU, through the real queue (spec 02's tests)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from corral.backends.local.process import process_start_time
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer
from tests.integration.test_pool_lifecycle import EventRecorder
from tests.tiny_model import build_tiny_model

pytest.importorskip("peft")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(30)]
    rows += [{"instruction": "Say hello", "input": "", "output": "hello world"}] * 20
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def submit(corral: CorralServer, model: Path, data: Path, **extra) -> dict:
    body = {"baseModel": str(model), "datasetPath": str(data), "hyperparameters": {"epochs": 1}} | extra
    return corral.ok("POST", "/api/finetune/tasks", json=body)


def task(corral: CorralServer, task_id: str) -> dict:
    return corral.ok("GET", f"/api/finetune/tasks/{task_id}")


def finished(corral: CorralServer, task_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (t := task(corral, task_id))["status"] in ("completed", "failed", "cancelled") and t,
                    timeout=timeout, what=f"task {task_id} to finish")


def test_three_tasks_at_once_train_one_after_another(corral: CorralServer, tiny_model: Path, dataset: Path) -> None:
    events = EventRecorder(corral.url)
    ids = [submit(corral, tiny_model, dataset)["id"] for _ in range(3)]
    assert [task(corral, i)["status"] for i in ids[1:]] == ["queued", "queued"]
    assert task(corral, ids[1])["reason"] == f"queued, waiting for a CPU training slot (currently running: {ids[0]})"
    results = [finished(corral, i) for i in ids]
    assert [r["status"] for r in results] == ["completed"] * 3
    # One after another, in submission order.
    assert results[0]["finishedAt"] <= results[1]["startedAt"] and results[1]["finishedAt"] <= results[2]["startedAt"]
    events.wait("finetune_task", lambda d: d["id"] == ids[2] and d["status"] == "completed")  # the event may trail the GET
    statuses = {i: [] for i in ids}
    for message in events.messages:
        if message["type"] == "finetune_task" and message["data"]["id"] in statuses:
            seen = statuses[message["data"]["id"]]
            if not seen or seen[-1] != message["data"]["status"]:
                seen.append(message["data"]["status"])
    assert statuses[ids[0]] == ["pending", "preparing", "training", "completed"]
    assert statuses[ids[2]] == ["pending", "queued", "preparing", "training", "completed"]
    events.close()
    # Progress, output and log.
    done = results[0]
    assert done["progress"]["step"] == done["progress"]["totalSteps"] > 0 and done["progress"]["loss"] > 0
    assert (Path(done["output"]) / "adapter_model.safetensors").exists()
    log = corral.http.get(f"/api/finetune/tasks/{ids[1]}/logs").text
    assert f"queued, waiting for a CPU training slot (currently running: {ids[0]})" in log and "starting on the CPU" in log
    assert corral.ok("GET", "/api/finetune/queue") == {"waiting": 0, "running": [], "strategy": "easy-backfill",
                                                       "backfillSlackSeconds": 3600.0, "warning": None}


def test_priority_cancel_and_timeout(corral: CorralServer, tiny_model: Path, dataset: Path) -> None:
    blocker = submit(corral, tiny_model, dataset, hyperparameters={"epochs": 200})["id"]
    low = submit(corral, tiny_model, dataset, priority="low")["id"]
    normal = submit(corral, tiny_model, dataset)["id"]
    high = submit(corral, tiny_model, dataset, priority="high")["id"]
    doomed = submit(corral, tiny_model, dataset, businessTag="research")
    assert doomed["businessTag"] == "research" and task(corral, low)["businessTag"] is None  # billed to research / (finetune)
    doomed = doomed["id"]
    # Cancel a queued task, then the running one once it trains.
    assert corral.ok("POST", f"/api/finetune/tasks/{doomed}/cancel")["status"] == "cancelled"
    wait_for(lambda: task(corral, blocker)["status"] == "training", timeout=60, what="the blocker to train")
    cancelled = corral.ok("POST", f"/api/finetune/tasks/{blocker}/cancel")
    assert cancelled["status"] == "cancelled" and cancelled["reason"] == "cancelled by request"
    again = corral.http.post(f"/api/finetune/tasks/{blocker}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]
    # The queue then runs high, normal, low.
    order = sorted((finished(corral, i)["startedAt"], i) for i in (low, normal, high))
    assert [i for _, i in order] == [high, normal, low]
    # A task running longer than its timeout is cancelled.
    slow = submit(corral, tiny_model, dataset, hyperparameters={"epochs": 200}, timeoutSeconds=3)["id"]
    result = finished(corral, slow)
    assert result["status"] == "cancelled" and result["reason"] == "timed out after 3 s (timeoutSeconds)"


def test_bad_submissions_are_refused_with_the_line_to_fix(corral: CorralServer, tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"instruction": 3}\n')
    cases = [
        ({"datasetPath": str(bad)}, "dataset line 2: needs 'messages', or 'instruction' and 'output'"),
        ({"datasetPath": str(tmp_path / "missing.jsonl")}, "is not a file"),
        ({"method": "dora"}, "method must be one of lora, qlora, full"),
        ({"priority": "urgent"}, "priority must be high, normal or low"),
        ({"gpus": 2}, "this machine has no GPU: submit with gpus 0"),
        ({"method": "qlora"}, "qlora needs a GPU"),
        ({"hyperparameters": {"epoch": 1}}, "unknown hyperparameter(s) epoch"),
        ({"hyperparameters": {"learningRate": -1}}, "learningRate must be a positive number"),
        ({"baseModel": "not-a-model"}, "neither a local model directory nor a hub id"),
        ({"baseModel": "org/name\n"}, "neither a local model directory nor a hub id"),  # a name is the whole text
        ({"timeoutSeconds": 0}, "timeoutSeconds must be a positive number of seconds"),
        # a business tag by deploy-service's rules (nothing created: the list below stays empty)
        ({"businessTag": "Research"}, "businessTag 'Research' is not a valid name"),
        ({"businessTag": "unassigned"}, "businessTag 'unassigned' is reserved"),
        ({"businessTag": "r" * 64}, "businessTag: String should have at most 63 characters"),
        ({"businessTag": ""}, "businessTag, when given, is a business name"),
    ]
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n')
    for change, fragment in cases:
        body = {"baseModel": str(tiny_model), "datasetPath": str(good)} | change
        if "gpus" in change and corral.ok("GET", "/api/system/gpu-info")["available"]:  # pragma: no cover
            continue
        response = corral.http.post("/api/finetune/tasks", json=body)
        assert response.status_code == 400, (change, response.text)
        assert fragment in response.json()["error"], (change, response.json())
    assert corral.ok("GET", "/api/finetune/tasks") == []
    assert corral.http.get("/api/finetune/tasks/ft-nope").status_code == 404


def test_restart_during_training_loses_nothing(corral: CorralServer, tiny_model: Path, dataset: Path) -> None:
    hp = {"epochs": 40, "saveSteps": 20}
    adopted = submit(corral, tiny_model, dataset, hyperparameters=hp)["id"]
    resumed = submit(corral, tiny_model, dataset, hyperparameters=hp)["id"]
    wait_for(lambda: task(corral, adopted)["status"] == "training" and (task(corral, adopted)["progress"].get("step") or 0) > 0,
             timeout=60, what="training to start")
    corral.stop()
    pid = corral.finetune_pid(adopted)
    assert process_start_time(pid) is not None, "the trainer outlives the control plane"
    corral.start()
    # Re-adopted: same process, and it completes.
    assert task(corral, adopted)["status"] == "training"
    done = finished(corral, adopted, timeout=180)
    assert done["status"] == "completed" and done["progress"]["step"] == done["progress"]["totalSteps"]
    assert "re-adopted trainer process" in corral.http.get(f"/api/finetune/tasks/{adopted}/logs", params={"tail": 5000}).text
    # The second task dies while the control plane is down: it resumes from its checkpoint.
    wait_for(lambda: (task(corral, resumed)["progress"].get("step") or 0) > 25, timeout=120, what="a checkpoint")
    corral.stop()
    os.killpg(corral.finetune_pid(resumed), signal.SIGKILL)
    corral.start()
    result = finished(corral, resumed, timeout=180)
    assert result["status"] == "completed"
    log = corral.http.get(f"/api/finetune/tasks/{resumed}/logs", params={"tail": 2000}).text
    assert "resuming from its last checkpoint" in log


@pytest.mark.slow
def test_cli_finetune_then_deploy_the_adapter_as_a_pool(corral: CorralServer, tiny_model: Path, dataset: Path) -> None:
    import httpx

    from tests.integration.test_cli import cli

    submitted = cli(corral.url, "finetune", "submit", str(tiny_model), str(dataset), "--hp", "epochs=1", "--follow")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.split(":", 1)[0].strip()
    assert f"{task_id}: completed" in submitted.stdout
    assert task_id in cli(corral.url, "finetune", "list").stdout
    assert "completed: completed; output in" in cli(corral.url, "finetune", "logs", task_id).stdout
    again = cli(corral.url, "finetune", "cancel", task_id)
    assert again.returncode == 1 and "already completed" in again.stderr
    bad_hp = cli(corral.url, "finetune", "submit", str(tiny_model), str(dataset), "--hp", "epochs")
    assert bad_hp.returncode == 1 and "'epochs' is not name=number" in bad_hp.stderr

    # One call: merge the adapter (transformers serves plain weights) and deploy a pool that answers chat.
    deployed = cli(corral.url, "finetune", "deploy", task_id, "--engine", "transformers", "--tag", "tiny-tuned", "-n", "1")
    assert deployed.returncode == 0, deployed.stderr
    assert "deployed transformers-tiny-tuned-pool" in deployed.stdout and "/merged" in deployed.stdout
    pod = corral.wait_ready("transformers-tiny-tuned-pool", 1, timeout=120)[0]
    merged = corral.ok("GET", "/api/deployments/transformers-tiny-tuned-pool")["modelId"]
    assert (Path(merged) / "model.safetensors").exists()
    reply = httpx.post(f"{pod['endpoint']}/v1/chat/completions", timeout=60,  # transformers serve names the model by its path
                       json={"model": merged, "messages": [{"role": "user", "content": "what is 2 + 2?"}], "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    # vLLM gets the adapter on the base model instead (refused here only because vLLM is not installed).
    vllm = corral.http.post(f"/api/finetune/tasks/{task_id}/deploy", json={"engine": "vllm", "modelTag": "tiny-lora", "gpusPerReplica": 0})
    assert vllm.status_code in (201, 400)
    running = submit(corral, tiny_model, dataset, hyperparameters={"epochs": 100})["id"]
    refused = corral.http.post(f"/api/finetune/tasks/{running}/deploy", json={"engine": "transformers", "modelTag": "x"})
    assert refused.status_code == 409 and "only a completed task can be deployed" in refused.json()["error"]
    corral.ok("POST", f"/api/finetune/tasks/{running}/cancel")


def test_a_task_that_completes_while_corral_is_down_is_not_launched_again(corral: CorralServer, tiny_model: Path,
                                                                          dataset: Path) -> None:
    task_id = submit(corral, tiny_model, dataset, hyperparameters={"epochs": 2, "saveSteps": 5})["id"]
    wait_for(lambda: task(corral, task_id)["status"] == "training", timeout=60, what="training to start")
    corral.stop()
    pid = corral.finetune_pid(task_id)
    wait_for(lambda: process_start_time(pid) is None, timeout=120, what="the trainer to finish while Corral is down")
    corral.start()
    done = finished(corral, task_id)
    assert done["status"] == "completed" and done["output"]
    log = corral.http.get(f"/api/finetune/tasks/{task_id}/logs", params={"tail": 2000}).text
    assert "the trainer finished while Corral was down" in log
    assert "resuming" not in log and log.count("starting on") == 1, "never launched a second time"
