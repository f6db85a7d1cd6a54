"""Finetune tasks as `batch/v1` Jobs on the emulated cluster, whose Job controller runs the real
trainer: Corral's queue admitting them, and Kueue admitting them (Jobs created suspended)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.batch_v1 import Job
from lightkube.types import PatchType

from tests.conftest import wait_for_async
from tests.integration.test_finetune import dataset, tiny_model  # noqa: F401 (fixtures)
from tests.k8s.cluster import NAMESPACE
from tests.k8s.conftest import start_runtime

pytest.importorskip("peft")


def finished(runtime, task_id: str) -> bool:  # noqa: ANN001
    return runtime.finetune.get(task_id)["status"] in ("completed", "failed", "cancelled")


async def test_tasks_run_as_jobs_admitted_by_corral(cluster, tmp_path: Path, tiny_model: Path, dataset: Path) -> None:  # noqa: ANN001, F811
    _, _, config = cluster
    runtime = await start_runtime(config, tmp_path / "data")
    try:
        first = runtime.finetune.submit(base_model=str(tiny_model), dataset_path=str(dataset), gpus=0, timeout_s=600,
                                        hyperparameters={"epochs": 1})["id"]
        second = runtime.finetune.submit(base_model=str(tiny_model), dataset_path=str(dataset), gpus=0,
                                         hyperparameters={"epochs": 1})["id"]
        assert runtime.finetune.get(second)["status"] == "queued"  # one CPU slot: Corral's queue admits one at a time
        client = AsyncClient(config=KubeConfig.from_file(str(config)), namespace=NAMESPACE)
        await wait_for_async(lambda: f"corral-{first}" in runtime.backend.objects["jobs"], what="the Job")  # type: ignore[attr-defined]
        job = (await client.get(Job, f"corral-{first}")).to_dict()
        assert job["spec"]["activeDeadlineSeconds"] == 600 and not job["spec"]["suspend"]
        assert job["metadata"]["labels"]["corral.dev/finetune-task"] == first
        assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
        assert (runtime.settings.manifests_dir / f"corral-{first}.yaml").exists()
        await wait_for_async(lambda: finished(runtime, first) and finished(runtime, second), timeout=240, what="both tasks")
        done = runtime.finetune.get(first)
        assert done["status"] == "completed" and done["progress"]["step"] == done["progress"]["totalSteps"] > 0
        assert runtime.finetune.get(second)["status"] == "completed"
        assert done["finishedAt"] <= runtime.finetune.get(second)["startedAt"]
        assert "training" in runtime.finetune.log_path(first).read_text()  # the Job's output, via the shared volume
        await client.close()
    finally:
        await runtime.close()


async def test_kueue_admits_suspended_jobs(cluster, tmp_path: Path, tiny_model: Path, dataset: Path) -> None:  # noqa: ANN001, F811
    _, _, config = cluster
    runtime = await start_runtime(config, tmp_path / "data", kueue_queue="team-a", cpu_training_slots=1)
    client = AsyncClient(config=KubeConfig.from_file(str(config)), namespace=NAMESPACE)
    try:
        ids = [runtime.finetune.submit(base_model=str(tiny_model), dataset_path=str(dataset), gpus=0,
                                       hyperparameters={"epochs": 1})["id"] for _ in range(2)]
        for task_id in ids:  # both Jobs exist at once, suspended, for Kueue
            await wait_for_async(lambda t=task_id: runtime.finetune.get(t)["reason"] == "waiting for Kueue admission (queue team-a)",
                                 what=f"{task_id} waiting for Kueue")
            job = (await client.get(Job, f"corral-{task_id}")).to_dict()
            assert job["spec"]["suspend"] and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
            assert runtime.finetune.get(task_id)["status"] == "queued"
        # Kueue admits the first: it unsuspends the Job.
        await client.patch(Job, f"corral-{ids[0]}", {"spec": {"suspend": False}}, patch_type=PatchType.MERGE)
        await wait_for_async(lambda: finished(runtime, ids[0]), timeout=180, what="the admitted task")
        assert runtime.finetune.get(ids[0])["status"] == "completed"
        assert runtime.finetune.get(ids[1])["status"] == "queued"
        await runtime.finetune.cancel(ids[1])  # cancelling deletes its Job
        await wait_for_async(lambda: f"corral-{ids[1]}" not in runtime.backend.objects["jobs"], what="the Job deleted")  # type: ignore[attr-defined]
        assert runtime.finetune.get(ids[1])["status"] == "cancelled"
    finally:
        await client.close()
        await runtime.close()
