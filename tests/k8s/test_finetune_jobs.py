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

DATA_CLAIM = "corral-data"


def shared_data_claim(api, modes: tuple[str, ...] = ("ReadWriteMany",)) -> None:  # noqa: ANN001
    """The cluster's claim on Corral's data directory (deploy/kubernetes/corral.yaml ships a ReadWriteMany one)."""
    api.create("/v1/persistentvolumeclaims", {"metadata": {"name": DATA_CLAIM},
                                              "spec": {"accessModes": list(modes), "resources": {"requests": {"storage": "50Gi"}}}})

pytest.importorskip("peft")


def finished(runtime, task_id: str) -> bool:  # noqa: ANN001
    return runtime.finetune.get(task_id).status in ("completed", "failed", "cancelled")


async def test_tasks_run_as_jobs_admitted_by_corral(cluster, tmp_path: Path, tiny_model: Path, dataset: Path) -> None:  # noqa: ANN001, F811
    api, _, config = cluster
    shared_data_claim(api)
    runtime = await start_runtime(config, tmp_path / "data", kubernetes_data_claim=DATA_CLAIM)
    try:
        first = runtime.finetune.submit(base_model=str(tiny_model), dataset_path=str(dataset), gpus=0, timeout_s=600,
                                        hyperparameters={"epochs": 1}).id
        second = runtime.finetune.submit(base_model=str(tiny_model), dataset_path=str(dataset), gpus=0,
                                         hyperparameters={"epochs": 1}).id
        assert runtime.finetune.get(second).status == "queued"  # one CPU slot: Corral's queue admits one at a time
        client = AsyncClient(config=KubeConfig.from_file(str(config)), namespace=NAMESPACE)
        await wait_for_async(lambda: f"corral-{first}" in runtime.backend.objects["jobs"], what="the Job")  # type: ignore[attr-defined]
        job = (await client.get(Job, f"corral-{first}")).to_dict()
        assert job["spec"]["activeDeadlineSeconds"] == 600 and not job["spec"]["suspend"]
        assert job["metadata"]["labels"]["corral.dev/finetune-task"] == first
        assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
        assert (runtime.settings.manifests_dir / f"corral-{first}.yaml").exists()
        await wait_for_async(lambda: finished(runtime, first) and finished(runtime, second), timeout=240, what="both tasks")
        done = runtime.finetune.get(first)
        assert done.status == "completed" and done.progress["step"] == done.progress["totalSteps"] > 0
        assert runtime.finetune.get(second).status == "completed"
        assert done.finishedAt <= runtime.finetune.get(second).startedAt
        assert "training" in runtime.finetune.log_path(first).read_text()  # the Job's output, via the shared volume
        await client.close()
    finally:
        await runtime.close()


async def test_kueue_admits_suspended_jobs(cluster, tmp_path: Path, tiny_model: Path, dataset: Path) -> None:  # noqa: ANN001, F811
    api, _, config = cluster
    shared_data_claim(api)
    runtime = await start_runtime(config, tmp_path / "data", kueue_queue="team-a", cpu_training_slots=1, kubernetes_data_claim=DATA_CLAIM)
    client = AsyncClient(config=KubeConfig.from_file(str(config)), namespace=NAMESPACE)
    try:
        ids = [runtime.finetune.submit(base_model=str(tiny_model), dataset_path=str(dataset), gpus=0,
                                       hyperparameters={"epochs": 1}).id for _ in range(2)]
        for task_id in ids:  # both Jobs exist at once, suspended, for Kueue
            await wait_for_async(lambda t=task_id: runtime.finetune.get(t).reason == "waiting for Kueue admission (queue team-a)",
                                 what=f"{task_id} waiting for Kueue")
            job = (await client.get(Job, f"corral-{task_id}")).to_dict()
            assert job["spec"]["suspend"] and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
            assert runtime.finetune.get(task_id).status == "queued"
        # Kueue admits the first: it unsuspends the Job.
        await client.patch(Job, f"corral-{ids[0]}", {"spec": {"suspend": False}}, patch_type=PatchType.MERGE)
        await wait_for_async(lambda: finished(runtime, ids[0]), timeout=180, what="the admitted task")
        assert runtime.finetune.get(ids[0]).status == "completed"
        assert runtime.finetune.get(ids[1]).status == "queued"
        await runtime.finetune.cancel(ids[1])  # cancelling deletes its Job
        await wait_for_async(lambda: f"corral-{ids[1]}" not in runtime.backend.objects["jobs"], what="the Job deleted")  # type: ignore[attr-defined]
        assert runtime.finetune.get(ids[1]).status == "cancelled"
    finally:
        await client.close()
        await runtime.close()


