"""LocalBackend: Kubernetes objects mapped onto one machine.

Deployment → rows + engine processes; pod → a process with its own port and labels; label patch
→ one SQLite transaction; Service → a row whose selector the gateway evaluates. GPUs are whole
devices handed to replicas through `CUDA_VISIBLE_DEVICES`, never to two replicas at once.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from collections.abc import Callable, Mapping
from pathlib import Path

from corral.backends.base import Backend, EventSink, save_manifests
from corral.backends.local import process
from corral.backends.local.supervisor import ReplicaSupervisor
from corral.config import Settings
from corral.domain.errors import Conflict, InvalidInput
from corral.domain.gpu_fit import pick_gpus
from corral.domain.models import Deployment, Pod, PodPhase, Service
from corral.engines import get_engine
from corral.gpus.inventory import read_inventory
from corral.store.state import ReplicaRecord, StateStore

_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


class LocalBackend(Backend):
    def __init__(self, settings: Settings, store: StateStore, emit: EventSink, gpu_ids: list[int] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.gpu_ids = [g.index for g in read_inventory().devices] if gpu_ids is None else gpu_ids
        self.supervisor = ReplicaSupervisor(settings, store, emit)
        # GPUs this backend must not hand out: the runtime points it at running finetune tasks.
        self.gpus_held_elsewhere: Callable[[], list[int]] = list

    def set_drain(self, drain) -> None:  # type: ignore[no-untyped-def]
        self.supervisor.drain = drain

    async def start(self) -> None:
        await self.supervisor.recover()
        for name in self.store.deployments_being_deleted():
            await (await self.delete_deployment(name))
        self.store.sync_desired_replicas()
        self.supervisor.start()

    async def close(self) -> None:
        await self.supervisor.close()

    # reads -----------------------------------------------------------------------------------
    def list_deployments(self) -> list[Deployment]:
        return self.store.list_deployments()

    def get_deployment(self, name: str) -> Deployment | None:
        return self.store.get_deployment(name)

    def list_pods(self, deployment: str | None = None) -> list[Pod]:
        return [r.to_pod() for r in self.store.list_replicas(deployment) if r.phase != PodPhase.TERMINATING]

    def gpus_in_use(self) -> set[int]:
        return {g for record in self.store.list_replicas() for g in record.gpu_ids}  # Terminating rows too

    def get_pod(self, name: str) -> Pod | None:
        record = self.store.get_replica(name)
        return record.to_pod() if record and record.phase != PodPhase.TERMINATING else None

    def list_services(self) -> list[Service]:
        return self.store.list_services()

    def get_service(self, name: str) -> Service | None:
        return self.store.get_service(name)

    # writes ----------------------------------------------------------------------------------
    async def create_deployment(self, deployment: Deployment, service: Service | None) -> list[Pod]:
        get_engine(deployment.engine).check_installed()
        if deployment.name in self.store.deployments_being_deleted():
            raise Conflict(f"deployment '{deployment.name}' is still being deleted; try again once its replicas have stopped")
        records = self._new_records(deployment, deployment.replicas)
        self.store.add_deployment(deployment, records, service)
        try:
            return self._launch_all(records)
        except Conflict:
            await (await self.delete_deployment(deployment.name))
            raise

    async def delete_deployment(self, name: str) -> asyncio.Task:
        """Gone for readers at once; replicas drain and stop in the background, then the rows go."""
        self.store.mark_deleting(name)
        return self.supervisor.retire(self.store.list_replicas(name), then=lambda: self.store.delete_deployment(name))

    async def add_replicas(self, deployment: str, count: int) -> list[Pod]:
        spec = self.store.get_deployment(deployment)
        assert spec is not None
        records = self._new_records(spec, count)
        for record in records:
            self.store.add_replica(record)
        self.store.set_desired_replicas(deployment, len(self.store.list_replicas(deployment)))
        try:
            return self._launch_all(records)
        except Conflict:
            await (await self.remove_replicas(deployment, [r.name for r in records]))
            raise

    async def remove_replicas(self, deployment: str, pods: list[str]) -> asyncio.Task:
        records = [r for r in self.store.list_replicas(deployment) if r.name in set(pods)]
        remaining = len(self.store.list_replicas(deployment)) - len(records)
        self.store.set_desired_replicas(deployment, remaining)
        return self.supervisor.retire(records)

    async def set_businesses(self, businesses: Mapping[str, str]) -> None:
        self.store.set_businesses(businesses)

    async def create_service(self, service: Service) -> None:
        if service.llm_routing:
            raise InvalidInput("llmRouting (a vllm-router beside the business service) needs the kubernetes backend; "
                               "on one machine Corral's gateway balances each business's replicas by outstanding requests")
        self.store.add_service(service)

    async def delete_service(self, name: str) -> None:
        self.store.delete_service(name)

    async def pod_logs(self, name: str, tail: int) -> str | None:
        record = self.store.get_replica(name)
        if record is None:
            return None
        return process.tail_lines(Path(record.log_path), tail)

    def write_manifests(self, name: str, documents: list[dict]) -> str:
        return save_manifests(self.settings.manifests_dir, name, documents)

    # helpers ---------------------------------------------------------------------------------
    def _new_records(self, deployment: Deployment, count: int) -> list[ReplicaRecord]:
        existing = self.store.list_replicas()
        taken_names = {r.name for r in existing}
        taken_ports = {r.port for r in existing}
        held_gpus = [g for r in existing for g in r.gpu_ids] + list(self.gpus_held_elsewhere())
        records = []
        for _ in range(count):
            name = _replica_name(deployment.name, taken_names)
            port = process.free_port()
            while port in taken_ports:
                port = process.free_port()
            gpus = pick_gpus(self.gpu_ids, held_gpus, deployment.gpus_per_replica, f"replica {name} of {deployment.name}")
            taken_names.add(name)
            taken_ports.add(port)
            held_gpus.extend(gpus)
            records.append(
                ReplicaRecord(
                    name=name, deployment=deployment.name, labels=deployment.new_pod_labels(), port=port,
                    log_path=str(self.settings.logs_dir / "replicas" / f"{name}.log"), gpu_ids=gpus,
                )
            )
        return records

    def _launch_all(self, records: list[ReplicaRecord]) -> list[Pod]:
        try:
            return [self.supervisor.launch(r).to_pod() for r in records]
        except OSError as exc:  # e.g. the engine executable vanished: leave nothing half-created
            raise Conflict(f"could not start replica process: {exc}") from exc


def _replica_name(deployment: str, taken: set[str]) -> str:
    while True:
        name = f"{deployment}-{''.join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5))}"
        if name not in taken:
            return name
