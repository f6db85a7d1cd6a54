"""A real, shared cluster (issue 29): what the real API server does that the emulator did not, and how
Corral holds up — a Scale that omits `spec.replicas` at 0, GPUs counted as the scheduler counts them
(other tenants' pods, cordoned, NotReady and tainted nodes, node selectors, MIG resources), leader
election over a slow API, and watches that are throttled (429) resumed without relisting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from lightkube.resources.apps_v1 import Deployment as K8sDeployment

from corral.backends.kubernetes import client_from
from corral.runtime import Runtime
from tests.conftest import wait_for_async
from tests.k8s.cluster import DEPLOYMENTS, NAMESPACE, PODS, ClusterEmulator, now_iso
from tests.k8s.conftest import start_runtime
from tests.k8s.test_backend_contract import deploy_pool
from tests.k8s.test_reflector import POOL, open_backend, ready_pool

NODES = "/v1/nodes"
GPU = "nvidia.com/gpu"
BUDGETS = "policy/v1/poddisruptionbudgets"


async def test_a_pool_at_zero_grows_by_one_after_a_conflict(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, _, config = cluster
    async with open_backend(config, tmp_path) as (backend, _):
        await ready_pool(api, backend)
        api.patch(DEPLOYMENTS, POOL.name, {"spec": {"replicas": 0}})  # someone scaled the pool to 0
        await wait_for_async(lambda: not backend.list_pods(POOL.name) and backend.get_deployment(POOL.name).replicas == 0,  # type: ignore[union-attr]
                             what="the pool at 0")
        client = client_from(config, NAMESPACE)
        try:  # the real API omits ScaleSpec.replicas at 0 (an int32 with `omitempty`); so does the emulator
            assert "replicas" not in ((await client.get(K8sDeployment.Scale, POOL.name)).to_dict().get("spec") or {})
        finally:
            await client.close()
        api.conflict_once(DEPLOYMENTS, POOL.name)  # another writer just before Corral's: 409, then Corral reads the Scale
        await backend.add_replicas(POOL.name, 1)
        assert api.get(DEPLOYMENTS, POOL.name)["spec"]["replicas"] == 1  # +1 from 0, not from a missing value read as 1
        await wait_for_async(lambda: len(backend.list_pods(POOL.name)) == 1, what="one pod")


# GPUs as the scheduler counts them ----------------------------------------------------------------
def add_node(api: ClusterEmulator, name: str, gpus: int = 8, labels: dict[str, str] | None = None, **extra: str) -> None:
    api.create(NODES, {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", **(labels or {})}},
                       "spec": {}, "status": {"allocatable": {"cpu": "96", GPU: str(gpus), **extra},
                                              "conditions": [{"type": "Ready", "status": "True"}]}})


def tenant_pod(api: ClusterEmulator, name: str, node: str, count: int, resource: str = GPU, phase: str = "Running",
               namespace: str = "team-b") -> None:
    """Another tenant's pod, bound to `node` (the kubelet has nothing left to do with it)."""
    api.create(PODS, {"metadata": {"name": name}, "spec": {"nodeName": node, "containers": [
        {"name": "train", "image": "trainer", "resources": {"limits": {resource: str(count)}, "requests": {"cpu": "1"}}}]}},
        namespace=namespace)
    api.patch(PODS, name, {"status": {"phase": phase, "conditions": [{"type": "Ready", "status": str(phase == "Running"),
                                                                      "lastTransitionTime": now_iso()}]}},
              namespace=namespace, subresource="status")


