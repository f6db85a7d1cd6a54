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
import os
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import PersistentVolumeClaim
from lightkube.types import CascadeType

from corral.backends.local import process
from corral.domain.manifests import CORRAL, FINETUNE_TASK, MANAGED_BY
from corral.finetune.store import TaskRecord
from corral.finetune.trainer import PREEMPT_SIGNAL

if TYPE_CHECKING:
    from corral.backends.kubernetes import KubernetesBackend

log = logging.getLogger("corral.finetune")
TRAINER = ["-m", "corral.finetune.trainer"]


def trainer_command(python: str, directory: Path, processes: int, *extra: str) -> list[str]:
    """The trainer's command line: one process, or (several GPUs) `torch.distributed.run` starting one per GPU for
    distributed data parallel. `--standalone` gives each task its own rendezvous on a free local port, so two
    multi-GPU tasks on one machine never meet. Pure."""
    if processes <= 1:
        return [python, *TRAINER, str(directory), *extra]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(processes),
            *TRAINER, str(directory), *extra]


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

    def preempt(self, task: TaskRecord) -> bool:
        """Ask the running trainer to save a checkpoint at its next step end and exit (the trainer's
        `PREEMPT_SIGNAL`); False when this runner cannot (then the task is not a preemption candidate).
        Not supported for Jobs: on a cluster, Kueue preempts workloads itself."""
        return False

    def can_preempt(self, task: TaskRecord) -> bool:
        return False


class ProcessRunner(TrainerRunner):
    """A detached process in its own session: it outlives a control-plane restart and is re-adopted."""

    def __init__(self, stop_grace_s: float) -> None:
        self.stop_grace_s = stop_grace_s
        self._handles: dict[str, subprocess.Popen] = {}

    def launch(self, task: TaskRecord, directory: Path, visible: list[str]) -> dict[str, Any]:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(visible), "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1" if Path(task.base_model).is_dir() else "0"}
        started = process.spawn(trainer_command(sys.executable, directory, task.gpus), env, directory / "train.log")
        self._handles[task.id] = started.handle  # type: ignore[assignment]
        return {"pid": started.pid, "pid_start": started.pid_start}

    def alive(self, task: TaskRecord) -> bool:
        return process.is_alive(task.pid, task.pid_start, self._handles.get(task.id))

    def failure(self, task: TaskRecord) -> str:
        handle = self._handles.pop(task.id, None)
        code = None
        if handle is not None:  # gone from /proc's point of view (a zombie counts as gone): reaped at once
            try:
                code = handle.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
        return f"trainer exited (code {code})" if code is not None else "trainer exited"

    async def stop(self, task: TaskRecord) -> None:
        await process.stop_group(task.pid, task.pid_start, self._handles.pop(task.id, None), self.stop_grace_s)

    def can_preempt(self, task: TaskRecord) -> bool:
        return self.alive(task)

    def preempt(self, task: TaskRecord) -> bool:
        """The signal goes to the trainer itself, or with several GPUs to each rank: `torch.distributed.run` does not
        forward SIGUSR1 (its default action would kill the launcher, and with it the ranks, unsaved)."""
        if not self.alive(task) or task.pid is None:
            return False
        targets = _children(task.pid) if task.gpus > 1 else [task.pid]
        sent = False
        for pid in targets:
            try:
                os.kill(pid, PREEMPT_SIGNAL)
                sent = True
            except ProcessLookupError:
                continue
        return sent


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (the ranks of a torch.distributed.run launcher), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(stat.parent.name))
    return sorted(children)


