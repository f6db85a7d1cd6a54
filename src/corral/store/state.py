"""The state store: short transactions over SQLite in WAL mode, returning domain values.

One writer at a time is all a control plane needs; WAL lets readers (the API, the CLI through
the API) run beside it, and every multi-row change (a deploy, a distribution) is one transaction,
so a crash never leaves half of it behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from corral.domain import labels as L
from corral.domain.adapters import Adapter
from corral.domain.errors import NotFound
from corral.domain.history import HistoryDraft, Intent, Outcome
from corral.domain.models import Deployment, Pod, PodPhase, Service
from corral.domain.sleep import SleepLevel, SleepState
from corral.domain.tenancy import WEIGHT_DEFAULT, ApiKey, AuthMode, Limits, ServiceAccess
from corral.paths import private_file
from corral.store.schema import (
    ApiKeyRow,
    AutopilotRow,
    Base,
    BusinessPolicyRow,
    DeploymentRow,
    DeploymentSecretRow,
    HistoryRow,
    PinRow,
    PoolAdapterRow,
    ReplicaRow,
    ServiceAccessRow,
    ServiceRoutingRow,
    ServiceRow,
)


def aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything Corral stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass(frozen=True)
class ReplicaRecord:
    """A replica as the local backend keeps it: the pod plus its process."""

    name: str
    deployment: str
    labels: Mapping[str, str]
    port: int
    log_path: str
    phase: PodPhase = PodPhase.PENDING
    ready: bool = False
    restarts: int = 0
    pid: int | None = None
    pid_start: str | None = None
    gpu_ids: tuple[int, ...] = ()
    created_at: datetime | None = None
    sleep_level: SleepLevel | None = None  # desired: asleep at this level (None: awake); domain/sleep.py
    sleep_state: SleepState = SleepState.AWAKE  # what the engine last reported

    def to_pod(self, host: str = "127.0.0.1") -> Pod:
        return Pod(
            name=self.name,
            deployment=self.deployment,
            labels=dict(self.labels),
            phase=self.phase,
            ready=self.ready,
            endpoint=f"http://{host}:{self.port}",
            restarts=self.restarts,
            created_at=self.created_at,
            gpu_ids=self.gpu_ids,
            sleep=self.sleep_state,
            sleep_level=self.sleep_level,
        )

    def replace(self, **changes: Any) -> ReplicaRecord:
        return dataclasses.replace(self, **changes)


def _deployment(row: DeploymentRow) -> Deployment:
    return Deployment(
        name=row.name, engine=row.engine, model_id=row.model_id, model_tag=row.model_tag, is_pool=row.is_pool,
        replicas=row.replicas, gpus_per_replica=row.gpus_per_replica, engine_args=tuple(row.engine_args or ()),
        created_at=aware(row.created_at), shared_gpus=bool(row.shared_gpus),
    )


def _replica(row: ReplicaRow) -> ReplicaRecord:
    return ReplicaRecord(
        name=row.name, deployment=row.deployment, labels=dict(row.labels), port=row.port, log_path=row.log_path,
        phase=PodPhase(row.phase), ready=row.ready, restarts=row.restarts, pid=row.pid, pid_start=row.pid_start,
        gpu_ids=tuple(row.gpu_ids or ()), created_at=aware(row.created_at),
        sleep_level=SleepLevel(row.sleep_level) if row.sleep_level else None,
        sleep_state=SleepState(row.sleep_state) if row.sleep_state else SleepState.AWAKE,
    )


def _service(row: ServiceRow) -> Service:
    return Service(
        name=row.name, model=row.model, selector=dict(row.selector), labels=dict(row.labels),
        is_external=row.is_external, deployment=row.deployment, created_at=aware(row.created_at),
    )


def _replica_columns(record: ReplicaRecord) -> dict[str, Any]:
    return {
        "name": record.name, "deployment": record.deployment, "labels": dict(record.labels), "port": record.port,
        "pid": record.pid, "pid_start": record.pid_start, "phase": record.phase.value, "ready": record.ready,
        "restarts": record.restarts, "gpu_ids": list(record.gpu_ids), "log_path": record.log_path,
        "created_at": record.created_at or datetime.now(timezone.utc),
        "sleep_level": int(record.sleep_level) if record.sleep_level else None, "sleep_state": record.sleep_state.value,
    }


def _add_new_columns(engine: Engine) -> None:
    """A database written by an older Corral lacks the columns added since: add them (all nullable
    or defaulted), so an upgrade keeps every deployment, replica and task. Columns are never dropped."""
    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=engine.dialect)
                    default = column.default.arg if column.default is not None and column.default.is_scalar else None
                    number = int(default) if isinstance(default, (bool, int)) else default
                    fill = f" DEFAULT {number!r}" if isinstance(number, (int, float)) else ""
                    connection.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}{fill}')


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):  # history and tasks: the owner's only
            private_file(path.parent / name)
        _add_new_columns(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.on_record: Callable[[dict[str, Any]], None] | None = None  # told of every history entry (→ `history` events)
        # The autopilot's desired state as last read (policies, pool settings, pins): read by every autopilot
        # tick for every pool and by every assignment, written seldom and only through this object (one
        # control plane per data directory), so a read is a copy of memory, and each write drops what it
        # changes.
        self._autopilot_reads: dict[str, Any] = {}

    def session(self) -> Session:
        return self._session.begin()  # type: ignore[return-value]

    def close(self) -> None:
        self.engine.dispose()

    # deployments -------------------------------------------------------------------------------
    def add_deployment(self, deployment: Deployment, replicas: Iterable[ReplicaRecord], service: Service | None,
                       intent: Intent | None = None) -> None:
        """The deployment, its replicas and (for a standard deployment) its service, all or nothing."""
        with self._intent(intent) as s:
            s.add(DeploymentRow(
                name=deployment.name, engine=deployment.engine, model_id=deployment.model_id,
                model_tag=deployment.model_tag, is_pool=deployment.is_pool, replicas=deployment.replicas,
                gpus_per_replica=deployment.gpus_per_replica, engine_args=list(deployment.engine_args),
                shared_gpus=deployment.shared_gpus,
            ))
            s.flush()
            s.add_all(ReplicaRow(**_replica_columns(r)) for r in replicas)
            if service is not None:
                s.add(_service_row(service))

    def get_deployment(self, name: str) -> Deployment | None:
        """A deployment being deleted is gone already, as far as readers are concerned."""
        with self.session() as s:
            row = s.get(DeploymentRow, name)
            return _deployment(row) if row and not row.deleting else None

    def list_deployments(self) -> list[Deployment]:
        query = select(DeploymentRow).where(DeploymentRow.deleting.is_(False)).order_by(DeploymentRow.name)
        with self.session() as s:
            return [_deployment(r) for r in s.scalars(query)]

    def deployments_being_deleted(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(DeploymentRow.name).where(DeploymentRow.deleting.is_(True))))

    def mark_deleting(self, name: str, intent: Intent | None = None) -> None:
        """The deployment and all its replicas leave service in one transaction; stopping follows."""
        with self._intent(intent) as s:
            s.get_one(DeploymentRow, name).deleting = True
            for row in s.scalars(select(ReplicaRow).where(ReplicaRow.deployment == name)):
                row.phase, row.ready = PodPhase.TERMINATING.value, False

    def sync_desired_replicas(self) -> None:
        """Make each deployment's desired count the replicas it keeps (a row marked Terminating by hand
        or by an older Corral, outside `retire_replicas`, leaves it behind)."""
        with self.session() as s:
            for name in list(s.scalars(select(DeploymentRow.name))):
                _set_desired(s, name)

    def delete_deployment(self, name: str) -> None:
        with self.session() as s:
            if (secrets := s.get(DeploymentSecretRow, name)) is not None:
                s.delete(secrets)
            for adapter in s.scalars(select(PoolAdapterRow).where(PoolAdapterRow.deployment == name)):
                s.delete(adapter)  # a pool re-created under this name starts without them
            for row in s.scalars(select(ReplicaRow).where(ReplicaRow.deployment == name)):
                s.delete(row)
            for row in s.scalars(select(ServiceRow).where(ServiceRow.deployment == name)):
                if not row.labels.get(L.SERVICE_TYPE) == L.BUSINESS_SERVICE:
                    s.delete(row)
            s.delete(s.get_one(DeploymentRow, name))

    # secret environment (`secretEnv` of a deploy) -------------------------------------------------
    def set_secret_env(self, deployment: str, env: Mapping[str, str]) -> None:
        """Keep (or, when empty, forget) the environment a deployment's replicas get as secrets."""
        with self.session() as s:
            row = s.get(DeploymentSecretRow, deployment)
            if env:
                if row is None:
                    s.add(DeploymentSecretRow(deployment=deployment, env=dict(env)))
                else:
                    row.env = dict(env)
            elif row is not None:
                s.delete(row)

    def secret_env(self, deployment: str) -> dict[str, str]:
        with self.session() as s:
            row = s.get(DeploymentSecretRow, deployment)
            return dict(row.env) if row is not None else {}

    def secret_env_names(self) -> dict[str, list[str]]:
        """deployment → the names (never the values) of its secret environment variables."""
        with self.session() as s:
            return {row.deployment: sorted(row.env) for row in s.scalars(select(DeploymentSecretRow))}

    # LoRA adapters of pools (desired state; corral.adapters loads them) ------------------------------
    def add_adapter(self, adapter: Adapter, intent: Intent | None = None) -> None:
        """The adapter and its pending history row, in one transaction."""
        with self._intent(intent) as s:
            s.add(PoolAdapterRow(deployment=adapter.pool, name=adapter.name, path=adapter.path, task_id=adapter.task_id,
                                 rank=adapter.rank))

    def remove_adapter(self, pool: str, name: str, intent: Intent | None = None) -> None:
        with self._intent(intent) as s:
            row = s.get(PoolAdapterRow, (pool, name))
            if row is not None:
                s.delete(row)

    def list_adapters(self, pool: str | None = None) -> list[Adapter]:
        query = select(PoolAdapterRow).order_by(PoolAdapterRow.deployment, PoolAdapterRow.name)
        if pool is not None:
            query = query.where(PoolAdapterRow.deployment == pool)
        with self.session() as s:
            return [Adapter(pool=r.deployment, name=r.name, path=r.path, task_id=r.task_id, rank=r.rank or 0)
                    for r in s.scalars(query)]

    # replicas ----------------------------------------------------------------------------------
    def add_replicas(self, deployment: str, records: Iterable[ReplicaRecord], intent: Intent | None = None) -> None:
        """New replicas and the deployment's desired count, in one transaction with the intent."""
        with self._intent(intent) as s:
            s.add_all(ReplicaRow(**_replica_columns(r)) for r in records)
            s.flush()
            _set_desired(s, deployment)

    def retire_replicas(self, deployment: str, names: Iterable[str], intent: Intent | None = None) -> None:
        """Mark replicas Terminating (out of service, to be stopped) and lower the desired count, at once."""
        with self._intent(intent) as s:
            for name in names:
                row = s.get_one(ReplicaRow, name)
                row.phase, row.ready = PodPhase.TERMINATING.value, False
            s.flush()
            _set_desired(s, deployment)

    def save_replica(self, record: ReplicaRecord) -> None:
        with self.session() as s:
            s.merge(ReplicaRow(**_replica_columns(record)))

    def update_replica(self, name: str, **columns: Any) -> None:
        """Set only the given process columns, so a status update never overwrites a concurrent relabel."""
        if "phase" in columns:
            columns["phase"] = PodPhase(columns["phase"]).value
        if "gpu_ids" in columns:
            columns["gpu_ids"] = list(columns["gpu_ids"])
        with self.session() as s:
            row = s.get(ReplicaRow, name)
            if row is None:  # deleted meanwhile: nothing to update
                return
            for key, value in columns.items():
                setattr(row, key, value)

    def set_sleep_intent(self, name: str, level: SleepLevel | None, intent: Intent) -> None:
        """A replica's desired sleep state and its pending history row, in one transaction (intent first: the engine
        is asked after). NotFound, with nothing written, when the replica is gone or being removed."""
        with self._intent(intent) as s:
            row = s.get(ReplicaRow, name)
            if row is None or row.phase == PodPhase.TERMINATING.value:
                raise NotFound(f"pod '{name}' not found (or being removed)")
            row.sleep_level = int(level) if level else None

    def delete_replica(self, name: str) -> None:
        with self.session() as s:
            row = s.get(ReplicaRow, name)
            if row is not None:
                s.delete(row)

    def get_replica(self, name: str) -> ReplicaRecord | None:
        with self.session() as s:
            row = s.get(ReplicaRow, name)
            return _replica(row) if row else None

    def list_replicas(self, deployment: str | None = None) -> list[ReplicaRecord]:
        query = select(ReplicaRow).order_by(ReplicaRow.name)
        if deployment is not None:
            query = query.where(ReplicaRow.deployment == deployment)
        with self.session() as s:
            return [_replica(r) for r in s.scalars(query)]

    def set_businesses(self, businesses: Mapping[str, str], intent: Intent | None = None) -> None:
        """Relabel several replicas in one transaction."""
        with self._intent(intent) as s:
            _relabel(s, businesses)

    # services ----------------------------------------------------------------------------------
    def add_service(self, service: Service, intent: Intent | None = None) -> None:
        with self._intent(intent) as s:
            s.add(_service_row(service))

    def get_service(self, name: str) -> Service | None:
        with self.session() as s:
            row = s.get(ServiceRow, name)
            return _service(row) if row else None

    def list_services(self) -> list[Service]:
        with self.session() as s:
            return [_service(r) for r in s.scalars(select(ServiceRow).order_by(ServiceRow.name))]

    def delete_service(self, name: str, unassign: Mapping[str, str] | None = None, intent: Intent | None = None) -> None:
        """Remove a service, and unassign the pods it would strand, in one transaction."""
        with self._intent(intent) as s:
            _relabel(s, unassign or {})
            s.delete(s.get_one(ServiceRow, name))

    # tenancy: who may call a business service, its keys (digests only) and quotas (corral.tenancy) ---------------
    # Read on every routing table build (every change): kept as last read until written, as the autopilot's reads.
    def set_access(self, access: ServiceAccess, intent: Intent | None = None) -> None:
        with self._changing("tenancy"), self._intent(intent) as s:
            s.merge(ServiceAccessRow(service=access.service, auth=access.auth.value, limits=access.limits.wire()))

    def access(self, service: str) -> ServiceAccess | None:
        return self.tenancy()[0].get(service)

    def tenancy(self) -> tuple[dict[str, ServiceAccess], list[ApiKey]]:
        """Every service's access row and every key (digests, never keys), oldest key first."""
        read = self._autopilot_reads.get("tenancy")
        if read is None:
            query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
            with self.session() as s:
                read = self._autopilot_reads["tenancy"] = (
                    {r.service: _access(r) for r in s.scalars(select(ServiceAccessRow))},
                    [_api_key(r) for r in s.scalars(query)])
        return dict(read[0]), list(read[1])

    def add_api_key(self, key: ApiKey, intent: Intent | None = None) -> None:
        with self._changing("tenancy"), self._intent(intent) as s:
            s.add(ApiKeyRow(id=key.id, service=key.service, name=key.name, prefix=key.prefix, digest=key.digest,
                            limits=key.limits.wire(), expires_at=key.expires_at, weight=key.weight))

    def list_api_keys(self, service: str) -> list[ApiKey]:
        """A service's keys, with when each was last used (not cached: `keys_used` writes it often)."""
        query = select(ApiKeyRow).where(ApiKeyRow.service == service).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        with self.session() as s:
            return [_api_key(r) for r in s.scalars(query)]

    def update_api_key(self, service: str, key_id: str, *, intent: Intent | None = None, **fields: Any) -> None:
        """Change a key in place (its digest, prefix and creation stay): any of `name`, `expires_at`, `limits`
        (`Limits`, replaced whole) and `weight`; a field not given keeps its value. NotFound (nothing written, the
        intent's rows neither) when the service has no such key."""
        unknown = set(fields) - {"name", "expires_at", "limits", "weight"}
        if unknown:
            raise TypeError(f"update_api_key: unknown fields {sorted(unknown)}")
        with self._changing("tenancy"), self._intent(intent) as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.service != service:
                raise NotFound(f"key '{key_id}' of business service '{service}' not found")
            for name, value in fields.items():
                setattr(row, name, value.wire() if isinstance(value, Limits) else value)

    def revoke_api_key(self, service: str, key_id: str, intent: Intent | None = None) -> None:
        with self._changing("tenancy"), self._intent(intent) as s:
            row = s.get(ApiKeyRow, key_id)
            if row is not None and row.service == service:
                s.delete(row)

    def keys_used(self, last_used: Mapping[str, datetime]) -> None:
        """When each key (by id) was last used, as the data plane saw it (only forward; not part of any route)."""
        with self.session() as s:
            for key_id, when in last_used.items():
                row = s.get(ApiKeyRow, key_id)
                if row is not None and (row.last_used_at is None or aware(row.last_used_at) < when):  # type: ignore[operator]
                    row.last_used_at = when

    def forget_tenancy(self, service: str) -> None:
        """A deleted service's access and keys go with it (a service re-created under its name starts without)."""
        with self._changing("tenancy"), self.session() as s:
            if (row := s.get(ServiceAccessRow, service)) is not None:
                s.delete(row)
            for key in s.scalars(select(ApiKeyRow).where(ApiKeyRow.service == service)):
                s.delete(key)

    # autopilot: policies, pool settings, pins -----------------------------------------------------
    def set_policy(self, service: str, policy: Mapping[str, Any], history: HistoryDraft) -> None:
        """A business's policy and its history row, in one transaction (the desired state of the autopilot)."""
        with self._changing("policies"), self._applied([history]) as s:
            s.merge(BusinessPolicyRow(service=service, policy=dict(policy)))

    def policies(self) -> dict[str, dict[str, Any]]:
        read = self._autopilot_reads.get("policies")
        if read is None:
            with self.session() as s:
                read = self._autopilot_reads["policies"] = {r.service: dict(r.policy)
                                                            for r in s.scalars(select(BusinessPolicyRow))}
        return {service: dict(policy) for service, policy in read.items()}  # copies: callers may alter theirs

    def set_routing(self, service: str, routing: Mapping[str, Any], history: HistoryDraft) -> None:
        """A business service's replica picking and its history row, in one transaction."""
        with self._changing("routings"), self._applied([history]) as s:
            s.merge(ServiceRoutingRow(service=service, routing=dict(routing)))

    def routings(self) -> dict[str, dict[str, Any]]:
        """Service → its routing (wire form); read once until changed (the routing table is built on every change)."""
        read = self._autopilot_reads.get("routings")
        if read is None:
            with self.session() as s:
                read = self._autopilot_reads["routings"] = {r.service: dict(r.routing)
                                                            for r in s.scalars(select(ServiceRoutingRow))}
        return {service: dict(routing) for service, routing in read.items()}

    def set_autopilot(self, pool: str, settings: Mapping[str, Any], history: HistoryDraft) -> None:
        with self._changing("autopilots"), self._applied([history]) as s:
            s.merge(AutopilotRow(pool=pool, settings=dict(settings)))

    def autopilots(self) -> dict[str, dict[str, Any]]:
        read = self._autopilot_reads.get("autopilots")
        if read is None:
            with self.session() as s:
                rows = s.scalars(select(AutopilotRow))
                read = self._autopilot_reads["autopilots"] = {r.pool: dict(r.settings) for r in rows}
        return {pool: dict(settings) for pool, settings in read.items()}

    def set_pins(self, pool: str, pods: Iterable[str], pinned: bool, history: HistoryDraft | None = None) -> None:
        with self._changing("pins"), self._applied([history] if history is not None else []) as s:
            for pod in pods:
                if pinned:
                    s.merge(PinRow(pod=pod, pool=pool))
                elif (row := s.get(PinRow, pod)) is not None:
                    s.delete(row)

    def pins(self) -> set[str]:
        read = self._autopilot_reads.get("pins")
        if read is None:
            with self.session() as s:
                read = self._autopilot_reads["pins"] = frozenset(s.scalars(select(PinRow.pod)))
        return set(read)

    def forget_pins(self, keep: Iterable[str]) -> None:
        """Pins of replicas that no longer exist (replaced, scaled away) are dropped (every autopilot tick
        asks: nothing is written, or even read from the database, while every pinned replica lives)."""
        alive = set(keep)
        if self.pins() <= alive:
            return
        with self._changing("pins"), self.session() as s:
            for row in s.scalars(select(PinRow)):
                if row.pod not in alive:
                    s.delete(row)

    @contextmanager
    def _changing(self, *reads: str) -> Iterator[None]:
        """A write to the tables behind these reads: what was read of them is dropped before and after (the
        write failed or not), so the next read sees the database."""
        for name in reads:
            self._autopilot_reads.pop(name, None)
        try:
            yield
        finally:
            for name in reads:
                self._autopilot_reads.pop(name, None)

    def forget_autopilot(self, *, pool: str | None = None, service: str | None = None) -> None:
        """A deleted pool's settings and pins, or a deleted service's policy and routing."""
        with self._changing("autopilots", "pins", "policies", "routings"), self.session() as s:
            if pool is not None:
                if (row := s.get(AutopilotRow, pool)) is not None:
                    s.delete(row)
                for pin in s.scalars(select(PinRow).where(PinRow.pool == pool)):
                    s.delete(pin)
            if service is not None and (policy := s.get(BusinessPolicyRow, service)) is not None:
                s.delete(policy)
            if service is not None and (routing := s.get(ServiceRoutingRow, service)) is not None:
                s.delete(routing)

    # history -----------------------------------------------------------------------------------
    # Written one way (`_writing_history`): with a desired state (the `intent=`/`history=` of the methods
    # above), or alone through the public methods below, which only `corral.intents` calls (it owns every
    # change's bookkeeping).
    @contextmanager
    def _writing_history(self, drafts: Sequence[HistoryDraft], outcome: Outcome
                         ) -> Iterator[tuple[Session, list[dict[str, Any]]]]:
        """The one way history rows are written: `drafts` as rows of `outcome` (`pending` for an intent,
        a final outcome for a change applied at once), in one transaction with whatever the block writes
        (the desired state they record), so the two never disagree. The rows' entries fill the yielded
        list once flushed, and are announced (`on_record`) once committed."""
        entries: list[dict[str, Any]] = []
        with self.session() as s:
            rows = [HistoryRow(action=str(d.action), target=d.target, before=d.before, after=d.after,
                               outcome=outcome.value, message=d.message) for d in drafts]
            s.add_all(rows)
            yield s, entries
            s.flush()
            entries.extend(_entry(r) for r in rows)
        self._announce(entries)

    @contextmanager
    def _intent(self, intent: Intent | None) -> Iterator[Session]:
        """A change's desired state and its pending rows (`intent.ids` once written), in one transaction."""
        drafts = intent.rows if intent is not None else ()
        with self._writing_history(drafts, Outcome.PENDING) as (s, entries):
            yield s
        if intent is not None:
            intent.ids = [e["id"] for e in entries]

    @contextmanager
    def _applied(self, drafts: Sequence[HistoryDraft]) -> Iterator[Session]:
        """A setting applied at once (not a process to drive): its rows are `success` with it."""
        with self._writing_history(drafts, Outcome.SUCCESS) as (s, _):
            yield s

    def begin(self, intent: Intent) -> None:
        """An intent's pending rows alone (its desired state is not in this database: a cluster, memory)."""
        with self._intent(intent):
            pass

    def record_applied(self, draft: HistoryDraft, outcome: Outcome = Outcome.SUCCESS) -> dict[str, Any]:
        """One row of a change that is over as it is written (an observation, a refusal): its entry."""
        with self._writing_history([draft], outcome) as (_, entries):
            pass
        return entries[0]

    def complete_rows(self, ids: Sequence[int], outcome: Outcome, message: str | None = None,
                      after: Any = None) -> None:
        """Close pending rows with `outcome`; `message`/`after` replace the last row's (a change's summary,
        completed last so that it is the newest row of the change, as listings show it). Rows completed
        already (e.g. rolled back before the change's block ended) stay as they are."""
        if not ids:
            return
        with self.session() as s:
            found = {row.id: row for row in s.scalars(select(HistoryRow).where(HistoryRow.id.in_(ids)))}
            rows = [found[i] for i in ids]
            if rows[-1].outcome != Outcome.PENDING:
                return
            for row in rows:
                if row.outcome == Outcome.PENDING:
                    row.outcome = outcome.value
            if message is not None:
                rows[-1].message = message
            if after is not None:
                rows[-1].after = after
            s.flush()
            entries = [_entry(r) for r in rows]
        self._announce(entries)

    def pending_history(self) -> list[dict[str, Any]]:
        query = select(HistoryRow).where(HistoryRow.outcome == Outcome.PENDING.value).order_by(HistoryRow.id)
        with self.session() as s:
            return [_entry(r) for r in s.scalars(query)]

    def _announce(self, entries: list[dict[str, Any]]) -> None:
        if self.on_record is not None:
            for entry in entries:
                self.on_record(entry)

    def history(self, *, action: str | None = None, target: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        query = select(HistoryRow).order_by(HistoryRow.id.desc()).limit(limit)
        if action:
            query = query.where(HistoryRow.action == action)
        if target:
            query = query.where(HistoryRow.target == target)
        with self.session() as s:
            return [_entry(r) for r in s.scalars(query)]


def _relabel(s: Session, businesses: Mapping[str, str]) -> None:
    for name, business in businesses.items():
        row = s.get_one(ReplicaRow, name)
        row.labels = {**row.labels, L.BUSINESS: business}


def _set_desired(s: Session, deployment: str) -> None:
    """A deployment's desired count is its replicas that are not being removed."""
    live = select(ReplicaRow.name).where(ReplicaRow.deployment == deployment, ReplicaRow.phase != PodPhase.TERMINATING.value)
    s.get_one(DeploymentRow, deployment).replicas = len(list(s.scalars(live)))


def _access(row: ServiceAccessRow) -> ServiceAccess:
    return ServiceAccess(service=row.service, auth=AuthMode(row.auth), limits=Limits.from_wire(row.limits))


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(id=row.id, service=row.service, prefix=row.prefix, digest=row.digest, name=row.name,
                  limits=Limits.from_wire(row.limits), created_at=aware(row.created_at), expires_at=aware(row.expires_at),
                  last_used_at=aware(row.last_used_at),
                  weight=row.weight if row.weight is not None else WEIGHT_DEFAULT)  # NULL: a row older than weights


def _service_row(service: Service) -> ServiceRow:
    return ServiceRow(
        name=service.name, model=service.model, selector=dict(service.selector), labels=dict(service.labels),
        is_external=service.is_external, deployment=service.deployment,
    )


def _entry(row: HistoryRow) -> dict[str, Any]:
    return {
        "id": row.id, "timestamp": aware(row.timestamp).isoformat(), "action": row.action, "target": row.target,
        "before": row.before, "after": row.after, "outcome": row.outcome, "message": row.message,
    }


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
