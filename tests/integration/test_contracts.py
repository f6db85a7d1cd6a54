"""The typed contracts over real HTTP: /openapi.json documents every /api response, and real responses
validate against the models their routes declare and round-trip to the very same JSON."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from corral.views import (
    AssignResult,
    BusinessServiceView,
    DeploymentView,
    DeployResult,
    DeployServiceResult,
    DistributeDryRun,
    ErrorBody,
    Estimate,
    FinetuneTask,
    GpuInfo,
    Health,
    HistoryEntry,
    PodView,
    PoolStatus,
    QueueSummary,
    ScaleRefusal,
    ScaleResult,
)
from tests.integration.conftest import SIM_ARGS, CorralServer


def same_json(model: Any, body: Any) -> None:
    """`body` validates against `model` and its wire form is exactly `body` (no key added, dropped or retyped)."""
    adapter = TypeAdapter(model)
    assert adapter.dump_python(adapter.validate_python(body), mode="json", by_alias=True) == body


def test_responses_match_their_declared_models(corral: CorralServer) -> None:
    document = corral.ok("GET", "/openapi.json")
    api = {(m, p): op for p, ops in document["paths"].items() for m, op in ops.items() if p.startswith("/api")}
    assert len(api) >= 25
    for (method, path), operation in api.items():
        success = next(r for code, r in operation["responses"].items() if code.startswith("2"))
        assert all(body.get("schema") for body in success["content"].values()), (method, path)
        assert "422" not in operation["responses"], (method, path)

    deployed = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b",
                                                      "replicas": 2, "deployAsPool": True, "engineArgs": SIM_ARGS})
    same_json(DeployResult, deployed)
    pool = deployed["deployment"]["name"]
    corral.wait_ready(pool, 2)
    same_json(DeployServiceResult, corral.ok("POST", "/api/deploy-service", json={
        "serviceName": "production-chat", "modelPool": pool, "businessTag": "production"}))
    pod = corral.pods(pool)[0]["name"]
    same_json(AssignResult, corral.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "production"}))
    same_json(DistributeDryRun, corral.ok("POST", "/api/distribute-pods", json={
        "deploymentName": pool, "counts": {"production": 2}, "dryRun": True}))
    refused = corral.http.post("/api/scale-pool-deployment", json={"deploymentName": pool, "targetReplicas": 0})
    assert refused.status_code == 409
    same_json(ScaleRefusal, refused.json())
    scaled = corral.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": pool, "targetReplicas": 3})
    same_json(ScaleResult, scaled)
    assert isinstance(scaled["unassignedPods"], int)

    same_json(list[DeploymentView], corral.ok("GET", "/api/deployments"))
    same_json(DeploymentView, corral.ok("GET", f"/api/deployments/{pool}"))
    same_json(list[PodView], corral.ok("GET", "/api/pods"))
    same_json(list[BusinessServiceView], corral.ok("GET", "/api/business-services"))
    same_json(PoolStatus, corral.ok("GET", f"/api/pool-status/{pool}"))
    history = corral.ok("GET", "/api/history", params={"action": "scale"})
    same_json(list[HistoryEntry], history)
    assert {h["outcome"] for h in history} >= {"refused"}
    same_json(Health, corral.ok("GET", "/api/health"))
    same_json(GpuInfo, corral.ok("GET", "/api/system/gpu-info"))
    same_json(Estimate, corral.ok("GET", "/api/system/estimate", params={"model": "qwen2.5-coder-7b"}))
    same_json(QueueSummary, corral.ok("GET", "/api/finetune/queue"))
    same_json(list[FinetuneTask], corral.ok("GET", "/api/finetune/tasks"))

    bad = corral.http.get("/api/history", params={"action": "explode"})  # actions are an enum now
    assert bad.status_code == 400 and "action" in bad.json()["error"]
    same_json(ErrorBody, bad.json())
    missing = corral.http.get("/api/deployments/nope")
    assert missing.status_code == 404
    same_json(ErrorBody, missing.json())
