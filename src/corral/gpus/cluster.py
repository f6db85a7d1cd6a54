"""A cluster's GPUs, from its nodes: allocatable `nvidia.com/gpu` (and MIG resources), with the
product and memory labels of NVIDIA GPU feature discovery. Pure: node and pod dicts in, inventory out.

On a shared cluster the GPUs Corral can use are those the kube scheduler would give its pods
(`cluster_inventory`): per node, allocatable minus the requests of every non-terminal pod bound there,
whoever owns it (the NodeResourcesFit plugin's arithmetic), on nodes a pool's pod could land on at all —
schedulable (not cordoned), Ready, every NoSchedule/NoExecute taint tolerated, every node-selector label
matched (the NodeUnschedulable, TaintToleration and NodeAffinity plugins). MIG resources
(`nvidia.com/mig-<profile>`) are counted the same way, each by its own name. Corral's own pods are not
subtracted here: the GPU ledger books them (replicas by their limits, finetune Jobs as their tasks), so
the node's units they use stay in the inventory for the ledger to book — on a node Corral could not use
any more (cordoned, say) exactly as many as they use, so that none of them is free."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.gpus.inventory import GIB, GpuDevice, GpuInventory

PRODUCT = "nvidia.com/gpu.product"
MEMORY_MB = "nvidia.com/gpu.memory"
MIG_PREFIX = "nvidia.com/mig-"


def inventory_from_nodes(nodes: list[dict[str, Any]], gpu_resource: str = "nvidia.com/gpu") -> GpuInventory:
    """One device per allocatable GPU (index across the cluster, name `node/product`); each MIG
    resource unit (e.g. `nvidia.com/mig-1g.10gb`) a schedulable instance of its own.

    Nodes do not say which GPU a MIG unit is carved from, and the kube scheduler places each unit on
    its own, so each MIG unit gets a parent slot of its own, numbered after every whole GPU of the
    cluster: the GPU ledger must never see a MIG unit as a slice of some whole GPU it can hand out."""
    sorted_nodes = sorted(nodes, key=lambda n: n["metadata"]["name"])
    devices: list[GpuDevice] = []
    mig_units: list[tuple[str, int]] = []  # (name, memory) of each MIG unit, in node order
    for node in sorted_nodes:
        name = node["metadata"]["name"]
        labels = node["metadata"].get("labels") or {}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        product = labels.get(PRODUCT, "NVIDIA GPU")
        memory = int(labels.get(MEMORY_MB, "0") or 0) * 1024**2
        for _ in range(int(allocatable.get(gpu_resource, "0") or 0)):
            devices.append(GpuDevice(index=len(devices), name=f"{name}/{product}", memory_total_bytes=memory))
        for resource, count in sorted(allocatable.items()):
            if resource.startswith(MIG_PREFIX) and resource != gpu_resource:  # counted above when it is the GPU resource
                profile = resource.removeprefix(MIG_PREFIX)  # e.g. 1g.10gb
                size = profile.split(".")[-1].removesuffix("gb")
                mig_memory = int(float(size) * GIB) if size.replace(".", "").isdigit() else 0
                mig_units += [(f"{name}/{product} MIG {profile}", mig_memory)] * int(count or 0)
    migs = [GpuDevice(index=0, name=unit_name, memory_total_bytes=mig_memory, parent_index=len(devices) + i)
            for i, (unit_name, mig_memory) in enumerate(mig_units)]
    if not devices and not migs:
        return GpuInventory(error="no node of the cluster has allocatable GPUs")
    return GpuInventory(devices=tuple(devices), mig_instances=tuple(migs), driver_version="cluster")


@dataclass(frozen=True)
class Placement:
    """Where a pool's pods may go: their tolerations and node selector (`ClusterOptions`)."""

    tolerations: tuple[Mapping[str, Any], ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)


def _count(value: Any) -> int:
    """An extended resource's quantity (an integer: "2"); anything else counts as 0."""
    try:
        return int(float(str(value)))
    except (TypeError, ValueError):
        return 0


def _container_requests(container: Mapping[str, Any], names: Callable[[str], bool]) -> dict[str, int]:
    """A container's requests of the resources `names` accepts; an unset request is its limit (API defaulting)."""
    resources = container.get("resources") or {}
    asked = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {k: _count(v) for k, v in asked.items() if names(k)}


