"""Cluster objects (plain dicts, as the API serves them) → Corral's domain objects. Pure.

Corral keeps no copy of cluster state in its database: what a Deployment, Pod or Service means is
read back from its labels and `corral.dev/*` annotations every time.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from corral.domain import labels as L
from corral.domain.manifests import (
    ANNOTATION_ENGINE,
    ANNOTATION_ENGINE_ARGS,
    ANNOTATION_GPUS,
    ANNOTATION_LLM_ROUTING,
    ANNOTATION_MODEL_ID,
    ANNOTATION_POOL,
    FINETUNE_TASK,
    HTTP_PORT,
)
from corral.domain.models import Deployment, Pod, PodPhase, Service


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def deployment(obj: dict[str, Any]) -> Deployment:
    meta = _meta(obj)
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    return Deployment(
        name=meta["name"], engine=notes.get(ANNOTATION_ENGINE, "vllm"), model_id=notes.get(ANNOTATION_MODEL_ID, ""),
        model_tag=labels.get(L.MODEL, ""), is_pool=labels.get(L.DEPLOYMENT_TYPE) == L.MODEL_POOL,
        replicas=int((obj.get("spec") or {}).get("replicas") or 0), gpus_per_replica=int(notes.get(ANNOTATION_GPUS, "0") or 0),
        engine_args=tuple(json.loads(notes.get(ANNOTATION_ENGINE_ARGS, "[]") or "[]")), created_at=_time(meta.get("creationTimestamp")),
    )


def pod(obj: dict[str, Any]) -> Pod:
    meta, status = _meta(obj), obj.get("status") or {}
    labels = dict(meta.get("labels") or {})
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    containers = status.get("containerStatuses") or []
    waiting = {((c.get("state") or {}).get("waiting") or {}).get("reason") for c in containers}
    if meta.get("deletionTimestamp"):
        phase = PodPhase.TERMINATING
    elif "CrashLoopBackOff" in waiting:
        phase = PodPhase.CRASH_LOOP
    elif status.get("phase") == "Running":
        phase = PodPhase.RUNNING
    else:
        phase = PodPhase.PENDING
    ip = status.get("podIP")
    return Pod(
        name=meta["name"], deployment=labels.get(L.POOL) or labels.get(L.APP) or "", labels=labels, phase=phase,
        ready=conditions.get("Ready") == "True" and phase != PodPhase.TERMINATING,
        endpoint=f"http://{ip}:{HTTP_PORT}" if ip else None, restarts=sum(int(c.get("restartCount") or 0) for c in containers),
        created_at=_time(meta.get("creationTimestamp")),
    )


JOB_POD_LABELS = ("batch.kubernetes.io/job-name", "job-name", FINETUNE_TASK)


def is_job_pod(obj: dict[str, Any]) -> bool:
    """A Job's pod (a finetune task's trainer): never a replica."""
    meta = _meta(obj)
    labels = meta.get("labels") or {}
    return any(k in labels for k in JOB_POD_LABELS) or any(r.get("kind") == "Job" for r in meta.get("ownerReferences") or [])


def is_terminal(obj: dict[str, Any]) -> bool:
    """Failed (evicted, say) or Succeeded: the pod will not run again; the ReplicaSet has replaced it."""
    return (obj.get("status") or {}).get("phase") in ("Failed", "Succeeded")


def is_active(obj: dict[str, Any]) -> bool:
    """client-go's `IsPodActive` (pkg/controller/controller_utils.go): not Succeeded, not Failed and not
    being deleted. A ReplicaSet counts only active pods towards its replicas, and so does Corral."""
    return not is_terminal(obj) and not _meta(obj).get("deletionTimestamp")


def deployment_of(obj: dict[str, Any]) -> str:
    labels = _meta(obj).get("labels") or {}
    return labels.get(L.POOL) or labels.get(L.APP) or ""


def is_replica(obj: dict[str, Any]) -> bool:
    """An active pod of one of Corral's Deployments."""
    return bool(deployment_of(obj)) and not is_job_pod(obj) and is_active(obj)


def holds_gpus(obj: dict[str, Any]) -> bool:
    """A replica pod that may hold its GPUs: active or still terminating (its containers may run until the
    grace period ends). A terminal pod holds none: its containers have exited, and the kubelet's device
    manager gives the devices of pods that are no longer active to new ones."""
    return bool(deployment_of(obj)) and not is_job_pod(obj) and not is_terminal(obj)


def phase_name(obj: dict[str, Any]) -> str:
    """What a `replica_status` report says of a pod: Failed / Succeeded for terminal pods, else its phase."""
    return (obj.get("status") or {}).get("phase") if is_terminal(obj) else pod(obj).phase.value


def service(obj: dict[str, Any]) -> Service:
    meta, spec = _meta(obj), obj.get("spec") or {}
    labels = dict(meta.get("labels") or {})
    return Service(
        name=meta["name"], model=labels.get(L.MODEL, ""), selector=dict(spec.get("selector") or {}), labels=labels,
        is_external=spec.get("type") == "LoadBalancer",
        deployment=(meta.get("annotations") or {}).get(ANNOTATION_POOL) or labels.get(L.APP) or None,
        created_at=_time(meta.get("creationTimestamp")),
        llm_routing=(meta.get("annotations") or {}).get(ANNOTATION_LLM_ROUTING) == "true",
    )


NOT_OBSERVED = "its latest change is not observed yet"


def rollout_in_progress(obj: dict[str, Any]) -> str | None:
    """Why a Deployment is mid-rollout (pods of an older template remain: two ReplicaSets hold its pods),
    or None when it is settled. As `kubectl rollout status` reads it: the status describes the current
    spec only once `observedGeneration` reached `generation`; `replicas` counts every active pod,
    `updatedReplicas` those of the current template. A plain scale-up in progress is no rollout."""
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    wanted = int(spec.get("replicas") if spec.get("replicas") is not None else 1)
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return NOT_OBSERVED
    updated, total = int(status.get("updatedReplicas") or 0), int(status.get("replicas") or 0)
    if total > updated:
        return f"{updated} of {wanted} replicas run the current template"
    return None


def endpoint_pods(slices: list[dict[str, Any]], service_name: str) -> set[str]:
    """Names of the pods a Service's EndpointSlices route to (ready endpoints only)."""
    names = set()
    for item in slices:
        if (_meta(item).get("labels") or {}).get("kubernetes.io/service-name") != service_name:
            continue
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready", True) and (endpoint.get("targetRef") or {}).get("name"):
                names.add(endpoint["targetRef"]["name"])
    return names


TARGET_HEALTH = "target-health.elbv2.k8s.aws/"  # the AWS Load Balancer Controller's pod readiness gates: <prefix><TargetGroupBinding>


def target_health_gates(pod: dict[str, Any]) -> list[str]:
    """The TargetGroupBindings whose target health this pod reports: the AWS Load Balancer Controller's webhook
    injects a readiness gate per binding whose Service selects the pod — when the pod is created, never after."""
    gates = ((pod.get("spec") or {}).get("readinessGates")) or []
    return [g["conditionType"].removeprefix(TARGET_HEALTH) for g in gates if str(g.get("conditionType", "")).startswith(TARGET_HEALTH)]


def target_healthy(pod: dict[str, Any], binding: str) -> bool:
    """Whether the controller has set the pod's gate condition for that binding True: its IP is a healthy target."""
    wanted = TARGET_HEALTH + binding
    return any(c.get("type") == wanted and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or [])
