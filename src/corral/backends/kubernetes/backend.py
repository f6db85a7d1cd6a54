"""The Kubernetes backend: pools are Deployments, business services are Services, assignment is a label.

Reads come from an informer cache: a reflector per kind (`reflector.py`: list, then watch from the
list's resourceVersion with bookmarks, re-watch from the last version on 429 or a cut connection,
relist and replace on 410 or a failed re-watch, a read timeout for dead connections) of Corral's
Deployments, Pods, Services, Jobs, the namespace's EndpointSlices and HorizontalPodAutoscalers — and,
cluster-wide, of the nodes and the pods bound to them, for a GPU inventory as the scheduler counts it. Replica pods are kept converted, per deployment, and updated per event, so
the controller's reads stay as cheap as on the local backend. Writes go to the API server with
lightkube's async client — never `kubectl` — and their answers enter the cache only when newer than
what it holds.

What the cluster does behind Corral's back is handled here:
- Only active pods are replicas (client-go's `IsPodActive`): a Failed (evicted), Succeeded or
  terminating pod is none, and a finetune Job's pod never is.
- Scale-down: the ReplicaSet chooses which pods die. Every pool pod carries a
  `pod-deletion-cost` that follows its `business` label (set in the same patch: assigned high,
  unassigned low; kept consistent when someone else relabels), so any scale-down — Corral's, an
  HPA's, `kubectl scale` — prefers unassigned pods; the pods Corral picks get the lowest cost just
  before it scales. `spec.replicas` is read and written with its resourceVersion as a precondition
  (409 Conflict: read again, retry), so a concurrent scale by someone else is never overwritten.
  Corral then verifies what was removed; when the cluster removed an assigned pod anyway (the cost
  is only its fourth sort key), it reports so and the controller's reconciler gives that business
  its count back. During a rollout a scale-down would span two ReplicaSets, and with a
  HorizontalPodAutoscaler on the pool the HPA owns `spec.replicas`: both are refused with the reason.
- Replacements: the counts per business are kept on the Deployment (`corral.dev/desired-assignment`).
  A pod replaced by its ReplicaSet (crash, eviction, node loss, rollout) comes back `unassigned`; the
  controller's reconciler assigns replacements (`domain.assignment.plan_restore`) under the pool's lock.
- Cut-over is eventually consistent (label → EndpointSlice → kube-proxy/LB): an assignment is
  recorded complete (`cutover` in the history, with its delay) once the pod is in the new business's
  EndpointSlice and out of the old one. For an external business service (a LoadBalancer: an AWS NLB
  with IP targets) that is not yet traffic: the AWS Load Balancer Controller registers the pod's IP
  in the target group, and the NLB's health checks pass, minutes later. Where the pod carries the
  controller's readiness gate for the service's TargetGroupBinding (`target-health.elbv2.k8s.aws/…`),
  the cut-over is complete once that condition is True; where it carries none — the webhook injects
  gates only into pods created while a Service selects them, and pool pods are created unassigned —
  it is recorded `unconfirmed`: "endpoints updated; external targets may take minutes", never as done.
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

from lightkube import ALL_NS, AsyncClient, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment as K8sDeployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler as K8sHPA
from lightkube.resources.batch_v1 import Job as K8sJob
from lightkube.resources.core_v1 import Node as K8sNode
from lightkube.resources.core_v1 import PersistentVolumeClaim
from lightkube.resources.core_v1 import Pod as K8sPod
from lightkube.resources.core_v1 import Service as K8sService
from lightkube.resources.discovery_v1 import EndpointSlice as K8sEndpointSlice
from lightkube.types import PatchType

from corral.backends.base import Backend, Report, save_manifests
from corral.backends.kubernetes import convert
from corral.backends.kubernetes.leader import LeaderElection
from corral.backends.kubernetes.reflector import DELETED, Reflector, Store, WatchSettings, watch_settings
from corral.domain import labels as L
from corral.domain.errors import Conflict
from corral.domain.gpu_ledger import GpuClaim, Holder
from corral.domain.history import Action, HistoryDraft, Intent, Outcome
from corral.domain.manifests import (
    ANNOTATION_DESIRED,
    CHOSEN_COST,
    CORRAL,
    DELETION_COST,
    MANAGED_BY,
    ROUTER_FOR,
    ClusterOptions,
    deletion_cost,
    disruption_budget_manifest,
    router_manifests,
    router_name,
    service_manifest,
)
from corral.domain.models import Deployment, Pod, Service
from corral.events import EventType
from corral.gpus.cluster import MIG_PREFIX, Placement, cluster_inventory, pod_requests
from corral.gpus.inventory import GpuInventory

log = logging.getLogger("corral.kubernetes")

# kind → (resource, only Corral's objects (managed-by label), required at start)
KINDS: dict[str, tuple[Any, bool, bool]] = {
    "deployments": (K8sDeployment, True, True), "pods": (K8sPod, True, True), "services": (K8sService, True, True),
    "endpointslices": (K8sEndpointSlice, False, True),
    "jobs": (K8sJob, True, True),  # finetune Jobs, read by finetune.runners.JobRunner
    "hpas": (K8sHPA, False, False),  # HorizontalPodAutoscalers: one on a pool owns its spec.replicas
}
# The GPU inventory's sources, cluster-wide (`gpu_inventory`): every node, and every pod bound to one and not terminal
# (kube-scheduler's own field selector), whoever owns it. Only what the GPU arithmetic needs is kept of them.
BOUND_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
CUTOVER_TIMEOUT_S = 120.0
# An NLB registers an IP target and passes its health checks in minutes (registration ~1-3 min, then the health
# check's healthy threshold × interval); the controller then sets the pod's readiness gate condition.
EXTERNAL_CUTOVER_TIMEOUT_S = 600.0
BINDINGS_TTL_S = 30.0  # TargetGroupBindings read at most this often (a distribution moves many pods at once)
TargetGroupBinding = create_namespaced_resource("elbv2.k8s.aws", "v1beta1", "TargetGroupBinding", "targetgroupbindings")
SCALE_VERIFY_TIMEOUT_S = 300.0
SCALE_ATTEMPTS = 8
SCALE_SETTLE_S = 1.0


def _not_a_router(obj: dict[str, Any]) -> bool:
    """A business service's vllm-router objects are part of the service, not deployments or services of their own."""
    return ROUTER_FOR not in ((obj.get("metadata") or {}).get("labels") or {})


