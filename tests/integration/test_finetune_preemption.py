"""GPUs shared both ways on a simulated 1-GPU machine (tests/fake_nvml, its memory read from a file the test
rewrites): the preflight keeps a task waiting while another program holds the GPU's memory, with the numbers in
its reason; then a running low-priority task is preempted by a scale-up for a high-priority business — the real
trainer saves a real checkpoint on the signal and exits, the replica gets the GPU — and once the replica is gone
the task resumes from that checkpoint and completes with exactly the configured steps."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.integration.conftest import SIM_ARGS, CorralServer, running_corral
from tests.integration.test_finetune import dataset, finished, submit, task, tiny_model  # noqa: F401 (fixtures)
from tests.integration.test_finetune_resume import progress_events

pytest.importorskip("peft")

FAKE_NVML = Path(__file__).parents[1] / "fake_nvml"
GIB = 1024**3


def set_used(path: Path, used_gib: float) -> None:
    """What NVML reports from now on: one 80 GiB GPU with `used_gib` held by another program (written atomically)."""
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps([{"name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB, "used": int(used_gib * GIB),
                                   "uuid": "GPU-0"}]))
    os.replace(staged, path)


@pytest.fixture
def one_gpu(tmp_path: Path) -> Iterator[tuple[CorralServer, Path]]:
    nvml = tmp_path / "nvml.json"
    set_used(nvml, 0)
    with running_corral(tmp_path / "data", {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
        "CORRAL_TEST_NVML_FILE": str(nvml), "CORRAL_FINETUNE_MEMORY_MARGIN_GB": "1.0",
    }) as server:
        yield server, nvml


def test_preflight_then_preemption_by_a_high_priority_business_and_resume(
        one_gpu: tuple[CorralServer, Path], tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    corral, nvml = one_gpu
    # A pool for business "chat" at priority 10, with no replica yet (its replica left again: the GPU is free).
    pool = corral.ok("POST", "/api/deploy", json={
        "engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 1, "deployAsPool": True,
        "gpusPerReplica": 1, "engineArgs": SIM_ARGS})["deployment"]["name"]
    corral.wait_ready(pool, 1)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "chat", "modelPool": pool, "businessTag": "chat"})
    corral.ok("PUT", "/api/business-services/chat-nlb/policy", json={"priority": 10})
    corral.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": pool, "targetReplicas": 0})
    wait_for(lambda: not corral.pods(pool), what="the replica to leave")

    # Preflight: another program holds 79.5 GiB; the task waits with the GPU and the numbers.
    set_used(nvml, 79.5)
    hp = {"epochs": 4, "saveSteps": 2}  # 50 examples, batch 4: 13 steps an epoch, 52 in all
    created = submit(corral, tiny_model, dataset, gpus=1, priority="low", hyperparameters=hp)
    task_id = created["id"]
    assert created["preemptible"] is True and created["status"] == "queued"
    need = created["memoryGb"]
    assert 0 < need < 78
    expected = (f"waiting for GPU 0: 0.5 GiB free now, 0.0 GiB reserved by starting replicas, needs {need:.1f} GiB + 1.0 GiB "
                "margin")
    # (until the leaving replica's process has exited, GPU 0 is still its own: the reason says 0 available then)
    wait_for(lambda: expected in (t := task(corral, task_id))["reason"] and t, what="the preflight's reason")
    assert task(corral, task_id)["status"] == "queued"
    # The memory comes back: it starts on GPU 0.
    set_used(nvml, 0)
    checkpoints = corral.data_dir / "finetune" / task_id / "checkpoints"
    wait_for(lambda: any((c / "trainer_state.json").exists() for c in checkpoints.glob("checkpoint-*")), timeout=120,
             what="a checkpoint")  # checkpoint-2 alone lasts a fraction of a second: a poll could miss it
    assert task(corral, task_id)["units"] == ["0"]

    # The business needs a replica: the task checkpoints and gives GPU 0 to it.
    scaled = corral.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": pool, "targetReplicas": 1, "preempt": True})
    assert scaled["preempted"] == [task_id] and len(scaled["added"]) == 1
    waiting = task(corral, task_id)
    assert waiting["status"] == "queued" and waiting["units"] == []
    assert "preempted by business 'chat' (priority 10)" in waiting["reason"]
    preempted = next(e for e in progress_events(corral, task_id) if e["event"] == "preempted")
    stopped_at = preempted["step"]
    assert preempted["checkpoint"] == f"checkpoint-{stopped_at}" and 2 <= stopped_at < 52
    assert (checkpoints / f"checkpoint-{stopped_at}" / "trainer_state.json").exists()  # saved on the signal: nothing lost
    replica = corral.wait_ready(pool, 1)[0]
    assert replica["gpuIds"] == [0]
    assert task(corral, task_id)["status"] == "queued"  # the GPU is the replica's: no resume under it
    # Nothing left to preempt: a further scale is refused with why; a high task is not preemptible by default.
    refused = corral.http.post("/api/scale-pool-deployment", json={"deploymentName": pool, "targetReplicas": 2, "preempt": True})
    assert refused.status_code == 409 and "preempt: no preemptible finetune task below priority 10 holds a GPU" in refused.text
    high = submit(corral, tiny_model, dataset, gpus=1, priority="high")
    assert high["preemptible"] is False and high["status"] == "queued"
    corral.ok("POST", f"/api/finetune/tasks/{high['id']}/cancel")
    bad = corral.http.post("/api/finetune/tasks", json={"baseModel": str(tiny_model), "datasetPath": str(dataset),
                                                        "preemptible": "sometimes"})
    assert bad.status_code == 400 and "preemptible" in bad.text

    # The replica leaves: the task resumes from its checkpoint by itself and completes.
    corral.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": pool, "targetReplicas": 0})
    done = finished(corral, task_id, timeout=180)
    assert done["status"] == "completed", done["reason"]
    assert done["progress"]["step"] == done["progress"]["totalSteps"] == 52
    events = progress_events(corral, task_id)
    second_run = events[next(i for i, e in enumerate(events) if e["event"] == "preparing" and e["resume"]):]
    assert [e["step"] for e in second_run if e["event"] == "step"][0] == stopped_at + 1
    assert sum(1 for e in events if e["event"] == "step") == 52  # no step ran twice
    assert [step for step, _ in corral.ok("GET", f"/api/finetune/tasks/{task_id}/curves")["loss"]] == list(range(1, 53))

    log = corral.http.get(f"/api/finetune/tasks/{task_id}/logs", params={"tail": 5000}).text
    assert "preempting for business 'chat' (priority 10)" in log and f"[trainer] preempted: saved checkpoint-{stopped_at}" in log
    assert f"resuming from checkpoint-{stopped_at}" in log
    messages = [(h["message"], h["outcome"]) for h in corral.ok("GET", "/api/history", params={"target": task_id})]
    assert any(m.startswith("preempting for business 'chat'") and o == "success" for m, o in messages), messages
    assert any(m.startswith("preempted: preempted by business 'chat' (priority 10)") for m, _ in messages), messages
    assert sum(1 for m, _ in messages if m.startswith("started on 0")) == 2, messages
    scale_rows = [h["message"] for h in corral.ok("GET", "/api/history", params={"action": "scale", "target": pool})]
    assert any(f"GPUs of {task_id} preempted for business 'chat' (priority 10)" in m for m in scale_rows), scale_rows


def test_the_autopilot_preempts_a_low_priority_task_for_a_business_below_its_min(
        one_gpu: tuple[CorralServer, Path], tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    """The same preemption, asked by the autopilot: a priority-10 business below its min, no spare, no free GPU
    (a low task holds the only one), scale-out on: the task checkpoints, the pool grows onto its GPU and the new
    replica is assigned to the business."""
    corral, _ = one_gpu
    pool = corral.ok("POST", "/api/deploy", json={
        "engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 0, "deployAsPool": True,
        "gpusPerReplica": 1, "engineArgs": SIM_ARGS})["deployment"]["name"]
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "chat", "modelPool": pool, "businessTag": "chat"})
    # 520 steps: ~13 s even on a quiet machine, so it is still training (and preemptible) when the autopilot acts; with 4
    # epochs it once completed in 1.2 s, taking its checkpoints with it, before the test saw checkpoint-2.
    task_id = submit(corral, tiny_model, dataset, gpus=1, priority="low", hyperparameters={"epochs": 40, "saveSteps": 2})["id"]
    checkpoints = corral.data_dir / "finetune" / task_id / "checkpoints"
    wait_for(lambda: any((c / "trainer_state.json").exists() for c in checkpoints.glob("checkpoint-*")), timeout=120,
             what="a checkpoint")  # checkpoint-2 alone lasts a fraction of a second: a poll could miss it

    corral.ok("PUT", "/api/business-services/chat-nlb/policy", json={"minReplicas": 1, "priority": 10})
    corral.ok("PUT", f"/api/autopilot/{pool}", json={"enabled": True, "warmSpares": 0, "scaleOut": True, "maxReplicas": 1})
    preempted = wait_for(lambda: "preempted by business 'chat' (priority 10)" in (t := task(corral, task_id))["reason"] and t,
                         timeout=60, what="the autopilot to preempt the task")
    assert preempted["status"] == "queued"
    wait_for(lambda: [p for p in corral.pods(pool) if p["ready"] and p["labels"]["business"] == "chat"], timeout=60,
             what="the new replica on the task's GPU, assigned to chat")
    decisions = corral.ok("GET", f"/api/autopilot/{pool}")["decisions"]
    assert any(f"preempted finetune task(s) {task_id}" in d["reason"] for d in decisions), decisions


@pytest.mark.parametrize("failpoint", [
    "preempt.before-scale",  # the trainer checkpointed and gave GPU 0; the replica not recorded yet
    "preempt.asked",  # the trainer was just signalled: it may still be saving when Corral is back
    "preempt.intent-recorded",  # the one intent is written; the trainer was never asked
])
def test_a_crash_between_a_preemption_and_its_scale_still_ends_with_the_replica(
        one_gpu: tuple[CorralServer, Path], tiny_model: Path, dataset: Path, failpoint: str) -> None:  # noqa: F811
    """Issue 26 item 6: `corral serve` is killed (SIGKILL, at a failpoint) during a scale-out that preempts a trainer,
    before the scale-out recorded the replica. The scale was written with the preemption as one intent, so after the
    restart it is carried out again: the business gets its replica on GPU 0, the task waits in the queue instead of
    starting again on it, and the history says what happened, with nothing left pending."""
    corral, _ = one_gpu
    pool = corral.ok("POST", "/api/deploy", json={
        "engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 0, "deployAsPool": True,
        "gpusPerReplica": 1, "engineArgs": SIM_ARGS})["deployment"]["name"]
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "chat", "modelPool": pool, "businessTag": "chat"})
    corral.ok("PUT", "/api/business-services/chat-nlb/policy", json={"priority": 10})
    # Many epochs: the trainer must still be running through the restarts below (on a quiet machine the tiny model
    # trains 50 steps a second); any checkpoint will do (checkpoint-2 is replaced by later ones within a second, and
    # a poll could miss it: CI's rehearsal did once).
    task_id = submit(corral, tiny_model, dataset, gpus=1, priority="low", hyperparameters={"epochs": 200, "saveSteps": 2})["id"]
    checkpoints = corral.data_dir / "finetune" / task_id / "checkpoints"
    wait_for(lambda: any((c / "trainer_state.json").exists() for c in checkpoints.glob("checkpoint-*")), timeout=120,
             what="a checkpoint")
    assert task(corral, task_id)["units"] == ["0"]

    corral.stop()  # the trainer outlives it (re-adopted), as replicas do
    corral.extra_env["CORRAL_FAILPOINTS"] = failpoint
    corral.start()
    with pytest.raises(httpx.HTTPError):  # killed at the failpoint, before the replica is recorded
        corral.http.post("/api/scale-pool-deployment", json={"deploymentName": pool, "targetReplicas": 1, "preempt": True})
    assert corral.process is not None and corral.process.wait(timeout=30) == -9, "killed by its failpoint"
    del corral.extra_env["CORRAL_FAILPOINTS"]
    corral.start()

    replica = corral.wait_ready(pool, 1, timeout=60)[0]
    assert replica["gpuIds"] == [0] and replica["business"] == "unassigned"
    waiting = task(corral, task_id)
    assert waiting["status"] == "queued" and waiting["units"] == [], waiting  # not started again on the replica's GPU
    assert "preempted by business 'chat' (priority 10)" in waiting["reason"]
    history = corral.ok("GET", "/api/history", params={"limit": 500})
    assert [h for h in history if h["outcome"] == "pending"] == []
    [scale] = [h for h in history if h["action"] == "scale" and h["target"] == pool]
    assert scale["outcome"] == "success" and scale["after"]["replicas"] == 1, scale
    assert "carried out again after a control-plane restart" in scale["message"], scale
    asked = [h["outcome"] for h in history if h["action"] == "finetune" and h["target"] == task_id
             and h["message"].startswith("preempting for business 'chat'")]
    # Killed before the trainer was asked: that preemption did not happen (failed), and the redo asked it (success).
    assert asked == (["success", "failed"] if failpoint == "preempt.intent-recorded" else ["success"]), asked


def test_a_high_priority_task_preempts_a_low_preemptible_one_which_resumes_after_it(
        one_gpu: tuple[CorralServer, Path], tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    """Issue 27 item 4: a low-priority preemptible task trains on the only GPU; a high-priority task arrives. The low
    one is asked to checkpoint (the preemption signal), saves and goes back to the queue; the high one trains on the
    GPU and completes; then the low one resumes from its checkpoint (its first step is the one after it)."""
    corral, _ = one_gpu
    # 104 steps (8 epochs of 13): still training when the high task arrives (it preempts as it is submitted).
    # Its first run stops at the preemption; its second is cancelled once it has resumed.
    low = submit(corral, tiny_model, dataset, gpus=1, priority="low", hyperparameters={"epochs": 8, "saveSteps": 2})["id"]
    checkpoints = corral.data_dir / "finetune" / low / "checkpoints"
    wait_for(lambda: any((c / "trainer_state.json").exists() for c in checkpoints.glob("checkpoint-*")), timeout=120,
             what="a checkpoint")
    assert task(corral, low)["units"] == ["0"]

    high = submit(corral, tiny_model, dataset, gpus=1, priority="high")["id"]
    preempted = wait_for(lambda: (t := task(corral, low))["status"] == "queued" and t, timeout=60, what="the low task to yield")
    assert f"preempted by finetune task {high} (priority 10)" in preempted["reason"], preempted["reason"]
    stopped_at = next(e for e in progress_events(corral, low) if e["event"] == "preempted")["step"]
    assert (checkpoints / f"checkpoint-{stopped_at}" / "trainer_state.json").exists()  # saved on the signal
    done = finished(corral, high, timeout=120)
    assert done["status"] == "completed" and done["units"] == ["0"], done["reason"]

    # The low task resumes by itself from its checkpoint (running it to the end is the business test's: not again here).
    def second_run() -> list[dict]:  # whole lines only: the trainer may be writing the last one
        text = (corral.data_dir / "finetune" / low / "progress.jsonl").read_text()
        events = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]
        resumed_at = next((i for i, e in enumerate(events) if e["event"] == "preparing" and e["resume"]), None)
        return [e for e in events[resumed_at:] if e["event"] == "step"] if resumed_at is not None else []

    assert wait_for(second_run, timeout=120, what="the low task to resume")[0]["step"] == stopped_at + 1
    corral.ok("POST", f"/api/finetune/tasks/{low}/cancel")
    log = corral.http.get(f"/api/finetune/tasks/{low}/logs", params={"tail": 5000}).text
    assert f"preempting for finetune task {high} (priority high, 10)" in log and f"resuming from checkpoint-{stopped_at}" in log
    history = corral.ok("GET", "/api/history", params={"target": low})
    asked = [h for h in history if h["message"].startswith(f"preempting for finetune task {high}")]
    assert [h["outcome"] for h in asked] == ["success"], history  # the intent row, completed once it was back in the queue
    started = sorted(h["id"] for h in corral.ok("GET", "/api/history", params={"target": high})
                     if h["message"].startswith("started on 0"))
    low_starts = sorted(h["id"] for h in history if h["message"].startswith("started on 0"))
    assert len(low_starts) == 2 and low_starts[0] < started[0] < low_starts[1]  # low, high, then low again


def test_a_crash_between_a_task_preemptions_intent_and_its_signal_applies_all_of_it_after_the_restart(
        one_gpu: tuple[CorralServer, Path], tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    """`corral serve` is killed (SIGKILL at the failpoint) right after the preemption's intent is written and before
    the low task is marked or signalled: on restart that row is judged (nothing of it happened: the trainer kept its
    GPU), and the next round carries the preemption out again; the high task gets the GPU, nothing stays pending."""
    corral, _ = one_gpu
    low = submit(corral, tiny_model, dataset, gpus=1, priority="low", hyperparameters={"epochs": 200, "saveSteps": 2})["id"]
    checkpoints = corral.data_dir / "finetune" / low / "checkpoints"
    wait_for(lambda: any((c / "trainer_state.json").exists() for c in checkpoints.glob("checkpoint-*")), timeout=120,
             what="a checkpoint")
    corral.stop()  # the trainer outlives it (re-adopted)
    corral.extra_env["CORRAL_FAILPOINTS"] = "preempt-task.intent-recorded"
    corral.start()
    with pytest.raises(httpx.HTTPError):  # the submit's round preempts: killed there
        submit(corral, tiny_model, dataset, gpus=1, priority="high")
    assert corral.process is not None and corral.process.wait(timeout=30) == -9, "killed by its failpoint"
    del corral.extra_env["CORRAL_FAILPOINTS"]
    corral.start()

    [high] = [t["id"] for t in corral.ok("GET", "/api/finetune/tasks") if t["priority"] == "high"]  # stored before the round
    waiting = wait_for(lambda: (t := task(corral, low))["status"] == "queued" and t, timeout=60, what="the low task to yield")
    assert f"preempted by finetune task {high} (priority 10)" in waiting["reason"]
    wait_for(lambda: task(corral, high)["units"] == ["0"], timeout=60, what="the high task on GPU 0")
    history = corral.ok("GET", "/api/history", params={"limit": 500})
    assert [h for h in history if h["outcome"] == "pending"] == []
    asked = [h["outcome"] for h in history if h["target"] == low and h["message"].startswith(f"preempting for finetune task {high}")]
    assert sorted(asked) == ["failed", "success"], asked  # the interrupted one did not happen; the redo did
    for task_id in (high, low):
        corral.ok("POST", f"/api/finetune/tasks/{task_id}/cancel")
