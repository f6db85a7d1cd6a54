"""Spec 01's two templates (and the standard deployment's), filled, as Kubernetes manifests.

Pure: returns dicts. The local backend writes them under `<data dir>/deployments/` so a local run
shows exactly what a cluster would receive; the Kubernetes backend applies the very same objects.
Everything Corral needs to rebuild its view from the cluster (engine, model id, engine arguments,
GPUs per replica) travels in `corral.dev/*` annotations, so the cluster is the only source of truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from corral.domain import labels as L
from corral.domain.models import Deployment, Service

ENGINE_IMAGES = {
    "vllm": "vllm/vllm-openai:v0.11.0",
    "sglang": "lmsysorg/sglang:v0.5.3-cu126",
    "transformers": "huggingface/transformers-pytorch-cpu:latest",
    "simulator": "corral/corral:0.1.0",  # Corral's own image (Dockerfile) carries the simulator
    "vllm-router": "corral/corral:0.1.0-router",  # Corral's image with `pip install vllm-router` (Dockerfile, target router)
}
# The container command where the image's entrypoint is not the engine's server (vLLM's is).
ENGINE_COMMANDS = {
    "sglang": ["python3", "-m", "sglang.launch_server"],
    "transformers": ["transformers"],
    "simulator": ["python", "-m", "corral.engines.simulator"],
}
HTTP_PORT = 8000
MANAGED_BY = "app.kubernetes.io/managed-by"
CORRAL = "corral"
ANNOTATION_ENGINE = "corral.dev/engine"
ANNOTATION_MODEL_ID = "corral.dev/model-id"
ANNOTATION_ENGINE_ARGS = "corral.dev/engine-args"
ANNOTATION_GPUS = "corral.dev/gpus-per-replica"
ANNOTATION_POOL = "corral.dev/pool"
ANNOTATION_LLM_ROUTING = "corral.dev/llm-routing"
ROUTER_FOR = "corral.dev/router-for"  # label of a business service's vllm-router objects
ROUTER_SERVICE_ACCOUNT = "corral-router"  # may list and watch pods (deploy/kubernetes/corral.yaml)
ANNOTATION_DESIRED = "corral.dev/desired-assignment"  # business → count, from the last assignment or distribution
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# Pod deletion costs (int32; a ReplicaSet scaling down removes lower costs first, after unscheduled,
# pending and not-ready pods: https://kubernetes.io/docs/reference/labels-annotations-taints/#pod-deletion-cost).
# Set in the same patch as the `business` label, so that any scale-down — Corral's, an HPA's,
# `kubectl scale`, a rollout's — prefers unassigned replicas; the replicas Corral picks for a
# scale-down get the lowest cost just before it scales.
ASSIGNED_COST = "1000"
UNASSIGNED_COST = "-100"
CHOSEN_COST = "-1000"
FINETUNE_TASK = "corral.dev/finetune-task"  # label of a finetune task's Job and its pods
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"  # Kueue's label: the LocalQueue whose quota admits a workload


def deletion_cost(business: str | None) -> str:
    return UNASSIGNED_COST if business in (None, L.UNASSIGNED) else ASSIGNED_COST


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how replicas run in a cluster (ignored by the local backend's processes)."""

    namespace: str = "default"
    images: dict[str, str] = field(default_factory=lambda: dict(ENGINE_IMAGES))
    commands: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in ENGINE_COMMANDS.items()})
    gpu_resource: str = "nvidia.com/gpu"
    tolerations: tuple[dict[str, Any], ...] = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    node_selector: dict[str, str] = field(default_factory=dict)
    shm_size: str = "8Gi"
    model_cache_claim: str | None = None  # a PersistentVolumeClaim (ReadWriteMany or ReadOnlyMany) for the HF cache; emptyDir when unset
    service_account: str | None = None
    # Requests beside the GPUs, so that replicas are not BestEffort (first to be evicted under node pressure).
    cpu_request: str = "4"
    memory_request: str = "32Gi"
    # Removal: the pod leaves its Services' endpoints as soon as it terminates, but kube-proxies and load
    # balancers follow within seconds; the preStop sleep keeps the engine serving meanwhile and lets
    # in-flight streams finish, then SIGTERM; terminationGracePeriodSeconds covers both.
    drain_s: int = 60
    startup_s: int = 1800  # model download + load + compile on first start: the startup probe's patience
    load_balancer_source_ranges: tuple[str, ...] = ()  # CIDRs allowed to reach external business services
    leader_election: bool = True  # a Lease: one Corral acts on the namespace at a time
    # A PodDisruptionBudget per pool: a drain (node-group upgrade, Karpenter consolidation, HyperPod node
    # replacement) evicts at most this many of its pods at a time (an integer, or a percentage such as "25%").
    max_unavailable: int | str = 1
    priority_class: str | None = None  # priorityClassName of replicas: preempted after lower classes, not before
    # Finetune Jobs' trainer pods ask for CPU and memory beside their GPUs, so that they are not BestEffort.
    trainer_cpu_request: str = "4"
    trainer_memory_request: str = "32Gi"
    # A watch silent (no event, no bookmark) for longer than this is dead and replaced, once the API server was seen
    # to send bookmarks (about one a minute): `backends.kubernetes.reflector`.
    watch_idle_s: float = 150.0
    # A Kueue LocalQueue for replica Deployments (pools and standard deployments): Kueue's `deployment` integration
    # then admits each replica pod as a workload of its own, against the same quota as finetune Jobs. None: Kueue
    # does not see them (and admits Jobs onto GPUs that replicas hold, unless quotas leave room for them).
    serving_queue: str | None = None


