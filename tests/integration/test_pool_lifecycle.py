"""Spec 01 end to end on the local backend: real `corral serve`, real simulator processes, real HTTP."""

from __future__ import annotations

import json
import threading
from collections import Counter

import httpx
from websockets.sync.client import connect

from corral.backends.local.process import process_start_time
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer

POOL = "simulator-qwen-06b-pool"


class EventRecorder:
    """Collects `/ws` messages in a thread while the test acts."""

    def __init__(self, url: str) -> None:
        self.messages: list[dict] = []
        self._connection = connect(url.replace("http", "ws") + "/ws")
        self._ws = self._connection.__enter__()
        hello = json.loads(self._ws.recv(timeout=10))
        assert hello["type"] == "hello"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in self._ws:
                self.messages.append(json.loads(raw))
        except Exception:
            pass

    def wait(self, type_: str, predicate=lambda data: True, what: str = "") -> dict:
        return wait_for(
            lambda: next((m["data"] for m in list(self.messages) if m["type"] == type_ and predicate(m["data"])), None),
            timeout=15, what=f"a '{type_}' event {what}",
        )

    def close(self) -> None:
        self._connection.__exit__(None, None, None)


def businesses(server: CorralServer) -> Counter:
    return Counter(p["business"] for p in server.pods(POOL))


