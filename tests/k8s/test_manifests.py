"""Every manifest Corral writes or ships validates against the Kubernetes schemas (strict: unknown
fields are errors), for a recent Kubernetes version."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from corral.config import Settings
from corral.domain import labels as L
from corral.domain.manifests import (
    KUEUE_QUEUE,
    ClusterOptions,
    deployment_manifest,
    disruption_budget_manifest,
    router_manifests,
    service_manifest,
)
from corral.domain.models import Deployment, Service

kubernetes_validate = pytest.importorskip("kubernetes_validate")
VERSION = "1.34.0"
DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"


def validate(document: dict) -> None:
    kubernetes_validate.validate(document, VERSION, strict=True)


POOL = Deployment("vllm-qwen-7b-pool", "vllm", "Qwen/Qwen2.5-Coder-7B-Instruct", "qwen-7b", True, 4, gpus_per_replica=2,
                  engine_args=("--max-model-len", "8192"))
STANDARD = Deployment("sglang-qwen-7b", "sglang", "Qwen/Qwen2.5-Coder-7B-Instruct", "qwen-7b", False, 1, gpus_per_replica=1)


@pytest.mark.parametrize("options", [
    ClusterOptions(namespace="corral"),
    ClusterOptions(namespace="corral", model_cache_claim="hf-cache", node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                   service_account="engines", shm_size="16Gi", priority_class="inference-high", max_unavailable="25%"),
], ids=["defaults", "all-options"])
def test_deployments_validate(options: ClusterOptions) -> None:
    for deployment in (POOL, STANDARD):
        manifest = deployment_manifest(deployment, ["--model", deployment.model_id, "--port", "8000"], options, "/health")
        validate(manifest)
    pool = deployment_manifest(POOL, [], options)
    assert pool["spec"]["selector"]["matchLabels"] == {L.MODEL: "qwen-7b", L.POOL: POOL.name}
    assert pool["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert pool["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pool["spec"]["template"]["spec"].get("priorityClassName") == options.priority_class
    budget = disruption_budget_manifest(POOL, options)
    validate(budget)
    assert budget["spec"]["selector"]["matchLabels"] == pool["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] == (1 if options.max_unavailable == 1 else "25%")
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a pod still loading never blocks a drain


@pytest.mark.parametrize("startup_s", [30, 1800, 7200])
def test_a_rollout_is_not_failed_while_a_model_loads(startup_s: int) -> None:
    pool = deployment_manifest(POOL, [], ClusterOptions(namespace="corral", startup_s=startup_s))
    validate(pool)
    probe = pool["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    budget = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    assert budget >= startup_s and pool["spec"]["progressDeadlineSeconds"] >= budget + 600  # + scheduling and the image pull


@pytest.mark.parametrize("external", [False, True])
def test_services_validate(external: bool) -> None:
    service = Service("production-chat-nlb", "qwen-7b", L.business_selector("qwen-7b", "production"),
                      {L.BUSINESS: "production", L.MODEL: "qwen-7b", L.SERVICE_TYPE: L.BUSINESS_SERVICE},
                      is_external=external, deployment=POOL.name, llm_routing=True)
    manifest = service_manifest(service, ClusterOptions(namespace="corral"))
    validate(manifest)
    router, front = router_manifests(service, ClusterOptions(namespace="corral"))
    validate(router)
    validate(front)
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--service-discovery", "--selector", "business=production", "model=qwen-7b"]
    assert router["metadata"]["name"] == "production-chat-router" and front["spec"]["selector"] == {"app": "production-chat-router"}
    assert manifest["spec"]["type"] == ("LoadBalancer" if external else "ClusterIP")
    if external:
        assert manifest["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-type"] == "external"


def test_shipped_manifests_validate() -> None:
    documents = [d for path in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"] for d in documents}
    assert {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"} <= kinds
    for document in documents:
        validate(document)
    role = next(d for d in documents if d["kind"] == "Role" and d["metadata"]["name"] == "corral")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # The least Corral needs (issue: list/watch/patch pods; deployments, services, jobs; deployments/scale; nodes).
    assert ("", "pods", "patch") in granted and ("", "pods", "delete") not in granted
    assert ("apps", "deployments/scale", "patch") in granted
    cluster_role = next(d for d in documents if d["kind"] == "ClusterRole")
    # Cluster-wide, read-only: nodes and bound pods, for the GPU inventory as the scheduler counts it.
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["list", "watch"]}]


@pytest.mark.parametrize("queue", [None, "gpu-team"])
def test_replicas_are_counted_by_kueue_when_asked(queue: str | None) -> None:
    options = ClusterOptions(namespace="corral", serving_queue=queue)
    for deployment in (POOL, STANDARD):
        manifest = deployment_manifest(deployment, [], options)
        validate(manifest)
        # Kueue's `deployment` integration reads the Deployment's label; its plain-Pod integration (older Kueue) the pods'.
        assert manifest["metadata"]["labels"].get(KUEUE_QUEUE) == queue
        assert manifest["spec"]["template"]["metadata"]["labels"].get(KUEUE_QUEUE) == queue
        assert KUEUE_QUEUE not in manifest["spec"]["selector"]["matchLabels"]  # the selector never changes with it
    with pytest.raises(ValidationError, match="kueue_serving_queue"):  # a LocalQueue's name, or nothing
        Settings(kueue_serving_queue="Not A Queue")


@pytest.mark.parametrize("kueue", [None, "team-a"])
def test_finetune_jobs_validate(kueue: str | None, tmp_path: Path) -> None:
    from corral.finetune.runners import job_manifest
    from corral.finetune.store import TaskRecord

    task = TaskRecord(id="ft-1234abcd", status="pending", base_model="Qwen/Qwen2.5-Coder-7B-Instruct", dataset_path="/data/d.jsonl",
                      method="qlora", priority="high", hyperparameters={}, gpus=2, timeout_s=3600)
    manifest = job_manifest(task, tmp_path / "finetune" / task.id, "corral", "corral/corral:0.1.0", tmp_path, "corral-data",
                            "nvidia.com/gpu", kueue, [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                            requests={"cpu": "8", "memory": "64Gi"})
    validate(manifest)
    # CPU and memory requested beside the GPUs: the trainer's pod is Burstable, not BestEffort (first evicted)
    assert manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert manifest["spec"]["activeDeadlineSeconds"] == 3600 and manifest["spec"]["suspend"] is bool(kueue)
    assert manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert (manifest["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == kueue)


def test_gpu_inventory_from_nodes() -> None:
    from corral.gpus.cluster import inventory_from_nodes

    def node(name: str, gpus: int, **extra: str) -> dict:
        return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559"}},
                "status": {"allocatable": {"cpu": "96", "nvidia.com/gpu": str(gpus), **extra}}}

    inventory = inventory_from_nodes([node("gpu-b", 2), node("gpu-a", 1, **{"nvidia.com/mig-1g.10gb": "2"}), node("cpu", 0)])
    assert inventory.available and [d.name for d in inventory.devices] == ["gpu-a/NVIDIA-H100-80GB-HBM3"] + ["gpu-b/NVIDIA-H100-80GB-HBM3"] * 2
    assert round(inventory.devices[0].memory_total_bytes / 1024**3) == 80
    assert [round(m.memory_total_bytes / 1024**3) for m in inventory.mig_instances] == [10, 10]
    assert len(inventory.schedulable_units()) == 5
    assert not inventory_from_nodes([node("cpu", 0)]).available


def test_pool_pods_are_fit_for_gpus_and_llm_traffic() -> None:
    options = ClusterOptions(namespace="corral", load_balancer_source_ranges=("10.0.0.0/8",))
    pool = deployment_manifest(POOL, [], options, "/health")
    spec = pool["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert pool["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 1800  # model loading
    assert container["livenessProbe"]["timeoutSeconds"] >= 10  # survives a loaded engine
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 60}}
    assert spec["terminationGracePeriodSeconds"] > 60  # preStop, then SIGTERM and the engine's shutdown
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}  # Burstable, not BestEffort
    assert container["securityContext"]["allowPrivilegeEscalation"] is False and spec["automountServiceAccountToken"] is False
    assert pool["spec"]["template"]["metadata"]["annotations"] == {"controller.kubernetes.io/pod-deletion-cost": "-100"}
    simulator = deployment_manifest(Deployment("simulator-x-pool", "simulator", "sim", "x", True, 1), [], options)
    assert simulator["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True
    validate(simulator)
    service = Service("production-chat-nlb", "qwen-7b", L.business_selector("qwen-7b", "production"),
                      {L.BUSINESS: "production", L.MODEL: "qwen-7b", L.SERVICE_TYPE: L.BUSINESS_SERVICE}, is_external=True)
    external = service_manifest(service, options)
    validate(external)
    assert external["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert external["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"] == "/health"