class JobRunner(TrainerRunner):
    """A `batch/v1` Job per task: GPU requests, the timeout as `activeDeadlineSeconds`, optionally Kueue.
    Jobs are read from the Kubernetes backend's informer cache, like every other cluster object.

    A Job is over only when it has a `Complete` or `Failed` condition (the Job controller's verdict,
    https://kubernetes.io/docs/concepts/workloads/controllers/job/#terminal-job-conditions): between
    attempts (`status.failed` > 0, a retry pending after its back-off) it is still running. Disruptions
    (preemption, eviction, a drained node) do not use up `backoffLimit` (`podFailurePolicy`).
    The trainer writes progress, logs and results into Corral's data directory, so the Jobs mount it:
    a ReadWriteMany PersistentVolumeClaim (`CORRAL_KUBERNETES_DATA_CLAIM`). Without one — or with a
    claim that GPU nodes cannot attach next to Corral's own pod (ReadWriteOnce) — a task is refused
    with the reason instead of training where nobody can read it."""

    def __init__(self, backend: KubernetesBackend, image: str, data_dir: Path, data_claim: str | None,
                 kueue_queue: str | None) -> None:
        self.backend = backend
        self.image = image
        self.data_dir = data_dir
        self.data_claim = data_claim
        self.kueue_queue = kueue_queue
        self.admits_itself = kueue_queue is not None
        self._creating: set[str] = set()
        self._errors: dict[str, str] = {}  # job → why it could not be created

    def launch(self, task: TaskRecord, directory: Path, visible: list[str]) -> dict[str, Any]:
        options = self.backend.cluster_options
        manifest = job_manifest(task, directory, options.namespace, self.image, self.data_dir, self.data_claim, options.gpu_resource,
                                self.kueue_queue, list(options.tolerations),
                                requests={"cpu": options.trainer_cpu_request, "memory": options.trainer_memory_request})
        name = manifest["metadata"]["name"]
        self.backend.write_manifests(name, [manifest])  # as every object Corral writes
        self._creating.add(name)
        self._errors.pop(name, None)

        async def create() -> None:
            try:
                if problem := await self.data_claim_problem():
                    self._errors[name] = problem
                    return
                created = await self.backend.client.create(from_dict(manifest))
                self.backend.cache("jobs", created.to_dict())
            except ApiError as exc:
                self._errors[name] = f"the Job could not be created: {exc.status.code} {exc.status.reason}: {exc.status.message}"
            except Exception as exc:  # the API server is unreachable, say
                self._errors[name] = f"the Job could not be created: {type(exc).__name__}: {exc}"
            finally:
                self._creating.discard(name)

        asyncio.get_running_loop().create_task(create(), name=f"create-{name}")
        return {"pid": None, "pid_start": f"job/{name}"}

    async def data_claim_problem(self) -> str | None:
        """Why finetune Jobs cannot share Corral's data directory on this cluster, or None."""
        if not self.data_claim:
            return ("finetunes on a cluster need a ReadWriteMany PersistentVolumeClaim for Corral's data directory "
                    "(CORRAL_KUBERNETES_DATA_CLAIM; deploy/kubernetes/corral.yaml has one): the trainer writes progress, "
                    "logs and the result there")
        try:
            claim = (await self.backend.client.get(PersistentVolumeClaim, self.data_claim)).to_dict()
        except ApiError as exc:
            return f"the data claim '{self.data_claim}' cannot be read ({exc.status.code} {exc.status.reason})"
        modes = set((claim.get("spec") or {}).get("accessModes") or [])
        if "ReadWriteMany" not in modes:
            return (f"the data claim '{self.data_claim}' is {', '.join(sorted(modes)) or 'without access modes'}: Jobs on other "
                    "nodes cannot mount it beside Corral; it must be ReadWriteMany")
        return None

    def _job(self, task: TaskRecord) -> dict[str, Any] | None:
        return self.backend.objects["jobs"].get(job_name(task.id))

    def alive(self, task: TaskRecord) -> bool:
        if job_name(task.id) in self._creating:
            return True
        job = self._job(task)
        return job is not None and job_verdict(job) is None

    def failure(self, task: TaskRecord) -> str:
        if error := self._errors.get(job_name(task.id)):
            return error
        job = self._job(task)
        if job is None:
            return "the Job is gone (deleted outside Corral?)"
        verdict = job_verdict(job)
        if verdict is not None and verdict[0] == "Complete":
            return "the Job completed but the trainer reported no result"
        reason = verdict[1] if verdict else ""
        failed = (job.get("status") or {}).get("failed") or 0
        return "Job failed" + (f" ({reason})" if reason else "") + (f" after {failed} failed pod(s)" if failed else "")

    def waiting(self, task: TaskRecord) -> str | None:
        job = self._job(task)
        if job is not None and (job.get("spec") or {}).get("suspend"):
            return f"waiting for Kueue admission (queue {self.kueue_queue})"
        return None

    async def stop(self, task: TaskRecord) -> None:
        with contextlib.suppress(ApiError):
            await self.backend.client.delete(Job, job_name(task.id), cascade=CascadeType.BACKGROUND)
        self.backend.forget("jobs", job_name(task.id))


def job_verdict(job: dict[str, Any]) -> tuple[str, str] | None:
    """("Complete" | "Failed", "reason: message") once the Job controller has decided; None while it runs
    (retries included)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            detail = ": ".join(x for x in (condition.get("reason"), condition.get("message")) if x)
            return condition["type"], detail
    return None


JOB_LABEL = FINETUNE_TASK


def job_name(task_id: str) -> str:
    return f"corral-{task_id}"


def job_manifest(task: TaskRecord, directory: Path, namespace: str, image: str, data_dir: Path, data_claim: str | None,
                 gpu_resource: str, kueue_queue: str | None, tolerations: list[dict],
                 requests: dict[str, str] | None = None) -> dict[str, Any]:
    """The Job of one finetune task. Pure. `requests` (CPU, memory) keep its pod from being BestEffort, the first
    evicted under node pressure."""
    labels = {JOB_LABEL: task.id, MANAGED_BY: CORRAL}
    if kueue_queue:
        labels["kueue.x-k8s.io/queue-name"] = kueue_queue
    resources: dict[str, Any] = {"limits": {gpu_resource: task.gpus}} if task.gpus else {}
    if requests:
        resources["requests"] = dict(requests)
    volume = ({"persistentVolumeClaim": {"claimName": data_claim}} if data_claim else {"emptyDir": {}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{
            # The trainer writes its output into the task's log on the shared volume, where Corral reads it.
            "name": "trainer", "image": image,
            "command": trainer_command("python", directory, task.gpus, "--log-to", str(directory / "train.log")),
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "HF_HUB_OFFLINE", "value": "1" if Path(task.base_model).is_absolute() else "0"}],
            "resources": resources,
            "volumeMounts": [{"name": "data", "mountPath": str(data_dir)}],
        }],
        "volumes": [{"name": "data", **volume}],
    }
    if task.gpus > 1:  # one process per GPU: NCCL passes data through shared memory, and a container's /dev/shm is 64 MiB
        pod_spec["containers"][0]["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
        pod_spec["volumes"].append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    if task.gpus and tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(task.id), "namespace": namespace, "labels": labels},
        "spec": {
            "suspend": bool(kueue_queue), "backoffLimit": 2, "activeDeadlineSeconds": int(task.timeout_s),
            # A pod ended by a disruption (preemption, eviction, node drain: the DisruptionTarget condition)
            # is retried without using up backoffLimit (https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy).
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
