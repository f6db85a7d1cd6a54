"""The Kubernetes backend: pools are Deployments, business services are Services, assignment is a label.

Reads come from an informer cache (one list, then watches, of Corral's Deployments, Pods, Services
and EndpointSlices in one namespace), so the controller's reads stay as cheap as on the local
backend. Writes go to the API server with lightkube's async client — never `kubectl`.

What the cluster does behind Corral's back is handled here:
- Scale-down: the ReplicaSet chooses which pods die. Corral marks the chosen unassigned pods with a
  low `pod-deletion-cost` just before scaling, then verifies what was removed; when the cluster
  removed an assigned pod anyway (deletion cost is only its fourth sort key), it reports so and the
  controller's reconciler gives that business its count back. During a rollout a scale-down would
  span two ReplicaSets: it is refused with the reason.
- Replacements: the counts per business are kept on the Deployment (`corral.dev/desired-assignment`).
  A pod replaced by its ReplicaSet (crash, node loss, rollout) comes back `unassigned`; the
  controller's reconciler assigns replacements (`domain.assignment.plan_restore`) under the pool's lock.
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

from corral.backends.base import Backend, Report, save_manifests
from corral.backends.kubernetes import convert
from corral.domain import labels as L
from corral.domain.errors import Conflict
from corral.domain.gpu_ledger import GpuClaim, Holder
from corral.domain.history import Action, HistoryDraft, Intent, Outcome
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
    def __init__(self, client: AsyncClient, options: ClusterOptions, store: StateStore, report: Report, manifests_dir: Path) -> None:
        self.client = client
        self.cluster_options = options
        self.namespace = options.namespace
        self.store = store
        self.report = report
        self.manifests_dir = manifests_dir
        self.objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
        self._tasks: set[asyncio.Task] = set()
        self._cutovers: dict[str, tuple[str, str, float]] = {}  # pod → (from, to, started at)
        self.cutover_seconds: collections.deque[float] = collections.deque(maxlen=10_000)  # label patch → EndpointSlices
        self.cutover_timeouts = 0

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """List everything once (reads are served from then on), then follow with watches."""
        for kind, resource in KINDS.items():
            labels = None if kind == "endpointslices" else {MANAGED_BY: CORRAL}
            async for obj in self.client.list(resource, namespace=self.namespace, labels=labels):
                self.cache(kind, obj.to_dict())
            self._spawn(self._watch(kind, resource, labels), f"watch-{kind}")

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
            self.report("replica_status", {"name": name, "deployment": pod.deployment, "ready": pod.ready, "restarts": pod.restarts,
                                         "phase": "Deleted" if change == "DELETED" else pod.phase.value, "business": pod.business})
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

    def gpu_claims(self) -> list[GpuClaim]:
        """The kube scheduler, not Corral, picks a pod's GPUs: each replica pod (terminating ones too, their
        GPUs are not free yet) claims as many units as its containers' limits ask, and the GPU ledger books
        them on the cluster inventory's units (from the nodes) — counts, not identities. A finetune Job's
        pods are not replicas: the finetune manager books their units as its task's."""
        resource = self.cluster_options.gpu_resource
        claims = []
        for name, obj in sorted(self.objects["pods"].items()):
            if not convert.pod(obj).deployment:
                continue
            count = sum(int(((c.get("resources") or {}).get("limits") or {}).get(resource, 0) or 0)
                        for c in (obj.get("spec") or {}).get("containers") or [])
            if count:
                claims.append(GpuClaim(Holder.replica(name), count=count))
        return claims

    def list_services(self) -> list[Service]:
        return sorted((convert.service(o) for o in self.objects["services"].values()), key=lambda s: s.name)

    def get_service(self, name: str) -> Service | None:
        obj = self.objects["services"].get(name)
        return convert.service(obj) if obj else None

    async def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes (for the GPU inventory)."""
        return [n.to_dict() async for n in self.client.list(K8sNode)]

    # writes ----------------------------------------------------------------------------------
    async def create_deployment(self, deployment: Deployment, service: Service | None, intent: Intent | None = None) -> list[Pod]:
        self._begin(intent)
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

    async def delete_deployment(self, name: str, intent: Intent | None = None) -> Awaitable[None]:
        self._begin(intent)
        deployment = self.get_deployment(name)
        await self.client.delete(K8sDeployment, name)
        self.objects["deployments"].pop(name, None)
        if deployment is not None and not deployment.is_pool and name in self.objects["services"]:
            await self.client.delete(K8sService, name)
            self.objects["services"].pop(name, None)
        return self._spawn(self._until(lambda: not self.list_pods(name), 600), f"delete-{name}")

    async def add_replicas(self, deployment: str, count: int, intent: Intent | None = None) -> list[Pod]:
        self._begin(intent)
        before = {p.name for p in self.list_pods(deployment)}
        await self._set_replicas(deployment, len(before) + count)
        return [p for p in self.list_pods(deployment) if p.name not in before]

    async def remove_replicas(self, deployment: str, pods: list[str], intent: Intent | None = None) -> Awaitable[None]:
        obj = self.objects["deployments"].get(deployment) or {}
        if reason := convert.rollout_in_progress(obj):
            raise Conflict(f"deployment '{deployment}' is rolling out ({reason}); a scale-down now would span two "
                           "ReplicaSets. Wait for the rollout to finish (kubectl rollout status) and try again")
        self._begin(intent)
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
            self.report("replica_status", {"deployment": deployment, "phase": "Replaced"},
                        history=HistoryDraft(Action.SCALE_VERIFY, deployment, message=message), outcome=Outcome.CORRECTED)

    async def _set_replicas(self, deployment: str, replicas: int) -> None:
        patched = await self.client.patch(K8sDeployment, deployment, {"spec": {"replicas": replicas}}, patch_type=PatchType.MERGE)
        self.cache("deployments", patched.to_dict())

    async def set_businesses(self, businesses: Mapping[str, str], intent: Intent | None = None) -> None:
        self._begin(intent)
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

    def _begin(self, intent: Intent | None) -> None:
        """The cluster holds the desired state; Corral's database holds the intent, written before the first write."""
        if intent is not None and not intent.ids:
            self.store.begin(intent)

    async def remember_assignment(self, deployment: str, counts: Mapping[str, int]) -> None:
        patched = await self.client.patch(K8sDeployment, deployment,
                                          {"metadata": {"annotations": {ANNOTATION_DESIRED: json.dumps(dict(sorted(counts.items())))}}},
                                          patch_type=PatchType.MERGE)
        self.cache("deployments", patched.to_dict())

    async def create_service(self, service: Service, intent: Intent | None = None) -> None:
        self._begin(intent)
        made = await self.client.create(from_dict(service_manifest(service, self.cluster_options)))
        self.cache("services", made.to_dict())
        if service.llm_routing:
            try:
                for document in router_manifests(service, self.cluster_options):
                    await self.client.create(from_dict(document))
            except ApiError:
                await self.delete_service(service.name)  # all or nothing
                raise

    async def delete_service(self, name: str, unassign: Mapping[str, str] | None = None, intent: Intent | None = None) -> None:
        self._begin(intent)
        if unassign:
            await self.set_businesses(unassign)
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
    def desired_assignment(self, deployment: str) -> Mapping[str, int]:
        obj = self.objects["deployments"].get(deployment) or {}
        return json.loads(((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DESIRED) or "{}")

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
                self.report("assignment_complete", {"podName": name, "from": source, "to": target, "delayMs": delay_ms},
                            history=HistoryDraft(Action.CUTOVER, name, before={"business": source}, after={"business": target},
                                                 message=f"traffic follows after {delay_ms} ms (EndpointSlices updated)"))
            elif now - started > CUTOVER_TIMEOUT_S:
                self.cutover_timeouts += 1
                del self._cutovers[name]
                self.report(None, history=HistoryDraft(Action.CUTOVER, name, before={"business": source}, after={"business": target},
                                                       message=f"EndpointSlices did not follow within {CUTOVER_TIMEOUT_S:.0f} s"),
                            outcome=Outcome.TIMEOUT)

    async def _until(self, condition: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