def _hpa_target(hpa: dict[str, Any]) -> str | None:
    ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
    return ref.get("name") if ref.get("kind") == "Deployment" else None


def _business_patch(business: str) -> dict[str, Any]:
    """The label and its deletion cost in one merge patch: never one without the other."""
    return {"metadata": {"labels": {L.BUSINESS: business}, "annotations": {DELETION_COST: deletion_cost(business)}}}


def _slim_node(obj: dict[str, Any]) -> dict[str, Any]:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    return {"metadata": {k: meta[k] for k in ("name", "uid", "resourceVersion", "labels") if k in meta},
            "spec": {k: spec[k] for k in ("unschedulable", "taints") if k in spec},
            "status": {"allocatable": status.get("allocatable") or {},
                       "conditions": [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]}}


def _slim_pod(obj: dict[str, Any]) -> dict[str, Any]:
    """A bound pod of any namespace, as the GPU arithmetic reads it, named `namespace/name`."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    labels = meta.get("labels") or {}

    def slim(c: dict[str, Any]) -> dict[str, Any]:
        return {"resources": c.get("resources") or {}, **({"restartPolicy": c["restartPolicy"]} if c.get("restartPolicy") else {})}

    return {"metadata": {"name": f"{meta.get('namespace')}/{meta.get('name')}", "namespace": meta.get("namespace"),
                         "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion"),
                         "labels": {MANAGED_BY: labels[MANAGED_BY]} if MANAGED_BY in labels else {}},
            "spec": {"nodeName": spec.get("nodeName"), "containers": [slim(c) for c in spec.get("containers") or []],
                     "initContainers": [slim(c) for c in spec.get("initContainers") or []],
                     **({"overhead": spec["overhead"]} if spec.get("overhead") else {})},
            "status": {"phase": (obj.get("status") or {}).get("phase")}}


def client_from(kubeconfig: Path | None, namespace: str) -> AsyncClient:
    """A kubeconfig file, else the in-cluster service account or ~/.kube/config (lightkube's order)."""
    config = KubeConfig.from_file(str(kubeconfig)) if kubeconfig else KubeConfig.from_env()
    return AsyncClient(config=config, namespace=namespace, field_manager="corral")


class KubernetesBackend(Backend):
    supports_secret_env = False  # it would need a Secret object, which Corral does not create

    def __init__(self, client: AsyncClient, options: ClusterOptions, report: Report, manifests_dir: Path,
                 watch: WatchSettings | None = None) -> None:
        """The cluster holds the desired state; Corral's database holds each change's intent, written
        through the controller's intent writer (`set_intent_writer`) before the change's first write."""
        self.client = client
        self.cluster_options = options
        self.namespace = options.namespace
        self.report = report
        self.manifests_dir = manifests_dir
        self.watch_settings = watch
        self.stores: dict[str, Store] = {kind: Store(kind, self._on_change, keep=_not_a_router) for kind in KINDS}
        gpu_like = self._gpu_like
        self.stores["nodes"] = Store("nodes", self._on_change, transform=_slim_node)
        # Pods without GPU requests are not kept (a pod's extended-resource requests never change).
        self.stores["bound-pods"] = Store("bound-pods", self._on_change, keep=lambda pod: bool(pod_requests(pod, gpu_like)),
                                          transform=_slim_pod)
        self.objects: dict[str, dict[str, dict[str, Any]]] = {kind: store_.objects for kind, store_ in self.stores.items()}
        self.reflectors: dict[str, Reflector] = {}
        self._replicas: dict[str, Pod] = {}  # active replica pods, converted once per event
        self._by_deployment: dict[str, dict[str, Pod]] = {}
        self._sorted: dict[str | None, list[Pod]] = {}  # list_pods answers, until a pod of that deployment changes
        self._doomed: set[str] = set()  # pods chosen for a scale-down in progress (the lowest deletion cost)
        self._costs_due = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._cutovers: dict[str, tuple[str, str, float]] = {}  # pod → (from, to, started at)
        self.cutover_seconds: collections.deque[float] = collections.deque(maxlen=10_000)  # label patch → EndpointSlices
        self.cutover_timeouts = 0
        self.cutover_unconfirmed = 0  # external cut-overs whose load balancer targets could not be read
        self._bindings: tuple[float, dict[str, str], str | None] | None = None  # (read at, TargetGroupBinding → Service, error)
        self.cost_patches = 0
        self.leader: LeaderElection | None = None

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """List everything once (reads are served from then on), then keep each kind in step with a reflector."""
        if self.cluster_options.leader_election:
            self.leader = LeaderElection(self.client, self.namespace)
            await self.leader.acquire()  # a standby Corral waits here, and serves nothing, until it leads
        if self.watch_settings is None:
            self.watch_settings = watch_settings(idle_s=self.cluster_options.watch_idle_s)
        for kind, (resource, managed, required) in KINDS.items():
            reflector = Reflector(self.client, resource, self.stores[kind], self.namespace, {MANAGED_BY: CORRAL} if managed else None,
                                  self.watch_settings)
            self.reflectors[kind] = reflector
            try:
                await reflector.list()
            except Exception as exc:
                if required:
                    raise
                log.warning("cannot list %s (%s); Corral keeps trying, and works without them meanwhile", kind, exc)
            self._spawn(reflector.run(), f"reflect-{kind}")
        # Cluster-wide, for the GPU inventory: without them (RBAC from before they were needed, say) Corral warns and
        # counts GPUs from what it has (no nodes: none; no pods: as if no other tenant used any).
        for kind, resource, namespace, fields in (("nodes", K8sNode, None, None), ("bound-pods", K8sPod, ALL_NS, BOUND_PODS)):
            reflector = Reflector(self.client, resource, self.stores[kind], namespace, None, self.watch_settings, fields=fields)
            self.reflectors[kind] = reflector
            try:
                await reflector.list()
            except Exception as exc:
                reflector.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("cannot list %s cluster-wide (%s): the GPU inventory is incomplete until Corral can (its ClusterRole "
                            "needs list/watch on nodes and pods)", kind, exc)
            self._spawn(reflector.run(), f"reflect-{kind}")
        self._spawn(self._keep_costs(), "deletion-costs")
        self._costs_due.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.leader is not None:
            await self.leader.release()
        await self.client.close()

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cache(self, kind: str, obj: dict[str, Any]) -> bool:
        """A write's answer: readable at once, unless the cache already holds a newer version or saw it deleted."""
        return self.stores[kind].write(obj)

    def forget(self, kind: str, name: str) -> None:
        """An object Corral deleted: gone from the reads now, whatever late events say."""
        self.stores[kind].forget(name)

    def _on_change(self, kind: str, change: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        if kind == "pods":
            self._on_pod(change, old, new)
        elif kind == "endpointslices" and self._cutovers:
            self._check_cutovers()
        elif kind == "hpas" and change != DELETED:
            target = _hpa_target(new)
            if target and target in self.objects["deployments"] and (old is None or _hpa_target(old) != target):
                log.warning("HorizontalPodAutoscaler %s scales %s: Corral refuses to scale that pool itself while it does",
                            new["metadata"]["name"], target)

    def _on_pod(self, change: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        name = new["metadata"]["name"]
        previous = self._replicas.pop(name, None)
        if previous is not None:
            self._by_deployment.get(previous.deployment, {}).pop(name, None)
            self._stale(previous.deployment)
        pod = convert.pod(new)
        if change != DELETED and convert.is_replica(new):
            self._replicas[name] = pod
            self._by_deployment.setdefault(pod.deployment, {})[name] = pod
            self._stale(pod.deployment)
            if (new["metadata"].get("annotations") or {}).get(DELETION_COST) != self._cost_of(pod):
                self._costs_due.set()
        if convert.is_job_pod(new) or not convert.deployment_of(new):
            return
        phase = "Deleted" if change == DELETED else convert.phase_name(new)
        self.report(EventType.REPLICA_STATUS, {
            "name": name, "deployment": pod.deployment, "ready": pod.ready and phase != "Deleted",
            "restarts": pod.restarts, "phase": phase, "business": pod.business})
        if change != DELETED and convert.is_terminal(new) and not (old is not None and convert.is_terminal(old)):
            status = new.get("status") or {}
            why = ": ".join(x for x in (status.get("reason"), status.get("message")) if x) or "its containers exited"
            self.report(None, history=HistoryDraft(Action.CRASH, name, before={"business": pod.business} if pod.business else None,
                                                   message=f"pod {status.get('phase', '').lower()} ({why}); its ReplicaSet "
                                                           "starts a replacement, which Corral assigns like the one it replaces"),
                        outcome=Outcome.RESTARTING)

    def _stale(self, deployment: str) -> None:
        self._sorted.pop(deployment, None)
        self._sorted.pop(None, None)

    # reads -----------------------------------------------------------------------------------
    def list_deployments(self) -> list[Deployment]:
        return sorted((convert.deployment(o) for o in self.objects["deployments"].values()), key=lambda d: d.name)

    def get_deployment(self, name: str) -> Deployment | None:
        obj = self.objects["deployments"].get(name)
        return convert.deployment(obj) if obj else None

    def list_pods(self, deployment: str | None = None) -> list[Pod]:
        pods = self._sorted.get(deployment)
        if pods is None:
            source = self._replicas if deployment is None else self._by_deployment.get(deployment, {})
            pods = self._sorted[deployment] = sorted(source.values(), key=lambda p: p.name)
        return list(pods)

    def get_pod(self, name: str) -> Pod | None:
        return self._replicas.get(name)

    def gpu_claims(self) -> list[GpuClaim]:
        """The kube scheduler, not Corral, picks a pod's GPUs: each replica pod (terminating ones too, their
        GPUs are not free yet; not Failed or Succeeded ones, which hold none) claims as many units as its
        containers' limits ask, and the GPU ledger books them on the cluster inventory's units (from the
        nodes) — counts, not identities. A finetune Job's pods are not replicas: the finetune manager books
        their units as its task's, once."""
        resource = self.cluster_options.gpu_resource
        claims = []
        for name, obj in sorted(self.objects["pods"].items()):
            if not convert.holds_gpus(obj):
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

    def _gpu_like(self, resource: str) -> bool:
        return resource == self.cluster_options.gpu_resource or resource.startswith(MIG_PREFIX)

    def _own(self, pod: Mapping[str, Any]) -> bool:
        """Corral's pods, whose GPUs the ledger books (replicas by their limits, finetune Jobs as their tasks)."""
        meta = pod.get("metadata") or {}
        return meta.get("namespace") == self.namespace and (meta.get("labels") or {}).get(MANAGED_BY) == CORRAL

    def gpu_inventory(self) -> GpuInventory:
        """The GPUs as the kube scheduler would count them for a pool's pods (`gpus.cluster.cluster_inventory`), from
        the Node and bound-Pod watches' caches: no request to the API server."""
        nodes = self.reflectors.get("nodes")
        if nodes is None or not nodes.synced.is_set():
            return GpuInventory(error=f"the cluster's nodes cannot be read ({nodes.last_error if nodes else 'not started'})")
        options = self.cluster_options
        return cluster_inventory(self.objects["nodes"].values(), self.objects["bound-pods"].values(), options.gpu_resource,
                                 Placement(options.tolerations, options.node_selector), self._own)

    def autoscaler_of(self, deployment: str) -> dict[str, Any] | None:
        """The HorizontalPodAutoscaler whose scaleTargetRef is this Deployment, if any."""
        return next((h for h in self.objects["hpas"].values() if _hpa_target(h) == deployment), None)

    async def _check_model_cache(self) -> None:
        """Replicas of a pool land on many nodes: a model cache claim they share must be ReadWriteMany (or
        ReadOnlyMany, filled beforehand); a ReadWriteOnce one would leave all but the first node's pods Pending."""
        claim = self.cluster_options.model_cache_claim
        if not claim:
            return
        try:
            modes = set(((await self.client.get(PersistentVolumeClaim, claim)).to_dict().get("spec") or {}).get("accessModes") or [])
        except ApiError as exc:
            raise Conflict(f"the model cache claim '{claim}' cannot be read ({exc.status.code} {exc.status.reason}); "
                           "create it (ReadWriteMany) or unset CORRAL_KUBERNETES_MODEL_CACHE_CLAIM") from None
        if not modes & {"ReadWriteMany", "ReadOnlyMany"}:
            raise Conflict(f"the model cache claim '{claim}' is {', '.join(sorted(modes)) or 'without access modes'}: replicas on "
                           "other nodes could not mount it. Use a ReadWriteMany (or a pre-filled ReadOnlyMany) claim")

    def manifests(self, deployment: Deployment, service: Service | None) -> list[dict]:
        """The Deployment, a standard deployment's Service, and a pool's PodDisruptionBudget."""
        documents = super().manifests(deployment, service)
        return documents + ([disruption_budget_manifest(deployment, self.cluster_options)] if deployment.is_pool else [])

    async def create_deployment(self, deployment: Deployment, service: Service | None, intent: Intent | None = None) -> list[Pod]:
        await self._check_model_cache()
        self._write_intent(intent)
        documents = {d["kind"]: d for d in self.manifests(deployment, service)}
        created = await self.client.create(from_dict(documents["Deployment"]))
        self.cache("deployments", created.to_dict())
        try:
            if budget := documents.get("PodDisruptionBudget"):
                # Owned by the Deployment: the garbage collector deletes it with the pool, whoever deletes that.
                budget["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment.name,
                                                          "uid": created.metadata.uid, "blockOwnerDeletion": False}]
                await self.client.create(from_dict(budget))
            if service is not None:
                made = await self.client.create(from_dict(documents["Service"]))
                self.cache("services", made.to_dict())
        except ApiError:
            await self.client.delete(K8sDeployment, deployment.name)  # all or nothing (its budget goes with it)
            self.forget("deployments", deployment.name)
            raise
        return []  # the ReplicaSet creates the pods; they arrive through the watch

    async def delete_deployment(self, name: str, intent: Intent | None = None) -> Awaitable[None]:
        self._write_intent(intent)
        deployment = self.get_deployment(name)
        await self.client.delete(K8sDeployment, name)
        self.forget("deployments", name)
        if deployment is not None and not deployment.is_pool and name in self.objects["services"]:
            await self.client.delete(K8sService, name)
            self.forget("services", name)
        return self._spawn(self._until(lambda: not self.list_pods(name), 600), f"delete-{name}")

    def _refuse_autoscaled(self, deployment: str) -> None:
        hpa = self.autoscaler_of(deployment)
        if hpa is not None:
            spec = hpa.get("spec") or {}
            raise Conflict(
                f"deployment '{deployment}' is scaled by the HorizontalPodAutoscaler '{hpa['metadata']['name']}' "
                f"({spec.get('minReplicas', 1)}-{spec.get('maxReplicas')} replicas): it owns spec.replicas and would undo a scale "
                "made here. Change its minReplicas/maxReplicas, or delete it to scale the pool from Corral. Its own "
                "scale-downs prefer unassigned pods (pod-deletion-cost), and Corral restores each business's count.")

    async def add_replicas(self, deployment: str, count: int, intent: Intent | None = None) -> list[Pod]:
        self._refuse_autoscaled(deployment)
        self._write_intent(intent)
        before = {p.name for p in self.list_pods(deployment)}
        await self._scale_by(deployment, count)
        return [p for p in self.list_pods(deployment) if p.name not in before]

    async def remove_replicas(self, deployment: str, pods: list[str], intent: Intent | None = None) -> Awaitable[None]:
        obj = self.objects["deployments"].get(deployment) or {}
        if convert.rollout_in_progress(obj) == convert.NOT_OBSERVED:  # the Deployment controller has not caught up yet (ms)
            await self._until(lambda: convert.rollout_in_progress(self.objects["deployments"].get(deployment) or {})
                              != convert.NOT_OBSERVED, 5.0)
            obj = self.objects["deployments"].get(deployment) or {}
        if reason := convert.rollout_in_progress(obj):
            raise Conflict(f"deployment '{deployment}' is rolling out ({reason}); a scale-down now would span two "
                           "ReplicaSets. Wait for the rollout to finish (kubectl rollout status) and try again")
        self._refuse_autoscaled(deployment)
        self._write_intent(intent)
        current = self.list_pods(deployment)
        assigned = {p.name: p.business for p in current if p.business not in (None, L.UNASSIGNED)}
        self._doomed.update(pods)
        try:
            for name in pods:  # just before scaling: the ReplicaSet removes the lowest cost first (among ready pods)
                patched = await self.client.patch(K8sPod, name, {"metadata": {"annotations": {DELETION_COST: CHOSEN_COST}}},
                                                  patch_type=PatchType.MERGE)
                self.cache("pods", patched.to_dict())
            _, target = await self._scale_by(deployment, -len(pods))
        except BaseException:
            self._doomed.difference_update(pods)
            self._costs_due.set()
            raise
        return self._spawn(self._verify_scale_down(deployment, target, set(pods), assigned), f"verify-{deployment}")

    async def _verify_scale_down(self, deployment: str, target: int, chosen: set[str], assigned: dict[str, str | None]) -> None:
        try:
            await self._until(lambda: not chosen & {p.name for p in self.list_pods(deployment)}
                              or len(self.list_pods(deployment)) <= target, SCALE_VERIFY_TIMEOUT_S)
            await asyncio.sleep(SCALE_SETTLE_S)  # the ReplicaSet deletes its victims in one sync; their events may trail
        finally:
            self._doomed.difference_update(chosen)  # the pods kept by the ReplicaSet get their label's cost back
            self._costs_due.set()
        remaining = {p.name for p in self.list_pods(deployment)}
        lost = sorted(name for name in assigned if name not in remaining)
        if lost:
            kept = sorted(chosen & remaining)
            message = (f"the ReplicaSet removed assigned pod(s) {', '.join(f'{n} ({assigned[n]})' for n in lost)}"
                       + (f" and kept {', '.join(kept)}" if kept else "")
                       + "; restoring each business's count from unassigned pods")
            self.report(EventType.REPLICA_STATUS, {"deployment": deployment, "phase": "Replaced"},
                        history=HistoryDraft(Action.SCALE_VERIFY, deployment, message=message), outcome=Outcome.CORRECTED)

    async def _scale_by(self, deployment: str, delta: int) -> tuple[int, int]:
        """`spec.replicas += delta` through the `scale` subresource (as an HPA or `kubectl scale` do), with the
        Deployment's resourceVersion as a precondition: a concurrent change (an HPA, `kubectl scale`, another
        Corral) makes the write fail with 409 Conflict instead of being overwritten, and it is retried from a
        fresh read (API conventions, "Concurrency Control and Consistency"; the scale subresource moves the
        Scale's resourceVersion onto the Deployment it updates). The delta applies to the *desired* count,
        not to the pods seen: pods being created or replaced are counted by the ReplicaSet, not yet by the
        watch. The Deployment itself arrives through the watch. Returns (before, after)."""
        current: dict[str, Any] | None = self.objects["deployments"].get(deployment)  # a Deployment or a Scale: same fields used
        # A missing `spec.replicas` means 1 on a Deployment (the API server defaults it; a pointer, kept at 0) but 0 on a
        # Scale (an int32 with `omitempty`: the API omits it at 0).
        missing = 1
        for _ in range(SCALE_ATTEMPTS):
            if current is None:
                current, missing = (await self.client.get(K8sDeployment.Scale, deployment)).to_dict(), 0
            replicas = (current.get("spec") or {}).get("replicas")
            before = int(replicas) if replicas is not None else missing
            after = max(0, before + delta)
            patch = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}, "spec": {"replicas": after}}
            try:
                await self.client.patch(K8sDeployment.Scale, deployment, patch, patch_type=PatchType.MERGE)
            except ApiError as exc:
                if exc.status.code != 409:
                    raise
                log.info("scaling %s: the Deployment changed meanwhile (409 Conflict); reading it again", deployment)
                current = None
                continue
            return before, after
        raise Conflict(f"deployment '{deployment}' kept changing while Corral scaled it ({SCALE_ATTEMPTS} conflicts in a row); "
                       "something else is scaling it — try again")

    async def set_businesses(self, businesses: Mapping[str, str], intent: Intent | None = None) -> None:
        self._write_intent(intent)
        done: dict[str, str] = {}
        try:
            for name, business in businesses.items():
                previous = self.get_pod(name)
                patched = await self.client.patch(K8sPod, name, _business_patch(business), patch_type=PatchType.MERGE)
                self.cache("pods", patched.to_dict())
                if previous is not None:
                    done[name] = previous.business or L.UNASSIGNED
                    self._cutovers[name] = (previous.business or L.UNASSIGNED, business, time.monotonic())
        except ApiError:
            for name, business in done.items():  # all or nothing
                with contextlib.suppress(ApiError):
                    patched = await self.client.patch(K8sPod, name, _business_patch(business), patch_type=PatchType.MERGE)
                    self.cache("pods", patched.to_dict())
            raise
        self._check_cutovers()

    def _cost_of(self, pod: Pod) -> str | None:
        """The deletion cost a replica should carry: the lowest while a scale-down chose it; else, for a pool
        pod, its label's; a standard deployment's pod none."""
        if pod.name in self._doomed:
            return CHOSEN_COST
        return deletion_cost(pod.business) if pod.is_pool_pod else None

    async def _keep_costs(self) -> None:
        """Keep each pool pod's deletion cost consistent with its label: pods born before Corral set costs,
        relabelled by someone else (`kubectl label`), or kept by a scale-down that chose them (stale costs).
        Patches only what differs; woken by pod events."""
        while True:
            await self._costs_due.wait()
            self._costs_due.clear()
            await asyncio.sleep(0.05)  # coalesce a burst of events
            for pod in self.list_pods():
                obj = self.objects["pods"].get(pod.name)
                wanted = self._cost_of(pod)
                if obj is None or (obj["metadata"].get("annotations") or {}).get(DELETION_COST) == wanted:
                    continue
                # Conditional on the version read: a relabel landing meanwhile makes this a 409, and its own
                # event brings the pod back here with the new label.
                patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"], "annotations": {DELETION_COST: wanted}}}
                try:
                    patched = await self.client.patch(K8sPod, pod.name, patch, patch_type=PatchType.MERGE)
                    self.cost_patches += 1
                    self.cache("pods", patched.to_dict())
                except ApiError as exc:
                    if exc.status.code not in (404, 409):
                        log.warning("could not set the deletion cost of %s: %s", pod.name, exc)
                except Exception as exc:  # the API server is away: the next event retries
                    log.warning("could not set the deletion cost of %s: %s", pod.name, exc)
                    break

    async def remember_assignment(self, deployment: str, counts: Mapping[str, int]) -> None:
        patched = await self.client.patch(K8sDeployment, deployment,
                                          {"metadata": {"annotations": {ANNOTATION_DESIRED: json.dumps(dict(sorted(counts.items())))}}},
                                          patch_type=PatchType.MERGE)
        self.cache("deployments", patched.to_dict())

    async def create_service(self, service: Service, intent: Intent | None = None) -> None:
        self._write_intent(intent)
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
        self._write_intent(intent)
        if unassign:
            await self.set_businesses(unassign)
        service = self.get_service(name)
        await self.client.delete(K8sService, name)
        self.forget("services", name)
        if service is not None and service.llm_routing:
            for resource in (K8sDeployment, K8sService):
                with contextlib.suppress(ApiError):
                    await self.client.delete(resource, router_name(service))

    async def pod_logs(self, name: str, tail: int) -> str | None:
        if name not in self.objects["pods"] or convert.is_job_pod(self.objects["pods"][name]):
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
                  "# TYPE corral_cutover_timeouts_total counter", f"corral_cutover_timeouts_total {self.cutover_timeouts}",
                  "# HELP corral_cutover_unconfirmed_total External assignments whose load balancer target health cannot be read.",
                  "# TYPE corral_cutover_unconfirmed_total counter", f"corral_cutover_unconfirmed_total {self.cutover_unconfirmed}"]
        lines += ["# HELP corral_kubernetes_lists_total Lists per kind (a relist follows a 410 Gone or a failed watch).",
                  "# TYPE corral_kubernetes_lists_total counter"]
        lines += [f'corral_kubernetes_lists_total{{kind="{k}"}} {r.lists}' for k, r in sorted(self.reflectors.items())]
        lines += ["# HELP corral_kubernetes_watch_failures_total Watches that failed (cut, silent, error, 410, 429) per kind.",
                  "# TYPE corral_kubernetes_watch_failures_total counter"]
        lines += [f'corral_kubernetes_watch_failures_total{{kind="{k}"}} {r.errors + r.expired + r.throttled}' for k, r in sorted(self.reflectors.items())]
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
                del self._cutovers[name]
                external = sorted(s.name for s in self.list_services()
                                  if s.is_business_service and s.is_external and s.business == target != L.UNASSIGNED)
                if external:  # the endpoints are only the first step: the load balancer's targets follow
                    self._spawn(self._external_cutover(name, source, target, started, now, external), f"cutover-{name}")
                else:
                    self._cutover_done(name, source, target, started, now, "EndpointSlices updated")
            elif now - started > CUTOVER_TIMEOUT_S:
                self.cutover_timeouts += 1
                del self._cutovers[name]
                self.report(None, history=HistoryDraft(Action.CUTOVER, name, before={"business": source}, after={"business": target},
                                                       message=f"EndpointSlices did not follow within {CUTOVER_TIMEOUT_S:.0f} s"),
                            outcome=Outcome.TIMEOUT)

    def _cutover_done(self, name: str, source: str, target: str, started: float, now: float, how: str) -> None:
        delay_ms = round((now - started) * 1000, 1)
        self.cutover_seconds.append(now - started)
        self.report(EventType.ASSIGNMENT_COMPLETE, {"podName": name, "from": source, "to": target, "delayMs": delay_ms},
                    history=HistoryDraft(Action.CUTOVER, name, before={"business": source}, after={"business": target},
                                         message=f"traffic follows after {delay_ms} ms ({how})"))

    async def _target_group_bindings(self) -> tuple[dict[str, str], str | None]:
        """The namespace's TargetGroupBindings (the AWS Load Balancer Controller's) → the Service each binds, read at most
        every `BINDINGS_TTL_S`; with the reason when they cannot be read (no such controller, RBAC)."""
        now = time.monotonic()
        if self._bindings is None or now - self._bindings[0] > BINDINGS_TTL_S:
            try:
                found = {b.metadata.name: ((b.to_dict().get("spec") or {}).get("serviceRef") or {}).get("name")
                         async for b in self.client.list(TargetGroupBinding, namespace=self.namespace)}
                self._bindings = (now, {k: v for k, v in found.items() if k and v}, None)
            except ApiError as exc:
                self._bindings = (now, {}, f"TargetGroupBindings cannot be read: {exc.status.code} {exc.status.reason}")
            except Exception as exc:  # the API server is away: not cached
                return {}, f"TargetGroupBindings cannot be read: {type(exc).__name__}"
        return self._bindings[1], self._bindings[2]

    async def _external_cutover(self, name: str, source: str, target: str, started: float, routed: float,
                                services: list[str]) -> None:
        """An assignment to an external business service, once its EndpointSlices followed: complete when the load
        balancer reports the pod's target healthy (the readiness gate condition of the service's TargetGroupBinding);
        `unconfirmed` where no such condition can be read — never recorded as done on the endpoints alone."""
        before, after = {"business": source}, {"business": target}
        endpoints_ms = round((routed - started) * 1000, 1)
        bindings, error = await self._target_group_bindings()
        ours = sorted(b for b, service in bindings.items() if service in services)
        gates = [b for b in convert.target_health_gates(self.objects["pods"].get(name) or {}) if b in ours]
        if not gates:
            why = (error or (f"no TargetGroupBinding binds {', '.join(services)} (no AWS Load Balancer Controller, or it has not "
                             "made one yet)" if not ours else
                             f"the pod has no readiness gate for {', '.join(ours)}: the AWS Load Balancer Controller injects them "
                             "only into pods created while a Service selects them, and pool pods are created unassigned"))
            self.cutover_unconfirmed += 1
            self.report(None, history=HistoryDraft(
                Action.CUTOVER, name, before=before, after=after,
                message=f"endpoints updated after {endpoints_ms} ms; external targets may take minutes (the load balancer "
                        f"registers and health-checks IP targets in its own time, and their health cannot be read here: {why})"),
                outcome=Outcome.UNCONFIRMED)
            return

        def healthy() -> bool:
            pod = self.objects["pods"].get(name)
            return pod is not None and all(convert.target_healthy(pod, gate) for gate in gates)

        await self._until(lambda: healthy() or name not in self.objects["pods"], EXTERNAL_CUTOVER_TIMEOUT_S)
        if healthy():
            self._cutover_done(name, source, target, started, time.monotonic(),
                               f"endpoints after {endpoints_ms} ms; load balancer target healthy: {', '.join(gates)}")
            return
        self.cutover_timeouts += 1
        gone = name not in self.objects["pods"]
        self.report(None, history=HistoryDraft(Action.CUTOVER, name, before=before, after=after, message=(
            "the pod was deleted before its load balancer target became healthy" if gone else
            f"endpoints updated after {endpoints_ms} ms, but the load balancer target ({', '.join(gates)}) was not healthy "
            f"within {EXTERNAL_CUTOVER_TIMEOUT_S:.0f} s")), outcome=Outcome.TIMEOUT)

    async def _until(self, condition: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
