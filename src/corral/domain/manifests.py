"""Spec 01's two templates (and the standard deployment's), filled, as Kubernetes manifests.

Pure: returns dicts. The local backend writes them under `<data dir>/deployments/` so a local run
shows exactly what a cluster would receive; the Kubernetes backend applies the same objects.
"""

from __future__ import annotations

from corral.domain import labels as L
from corral.domain.models import Deployment, Service

ENGINE_IMAGES = {
    "vllm": "vllm/vllm-openai:latest",
    "sglang": "lmsysorg/sglang:latest",
    "transformers": "huggingface/transformers-pytorch-cpu:latest",
    "simulator": "corral/simulator:latest",
}
HTTP_PORT = 8000


def deployment_manifest(deployment: Deployment, container_args: list[str]) -> dict:
    """A Deployment; for a pool the selector is `{model, pool}` and pods start `business: unassigned`."""
    resources: dict = {}
    if deployment.gpus_per_replica:
        resources = {"limits": {"nvidia.com/gpu": deployment.gpus_per_replica}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment.name,
            "labels": {
                L.MODEL: deployment.model_tag,
                L.DEPLOYMENT_TYPE: L.MODEL_POOL if deployment.is_pool else L.STANDARD,
            },
        },
        "spec": {
            "replicas": deployment.replicas,
            "selector": {"matchLabels": deployment.selector},
            "template": {
                "metadata": {"labels": deployment.new_pod_labels()},
                "spec": {
                    "containers": [
                        {
                            "name": deployment.engine,
                            "image": ENGINE_IMAGES.get(deployment.engine, deployment.engine),
                            "args": container_args,
                            "ports": [{"name": "http", "containerPort": HTTP_PORT}],
                            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                            "resources": resources,
                        }
                    ]
                },
            },
        },
    }


def service_manifest(service: Service) -> dict:
    """A Service; a business service is a LoadBalancer with NLB annotations when external."""
    metadata: dict = {"name": service.name, "labels": dict(service.labels)}
    spec: dict = {
        "selector": dict(service.selector),
        "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        "type": "ClusterIP",
    }
    if service.is_external:
        spec["type"] = "LoadBalancer"
        metadata["annotations"] = {
            "service.beta.kubernetes.io/aws-load-balancer-type": "external",
            "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "ip",
            "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing",
        }
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}
