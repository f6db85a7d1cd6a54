"""Spec 02's optional reclaim policy on a simulated 2-GPU machine: a fake NVML library (tests/fake_nvml)
reports the GPUs; the control plane, simulator replicas and the LoRA trainer are real processes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import SIM_ARGS, CorralServer, running_corral
from tests.integration.test_finetune import dataset, finished, submit, task, tiny_model  # noqa: F401 (fixtures)

pytest.importorskip("peft")

FAKE_NVML = Path(__file__).parents[1] / "fake_nvml"
GIB = 1024**3


@pytest.fixture
def two_gpu_corral(tmp_path: Path) -> Iterator[CorralServer]:
    devices = [{"name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB, "uuid": f"GPU-{i}"} for i in range(2)]
    with running_corral(tmp_path / "data", {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])),
        "CORRAL_TEST_NVML_DEVICES": json.dumps(devices), "CORRAL_RECLAIM_UNASSIGNED_REPLICAS": "true",
    }) as server:
        yield server


def test_high_priority_task_reclaims_an_unassigned_replica_and_gives_it_back(
        two_gpu_corral: CorralServer, tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    corral = two_gpu_corral
    assert corral.ok("GET", "/api/system/gpu-info")["count"] == 2
    pool = corral.ok("POST", "/api/deploy", json={
        "engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 2, "deployAsPool": True,
        "gpusPerReplica": 1, "engineArgs": SIM_ARGS})["deployment"]["name"]
    pods = corral.wait_ready(pool, 2)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "prod", "modelPool": pool, "businessTag": "production"})
    serving = pods[0]["name"]
    corral.ok("POST", "/api/assign-pod", json={"podName": serving, "businessTag": "production"})

    # Both GPUs are held by replicas: a normal-priority task waits and takes nothing.
    normal = submit(corral, tiny_model, dataset, gpus=1)["id"]
    assert task(corral, normal)["status"] == "queued" and task(corral, normal)["reclaimed"] == {}
    # the tiny model is sized from its files now (corral.model_files), so the reason names its memory too
    assert "waiting for GPU to be released: needs 1 with 1.0GB free, 0 available" in task(corral, normal)["reason"]

    # A high-priority one scales the unassigned replica in and trains on its GPU.
    high = submit(corral, tiny_model, dataset, gpus=1, priority="high")["id"]
    assert wait_for(lambda: task(corral, high)["reclaimed"], what="the reclaim") == {pool: 1}
    spare = next(p for p in pods if p["name"] != serving)
    done = finished(corral, high)
    assert done["status"] == "completed" and done["units"] == [str(g) for g in spare["gpuIds"]]
    # The replica serving production was never touched.
    assert any(p["name"] == serving and p["business"] == "production" for p in corral.pods(pool))

    # When it ends the pool gets its replica back — before the waiting normal task can take the GPU.
    wait_for(lambda: task(corral, high)["reclaimed"] == {}, what="the restore")
    restored = corral.wait_ready(pool, 2)
    assert {p["business"] for p in restored} == {"production", "unassigned"}
    assert task(corral, normal)["status"] == "queued"
    messages = [h["message"] for h in corral.ok("GET", "/api/history", params={"action": "scale", "target": pool})]
    assert any(f"reclaimed for high-priority finetune task {high}" in m and spare["name"] in m for m in messages)
    assert any(f"restored after finetune task {high} ended" in m for m in messages)
    log = corral.http.get(f"/api/finetune/tasks/{high}/logs").text
    assert "reclaiming GPU" in log and f"restored 1 replica(s) of {pool}" in log
    corral.ok("POST", f"/api/finetune/tasks/{normal}/cancel")
