"""A cluster's GPUs, from its nodes: allocatable `nvidia.com/gpu` (and MIG resources), with the
product and memory labels of NVIDIA GPU feature discovery. Pure: node dicts in, inventory out."""

from __future__ import annotations

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