def test_pool_services_assignment_distribution_scaling(corral: CorralServer) -> None:
    events = EventRecorder(corral.url)

    # Deploy a pool of 4 simulator replicas: all unassigned, each a real process answering chat.
    result = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b",
                                                    "replicas": 4, "deployAsPool": True, "engineArgs": "--ttft-ms 5"})
    assert result["deployment"]["name"] == POOL and result["deployment"]["type"] == "pool"
    assert result["deployment"]["isSimulator"] is True
    events.wait("deployment", lambda d: d["action"] == "created")
    pods = corral.wait_ready(POOL, 4)
    events.wait("replica_status", lambda d: d["ready"], "for a ready replica")
    assert {p["business"] for p in pods} == {"unassigned"}
    for pod in pods:
        assert pod["labels"] == {"model": "qwen-06b", "pool": POOL, "business": "unassigned",
                                 "pool-type": "simulator", "deployment-type": "model-pool"}
        reply = httpx.post(f"{pod['endpoint']}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert reply.json()["system_fingerprint"] == f"corral-simulator:{pod['name']}"
    manifest = (corral.data_dir / "deployments" / f"{POOL}.yaml").read_text()
    assert "matchLabels:\n      model: qwen-06b\n      pool: simulator-qwen-06b-pool" in manifest

    # A pool gets no service; business services are created explicitly.
    assert corral.ok("GET", "/api/business-services") == []
    for name, business in [("production-chat", "production"), ("testing-chat", "testing")]:
        created = corral.ok("POST", "/api/deploy-service", json={"serviceName": name, "modelPool": POOL,
                                                                 "businessTag": business, "isExternal": business == "production"})
        assert created["service"]["name"] == f"{name}-nlb"
        events.wait("service_deployment", lambda d, n=name: d["service"]["name"] == f"{n}-nlb")
    services = {s["name"]: s for s in corral.ok("GET", "/api/business-services")}
    assert {(s["businessTag"], s["displayName"], s["modelName"]) for s in services.values()} == {
        ("production", "production-chat", "qwen-06b"), ("testing", "testing-chat", "qwen-06b")}
    assert services["production-chat-nlb"]["type"] == "LoadBalancer"
    assert "aws-load-balancer-type" in (corral.data_dir / "deployments" / "production-chat-nlb.yaml").read_text()

    # Assign, reassign, unassign one pod.
    pod = pods[0]["name"]
    assigned = corral.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "production", "modelName": "qwen-06b"})
    assert assigned["changed"] and assigned["previousBusiness"] == "unassigned"
    events.wait("pod_assignment", lambda d: d["podName"] == pod and d["to"] == "production")
    corral.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "testing", "modelName": "qwen-06b"})
    assert next(p for p in corral.pods() if p["name"] == pod)["labels"]["business"] == "testing"
    corral.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "unassigned", "modelName": "qwen-06b"})
    events.wait("pod_assignment", lambda d: d["podName"] == pod and d["to"] == "unassigned")
    assert businesses(corral) == Counter({"unassigned": 4})

    # Distribute 3:1, then again: the second call moves nothing.
    first = corral.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "ratios": {"production": 3, "testing": 1}})
    assert len(first["moves"]) == 4 and first["podDistribution"] == {"unassigned": 0, "production": 3, "testing": 1}
    events.wait("distribution", lambda d: len(d["moves"]) == 4)
    second = corral.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "ratios": {"production": 3, "testing": 1}})
    assert second["moves"] == []
    assert businesses(corral) == Counter({"production": 3, "testing": 1})
    # Explicit counts: one production pod goes back to unassigned, one move only.
    counted = corral.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "counts": {"production": 2, "testing": 1}})
    assert [(m["from"], m["to"]) for m in counted["moves"]] == [("production", "unassigned")]

    status = corral.ok("GET", f"/api/pool-status/{POOL}")
    assert status["totalPods"] == 4 and status["availableForScaleDown"] == 1
    assert status["podDistribution"] == {"unassigned": 1, "production": 2, "testing": 1}

    # Safe scale-down refused with the exact message, nothing removed.
    refused = corral.http.post("/api/scale-pool-deployment", json={"deploymentName": POOL, "targetReplicas": 2})
    assert refused.status_code == 409
    assert refused.json() == {"error": "Cannot scale down: need 2 unassigned pods, but only 1 available", "success": False,
                              "currentReplicas": 4, "targetReplicas": 2, "unassignedPods": 1}
    assert len(corral.pods(POOL)) == 4

    # Scale up: the new replicas are unassigned.
    before = {p["name"] for p in corral.pods(POOL)}
    up = corral.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": POOL, "targetReplicas": 6})
    assert up["success"] and up["currentReplicas"] == 4 and up["targetReplicas"] == 6 and up["unassignedPods"] == 3
    events.wait("scale", lambda d: d["targetReplicas"] == 6)
    new = [p for p in corral.wait_ready(POOL, 6) if p["name"] not in before]
    assert len(new) == 2 and all(p["business"] == "unassigned" for p in new)

    # Safe scale-down: only unassigned replicas go, every assigned one stays (and keeps its process).
    assigned_before = {p["name"]: p["business"] for p in corral.pods(POOL) if p["business"] != "unassigned"}
    down = corral.ok("POST", "/api/scale-deployment", json={"deploymentName": POOL, "targetReplicas": 3})
    assert down["success"] and down["unassignedPods"] == 0 and len(down["removed"]) == 3
    remaining = {p["name"]: p["business"] for p in corral.pods(POOL)}
    assert remaining == assigned_before
    for pod in corral.pods(POOL):
        assert httpx.get(f"{pod['endpoint']}/health").status_code == 200

    # History has every action with before → after.
    history = corral.ok("GET", "/api/history", params={"limit": 100})
    actions = Counter(h["action"] for h in history)
    assert actions["deploy"] == 1 and actions["deploy-service"] == 2 and actions["distribute"] == 3
    assert actions["assign"] == 3 + 4 + 1 and actions["scale"] == 3
    refusal = next(h for h in history if h["outcome"] == "refused")
    assert refusal["message"] == "Cannot scale down: need 2 unassigned pods, but only 1 available"
    scale_up = next(h for h in history if h["action"] == "scale" and h["after"] == {"replicas": 6})
    assert scale_up["before"] == {"replicas": 4} and scale_up["outcome"] == "success"
    only_assign = corral.ok("GET", "/api/history", params={"action": "assign", "target": pods[0]["name"]})
    assert [(h["before"]["business"], h["after"]["business"]) for h in reversed(only_assign)][:3] == [
        ("unassigned", "production"), ("production", "testing"), ("testing", "unassigned")]

    # Deleting a service that still has pods needs force, which unassigns them.
    blocked = corral.http.delete("/api/business-services/testing-chat-nlb")
    assert blocked.status_code == 409 and "force=true" in blocked.json()["error"]
    forced = corral.ok("DELETE", "/api/business-services/testing-chat-nlb", params={"force": "true"})
    assert len(forced["unassignedPods"]) == 1
    assert businesses(corral) == Counter({"production": 2, "unassigned": 1})

    # Deleting the pool stops its processes.
    pids = corral.replica_pids()
    assert corral.http.delete(f"/api/deployments/{POOL}").status_code == 409  # still serving production
    corral.ok("DELETE", f"/api/deployments/{POOL}", params={"force": "true"})
    events.wait("deployment", lambda d: d["action"] == "deleted")
    assert corral.pods() == []  # out of service at once; the processes drain and stop in the background
    wait_for(lambda: corral.replica_pids() == [], what="the replicas to stop")
    assert all(process_start_time(pid) is None for pid in pids)
    events.close()


