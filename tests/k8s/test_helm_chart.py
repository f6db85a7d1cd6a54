"""The Helm chart (deploy/helm/corral), rendered and linted by Helm itself (helm v4 as a library: helm-python-sdk),
each rendered manifest validated against the Kubernetes schemas (strict), and its settings read back by Corral."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.config import Settings

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "corral"
SHIPPED = Path(__file__).parents[2] / "deploy" / "kubernetes" / "corral.yaml"
VERSIONS = ("1.30.0", "1.34.0")  # the chart's kubeVersion floor (preStop sleep) and a recent one
ALL_OPTIONS: dict[str, Any] = {
    "replicaCount": 2, "image": {"tag": "0.2.0"}, "imagePullSecrets": [{"name": "registry"}],
    "apiToken": {"existingSecret": "corral-token", "key": "bearer"},
    "data": {"existingClaim": "shared-data"}, "nodeSelector": {"kubernetes.io/os": "linux"},
    "replicas": {"gpuResource": "nvidia.com/mig-3g.40gb", "cpuRequest": "8", "memoryRequest": "64Gi", "maxUnavailable": "25%",
                 "priorityClassName": "inference-high", "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                 "startupSeconds": 3600, "drainSeconds": 30, "modelCacheClaim": "hf-cache", "images": {"vllm": "vllm/vllm-openai:v0.11.1"},
                 "loadBalancerSourceRanges": ["10.0.0.0/8"]},
    "trainer": {"image": "corral/trainer:0.2.0", "cpuRequest": "16", "memoryRequest": "128Gi"},
    "kueue": {"jobsQueue": "gpu-team", "servingQueue": "gpu-team"}, "watchIdleSeconds": 90,
    "extraEnv": [{"name": "CORRAL_LOG_LEVEL", "value": "debug"}],
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rendered = helm.Chart.load(CHART).render(values, name="corral", namespace="corral", is_install=True)
    return [d for path, text in sorted(rendered.items()) if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"]))


def test_the_chart_lints_clean() -> None:
    for values in (None, ALL_OPTIONS):
        report = helm.lint(CHART, values, strict=True, kube_version="v1.34.0")
        assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("values", [None, ALL_OPTIONS], ids=["defaults", "all-options"])
def test_every_rendered_manifest_validates(values: dict[str, Any] | None) -> None:
    documents = render(values)
    assert {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"} <= {
        d["kind"] for d in documents}
    for version in VERSIONS:
        for document in documents:
            kubernetes_validate.validate(document, version, strict=True)
    assert all(d["metadata"].get("namespace") in (None, "corral") for d in documents)
    assert ("PersistentVolumeClaim" in {d["kind"] for d in documents}) is (values is None)  # an existing claim is used as it is


def test_the_role_grants_what_the_shipped_manifest_grants() -> None:
    """The chart and deploy/kubernetes/corral.yaml grant the same: neither drifts from what Corral uses."""
    shipped = next(d for d in yaml.safe_load_all(SHIPPED.read_text()) if d and d["kind"] == "Role" and d["metadata"]["name"] == "corral")

    def grants(role: dict[str, Any]) -> set[tuple]:
        return {(g, r, v, tuple(rule.get("resourceNames") or ())) for rule in role["rules"] for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"]}

    chart = find(render(), "Role", "corral")
    assert grants(chart) == grants(shipped)
    assert ("elbv2.k8s.aws", "targetgroupbindings", "list", ()) in grants(chart)  # external cut-over: target health
    assert find(render(), "ClusterRole")["rules"] == [{"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["list", "watch"]}]
    without = find(render({"leaderElection": False, "rbac": {"targetGroupBindings": False}}), "Role", "corral")
    assert not {g for g in grants(without) if g[0] in ("coordination.k8s.io", "elbv2.k8s.aws")}


def test_corral_reads_back_every_setting_the_chart_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = render(ALL_OPTIONS)
    deployment = find(documents, "Deployment")
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "corral/corral:0.2.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]} \
        == {"CORRAL_API_TOKEN": {"name": "corral-token", "key": "bearer"}}
    fields = set(Settings.model_fields)
    unknown = sorted(name for name in env if name.removeprefix("CORRAL_").lower() not in fields and name != "CORRAL_LOG_LEVEL")
    assert not unknown, f"the chart sets variables Corral does not read: {unknown}"
    for name, value in env.items():
        if value is not None and name not in ("CORRAL_API_TOKEN", "CORRAL_LOG_LEVEL"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("CORRAL_KUBERNETES_NAMESPACE", "corral")  # the pod's namespace (a fieldRef)
    settings = Settings()
    options = settings.cluster_options()
    assert settings.backend == "kubernetes" and settings.kubernetes_data_claim == "shared-data"
    assert options.gpu_resource == "nvidia.com/mig-3g.40gb" and options.max_unavailable == "25%"
    assert options.priority_class == "inference-high" and options.serving_queue == "gpu-team" and settings.kueue_queue == "gpu-team"
    assert options.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} and options.tolerations[0]["key"] == "nvidia.com/gpu"
    assert options.images["vllm"] == "vllm/vllm-openai:v0.11.1" and options.load_balancer_source_ranges == ("10.0.0.0/8",)
    assert (options.startup_s, options.drain_s, options.watch_idle_s) == (3600, 30, 90)
    assert (options.trainer_cpu_request, options.trainer_memory_request, settings.kubernetes_trainer_image) == (
        "16", "128Gi", "corral/trainer:0.2.0")


@pytest.mark.parametrize(("values", "error"), [
    ({"replicas": {"maxUnavailable": "0"}}, "maxUnavailable"),
    ({"replicaCount": 3}, "replicaCount"),
    ({"kueue": {"servingQueue": "Not A Queue"}}, "servingQueue"),
    ({"watchIdleSeconds": 1}, "watchIdleSeconds"),
    ({"replicaCount": 2, "leaderElection": False}, "needs leaderElection"),
])
def test_bad_values_are_refused_naming_the_value(values: dict[str, Any], error: str) -> None:
    with pytest.raises(helm.HelmError, match=error):
        render(values)