def deployment_manifest(deployment: Deployment, container_args: list[str], options: ClusterOptions = ClusterOptions(),
                        health_path: str = "/health") -> dict:
    """A Deployment; for a pool the selector is `{model, pool}` and pods start `business: unassigned`."""
    gpus = deployment.gpus_per_replica
    # GPUs as limits only (an extended resource's request defaults to its limit); CPU and memory requested
    # so that the pod is Burstable, not BestEffort. A CPU-only replica (the simulator) asks for little.
    resources: dict = {"requests": {"cpu": options.cpu_request, "memory": options.memory_request} if gpus
                       else {"cpu": "250m", "memory": "512Mi"}}
    if gpus:
        resources["limits"] = {options.gpu_resource: gpus}
    cache = ({"persistentVolumeClaim": {"claimName": options.model_cache_claim}} if options.model_cache_claim
             else {"emptyDir": {}})
    probe = {"httpGet": {"path": health_path, "port": "http"}, "timeoutSeconds": 5}
    startup_failures = max(1, options.startup_s // 10)
    container: dict[str, Any] = {
        "name": deployment.engine,
        "image": options.images.get(deployment.engine, deployment.engine),
        **({"command": list(options.commands[deployment.engine])} if deployment.engine in options.commands else {}),
        "args": container_args,
        "ports": [{"name": "http", "containerPort": HTTP_PORT}],
        # Startup: liveness and readiness wait until the engine answered once (model loading takes minutes).
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": startup_failures},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        # Liveness: generous (a loaded engine answers /health slowly under load; a restart costs minutes).
        "livenessProbe": {**probe, "timeoutSeconds": 10, "periodSeconds": 15, "failureThreshold": 8},
        # Kubernetes 1.30+ (PodLifecycleSleepAction): no shell needed in the engine's image.
        "lifecycle": {"preStop": {"sleep": {"seconds": options.drain_s}}},
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "seccompProfile": {"type": "RuntimeDefault"},
                            # Corral's own image (the simulator) runs as a user; engine images expect root.
                            **({"runAsNonRoot": True, "runAsUser": 10001, "capabilities": {"drop": ["ALL"]}}
                               if deployment.engine == "simulator" else {})},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "model-cache", "mountPath": "/root/.cache/huggingface"}],
    }
    if deployment.engine == "vllm" and "--enable-lora" in container_args:
        # LoRA adapters are added to the running pool (corral.adapters): vLLM's load endpoint needs this.
        container["env"] = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": options.drain_s + 30,
        "automountServiceAccountToken": False,  # engines never call the Kubernetes API
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
                    {"name": "model-cache", **cache}],
    }
    if deployment.gpus_per_replica and options.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in options.tolerations]
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    if options.priority_class:
        pod_spec["priorityClassName"] = options.priority_class
    # Kueue: the Deployment's label is what its `deployment` integration reads (Kueue 0.10+); the pod template's is
    # what the older plain-Pod integration reads, and what Kueue's own webhook would copy there. Each pod is then
    # gated (`kueue.x-k8s.io/admission`) until Kueue admits it: a replica beyond the quota stays Pending.
    queue = {KUEUE_QUEUE: options.serving_queue} if options.serving_queue else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment.name,
            "namespace": options.namespace,
            "labels": {
                L.MODEL: deployment.model_tag,
                L.DEPLOYMENT_TYPE: L.MODEL_POOL if deployment.is_pool else L.STANDARD,
                MANAGED_BY: CORRAL,
                **queue,
            },
            "annotations": {
                ANNOTATION_ENGINE: deployment.engine,
                ANNOTATION_MODEL_ID: deployment.model_id,
                ANNOTATION_ENGINE_ARGS: json.dumps(list(deployment.engine_args)),
                ANNOTATION_GPUS: str(deployment.gpus_per_replica),
            },
        },
        "spec": {
            "replicas": deployment.replicas,
            "selector": {"matchLabels": deployment.selector},
            # A rollout replaces one replica at a time and never adds one first: a surge pod needs GPUs that a
            # full cluster does not have, and would wait Pending for ever.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            # A rollout is failed (`kubectl rollout status`, Argo CD's health) only once a new pod had the whole
            # startup probe's patience to load its model, plus the default 600 s for scheduling and the image pull.
            "progressDeadlineSeconds": progress_deadline_s(options),
            "template": {"metadata": {"labels": {**deployment.new_pod_labels(), MANAGED_BY: CORRAL, **queue},
                                      **({"annotations": {DELETION_COST: UNASSIGNED_COST}} if deployment.is_pool else {})},
                         "spec": pod_spec},
        },
    }