def test_standard_deployment_gets_its_own_service_and_scales_directly(corral: CorralServer) -> None:
    result = corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "llama-8b", "replicas": 2})
    assert result["deployment"]["name"] == "simulator-llama-8b" and result["deployment"]["type"] == "standard"
    assert result["deployment"]["service"] == "simulator-llama-8b"
    pods = corral.wait_ready("simulator-llama-8b", 2)
    assert all(p["isPoolPod"] is False and p["business"] is None for p in pods)
    manifest = (corral.data_dir / "deployments" / "simulator-llama-8b.yaml").read_text()
    assert "kind: Deployment" in manifest and "kind: Service" in manifest
    # Standard pods cannot be assigned.
    refused = corral.http.post("/api/assign-pod", json={"podName": pods[0]["name"], "businessTag": "production"})
    assert refused.status_code == 400 and "standard deployment" in refused.json()["error"]
    # Any target, applied directly; the pool endpoint refuses a standard deployment.
    down = corral.ok("POST", "/api/scale-deployment", json={"deploymentName": "simulator-llama-8b", "targetReplicas": 1})
    assert down["currentReplicas"] == 2 and len(down["removed"]) == 1
    assert corral.http.post("/api/scale-pool-deployment", json={"deploymentName": "simulator-llama-8b",
                                                                "targetReplicas": 3}).status_code == 400
    deployments = corral.ok("GET", "/api/deployments")
    assert [(d["name"], d["type"], d["replicas"]) for d in deployments] == [("simulator-llama-8b", "standard", 1)]
    corral.ok("DELETE", "/api/deployments/simulator-llama-8b")
    assert corral.ok("GET", "/api/deployments") == []


def test_quick_scaling_keeps_the_desired_count_exact(corral: CorralServer) -> None:
    """8 → 4 → 6 → 3 → 8 without waiting for removals to finish: the desired count is written with
    each scale's intent, so it never counts replicas that are still draining."""
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 8,
                                           "deployAsPool": True})
    for target in (4, 6, 3, 8):
        result = corral.ok("POST", "/api/scale-pool-deployment", json={"deploymentName": POOL, "targetReplicas": target})
        assert result["targetReplicas"] == target
        deployment = corral.ok("GET", f"/api/deployments/{POOL}")
        assert deployment["replicas"] == deployment["currentReplicas"] == target
    corral.wait_ready(POOL, 8)
    history = corral.ok("GET", "/api/history", params={"action": "scale"})
    assert [h["after"]["replicas"] for h in reversed(history)] == [4, 6, 3, 8]
    assert {h["outcome"] for h in history} == {"success"}
