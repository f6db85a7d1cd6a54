"""The Kubernetes backend against an emulated cluster over real HTTP: pools, services, assignment,
distribution, pool-safe scale-down (with the cluster choosing otherwise), replacements, watches."""

from __future__ import annotations

import json
from pathlib import Path

from lightkube import AsyncClient, KubeConfig
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod, Service
from lightkube.types import PatchType

from corral.controller import DeploySpec
from corral.domain.errors import Conflict
from corral.runtime import Runtime
from tests.conftest import wait_for_async

# The emulated cluster runs no engine, so the pool is a vLLM one (GPU requests and all); a real
# cluster (test_real_cluster.py) runs the simulator instead. Both set ENGINE through the fixture.
TIMEOUT = 30.0


def client_for(runtime: Runtime) -> AsyncClient:
    return AsyncClient(config=KubeConfig.from_file(str(runtime.settings.kubeconfig)), namespace=runtime.settings.kubernetes_namespace)


async def deploy_pool(runtime: Runtime, engine: str, replicas: int = 4) -> list[str]:
    await runtime.controller.deploy(DeploySpec(engine=engine, model_id="Qwen/Qwen2.5-Coder-7B-Instruct", model_tag="qwen-7b",
                                               replicas=replicas, deploy_as_pool=True,
                                               gpus_per_replica=None if engine == "vllm" else 0))
    pool = f"{engine}-qwen-7b-pool"
    await wait_for_async(lambda: len(runtime.backend.list_pods(pool)) == replicas and all(p.ready for p in runtime.backend.list_pods(pool)),
                         timeout=TIMEOUT * 10, what=f"{replicas} ready pods")
    for business in ("production", "testing"):
        await runtime.controller.deploy_service(f"{business}-chat", pool, business, business == "production")
    return [p.name for p in runtime.backend.list_pods(pool)]


