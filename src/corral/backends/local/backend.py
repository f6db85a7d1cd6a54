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

from corral import failpoints
from corral.backends.base import Backend, Report, save_manifests
from corral.backends.local import process
from corral.backends.local.supervisor import ReplicaSupervisor
from corral.config import Settings
from corral.domain.errors import Conflict, InvalidInput
from corral.domain.gpu_ledger import GpuClaim, GpuLedger, Holder, whole_units
from corral.domain.history import Intent
from corral.domain.models import Deployment, Pod, PodPhase, Service
from corral.engines import get_engine
from corral.gpus.inventory import read_inventory
from corral.store.state import ReplicaRecord, StateStore

_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


class LocalBackend(Backend):
    supports_secret_env = True  # the supervisor launches each replica with its deployment's secretEnv
    supports_sleep = True  # replica rows keep each replica's desired sleep state (corral.sleeping)

    def __init__(self, settings: Settings, store: StateStore, report: Report, gpu_ids: list[int] | None = None,
                 gpu_ledger: Callable[[], GpuLedger] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.report = report
        self.gpu_ids = [g.index for g in read_inventory().devices] if gpu_ids is None else gpu_ids
        self.supervisor = ReplicaSupervisor(settings, store, lambda *args, **kw: self.report(*args, **kw))
        # The GPU ledger replicas are placed against: the platform gives the one it shares with the finetune
        # manager (so no task's GPU or MIG slice is reused); on its own, these devices and its replicas.
        self.gpu_ledger: Callable[[], GpuLedger] = gpu_ledger or (lambda: GpuLedger.build(whole_units(self.gpu_ids),
                                                                                          self.gpu_claims()))

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

    def gpu_claims(self) -> list[GpuClaim]:
        """Terminating replicas included: their memory is not free until their process has exited. A replica of a
        sharedGpus pool claims its unit shared, with its sleep state and its weights' size (gpu_ledger)."""
        deployments = {d.name: d for d in self.store.list_deployments()}
        claims = []
        for r in self.store.list_replicas():
            if not r.gpu_ids:
                continue
            deployment = deployments.get(r.deployment)
            shared = deployment is not None and deployment.shared_gpus
            claims.append(GpuClaim(Holder.replica(r.name), tuple(str(g) for g in r.gpu_ids), shared=shared,
                                   sleeping=r.sleep_level if shared else None,
                                   host_bytes=weights_bytes(deployment) if shared and deployment else 0.0))
        return claims

    def get_pod(self, name: str) -> Pod | None:
        record = self.store.get_replica(name)
        return record.to_pod() if record and record.phase != PodPhase.TERMINATING else None

    def list_services(self) -> list[Service]:
        return self.store.list_services()

    def get_service(self, name: str) -> Service | None:
        return self.store.get_service(name)

    # writes ----------------------------------------------------------------------------------
    async def create_deployment(self, deployment: Deployment, service: Service | None, intent: Intent | None = None) -> list[Pod]:
        get_engine(deployment.engine).check_installed()
        if deployment.name in self.store.deployments_being_deleted():
            raise Conflict(f"deployment '{deployment.name}' is still being deleted; try again once its replicas have stopped")
        records = self._new_records(deployment, deployment.replicas)
        self.store.add_deployment(deployment, records, service, intent)
        failpoints.reached("deploy.intent-recorded")
        try:
            return self._launch_all(records)
        except Conflict:
            await (await self.delete_deployment(deployment.name))
            raise

    async def delete_deployment(self, name: str, intent: Intent | None = None) -> asyncio.Task:
        """Gone for readers at once; replicas drain and stop in the background, then the rows go."""
        records = self.store.list_replicas(name)
        self.store.mark_deleting(name, intent)
        return self.supervisor.retire(records, then=lambda: self.store.delete_deployment(name))

    async def add_replicas(self, deployment: str, count: int, intent: Intent | None = None) -> list[Pod]:
        spec = self.store.get_deployment(deployment)
        assert spec is not None
        records = self._new_records(spec, count)
        self.store.add_replicas(deployment, records, intent)
        try:
            return self._launch_all(records)
        except Conflict:
            await (await self.remove_replicas(deployment, [r.name for r in records]))
            raise

    async def remove_replicas(self, deployment: str, pods: list[str], intent: Intent | None = None) -> asyncio.Task:
        records = [r for r in self.store.list_replicas(deployment) if r.name in set(pods)]
        self.store.retire_replicas(deployment, [r.name for r in records], intent)
        return self.supervisor.retire(records)

    async def set_businesses(self, businesses: Mapping[str, str], intent: Intent | None = None) -> None:
        self.store.set_businesses(businesses, intent)

    async def create_service(self, service: Service, intent: Intent | None = None) -> None:
        if service.llm_routing:
            raise InvalidInput("llmRouting (a vllm-router beside the business service) needs the kubernetes backend; "
                               "on one machine Corral's gateway balances each business's replicas by outstanding requests")
        self.store.add_service(service, intent)

    async def delete_service(self, name: str, unassign: Mapping[str, str] | None = None, intent: Intent | None = None) -> None:
        self.store.delete_service(name, unassign, intent)

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
        ledger = self.gpu_ledger()
        records = []
        for _ in range(count):
            name = _replica_name(deployment.name, taken_names)
            port = process.free_port()
            while port in taken_ports:
                port = process.free_port()
            # A replica holds whole devices only (CUDA_VISIBLE_DEVICES by index; `Pod.gpu_ids` are ints).
            who = f"replica {name} of {deployment.name}"
            if deployment.shared_gpus and deployment.gpus_per_replica:
                # A free unit first, else one whose replicas all sleep (gpu_ledger.place_shared): it starts awake there.
                units = ledger.place_shared(Holder.replica(name), deployment.gpus_per_replica,
                                            host_bytes=weights_bytes(deployment), who=who)
                ledger = ledger.hold_shared(Holder.replica(name), units, host_bytes=weights_bytes(deployment))
            else:
                ledger, units = ledger.claim(Holder.replica(name), deployment.gpus_per_replica, whole_only=True, who=who)
            gpus = tuple(int(u) for u in units)
            taken_names.add(name)
            taken_ports.add(port)
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


def weights_bytes(deployment: Deployment) -> float:
    """The weights' size a level-1 sleep keeps in host memory, for the host budget: the simulator's `--weights-gb`;
    0 (not counted) for real engines until Corral estimates a model's weights (an integrator's follow-up)."""
    args = list(deployment.engine_args)
    for i, arg in enumerate(args):
        value = arg.partition("=")[2] if arg.startswith("--weights-gb=") else (
            args[i + 1] if arg == "--weights-gb" and i + 1 < len(args) else None)
        if value is not None:
            try:
                return max(0.0, float(value)) * 1024**3
            except ValueError:
                return 0.0
    return 0.0


def _replica_name(deployment: str, taken: set[str]) -> str:
    while True:
        name = f"{deployment}-{''.join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5))}"
        if name not in taken:
            return name