def pod_requests(pod: Mapping[str, Any], names: Callable[[str], bool]) -> dict[str, int]:
    """What the scheduler reserves for a pod (k8s.io/component-helpers resource.PodRequests): the sum over its
    containers, sidecars (restartable init containers) added, or the largest init container's request
    (with the sidecars started before it) if that is more; plus the pod's overhead."""
    spec = pod.get("spec") or {}
    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for k, v in _container_requests(container, names).items():
            total[k] = total.get(k, 0) + v
    sidecars: dict[str, int] = {}
    init: dict[str, int] = {}
    for container in spec.get("initContainers") or []:
        asked = _container_requests(container, names)
        if container.get("restartPolicy") == "Always":
            for k, v in asked.items():
                total[k] = total.get(k, 0) + v
                sidecars[k] = sidecars.get(k, 0) + v
            asked = dict(sidecars)
        else:
            asked = {k: asked.get(k, 0) + sidecars.get(k, 0) for k in {*asked, *sidecars}}
        for k, v in asked.items():
            init[k] = max(init.get(k, 0), v)
    for k, v in init.items():
        total[k] = max(total.get(k, 0), v)
    for k, v in (spec.get("overhead") or {}).items():
        if names(k):
            total[k] = total.get(k, 0) + _count(v)
    return {k: v for k, v in total.items() if v}


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """core/v1 `Toleration.ToleratesTaint`: effect (empty: all), key (empty with Exists: all), then value."""
    if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
        return False
    if toleration.get("key") and toleration.get("key") != taint.get("key"):
        return False
    if toleration.get("operator") == "Exists":
        return True
    return bool(toleration.get("key")) and (toleration.get("value") or "") == (taint.get("value") or "")


def unusable(node: Mapping[str, Any], placement: Placement) -> str | None:
    """Why the scheduler would place none of a pool's pods on this node, or None."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    if spec.get("unschedulable"):
        return "cordoned"
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready != "True":
        return "not Ready"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(tolerates(t, taint) for t in placement.tolerations):
            return f"taint {taint.get('key')}{'=' + taint['value'] if taint.get('value') else ''}:{taint.get('effect')} not tolerated"
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in placement.node_selector.items()):
        return "node selector not matched"
    return None


def is_bound(pod: Mapping[str, Any]) -> bool:
    """Bound to a node and not terminal: the pods whose requests the scheduler counts on that node."""
    return bool((pod.get("spec") or {}).get("nodeName")) and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def usable_nodes(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], gpu_resource: str, placement: Placement,
                 own: Callable[[Mapping[str, Any]], bool]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The nodes as Corral may use their GPUs: each a copy whose allocatable GPU (and MIG) counts are what the
    scheduler would leave to Corral's pods — allocatable minus the requests of every other bound pod there —
    on a usable node, and only what Corral's own pods (`own`) use there on an unusable one. Also returns why
    each unusable node with GPUs is so (node → reason)."""
    def gpu_like(name: str) -> bool:
        return name == gpu_resource or name.startswith(MIG_PREFIX)

    others: dict[str, dict[str, int]] = {}
    mine: dict[str, dict[str, int]] = {}
    for pod in pods:
        if not is_bound(pod):
            continue
        requests = pod_requests(pod, gpu_like)
        if requests:
            into = (mine if own(pod) else others).setdefault(pod["spec"]["nodeName"], {})
            for k, v in requests.items():
                into[k] = into.get(k, 0) + v
    result: list[dict[str, Any]] = []
    reasons: dict[str, str] = {}
    for node in nodes:
        name = node["metadata"]["name"]
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        gpus = {k: _count(v) for k, v in allocatable.items() if gpu_like(k)}
        if not any(gpus.values()):
            continue
        why = unusable(node, placement)
        if why is None:
            left = {k: max(0, v - others.get(name, {}).get(k, 0)) for k, v in gpus.items()}
        else:
            reasons[name] = why
            left = {k: min(v, mine.get(name, {}).get(k, 0)) for k, v in gpus.items()}
        result.append({"metadata": node["metadata"], "status": {"allocatable": {k: str(v) for k, v in left.items()}}})
    return result, reasons


def cluster_inventory(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], gpu_resource: str = "nvidia.com/gpu",
                      placement: Placement = Placement(), own: Callable[[Mapping[str, Any]], bool] = lambda pod: False) -> GpuInventory:
    """The GPU units Corral's pods could get as the scheduler counts them (see the module's doc), plus those
    they hold; when there are none, the inventory's error says why."""
    usable, reasons = usable_nodes(nodes, pods, gpu_resource, placement, own)
    inventory = inventory_from_nodes(usable, gpu_resource)
    if not inventory.available and not inventory.mig_instances:
        held = len(usable) - len(reasons)
        parts = ([f"{held} usable node(s) with GPUs, all requested by other pods"] if held else []) + [
            f"{node}: {why}" for node, why in sorted(reasons.items())]
        return GpuInventory(error="no GPU of the cluster is left for Corral's pods" + (f" ({'; '.join(parts)})" if parts else
                                                                                      ": no node has allocatable GPUs"))
    return inventory