def set_ready(api: ClusterEmulator, node: str, ready: bool) -> None:
    api.patch(NODES, node, {"status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}, namespace=None, subresource="status")


async def free_gpus(runtime: Runtime) -> int:
    runtime.platform.inventory = await runtime.platform.read_inventory()  # what the runtime's inventory watcher does
    return len(runtime.gpu_ledger().free_units())


async def until_free(runtime: Runtime, expected: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while (free := await free_gpus(runtime)) != expected:
        assert time.monotonic() < deadline, f"{what}: {free} free GPU units, the scheduler would see {expected}"
        await asyncio.sleep(0.05)


def cordon(api: ClusterEmulator, node: str, on: bool = True) -> None:
    api.patch(NODES, node, {"spec": {"unschedulable": True if on else None}}, namespace=None)  # kubectl cordon / uncordon


def taint(api: ClusterEmulator, node: str, *taints: tuple[str, str, str]) -> None:
    api.patch(NODES, node, {"spec": {"taints": [{"key": k, "value": v, "effect": e} for k, v, e in taints] or None}}, namespace=None)


FAULTS = {  # what happens on a 3 × 8-GPU cluster, the free GPU units the scheduler would see after it, and after its undoing
    "another tenant's pod": (lambda api: tenant_pod(api, "other-tenant-train", "gpu-node-a", 6), 18,
                             lambda api: api.delete(PODS, "other-tenant-train", namespace="team-b", grace_s=0)),
    "a cordoned node": (lambda api: cordon(api, "gpu-node-b"), 16, lambda api: cordon(api, "gpu-node-b", False)),
    "a NotReady node": (lambda api: set_ready(api, "gpu-node-c", False), 16, lambda api: set_ready(api, "gpu-node-c", True)),
    "an untolerated taint": (lambda api: taint(api, "gpu-node-b", ("dedicated", "training", "NoSchedule")), 16,
                             lambda api: taint(api, "gpu-node-b")),
    "MIG units, by name": (lambda api: (add_node(api, "mig-node", 0, **{"nvidia.com/mig-1g.10gb": "7"}),
                                        tenant_pod(api, "other-tenant-mig", "mig-node", 3, resource="nvidia.com/mig-1g.10gb")), 24 + 4,
                           lambda api: api.delete(PODS, "other-tenant-mig", namespace="team-b", grace_s=0)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_free_gpus_are_what_the_scheduler_would_give(runtime: Runtime, cluster, fault: str) -> None:  # noqa: ANN001
    api, _, _ = cluster
    for name in ("gpu-node-a", "gpu-node-b", "gpu-node-c"):
        add_node(api, name)
    await until_free(runtime, 24, "three nodes of 8")
    tenant_pod(api, "finished", "gpu-node-c", 8, phase="Succeeded", namespace="team-c")  # a terminal pod holds none
    do, expected, undo = FAULTS[fault]
    do(api)
    await until_free(runtime, expected, fault)
    undo(api)
    await until_free(runtime, 24 + 7 * (fault == "MIG units, by name"), f"{fault}, undone")


async def test_tolerated_taints_and_preferences_leave_a_node_usable(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    api, _, _ = cluster
    add_node(api, "gpu-node-a")
    taint(api, "gpu-node-a", ("dedicated", "training", "PreferNoSchedule"), (GPU, "present", "NoSchedule"))  # pools tolerate nvidia.com/gpu
    add_node(api, "gpu-node-b")
    taint(api, "gpu-node-b", ("dedicated", "training", "NoExecute"))
    await until_free(runtime, 8, "one usable node of two")


async def test_corral_pods_on_an_unusable_node_are_not_counted_twice(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    api, _, _ = cluster
    for name in ("gpu-node-a", "gpu-node-b", "gpu-node-c"):
        add_node(api, name)
    pods = await deploy_pool(runtime, "vllm", replicas=3)
    per_pod = {c.holder.name: c.count for c in runtime.backend.gpu_claims()}
    on_node: dict[str, int] = {}
    for name in pods:
        node = api.get(PODS, name)["spec"]["nodeName"]
        on_node[node] = on_node.get(node, 0) + per_pod[name]
    await until_free(runtime, 24 - sum(per_pod.values()), "Corral's pool booked once")
    busiest = max(on_node, key=lambda n: on_node[n])
    api.patch(NODES, busiest, {"spec": {"unschedulable": True}}, namespace=None)
    # The scheduler: the cordoned node gives nothing; the others their GPUs less what Corral's pods there request.
    await until_free(runtime, sum(8 - on_node.get(n, 0) for n in ("gpu-node-a", "gpu-node-b", "gpu-node-c") if n != busiest),
                     "Corral's pods on a cordoned node")


async def test_a_node_selector_limits_the_gpus(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, _, config = cluster
    add_node(api, "inference-node", labels={"corral.dev/node-pool": "inference"})
    add_node(api, "training-node", labels={"corral.dev/node-pool": "training"})
    add_node(api, "unlabelled-node")
    runtime = await start_runtime(config, tmp_path / "data", kubernetes_node_selector={"corral.dev/node-pool": "inference"})
    try:
        await until_free(runtime, 8, "only the selected node")
        api.patch(NODES, "training-node", {"metadata": {"labels": {"corral.dev/node-pool": "inference"}}}, namespace=None)
        await until_free(runtime, 16, "a node relabelled into the selection")
    finally:
        await runtime.close()


async def test_the_inventory_comes_from_watches_not_lists(runtime: Runtime, cluster) -> None:  # noqa: ANN001
    api, _, _ = cluster
    add_node(api, "gpu-node-a")
    await until_free(runtime, 8, "a node seen")

    def node_lists() -> int:
        return sum(r.method == "GET" and r.url.path == "/api/v1/nodes" and "watch=true" not in str(r.url) for r in api._requests)

    listed = node_lists()
    for _ in range(5):
        await free_gpus(runtime)
    assert node_lists() == listed  # no LIST per read: the Node watch's cache answers
    pod_watches = [params for plural, params in api.watch_requests if plural == PODS and "fieldSelector" in params]
    assert pod_watches and pod_watches[0]["fieldSelector"] == "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
    assert any(plural == NODES for plural, _ in api.watch_requests)


# Drains --------------------------------------------------------------------------------------------
async def test_a_pool_gets_a_disruption_budget_owned_by_its_deployment(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, _, config = cluster
    async with open_backend(config, tmp_path) as (backend, _):
        await backend.create_deployment(POOL, None)
        budget = api.get(BUDGETS, POOL.name)
        assert budget["spec"]["maxUnavailable"] == 1 and budget["spec"]["selector"]["matchLabels"] == POOL.selector
        owner = api.get(DEPLOYMENTS, POOL.name)["metadata"]["uid"]
        assert [r["uid"] for r in budget["metadata"]["ownerReferences"]] == [owner]
        assert (Path(backend.write_manifests(POOL.name, backend.manifests(POOL, None))).read_text().count("kind: PodDisruptionBudget")
                == 1)  # the written manifests show it too
        await backend.delete_deployment(POOL.name)
        await wait_for_async(lambda: api.find(BUDGETS, POOL.name) is None, what="the budget garbage-collected with its pool")
