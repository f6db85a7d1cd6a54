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
    model_cache_claim: str | None = None  # a PersistentVolumeClaim for /root/.cache/huggingface; emptyDir when unset
    service_account: str | None = None


def deployment_manifest(deployment: Deployment, container_args: list[str], options: ClusterOptions = ClusterOptions(),
                        health_path: str = "/health") -> dict:
    """A Deployment; for a pool the selector is `{model, pool}` and pods start `business: unassigned`."""
    resources: dict = {}
    if deployment.gpus_per_replica:
        resources = {"limits": {options.gpu_resource: deployment.gpus_per_replica}}
    cache = ({"persistentVolumeClaim": {"claimName": options.model_cache_claim}} if options.model_cache_claim
             else {"emptyDir": {}})
    pod_spec: dict[str, Any] = {
        "containers": [{
            "name": deployment.engine,
            "image": options.images.get(deployment.engine, deployment.engine),
            **({"command": list(options.commands[deployment.engine])} if deployment.engine in options.commands else {}),
            "args": container_args,
            "ports": [{"name": "http", "containerPort": HTTP_PORT}],
            "readinessProbe": {"httpGet": {"path": health_path, "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
            "resources": resources,
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "model-cache", "mountPath": "/root/.cache/huggingface"}],
        }],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
                    {"name": "model-cache", **cache}],
    }
    if deployment.gpus_per_replica and options.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in options.tolerations]
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
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
            "template": {"metadata": {"labels": {**deployment.new_pod_labels(), MANAGED_BY: CORRAL}}, "spec": pod_spec},
        },
    }


def service_manifest(service: Service, options: ClusterOptions = ClusterOptions()) -> dict:
    """A Service; a business service is a LoadBalancer with NLB annotations when external."""
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
        }
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
