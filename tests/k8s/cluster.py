"""An emulated cluster for contract tests: kmock's Kubernetes API emulation plus the parts of a
cluster it leaves out, written here as small as they can be.

kmock stores objects and serves list/watch/create/patch/delete over real HTTP. It does not filter by
label selector and runs no controllers, so this module adds:
- label-selector filtering of lists and watches (equality, inequality and existence terms);
- `MiniControllers`, a client of that API (like kube-controller-manager) that keeps each
  Deployment's pods at its replica count — on scale-down removing, like a ReplicaSet, not-ready
  pods first, then the lowest `pod-deletion-cost`, then the newest — keeps the Deployment's status,
  maintains one EndpointSlice per Service from the ready pods its selector matches, and runs each
  Job that is not suspended (Kueue unsuspends on admission) by running its container's command here
  as a process — the real trainer — with `activeDeadlineSeconds` enforced.
  `ignore_deletion_cost` makes it delete the oldest pods instead, the way a ReplicaSet may when its
  cache is stale or pods differ in readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kmock
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod, Service
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import PatchType

NAMESPACE = "corral"
COST = "controller.kubernetes.io/pod-deletion-cost"


def _matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


RESOURCES = {"v1/pods": "Pod", "v1/services": "Service", "v1/nodes": "Node", "apps/v1/deployments": "Deployment",
             "batch/v1/jobs": "Job", "discovery.k8s.io/v1/endpointslices": "EndpointSlice"}


class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, with the resources a cluster has, filtering lists and watches by `labelSelector`."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource, kind in RESOURCES.items():
            self.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=kind != "Node")

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            payload["items"] = [item for item in payload["items"] if _matches(selector, _labels(item))]
        return payload

    async def _serve_watch(self, request: Any) -> Any:
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            if not selector or not isinstance(event, dict) or _matches(selector, _labels(event.get("object") or {})):
                yield event


def kubeconfig(url: str, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "emulated"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": NAMESPACE}}],
    }))
    return path


class MiniControllers:
    """Deployment, EndpointSlice and Job controllers for the emulated cluster."""

    def __init__(self, config: Path) -> None:
        self.client = AsyncClient(config=KubeConfig.from_file(str(config)), namespace=NAMESPACE)
        self.ignore_deletion_cost = False
        self.paused = False  # a frozen controller (to hold a Deployment mid-rollout, say)
        self._ips = itertools.count(10)
        self.trainers: dict[str, tuple[asyncio.subprocess.Process, float]] = {}
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> MiniControllers:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for child, _ in self.trainers.values():
            if child.returncode is None:
                child.kill()
                await child.wait()
        await self.client.close()

    async def _run(self) -> None:
        while True:  # the emulated cluster's control loop (its own pace; tests wait on outcomes)
            if not self.paused:
                with contextlib.suppress(ApiError):
                    await self._deployments()
                    await self._jobs()
                    await self._endpoint_slices()
            await asyncio.sleep(0.05)

    async def _deployments(self) -> None:
        pods = [p.to_dict() async for p in self.client.list(Pod)]
        async for deployment in self.client.list(Deployment):
            d = deployment.to_dict()
            selector = d["spec"]["selector"]["matchLabels"]
            mine = [p for p in pods if all(_labels(p).get(k) == v for k, v in selector.items())]
            wanted = int(d["spec"].get("replicas") or 0)
            for _ in range(wanted - len(mine)):
                await self._create_pod(d["metadata"]["name"], d["spec"]["template"])
            if len(mine) > wanted:
                for victim in self._removal_order(mine)[: len(mine) - wanted]:
                    await self.client.delete(Pod, victim["metadata"]["name"])
            status = {"replicas": wanted, "readyReplicas": wanted, "updatedReplicas": wanted, "availableReplicas": wanted}
            if any((d.get("status") or {}).get(k) != v for k, v in status.items()):
                await self.client.patch(Deployment, d["metadata"]["name"], {"status": status}, patch_type=PatchType.MERGE)

    def _removal_order(self, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        def created(p: dict[str, Any]) -> str:
            return p["metadata"].get("creationTimestamp") or ""

        if self.ignore_deletion_cost:
            return sorted(pods, key=created)  # oldest first: what a stale ReplicaSet cache may do
        ready = {p["metadata"]["name"]: any(c.get("type") == "Ready" and c.get("status") == "True"
                                             for c in (p.get("status") or {}).get("conditions") or []) for p in pods}
        by_newest = sorted(pods, key=created, reverse=True)
        return sorted(by_newest, key=lambda p: (ready[p["metadata"]["name"]],
                                                int((p["metadata"].get("annotations") or {}).get(COST, "0"))))

    async def _create_pod(self, owner: str, template: dict[str, Any], phase: str = "Running") -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        n = next(self._ips)
        await self.client.create(from_dict({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{owner}-{secrets.token_hex(3)}", "namespace": NAMESPACE, "labels": dict(template["metadata"]["labels"]),
                         "creationTimestamp": now},
            "spec": template["spec"],
            "status": {"phase": phase, "podIP": f"10.0.{n // 250}.{n % 250}",
                       "conditions": [{"type": "Ready", "status": "True" if phase == "Running" else "False"}]},
        }))

    async def _jobs(self) -> None:
        """A Job's pod is its container's command run here, as a process (the trainer is real)."""
        names = set()
        async for job in self.client.list(Job):
            j = job.to_dict()
            name = j["metadata"]["name"]
            names.add(name)
            status = j.get("status") or {}
            if j["spec"].get("suspend") or status.get("succeeded") or status.get("failed"):
                continue
            trainer = self.trainers.get(name)
            if trainer is None:
                container = j["spec"]["template"]["spec"]["containers"][0]
                argv = [sys.executable if i == 0 and a == "python" else a for i, a in enumerate(container["command"])]
                env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env") or []}}
                self.trainers[name] = (await asyncio.create_subprocess_exec(*argv, env=env), time.monotonic())
                await self.client.patch(Job, name, {"status": {"active": 1}}, patch_type=PatchType.MERGE)
                continue
            child, started = trainer
            deadline = j["spec"].get("activeDeadlineSeconds")
            if child.returncode is None and deadline and time.monotonic() - started > deadline:
                child.kill()
                await child.wait()
                await self.client.patch(Job, name, {"status": {"active": 0, "failed": 1, "conditions": [
                    {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                     "message": "Job was active longer than specified deadline"}]}}, patch_type=PatchType.MERGE)
            elif child.returncode is not None:
                outcome = {"succeeded": 1} if child.returncode == 0 else {"failed": 1, "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": f"exit code {child.returncode}"}]}
                await self.client.patch(Job, name, {"status": {"active": 0, **outcome}}, patch_type=PatchType.MERGE)
        for name in set(self.trainers) - names:  # a deleted Job's pod is killed
            child, _ = self.trainers.pop(name)
            if child.returncode is None:
                child.kill()
                await child.wait()

    async def _endpoint_slices(self) -> None:
        pods = [p.to_dict() async for p in self.client.list(Pod)]
        existing = {s.metadata.name: s.to_dict().get("endpoints") or [] async for s in self.client.list(EndpointSlice)}
        async for service in self.client.list(Service):
            s = service.to_dict()
            selector = (s.get("spec") or {}).get("selector") or {}
            endpoints = [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                          "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": NAMESPACE}}
                         for p in pods if selector and all(_labels(p).get(k) == v for k, v in selector.items())
                         and (p.get("status") or {}).get("phase") == "Running"]
            name = f"{s['metadata']['name']}-eps"
            body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                    "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": s["metadata"]["name"]}},
                    "endpoints": endpoints, "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]}
            if name in existing and existing[name] != endpoints:
                await self.client.patch(EndpointSlice, name, {"endpoints": endpoints}, patch_type=PatchType.MERGE)
            elif name not in existing:
                await self.client.create(from_dict(body))
