"""What other actors and the cluster's own controllers do, and how Corral holds up: only active pods are
replicas (evicted, terminating and Job pods are not), deletion costs that follow the business label so
that any scale-down prefers unassigned pods, `spec.replicas` written with a resourceVersion
precondition, an HPA on a pool, and a ReplicaSet removing not-ready assigned pods first."""

from __future__ import annotations

import pytest
from lightkube.models.autoscaling_v2 import CrossVersionObjectReference, HorizontalPodAutoscalerSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from corral.domain.errors import Conflict
from corral.domain.manifests import ASSIGNED_COST, UNASSIGNED_COST
from corral.runtime import Runtime
from tests.conftest import wait_for_async
from tests.k8s.cluster import COST, DEPLOYMENTS, JOBS, PODS
from tests.k8s.test_backend_contract import businesses, client_for, deploy_pool

POOL = "vllm-qwen-7b-pool"


def cost(api, pod: str) -> str | None:  # noqa: ANN001
    return (api.get(PODS, pod)["metadata"].get("annotations") or {}).get(COST)


async def test_evicted_and_terminating_pods_are_not_replicas(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    api, controllers, _ = cluster
    await deploy_pool(runtime, "vllm", replicas=3)
    await runtime.controller.distribute(POOL, None, {"production": 2, "testing": 1})
    evicted = next(p.name for p in runtime.backend.list_pods(POOL) if p.business == "testing")
    controllers.fail_pod(evicted, "Evicted", "The node was low on resource: memory.")
    # Failed is not active (IsPodActive): not a replica, holds no GPU; the ReplicaSet replaces it and
    # Corral gives the replacement the evicted pod's business.
    await wait_for_async(lambda: evicted not in {p.name for p in runtime.backend.list_pods(POOL)}, what="the evicted pod dropped")
    assert not any(c.holder.name == evicted for c in runtime.backend.gpu_claims())
    await wait_for_async(lambda: businesses(runtime, POOL) == {"production": 2, "testing": 1} and len(runtime.backend.list_pods(POOL)) == 3,
                         what="the replacement assigned to testing")
    assert api.get(PODS, evicted)["status"]["phase"] == "Failed"  # the pod object stays (pod GC), yet counts for nothing
    crash = runtime.store.history(action="crash", target=evicted)
    assert crash and "Evicted" in crash[0]["message"]
    status = runtime.controller.pool_status(POOL)
    assert status.totalPods == 3

    controllers.timings.termination_s = 30  # a long grace period: the pod terminates for a while
    leaving = next(p.name for p in runtime.backend.list_pods(POOL) if p.business == "production")
    await client_for(runtime).delete(Pod, leaving)
    await wait_for_async(lambda: leaving not in {p.name for p in runtime.backend.list_pods(POOL)}, what="the terminating pod dropped")
    assert api.get(PODS, leaving)["metadata"]["deletionTimestamp"]
    assert any(c.holder.name == leaving for c in runtime.backend.gpu_claims())  # its GPU is not free until it is gone


async def test_finetune_job_pods_are_never_replicas(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    api, controllers, _ = cluster
    await deploy_pool(runtime, "vllm", replicas=1)
    api.create(JOBS, {"metadata": {"name": "corral-ft-1", "labels": {"corral.dev/finetune-task": "ft-1", "app.kubernetes.io/managed-by": "corral",
                                                                      "app": "looks-like-a-deployment"}},
                      "spec": {"backoffLimit": 0, "template": {
                          "metadata": {"labels": {"corral.dev/finetune-task": "ft-1", "app.kubernetes.io/managed-by": "corral"}},
                          "spec": {"restartPolicy": "Never", "containers": [{
                              "name": "trainer", "image": "corral", "command": ["python", "-c", "import time; time.sleep(60)"],
                              "resources": {"limits": {"nvidia.com/gpu": 2}}}]}}}})
    await wait_for_async(lambda: "corral-ft-1" in controllers.trainers, what="the Job's pod running")
    job_pod = controllers.trainers["corral-ft-1"].pod
    await wait_for_async(lambda: job_pod in runtime.backend.objects["pods"], what="the Job's pod in the cache")  # type: ignore[attr-defined]
    assert job_pod not in {p.name for p in runtime.backend.list_pods()}
    assert [c.holder.name for c in runtime.backend.gpu_claims()] == [p.name for p in runtime.backend.list_pods(POOL)]
    assert await runtime.backend.pod_logs(job_pod, 10) is None


async def test_deletion_costs_follow_the_business_label(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    api, _, _ = cluster
    pods = await deploy_pool(runtime, "vllm", replicas=3)
    assert {cost(api, p) for p in pods} == {UNASSIGNED_COST}  # born with it (the pod template)
    api.writes.clear()
    await runtime.controller.assign_pod(pods[0], "production", None)
    [patch] = [body for verb, plural, name, body in api.writes if verb == "PATCH" and plural == PODS and name == pods[0]]
    assert patch["metadata"] == {"labels": {"business": "production"}, "annotations": {COST: ASSIGNED_COST}}  # one patch, both
    # Someone relabels a pod behind Corral's back (kubectl label): its cost follows.
    await client_for(runtime).patch(Pod, pods[1], {"metadata": {"labels": {"business": "testing"}}}, patch_type=PatchType.MERGE)
    await wait_for_async(lambda: cost(api, pods[1]) == ASSIGNED_COST, what="the stale cost corrected")
    await client_for(runtime).patch(Pod, pods[0], {"metadata": {"annotations": {COST: None}}}, patch_type=PatchType.MERGE)
    await wait_for_async(lambda: cost(api, pods[0]) == ASSIGNED_COST, what="a removed cost restored")


async def test_any_scale_down_prefers_unassigned_pods(runtime: Runtime, engine: str) -> None:
    pool = f"{engine}-qwen-7b-pool"
    await deploy_pool(runtime, engine, replicas=4)
    await runtime.controller.distribute(pool, None, {"production": 1, "testing": 1})
    assigned = {p.name for p in runtime.backend.list_pods(pool) if p.business != "unassigned"}
    # `kubectl scale --replicas=2` (or an HPA): not Corral's pool-safe path, yet the costs steer the ReplicaSet.
    client = client_for(runtime)
    await client.patch(Deployment, pool, {"spec": {"replicas": 2}}, patch_type=PatchType.MERGE)
    await wait_for_async(lambda: len(runtime.backend.list_pods(pool)) == 2, timeout=120, what="the scale-down")
    assert {p.name for p in runtime.backend.list_pods(pool)} == assigned
    await client.close()


async def test_scale_writes_spec_replicas_with_a_version_precondition(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    api, _, _ = cluster
    await deploy_pool(runtime, "vllm", replicas=2)
    api.conflict_once(DEPLOYMENTS, POOL, {"spec": {"replicas": 4}})  # someone scales to 4 just before Corral writes
    api.writes.clear()
    result = await runtime.controller.scale(POOL, 3, pool_endpoint=True)  # +1, from the 2 Corral saw
    assert (result.currentReplicas, result.targetReplicas) == (2, 3)  # what Corral saw and asked for
    scales = [body for verb, plural, name, body in api.writes if verb == "PATCH" and plural == DEPLOYMENTS and "spec" in (body or {})]
    assert len([r for r in api._requests if r.method == "PATCH" and r.url.path.endswith(f"/deployments/{POOL}/scale")]) == 2
    assert len(scales) == 2 and scales[0]["metadata"]["resourceVersion"] != scales[1]["metadata"]["resourceVersion"]
    assert [s["spec"]["replicas"] for s in scales] == [3, 5]  # retried on 409 from the fresh spec: +1, not overwritten
    assert api.get(DEPLOYMENTS, POOL)["spec"]["replicas"] == 5
    await wait_for_async(lambda: len(runtime.backend.list_pods(POOL)) == 5, what="five pods")


async def test_a_pool_scaled_by_an_hpa_is_not_scaled_by_corral(runtime: Runtime, engine: str) -> None:
    pool = f"{engine}-qwen-7b-pool"
    await deploy_pool(runtime, engine, replicas=2)
    client = client_for(runtime)
    await client.create(HorizontalPodAutoscaler(
        metadata=ObjectMeta(name="chat-hpa"),
        spec=HorizontalPodAutoscalerSpec(scaleTargetRef=CrossVersionObjectReference(apiVersion="apps/v1", kind="Deployment", name=pool),
                                         minReplicas=2, maxReplicas=8)))
    try:
        await wait_for_async(lambda: runtime.backend.autoscaler_of(pool) is not None, what="the HPA seen")  # type: ignore[attr-defined]
        for target in (1, 3):
            with pytest.raises(Conflict) as refusal:
                await runtime.controller.scale(pool, target, pool_endpoint=True)
            assert "HorizontalPodAutoscaler 'chat-hpa' (2-8 replicas)" in refusal.value.message
        assert (await client.get(Deployment, pool)).spec.replicas == 2
        assert not [r for r in runtime.store.history() if r["outcome"] == "pending"]
    finally:
        await client.delete(HorizontalPodAutoscaler, "chat-hpa")
        await client.close()


async def test_not_ready_assigned_pods_go_first_and_are_restored(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    """The ReplicaSet ranks readiness above the deletion cost: not-ready assigned pods are removed before
    ready unassigned ones. The scale-down's verification records it and the business gets its count back."""
    api, controllers, _ = cluster
    await deploy_pool(runtime, "vllm", replicas=4)
    await runtime.controller.distribute(POOL, None, {"production": 2})
    sick = [p.name for p in runtime.backend.list_pods(POOL) if p.business == "production"]
    for name in sick:
        controllers.set_ready(name, False)  # their readiness probes fail
    await wait_for_async(lambda: not any(p.ready for p in runtime.backend.list_pods(POOL) if p.name in sick), what="not ready")
    result = await runtime.controller.scale(POOL, 2, pool_endpoint=True)
    assert not set(result.removed) & set(sick)  # Corral chose the unassigned pods ...
    verify = await wait_for_async(lambda: runtime.store.history(action="scale-verify"), what="the verification")
    assert sorted(controllers.removed) == sorted(sick)  # ... the ReplicaSet took the not-ready assigned ones
    assert verify[0]["outcome"] == "corrected" and all(name in verify[0]["message"] for name in sick)
    await wait_for_async(lambda: businesses(runtime, POOL) == {"production": 2}, what="production's two replicas back")
    kept = [p.name for p in runtime.backend.list_pods(POOL)]
    await wait_for_async(lambda: all(cost(api, p) == ASSIGNED_COST for p in kept), what="no stale cost on the kept pods")


async def test_a_read_write_once_model_cache_is_refused(cluster, tmp_path) -> None:  # noqa: ANN001
    from corral.controller import DeploySpec
    from tests.k8s.conftest import start_runtime

    api, _, config = cluster
    api.create("/v1/persistentvolumeclaims", {"metadata": {"name": "hf-cache"}, "spec": {"accessModes": ["ReadWriteOnce"]}})
    runtime = await start_runtime(config, tmp_path / "data", kubernetes_model_cache_claim="hf-cache")
    try:
        with pytest.raises(Conflict) as refusal:
            await runtime.controller.deploy(DeploySpec(engine="vllm", model_id="Qwen/Qwen2.5-7B", model_tag="qwen-7b", replicas=2,
                                                       deploy_as_pool=True))
        assert "'hf-cache' is ReadWriteOnce" in refusal.value.message
        assert not api.items(DEPLOYMENTS)
    finally:
        await runtime.close()
