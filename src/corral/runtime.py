"""The running control plane: one store, one event bus, one backend, one gateway, one controller.

The API server and the gateway server share this object in one process, so the routing table is
updated in memory, synchronously, by the same event that announces a change.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from corral.backends.base import Backend
from corral.backends.kubernetes import KubernetesBackend, client_from
from corral.backends.local import LocalBackend
from corral.config import Settings
from corral.controller import Controller
from corral.domain.memory import find_model
from corral.engines import get_engine
from corral.events import EventBus
from corral.finetune.manager import FinetuneManager
from corral.finetune.runners import JobRunner, ProcessRunner, TrainerRunner
from corral.finetune.store import ACTIVE
from corral.gateway import nginx_plane
from corral.gateway.nginx_plane import NginxGateway
from corral.gateway.policies import make_policy
from corral.gateway.proxy import Gateway
from corral.gateway.routing import build_routes
from corral.gpus.cluster import inventory_from_nodes
from corral.gpus.inventory import GpuInventory, read_inventory
from corral.store.state import StateStore

log = logging.getLogger("corral.runtime")
NOT_ROUTING_EVENTS = frozenset({"history", "finetune_task", "gpu_inventory"})


class Runtime:
    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.store = StateStore(settings.database_path)
        self.bus = EventBus()
        self.store.on_record = lambda entry: self.bus.publish("history", entry)
        self.catalogue = [find_model(name) for name in settings.recommend_catalogue]
        self.gpu_inventory: GpuInventory = read_inventory()
        self._gpu_task: asyncio.Task | None = None
        self.backend = backend or self._make_backend(settings)
        self.gateway = self._make_gateway(settings)
        self.backend.set_drain(self.gateway.drain)
        self.controller = Controller(self.backend, self.store, self.bus, base_url=self.service_base_url,
                                     traffic=self.gateway.stats.replica_summary)
        self.bus.listen(self._on_event)
        self.finetune = FinetuneManager(
            settings, self.store, self.bus, inventory=self._fresh_inventory,
            replica_gpus=lambda: {str(g) for g in self.backend.gpus_in_use()}, controller=self.controller,
            runner=self._make_runner(settings),
        )
        if isinstance(self.backend, LocalBackend):  # one GPU ledger: replicas never get a training task's GPU
            self.backend.gpus_held_elsewhere = lambda: [int(u) for t in self.finetune.tasks.list(ACTIVE) for u in t.units
                                                        if u.isdigit()]

    def _make_backend(self, settings: Settings) -> Backend:
        if settings.backend == "kubernetes":
            return KubernetesBackend(client_from(settings.kubeconfig, settings.kubernetes_namespace), settings.cluster_options(),
                                     self.store, self.bus.publish, settings.manifests_dir)
        return LocalBackend(settings, self.store, self.bus.publish, gpu_ids=[d.index for d in self.gpu_inventory.devices])

    def _make_runner(self, settings: Settings) -> TrainerRunner:
        if isinstance(self.backend, KubernetesBackend):
            return JobRunner(self.backend, settings.kubernetes_trainer_image, settings.data_dir.resolve(),
                             settings.kubernetes_data_claim, settings.kueue_queue)
        return ProcessRunner(settings.stop_grace_s)

    def _make_gateway(self, settings: Settings) -> Gateway | NginxGateway:
        choice = settings.gateway_data_plane
        missing = nginx_plane.missing_parts()
        if choice == "nginx" and missing:
            raise RuntimeError("the nginx data plane needs: " + ", ".join(missing))
        if choice == "nginx" or (choice == "auto" and not missing):
            self.data_plane = "nginx"
            return NginxGateway(settings.data_dir / "gateway", settings.host, settings.gateway_port,
                                connect_timeout_s=settings.gateway_connect_timeout_s,
                                read_timeout_s=settings.gateway_read_timeout_s, drain_timeout_s=settings.drain_timeout_s,
                                workers=settings.gateway_workers)
        self.data_plane = "python"
        return Gateway(make_policy(settings.gateway_policy), connect_timeout_s=settings.gateway_connect_timeout_s,
                       read_timeout_s=settings.gateway_read_timeout_s, health_path=self._health_path)

    async def start(self) -> None:
        await self.backend.start()
        if isinstance(self.backend, KubernetesBackend):  # the cluster's GPUs, not this machine's
            self.gpu_inventory = await self._read_inventory()
        self.refresh_routes()
        self.gateway.start()
        await self.finetune.start()
        if self.gpu_inventory.available or isinstance(self.backend, KubernetesBackend):  # without a driver there is nothing to watch
            self._gpu_task = asyncio.create_task(self._watch_gpus(), name="gpu-inventory")

    async def close(self) -> None:
        if self._gpu_task:
            self._gpu_task.cancel()
        await self.finetune.close()
        await self.gateway.close()
        await self.backend.close()
        self.store.close()

    async def _read_inventory(self) -> GpuInventory:
        if isinstance(self.backend, KubernetesBackend):
            return inventory_from_nodes(await self.backend.nodes(), self.settings.kubernetes_gpu_resource)
        return await asyncio.to_thread(read_inventory)

    def _fresh_inventory(self) -> GpuInventory:
        """A new NVML read (free memory as of now) where there are GPUs; nothing to re-read without."""
        if isinstance(self.backend, KubernetesBackend):  # re-read from the nodes by the watcher
            return self.gpu_inventory
        return read_inventory() if self.gpu_inventory.available else self.gpu_inventory

    async def _watch_gpus(self) -> None:
        """Re-read NVML periodically; publish `gpu_inventory` when something changed."""
        from corral.api.system import gpu_info

        while True:
            await asyncio.sleep(self.settings.gpu_refresh_s)
            inventory = await self._read_inventory()
            if inventory != self.gpu_inventory:
                self.gpu_inventory = inventory
                self.bus.publish("gpu_inventory", gpu_info(inventory, self.catalogue))

    def service_base_url(self, service: str) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        return f"http://{host}:{self.settings.gateway_port}/s/{service}/v1"

    def refresh_routes(self) -> None:
        try:
            self.gateway.set_table(build_routes(self.backend.list_services(), self.backend.list_pods()))
        except Exception:  # the change itself is applied and recorded; the data plane catches up on the next event
            log.exception("could not update the gateway's routing table")

    def _on_event(self, type_: str, data: dict[str, Any]) -> None:
        # Every serving event may change which replicas a service selects (labels, readiness, services).
        if type_ not in NOT_ROUTING_EVENTS:
            self.refresh_routes()

    def _health_path(self, replica: str) -> str:
        pod = self.backend.get_pod(replica)
        deployment = self.backend.get_deployment(pod.deployment) if pod else None
        return get_engine(deployment.engine).health_path if deployment else "/health"
