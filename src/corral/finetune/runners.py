"""Where a trainer runs: a detached local process, or a Kubernetes Job.

The task manager decides *what* starts and follows progress through the task directory (the trainer
appends to `progress.jsonl`); a runner only starts, watches and stops the trainer. On a cluster the
task directory lives on a volume shared by Corral and the Job's pod (`CORRAL_KUBERNETES_DATA_CLAIM`,
mounted at the same path), so the manager reads progress the same way in both cases.

With Kueue (`CORRAL_KUEUE_QUEUE`), Jobs are created suspended with `kueue.x-k8s.io/queue-name` and
Kueue admits them against its quotas; Corral's own queue then admits every task at once and shows
"waiting for Kueue admission" until the Job is unsuspended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.resources.batch_v1 import Job
from lightkube.types import CascadeType

from corral.backends.local import process
from corral.domain.manifests import CORRAL, MANAGED_BY
from corral.finetune.store import TaskRecord

if TYPE_CHECKING:
    from corral.backends.kubernetes import KubernetesBackend

log = logging.getLogger("corral.finetune")
TRAINER = ["-m", "corral.finetune.trainer"]


class TrainerRunner(ABC):
    #: True when something else (Kueue) admits tasks against GPU quotas; Corral's queue then admits all.
    admits_itself = False

    @abstractmethod
    def launch(self, task: TaskRecord, directory: Path, visible: list[str]) -> dict[str, Any]:
        """Start the trainer on `directory`; the task columns that identify it (pid, pid_start)."""

    @abstractmethod
    def alive(self, task: TaskRecord) -> bool: ...

    @abstractmethod
    def failure(self, task: TaskRecord) -> str:
        """Why the trainer ended without a result (the manager adds the log's last line)."""

    @abstractmethod
    async def stop(self, task: TaskRecord) -> None: ...

    def waiting(self, task: TaskRecord) -> str | None:
        """Why a launched trainer has not started yet (e.g. Kueue admission), or None."""
        return None


class ProcessRunner(TrainerRunner):
    """A detached process in its own session: it outlives a control-plane restart and is re-adopted."""

    def __init__(self, stop_grace_s: float) -> None:
        self.stop_grace_s = stop_grace_s
        self._handles: dict[str, subprocess.Popen] = {}

    def launch(self, task: TaskRecord, directory: Path, visible: list[str]) -> dict[str, Any]:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(visible), "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1" if Path(task.base_model).is_dir() else "0"}
        started = process.spawn([sys.executable, *TRAINER, str(directory)], env, directory / "train.log")
        self._handles[task.id] = started.handle  # type: ignore[assignment]
        return {"pid": started.pid, "pid_start": started.pid_start}

    def alive(self, task: TaskRecord) -> bool:
        return process.is_alive(task.pid, task.pid_start, self._handles.get(task.id))

    def failure(self, task: TaskRecord) -> str:
        return f"trainer exited (code {process.exit_code(self._handles.pop(task.id, None))})"

    async def stop(self, task: TaskRecord) -> None:
        await process.stop_group(task.pid, task.pid_start, self._handles.pop(task.id, None), self.stop_grace_s)


class JobRunner(TrainerRunner):
    """A `batch/v1` Job per task: GPU requests, the timeout as `activeDeadlineSeconds`, optionally Kueue.
    Jobs are read from the Kubernetes backend's informer cache, like every other cluster object."""

    def __init__(self, backend: KubernetesBackend, image: str, data_dir: Path, data_claim: str | None,
                 kueue_queue: str | None) -> None:
        self.backend = backend
        self.image = image
        self.data_dir = data_dir
        self.data_claim = data_claim
        self.kueue_queue = kueue_queue
        self.admits_itself = kueue_queue is not None
        self._creating: set[str] = set()

    def launch(self, task: TaskRecord, directory: Path, visible: list[str]) -> dict[str, Any]:
        options = self.backend.cluster_options
        manifest = job_manifest(task, directory, options.namespace, self.image, self.data_dir, self.data_claim, options.gpu_resource,
                                self.kueue_queue, list(options.tolerations))
        name = manifest["metadata"]["name"]
        self.backend.write_manifests(name, [manifest])  # as every object Corral writes
        self._creating.add(name)

        async def create() -> None:
            try:
                created = await self.backend.client.create(from_dict(manifest))
                self.backend.cache("jobs", created.to_dict())
            finally:
                self._creating.discard(name)

        asyncio.get_running_loop().create_task(create(), name=f"create-{name}")
        return {"pid": None, "pid_start": f"job/{name}"}

    def _job(self, task: TaskRecord) -> dict[str, Any] | None:
        return self.backend.objects["jobs"].get(job_name(task.id))

    def alive(self, task: TaskRecord) -> bool:
        if job_name(task.id) in self._creating:
            return True
        job = self._job(task)
        if job is None:
            return False
        status = job.get("status") or {}
        return not (status.get("succeeded") or status.get("failed") and not status.get("active"))

    def failure(self, task: TaskRecord) -> str:
        job = self._job(task)
        if job is None:
            return "the Job is gone (deleted outside Corral?)"
        conditions = (job.get("status") or {}).get("conditions") or []
        reasons = [f"{c.get('reason')}: {c.get('message')}" for c in conditions if c.get("type") == "Failed"]
        return "Job failed" + (f" ({'; '.join(reasons)})" if reasons else "")

    def waiting(self, task: TaskRecord) -> str | None:
        job = self._job(task)
        if job is not None and (job.get("spec") or {}).get("suspend"):
            return f"waiting for Kueue admission (queue {self.kueue_queue})"
        return None

    async def stop(self, task: TaskRecord) -> None:
        with contextlib.suppress(ApiError):
            await self.backend.client.delete(Job, job_name(task.id), cascade=CascadeType.BACKGROUND)
        self.backend.objects["jobs"].pop(job_name(task.id), None)


JOB_LABEL = "corral.dev/finetune-task"


def job_name(task_id: str) -> str:
    return f"corral-{task_id}"


def job_manifest(task: TaskRecord, directory: Path, namespace: str, image: str, data_dir: Path, data_claim: str | None,
                 gpu_resource: str, kueue_queue: str | None, tolerations: list[dict]) -> dict[str, Any]:
    """The Job of one finetune task. Pure."""
    labels = {JOB_LABEL: task.id, MANAGED_BY: CORRAL}
    if kueue_queue:
        labels["kueue.x-k8s.io/queue-name"] = kueue_queue
    resources = {"limits": {gpu_resource: task.gpus}} if task.gpus else {}
    volume = ({"persistentVolumeClaim": {"claimName": data_claim}} if data_claim else {"emptyDir": {}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{
            # The trainer writes its output into the task's log on the shared volume, where Corral reads it.
            "name": "trainer", "image": image, "command": ["python", *TRAINER, str(directory), "--log-to", str(directory / "train.log")],
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "HF_HUB_OFFLINE", "value": "1" if Path(task.base_model).is_absolute() else "0"}],
            "resources": resources,
            "volumeMounts": [{"name": "data", "mountPath": str(data_dir)}],
        }],
        "volumes": [{"name": "data", **volume}],
    }
    if task.gpus and tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(task.id), "namespace": namespace, "labels": labels},
        "spec": {
            "suspend": bool(kueue_queue), "backoffLimit": 2, "activeDeadlineSeconds": int(task.timeout_s),
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