def progress_deadline_s(options: ClusterOptions) -> int:
    """The Deployment's progressDeadlineSeconds: the startup probe's budget (period × failureThreshold) + 600 s."""
    return 10 * max(1, options.startup_s // 10) + 600


def disruption_budget_manifest(deployment: Deployment, options: ClusterOptions = ClusterOptions()) -> dict:
    """A pool's PodDisruptionBudget: a drain evicts at most `max_unavailable` of its pods at a time (the others
    wait until the evicted ones' replacements are ready), so a node drain never takes every replica of a
    business at once. Pods that are not ready (loading, crash-looping) may always be evicted
    (`unhealthyPodEvictionPolicy: AlwaysAllow`): they serve nothing, and must not block a drain."""
    value = options.max_unavailable
    max_unavailable: int | str = int(value) if isinstance(value, int) or str(value).isdigit() else str(value)
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": deployment.name, "namespace": options.namespace,
                     "labels": {L.MODEL: deployment.model_tag, MANAGED_BY: CORRAL}},
        "spec": {"maxUnavailable": max_unavailable, "selector": {"matchLabels": dict(deployment.selector)},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def service_manifest(service: Service, options: ClusterOptions = ClusterOptions(), health_path: str = "/health") -> dict:
    """A Service; a business service is a LoadBalancer with NLB annotations when external: its health check
    asks the engines' health path (not a bare TCP connect), and `load_balancer_source_ranges` limits who
    can reach it."""
    metadata: dict = {"name": service.name, "namespace": options.namespace, "labels": {**service.labels, MANAGED_BY: CORRAL},
                      "annotations": {ANNOTATION_POOL: service.deployment or "", ANNOTATION_LLM_ROUTING: str(service.llm_routing).lower()}}
    spec: dict = {
        "selector": dict(service.selector),
        "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        "type": "ClusterIP",
    }
    if service.is_external:
        spec["type"] = "LoadBalancer"
        metadata["annotations"] |= {
            "service.beta.kubernetes.io/aws-load-balancer-type": "external",
            "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "ip",
            "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing",
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol": "HTTP",
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-path": health_path,
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port": "traffic-port",
        }
        if options.load_balancer_source_ranges:
            spec["loadBalancerSourceRanges"] = list(options.load_balancer_source_ranges)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def router_name(service: Service) -> str:
    return f"{service.name.removesuffix(L.SERVICE_SUFFIX)}-router"


def router_manifests(service: Service, options: ClusterOptions = ClusterOptions()) -> list[dict]:
    """A vllm-router Deployment and Service for one business service: Kubernetes service discovery
    selects the same `{model, business}` pods, so an assignment moves its traffic too."""
    name = router_name(service)
    labels = {L.APP: name, MANAGED_BY: CORRAL, ROUTER_FOR: service.name}
    selector = [f"{k}={v}" for k, v in sorted(service.selector.items())]
    container = {
        "name": "vllm-router", "image": options.images.get("vllm-router", ENGINE_IMAGES["vllm-router"]), "command": ["vllm-router"],
        "args": ["--service-discovery", "--selector", *selector, "--service-discovery-namespace", options.namespace,
                 "--service-discovery-port", str(HTTP_PORT), "--policy", "cache_aware", "--host", "0.0.0.0", "--port", str(HTTP_PORT)],
        "ports": [{"name": "http", "containerPort": HTTP_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": {L.APP: name}},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"serviceAccountName": ROUTER_SERVICE_ACCOUNT, "containers": [container]}}},
    }
    front = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {"selector": {L.APP: name}, "type": "ClusterIP",
                 "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    return [deployment, front]
