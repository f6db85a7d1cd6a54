"""The Kubernetes backend: pools are Deployments, business services are Services, assignment is a label.

Reads come from an informer cache (one list, then watches, of Corral's Deployments, Pods, Services
and EndpointSlices in one namespace), so the controller's reads stay as cheap as on the local
backend. Writes go to the API server with lightkube's async client — never `kubectl`.

What the cluster does behind Corral's back is handled here:
- Scale-down: the ReplicaSet chooses which pods die. Corral marks the chosen unassigned pods with a
  low `pod-deletion-cost` just before scaling, then verifies what was removed; when the cluster
  removed an assigned pod anyway (deletion cost is only its fourth sort key), the restore below
  gives that business its count back, and the history says so. During a rollout a scale-down would
  span two ReplicaSets: it is refused with the reason.
- Replacements: the counts per business are kept on the Deployment (`corral.dev/desired-assignment`).
  A pod replaced by its ReplicaSet (crash, node loss, rollout) comes back `unassigned`; the restore
  assigns replacements (`domain.assignment.plan_restore`) under the controller's lock.
- Cut-over is eventually consistent (label → EndpointSlice → kube-proxy/LB): an assignment is
  recorded complete (`cutover` in the history, with its delay) once the pod is in the new business's
  EndpointSlice and out of the old one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any

from lightkube import AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment as K8sDeployment
from lightkube.resources.batch_v1 import Job as K8sJob
from lightkube.resources.core_v1 import Node as K8sNode
from lightkube.resources.core_v1 import Pod as K8sPod
from lightkube.resources.core_v1 import Service as K8sService
from lightkube.resources.discovery_v1 import EndpointSlice as K8sEndpointSlice
from lightkube.types import PatchType

from corral.backends.base import Backend, EventSink, save_manifests
from corral.backends.kubernetes import convert
from corral.domain import labels as L
from corral.domain.assignment import plan_restore
from corral.domain.errors import Conflict, CorralError
from corral.domain.manifests import (
    ANNOTATION_DESIRED,
    CORRAL,
    DELETION_COST,
    MANAGED_BY,
    ROUTER_FOR,
    ClusterOptions,
    router_manifests,
    router_name,
    service_manifest,
)
from corral.domain.models import Deployment, Pod, PodPhase, Service
from corral.store.state import StateStore

log = logging.getLogger("corral.kubernetes")

KINDS: dict[str, Any] = {"deployments": K8sDeployment, "pods": K8sPod, "services": K8sService, "endpointslices": K8sEndpointSlice,
                         "jobs": K8sJob}  # finetune Jobs, read by finetune.runners.JobRunner
CUTOVER_TIMEOUT_S = 120.0
SCALE_VERIFY_TIMEOUT_S = 300.0


def client_from(kubeconfig: Path | None, namespace: str) -> AsyncClient:
    """A kubeconfig file, else the in-cluster service account or ~/.kube/config (lightkube's order)."""
    config = KubeConfig.from_file(str(kubeconfig)) if kubeconfig else KubeConfig.from_env()
    return AsyncClient(config=config, namespace=namespace, field_manager="corral")


class KubernetesBackend(Backend):
    def __init__(self, client: AsyncClient, options: ClusterOptions, store: StateStore, emit: EventSink, manifests_dir: Path) -> None:
        self.client = client
        self.cluster_options = options
        self.namespace = options.namespace
        self.store = store
        self.emit = emit
        self.manifests_dir = manifests_dir
        self.objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
        self._tasks: set[asyncio.Task] = set()
        self._dirty_pools: set[str] = set()
        self._wake = asyncio.Event()
        self._mutation_lock: asyncio.Lock | None = None
        self._cutovers: dict[str, tuple[str, str, float]] = {}  # pod → (from, to, started at)
        self.cutover_seconds: collections.deque[float] = collections.deque(maxlen=10_000)  # label patch → EndpointSlices
        self.cutover_timeouts = 0

    def set_mutation_lock(self, lock: asyncio.Lock) -> None:
        self._mutation_lock = lock

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """List everything once (reads are served from then on), then follow with watches."""
        for kind, resource in KINDS.items():
            labels = None if kind == "endpointslices" else {MANAGED_BY: CORRAL}
            async for obj in self.client.list(resource, namespace=self.namespace, labels=labels):
                self.cache(kind, obj.to_dict())
            self._spawn(self._watch(kind, resource, labels), f"watch-{kind}")
        self._dirty_pools.update(d.name for d in self.list_deployments() if d.is_pool)
        self._spawn(self._restore_loop(), "restore-assignments")
        self._wake.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.close()

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch(self, kind: str, resource: Any, labels: dict[str, str] | None) -> None:
        delay = 0.5
        while True:
            try:
                async for change, obj in self.client.watch(resource, namespace=self.namespace, labels=labels):
                    delay = 0.5
                    self._on_change(kind, change, obj.to_dict())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server went away or the watch expired: list-and-watch again
                log.warning("watch of %s failed (%s); retrying in %.1f s", kind, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def cache(self, kind: str, obj: dict[str, Any]) -> None:
        """Keep an object as the watch would: a write's answer is readable before its event arrives."""
        if ROUTER_FOR not in (obj["metadata"].get("labels") or {}):  # a service's vllm-router is part of the service
            self.objects[kind][obj["metadata"]["name"]] = obj

    def _on_change(self, kind: str, change: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if ROUTER_FOR in (obj["metadata"].get("labels") or {}):
            return
        if change == "DELETED":
            self.objects[kind].pop(name, None)
        else:
            self.cache(kind, obj)
        if kind == "pods":
            pod = convert.pod(obj)
            self.emit("replica_status", {"name": name, "deployment": pod.deployment, "ready": pod.ready, "restarts": pod.restarts,
                                         "phase": "Deleted" if change == "DELETED" else pod.phase.value, "business": pod.business})
            if pod.is_pool_pod:
                self._dirty_pools.add(pod.deployment)
                self._wake.set()
        elif kind == "endpointslices" and self._cutovers:
            self._check_cutovers()

    # reads -----------------------------------------------------------------------------------
    def list_deployments(self) -> list[Deployment]:
        return sorted((convert.deployment(o) for o in self.objects["deployments"].values()), key=lambda d: d.name)

    def get_deployment(self, name: str) -> Deployment | None:
        obj = self.objects["deployments"].get(name)
        return convert.deployment(obj) if obj else None

    def list_pods(self, deployment: str | None = None) -> list[Pod]:
        pods = (convert.pod(o) for o in self.objects["pods"].values())
        return sorted((p for p in pods if p.phase != PodPhase.TERMINATING and deployment in (None, p.deployment)), key=lambda p: p.name)

    def get_pod(self, name: str) -> Pod | None:
        obj = self.objects["pods"].get(name)
        pod = convert.pod(obj) if obj else None
        return pod if pod and pod.phase != PodPhase.TERMINATING else None

    def gpus_in_use(self) -> set[int]:
        """The scheduler places GPUs in a cluster; Corral's ledger counts them: as many units are held
        as Corral's replicas request (unit ids are the cluster inventory's indices)."""
        resource = self.cluster_options.gpu_resource
        count = 0
        for obj in self.objects["pods"].values():
            for container in (obj.get("spec") or {}).get("containers") or []:
                count += int(((container.get("resources") or {}).get("limits") or {}).get(resource, 0) or 0)
        return set(range(count))

    def list_services(self) -> list[Service]:
        return sorted((convert.service(o) for o in self.objects["services"].values()), key=lambda s: s.name)

    def get_service(self, name: str) -> Service | None:
        obj = self.objects["services"].get(name)
        return convert.service(obj) if obj else None

    async def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes (for the GPU inventory)."""
        return [n.to_dict() async for n in self.client.list(K8sNode)]

    # writes ----------------------------------------------------------------------------------
    async def create_deployment(self, deployment: Deployment, service: Service | None) -> list[Pod]:
        documents = self.manifests(deployment, service)
        created = await self.client.create(from_dict(documents[0]))
        self.cache("deployments", created.to_dict())
        if service is not None:
            try:
                made = await self.client.create(from_dict(documents[1]))
            except ApiError:
                await self.client.delete(K8sDeployment, deployment.name)  # all or nothing
                self.objects["deployments"].pop(deployment.name, None)
                raise
            self.cache("services", made.to_dict())
        return []  # the ReplicaSet creates the pods; they arrive through the watch

    async def delete_deployment(self, name: str) -> Awaitable[None]:
        deployment = self.get_deployment(name)
        await self.client.delete(K8sDeployment, name)
        self.objects["deployments"].pop(name, None)
        if deployment is not None and not deployment.is_pool and name in self.objects["services"]:
            await self.client.delete(K8sService, name)
            self.objects["services"].pop(name, None)
        return self._spawn(self._until(lambda: not self.list_pods(name), 600), f"delete-{name}")

    async def add_replicas(self, deployment: str, count: int) -> list[Pod]:
        before = {p.name for p in self.list_pods(deployment)}
        await self._set_replicas(deployment, len(before) + count)
        return [p for p in self.list_pods(deployment) if p.name not in before]

    async def remove_replicas(self, deployment: str, pods: list[str]) -> Awaitable[None]:
        obj = self.objects["deployments"].get(deployment) or {}
        if reason := convert.rollout_in_progress(obj):
            raise Conflict(f"deployment '{deployment}' is rolling out ({reason}); a scale-down now would span two "
                           "ReplicaSets. Wait for the rollout to finish (kubectl rollout status) and try again")
        current = self.list_pods(deployment)
        assigned = {p.name: p.business for p in current if p.business not in (None, L.UNASSIGNED)}
        for name in pods:  # once, just before scaling: the ReplicaSet removes the lowest cost first
            await self.client.patch(K8sPod, name, {"metadata": {"annotations": {DELETION_COST: "-1000"}}}, patch_type=PatchType.MERGE)
        target = len(current) - len(pods)
        await self._set_replicas(deployment, target)
        return self._spawn(self._verify_scale_down(deployment, target, set(pods), assigned), f"verify-{deployment}")

    async def _verify_scale_down(self, deployment: str, target: int, chosen: set[str], assigned: dict[str, str | None]) -> None:
        await self._until(lambda: len(self.list_pods(deployment)) <= target, SCALE_VERIFY_TIMEOUT_S)
        remaining = {p.name for p in self.list_pods(deployment)}
        lost = sorted(name for name in assigned if name not in remaining)
        if lost:
            kept = sorted(chosen & remaining)
            message = (f"the ReplicaSet removed assigned pod(s) {', '.join(f'{n} ({assigned[n]})' for n in lost)}"
                       + (f" and kept {', '.join(kept)}" if kept else "")
                       + "; restoring each business's count from unassigned pods")
            self.store.record("scale-verify", deployment, outcome="corrected", message=message)
            self._dirty_pools.add(deployment)
            self._wake.set()

    async def _set_replicas(self, deployment: str, replicas: int) -> None:
        patched = await self.client.patch(K8sDeployment, deployment, {"spec": {"replicas": replicas}}, patch_type=PatchType.MERGE)
        self.cache("deployments", patched.to_dict())

    async def set_businesses(self, businesses: Mapping[str, str]) -> None:
        done: dict[str, str] = {}
        try:
            for name, business in businesses.items():
                previous = self.get_pod(name)
                patched = await self.client.patch(K8sPod, name, {"metadata": {"labels": {L.BUSINESS: business}}},
                                                  patch_type=PatchType.MERGE)
                self.cache("pods", patched.to_dict())
                if previous is not None:
                    done[name] = previous.business or L.UNASSIGNED
                    self._cutovers[name] = (previous.business or L.UNASSIGNED, business, time.monotonic())
        except ApiError:
            for name, business in done.items():  # all or nothing
                with contextlib.suppress(ApiError):
                    await self.client.patch(K8sPod, name, {"metadata": {"labels": {L.BUSINESS: business}}}, patch_type=PatchType.MERGE)
            raise
        self._check_cutovers()

    async def remember_assignment(self, deployment: str, counts: Mapping[str, int]) -> None:
        patched = await self.client.patch(K8sDeployment, deployment,
                                          {"metadata": {"annotations": {ANNOTATION_DESIRED: json.dumps(dict(sorted(counts.items())))}}},
                                          patch_type=PatchType.MERGE)
        self.cache("deployments", patched.to_dict())

    async def create_service(self, service: Service) -> None:
        made = await self.client.create(from_dict(service_manifest(service, self.cluster_options)))
        self.cache("services", made.to_dict())
        if service.llm_routing:
            try:
                for document in router_manifests(service, self.cluster_options):
                    await self.client.create(from_dict(document))
            except ApiError:
                await self.delete_service(service.name)  # all or nothing
                raise

    async def delete_service(self, name: str) -> None:
        service = self.get_service(name)
        await self.client.delete(K8sService, name)
        self.objects["services"].pop(name, None)
        if service is not None and service.llm_routing:
            for resource in (K8sDeployment, K8sService):
                with contextlib.suppress(ApiError):
                    await self.client.delete(resource, router_name(service))

    async def pod_logs(self, name: str, tail: int) -> str | None:
        if name not in self.objects["pods"]:
            return None
        return "".join([line async for line in self.client.log(name, tail_lines=tail)])

    def write_manifests(self, name: str, documents: list[dict]) -> str:
        return save_manifests(self.manifests_dir, name, documents)

    def metrics(self) -> list[str]:
        """Assignment cut-over delay (label patch → pod moved between the businesses' EndpointSlices)."""
        delays = sorted(self.cutover_seconds)
        lines = ["# HELP corral_cutover_seconds Delay from an assignment to the EndpointSlices following it.",
                 "# TYPE corral_cutover_seconds summary"]
        for q in (0.5, 0.9, 0.99):
            if delays:
                lines.append(f'corral_cutover_seconds{{quantile="{q}"}} {delays[min(len(delays) - 1, int(q * len(delays)))]:.4f}')
        lines += [f"corral_cutover_seconds_sum {sum(delays):.4f}", f"corral_cutover_seconds_count {len(delays)}",
                  "# HELP corral_cutover_timeouts_total Assignments whose EndpointSlices did not follow in time.",
                  "# TYPE corral_cutover_timeouts_total counter", f"corral_cutover_timeouts_total {self.cutover_timeouts}"]
        return lines

    # behind Corral's back ----------------------------------------------------------------------
    async def _restore_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0.1)  # coalesce a burst of pod events
            pools, self._dirty_pools = self._dirty_pools, set()
            for pool in sorted(pools):
                try:
                    await self._restore(pool)
                except CorralError as exc:
                    log.warning("could not restore the assignment of %s: %s", pool, exc.message)
                except ApiError as exc:
                    log.warning("could not restore the assignment of %s: %s", pool, exc)

    async def _restore(self, pool: str) -> None:
        lock = self._mutation_lock or asyncio.Lock()
        async with lock:
            obj = self.objects["deployments"].get(pool)
            if obj is None:
                return
            desired = json.loads(((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DESIRED) or "{}")
            plan = plan_restore(self.list_pods(pool), desired)
            if not plan:
                return
            await self.set_businesses(plan)
            for name, business in plan.items():
                self.store.record("assign", name, before={"business": L.UNASSIGNED}, after={"business": business},
                                  message=f"restored: replacement for a lost replica of business '{business}' in {pool}")
                self.emit("pod_assignment", {"podName": name, "deployment": pool, "from": L.UNASSIGNED, "to": business,
                                             "reason": "restore"})

    def _check_cutovers(self) -> None:
        """Record the assignments whose pod has moved between the businesses' EndpointSlices."""
        slices = list(self.objects["endpointslices"].values())
        now = time.monotonic()
        routed: dict[str, set[str]] = {}  # business → pods its services' EndpointSlices route to
        for service in self.list_services():
            if service.is_business_service and service.business:
                routed.setdefault(service.business, set()).update(convert.endpoint_pods(slices, service.name))
        for name, (source, target, started) in list(self._cutovers.items()):
            arrived = target == L.UNASSIGNED or name in routed.get(target, set())
            left = source == L.UNASSIGNED or name not in routed.get(source, set())
            if arrived and left:
                delay_ms = round((now - started) * 1000, 1)
                self.cutover_seconds.append(now - started)
                del self._cutovers[name]
                self.store.record("cutover", name, before={"business": source}, after={"business": target},
                                  message=f"traffic follows after {delay_ms} ms (EndpointSlices updated)")
                self.emit("assignment_complete", {"podName": name, "from": source, "to": target, "delayMs": delay_ms})
            elif now - started > CUTOVER_TIMEOUT_S:
                self.cutover_timeouts += 1
                del self._cutovers[name]
                self.store.record("cutover", name, before={"business": source}, after={"business": target}, outcome="timeout",
                                  message=f"EndpointSlices did not follow within {CUTOVER_TIMEOUT_S:.0f} s")

    async def _until(self, condition: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