async def test_finetunes_need_a_read_write_many_data_claim(cluster, tmp_path: Path, tiny_model: Path, dataset: Path) -> None:  # noqa: ANN001, F811
    api, _, config = cluster
    shared_data_claim(api, ("ReadWriteOnce",))
    for claim, why in ((None, "need a ReadWriteMany PersistentVolumeClaim"), (DATA_CLAIM, "is ReadWriteOnce")):
        runtime = await start_runtime(config, tmp_path / f"data-{claim}", kubernetes_data_claim=claim)
        try:
            task = runtime.finetune.submit(base_model=str(tiny_model), dataset_path=str(dataset), gpus=0).id
            await wait_for_async(lambda t=task, r=runtime: finished(r, t), what="the refusal")
            done = runtime.finetune.get(task)
            assert done.status == "failed" and why in done.reason, done.reason
            assert f"corral-{task}" not in {j["metadata"]["name"] for j in api.items("batch/v1/jobs")}  # no Job created
        finally:
            await runtime.close()


def sleeper_job(name: str, command: str, backoff_limit: int) -> dict:
    from corral.finetune.runners import job_manifest
    from corral.finetune.store import TaskRecord

    task = TaskRecord(id=name, status="pending", base_model="/m", dataset_path="/d.jsonl", method="lora", priority="normal",
                      hyperparameters={}, gpus=0, timeout_s=600)
    manifest = job_manifest(task, Path("/tmp"), NAMESPACE, "corral", Path("/tmp"), DATA_CLAIM, "nvidia.com/gpu", None, [])
    manifest["spec"]["backoffLimit"] = backoff_limit
    manifest["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "-c", command]
    return manifest


async def test_a_job_is_over_only_on_its_terminal_condition(cluster) -> None:  # noqa: ANN001
    from corral.finetune.runners import job_verdict

    api, controllers, _ = cluster
    # A disruption (preemption) is ignored by the podFailurePolicy: retried, not counted against backoffLimit.
    api.create("batch/v1/jobs", sleeper_job("ft-sleeps", "import time; time.sleep(60)", 0))
    await wait_for_async(lambda: "corral-ft-sleeps" in controllers.trainers, what="the first attempt")
    first = controllers.disrupt_job_pod("corral-ft-sleeps")
    await wait_for_async(lambda: "corral-ft-sleeps" in controllers.trainers and controllers.trainers["corral-ft-sleeps"].pod != first,
                         what="the retry after the preemption")
    job = api.get("batch/v1/jobs", "corral-ft-sleeps")
    assert job_verdict(job) is None and not job["status"].get("failed")
    # Counted failures are retried with back-off until backoffLimit; only then is the Job Failed.
    api.create("batch/v1/jobs", sleeper_job("ft-fails", "import sys; sys.exit(3)", 1))
    await wait_for_async(lambda: (api.get("batch/v1/jobs", "corral-ft-fails").get("status") or {}).get("failed") == 1,
                         what="one failed attempt")
    assert job_verdict(api.get("batch/v1/jobs", "corral-ft-fails")) is None  # between attempts: still running
    await wait_for_async(lambda: job_verdict(api.get("batch/v1/jobs", "corral-ft-fails")), what="the verdict")
    verdict = job_verdict(api.get("batch/v1/jobs", "corral-ft-fails"))
    assert verdict is not None and verdict[0] == "Failed" and verdict[1].startswith("BackoffLimitExceeded")
    assert api.get("batch/v1/jobs", "corral-ft-fails")["status"]["failed"] == 2