def businesses(runtime: Runtime, pool: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in runtime.backend.list_pods(pool):
        counts[pod.business or ""] = counts.get(pod.business or "", 0) + 1
    return counts


async def test_pool_services_and_assignment_are_cluster_objects(runtime: Runtime, engine: str) -> None:
    pool = f"{engine}-qwen-7b-pool"
    events: list[tuple[str, dict]] = []
    runtime.bus.listen(lambda kind, data: events.append((kind, data)))
    pods = await deploy_pool(runtime, engine)
    client = client_for(runtime)
    deployment = (await client.get(Deployment, pool)).to_dict()
    assert deployment["spec"]["selector"]["matchLabels"] == {"model": "qwen-7b", "pool": pool}  # never business
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    if engine == "vllm":
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert deployment["spec"]["template"]["metadata"]["labels"]["business"] == "unassigned"
    production = (await client.get(Service, "production-chat-nlb")).to_dict()
    assert production["spec"]["type"] == "LoadBalancer" and production["spec"]["selector"] == {"model": "qwen-7b", "business": "production"}
    assert production["metadata"]["labels"]["service-type"] == "business-service"
    assert (await client.get(Service, "testing-chat-nlb")).to_dict()["spec"]["type"] == "ClusterIP"
    assert (Path(runtime.settings.manifests_dir) / f"{pool}.yaml").exists()
    # Businesses are discovered from the cluster's services.
    assert [s.businessTag for s in runtime.controller.list_business_services()] == ["production", "testing"]

    # Assign = a merge patch of the pod's label; complete once the EndpointSlices follow (an internal service).
    await runtime.controller.assign_pod(pods[0], "testing", "qwen-7b")
    assert (await client.get(Pod, pods[0])).to_dict()["metadata"]["labels"]["business"] == "testing"
    cutover = await wait_for_async(lambda: runtime.store.history(action="cutover", target=pods[0]), what="the cut-over")
    assert cutover[0]["outcome"] == "success" and "traffic follows after" in cutover[0]["message"]
    assert any(kind == "assignment_complete" and data["podName"] == pods[0] for kind, data in events)
    metrics = "\n".join(runtime.backend.metrics())
    assert "corral_cutover_seconds_count 1" in metrics and 'corral_cutover_seconds{quantile="0.5"}' in metrics
    desired = (await client.get(Deployment, pool)).to_dict()["metadata"]["annotations"]["corral.dev/desired-assignment"]
    assert json.loads(desired) == {"testing": 1}

    result = await runtime.controller.distribute(pool, None, {"production": 2, "testing": 1})
    assert result.podDistribution == {"unassigned": 1, "production": 2, "testing": 1}
    # The external (LoadBalancer) service: no AWS Load Balancer Controller here, so its targets' health cannot be read,
    # and the cut-over is recorded as such, never as done.
    external = [p.name for p in runtime.backend.list_pods(pool) if p.business == "production"]
    rows = await wait_for_async(lambda: [r for p in external for r in runtime.store.history(action="cutover", target=p)]
                                if all(runtime.store.history(action="cutover", target=p) for p in external) else None,
                                what="the external cut-overs")
    assert {r["outcome"] for r in rows} == {"unconfirmed"} and "external targets may take minutes" in rows[0]["message"]
    assert not any(kind == "assignment_complete" and data["podName"] in external for kind, data in events)
    labels = [p.to_dict()["metadata"]["labels"]["business"] async for p in client.list(Pod, labels={"pool": pool})
              if not p.metadata.deletionTimestamp]
    assert sorted(labels) == ["production", "production", "testing", "unassigned"]
    # Watches feed the same events as the local backend.
    assert any(kind == "replica_status" and data["deployment"] == pool for kind, data in events)
    await client.close()


async def test_pool_safe_scale_down_uses_deletion_cost_and_refuses_below_assigned(runtime: Runtime, engine: str) -> None:
    pool = f"{engine}-qwen-7b-pool"
    pods = await deploy_pool(runtime, engine)
    await runtime.controller.distribute(pool, None, {"production": 1, "testing": 1})
    try:
        await runtime.controller.scale(pool, 1, pool_endpoint=True)
        raise AssertionError("expected a refusal")
    except Conflict as refusal:
        assert refusal.message == "Cannot scale down: need 3 unassigned pods, but only 2 available"
    assert len(runtime.backend.list_pods(pool)) == 4
    result = await runtime.controller.scale(pool, 2, pool_endpoint=True)
    assert len(result.removed) == 2
    await wait_for_async(lambda: len(runtime.backend.list_pods(pool)) == 2, timeout=TIMEOUT * 4, what="the scale-down")
    assert businesses(runtime, pool) == {"production": 1, "testing": 1}  # exactly the unassigned ones went
    assert set(result.removed) <= set(pods)
    assert not runtime.store.history(action="scale-verify")


async def test_cluster_removing_assigned_pods_is_corrected(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    _, controllers, _ = cluster
    pool = "vllm-qwen-7b-pool"
    await deploy_pool(runtime, "vllm")
    oldest = sorted(runtime.backend.list_pods(pool), key=lambda p: p.created_at)[:2]  # type: ignore[arg-type, return-value]
    for pod in oldest:
        await runtime.controller.assign_pod(pod.name, "production", None)
    controllers.ignore_deletion_cost = True  # the ReplicaSet removes the oldest pods: the assigned ones
    await runtime.controller.scale(pool, 2, pool_endpoint=True)
    verify = await wait_for_async(lambda: runtime.store.history(action="scale-verify"), timeout=30, what="the verification")
    assert verify[0]["outcome"] == "corrected" and "removed assigned pod(s)" in verify[0]["message"]
    await wait_for_async(lambda: businesses(runtime, pool) == {"production": 2}, what="production's two replicas back")
    restored = [h for h in runtime.store.history(action="assign") if h["message"].startswith("restored")]
    assert len(restored) == 2


async def test_replaced_pod_is_reassigned(runtime: Runtime, engine: str) -> None:
    pool = f"{engine}-qwen-7b-pool"
    await deploy_pool(runtime, engine, replicas=3)
    await runtime.controller.distribute(pool, None, {"production": 2, "testing": 1})
    victim = next(p.name for p in runtime.backend.list_pods(pool) if p.business == "testing")
    client = client_for(runtime)
    await client.delete(Pod, victim)  # a node lost, say: the ReplicaSet makes a new, unassigned pod
    await wait_for_async(lambda: victim not in {p.name for p in runtime.backend.list_pods(pool)}
                         and businesses(runtime, pool) == {"production": 2, "testing": 1}, timeout=TIMEOUT * 4,
                         what="testing's replica replaced")
    entry = next(h for h in runtime.store.history(action="assign") if h["message"].startswith("restored"))
    assert "replacement for a lost replica of business 'testing'" in entry["message"]
    await client.close()


async def test_scale_down_during_a_rollout_is_refused(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    _, controllers, _ = cluster
    pool = "vllm-qwen-7b-pool"
    await deploy_pool(runtime, "vllm", replicas=3)
    controllers.paused = True
    client = client_for(runtime)
    # As the Deployment controller would mid-rollout: through the status subresource (a write to the
    # Deployment itself never changes its status).
    await client.patch(Deployment.Status, pool, {"status": {"updatedReplicas": 1, "replicas": 4}}, patch_type=PatchType.MERGE)
    await wait_for_async(lambda: runtime.backend.objects["deployments"][pool]["status"]["updatedReplicas"] == 1, what="the watch")
    try:
        await runtime.controller.scale(pool, 2, pool_endpoint=True)
        raise AssertionError("expected a refusal")
    except Conflict as refusal:
        assert "is rolling out (1 of 3 replicas run the current template)" in refusal.message
    assert (await client.get(Deployment, pool)).to_dict()["spec"]["replicas"] == 3
    await client.close()


async def test_llm_routing_adds_a_vllm_router_discovering_the_business(runtime: Runtime, engine: str) -> None:
    pool = f"{engine}-qwen-7b-pool"
    await deploy_pool(runtime, engine, replicas=1)
    await runtime.controller.deploy_service("support-chat", pool, "support", False, llm_routing=True)
    client = client_for(runtime)
    router = (await client.get(Deployment, "support-chat-router")).to_dict()
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--service-discovery", "--selector", "business=support", "model=qwen-7b"]
    assert (await client.get(Service, "support-chat-router")).to_dict()["spec"]["selector"] == {"app": "support-chat-router"}
    assert next(s for s in runtime.controller.list_business_services() if s.businessTag == "support").llmRouting
    assert [d.name for d in runtime.backend.list_deployments()] == [pool]  # the router is part of the service
    await runtime.controller.delete_service("support-chat-nlb")
    assert "support-chat-router" not in {d.metadata.name async for d in client.list(Deployment)}
    await client.close()
