"""A platform per backend kind, built once from the settings: the backend, where its GPU inventory
comes from, and how finetune trainers run.

This is the only module that knows which backend runs: nothing else branches on the backend's
class. The runtime assembles the rest — store, bus, controller, gateway, finetune manager — from a
platform's parts, which it reaches only through their interfaces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from corral.backends.base import Backend
from corral.config import Settings
from corral.domain.gpu_ledger import GpuLedger
from corral.finetune.runners import JobRunner, ProcessRunner, TrainerRunner
from corral.gpus.inventory import GpuInventory, read_inventory
from corral.store.state import StateStore

PlatformKind = Literal["local", "kubernetes", "given"]


def _ignore(*_: object, **__: object) -> None:
    """Observations before the controller takes over (it calls `Backend.set_report` when built)."""


@dataclass
class Platform:
    kind: PlatformKind
    backend: Backend
    runner: TrainerRunner
    read_inventory: Callable[[], Awaitable[GpuInventory]]  # a full read: NVML on this machine, the nodes of a cluster
    rereads_for_decisions: bool  # NVML's free memory changes by the second: re-read before each placement
    inventory: GpuInventory  # the last read (on a cluster: empty until the first read after `backend.start`)

    def fresh_inventory(self) -> GpuInventory:
        """The inventory a placement decision reads: a new NVML read where there are GPUs on this machine;
        the watcher's last read where reading is remote (a cluster's nodes) or there is nothing to re-read."""
        if self.rereads_for_decisions and self.inventory.available:
            return read_inventory()
        return self.inventory

    @property
    def watches_inventory(self) -> bool:
        """Whether the inventory can change while running (no driver on this machine: nothing to watch)."""
        return self.kind == "kubernetes" or self.inventory.available


def build_platform(settings: Settings, store: StateStore, ledger: Callable[[], GpuLedger],
                   backend: Callable[[StateStore], Backend] | None = None) -> Platform:
    """`ledger` is the runtime's one GPU ledger (replicas and finetune tasks), read by local placement.
    A `backend` factory given by the caller (tests, benchmarks) gets the runtime's store and runs on
    this machine's inventory and trainers."""

    async def nvml() -> GpuInventory:
        return await asyncio.to_thread(read_inventory)

    if backend is not None:
        return Platform("given", backend(store), ProcessRunner(settings.stop_grace_s), nvml, True, read_inventory())
    if settings.backend == "kubernetes":
        from corral.backends.kubernetes import KubernetesBackend, client_from

        cluster = KubernetesBackend(client_from(settings.kubeconfig, settings.kubernetes_namespace), settings.cluster_options(),
                                    _ignore, settings.manifests_dir)

        async def nodes() -> GpuInventory:  # from the backend's Node and bound-Pod watches, as the scheduler counts
            return cluster.gpu_inventory()

        runner = JobRunner(cluster, settings.kubernetes_trainer_image, settings.data_dir, settings.kubernetes_data_claim,
                           settings.kueue_queue)
        return Platform("kubernetes", cluster, runner, nodes, False, GpuInventory())
    from corral.backends.local import LocalBackend

    inventory = read_inventory()
    local = LocalBackend(settings, store, _ignore, gpu_ids=[d.index for d in inventory.devices], gpu_ledger=ledger)
    return Platform("local", local, ProcessRunner(settings.stop_grace_s), nvml, True, inventory)
