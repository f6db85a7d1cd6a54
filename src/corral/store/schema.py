"""Tables. JSON columns hold label maps and argument lists, exactly as the API shows them."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class DeploymentRow(Base):
    __tablename__ = "deployments"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    engine: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str] = mapped_column(Text)
    model_tag: Mapped[str] = mapped_column(String(63), index=True)
    is_pool: Mapped[bool] = mapped_column(Boolean)
    replicas: Mapped[int] = mapped_column(Integer)
    gpus_per_replica: Mapped[int] = mapped_column(Integer, default=0)
    engine_args: Mapped[list] = mapped_column(JSON, default=list)
    # Set before a deletion starts; a control plane that crashed half-way finishes it on start.
    deleting: Mapped[bool] = mapped_column(Boolean, default=False)
    # `sharedGpus`: its replicas may share GPU units with other shared pools' sleeping replicas (issue 31).
    shared_gpus: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeploymentSecretRow(Base):
    """A deployment's `secretEnv` (name → value), given to its replicas as environment. Kept apart from the
    deployment's row, never in a view, a history row, an event or a log: only the names are ever shown."""

    __tablename__ = "deployment_secrets"
    deployment: Mapped[str] = mapped_column(String(63), primary_key=True)
    env: Mapped[dict] = mapped_column(JSON, default=dict)


class ReplicaRow(Base):
    __tablename__ = "replicas"
    name: Mapped[str] = mapped_column(String(80), primary_key=True)
    deployment: Mapped[str] = mapped_column(ForeignKey("deployments.name"), index=True)
    labels: Mapped[dict] = mapped_column(JSON)
    port: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The process start time (from /proc) tells our process from a later one that reused its pid.
    pid_start: Mapped[str | None] = mapped_column(String(32), nullable=True)
    phase: Mapped[str] = mapped_column(String(32))
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    gpu_ids: Mapped[list] = mapped_column(JSON, default=list)
    log_path: Mapped[str] = mapped_column(Text)
    # Sleep mode (domain/sleep.py). `sleep_level`: the desired state, written with its history row before the
    # engine is asked (null: awake); `sleep_state`: what the engine last reported (awake, sleeping, waking).
    sleep_level: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sleep_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ServiceRow(Base):
    __tablename__ = "services"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    model: Mapped[str] = mapped_column(String(63), index=True)
    selector: Mapped[dict] = mapped_column(JSON)
    labels: Mapped[dict] = mapped_column(JSON)
    is_external: Mapped[bool] = mapped_column(Boolean, default=False)
    deployment: Mapped[str | None] = mapped_column(String(63), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PoolAdapterRow(Base):
    """A LoRA adapter a running vLLM pool should serve (desired state; `corral.adapters` loads it on every ready
    replica). Deleted with its pool."""

    __tablename__ = "pool_adapters"
    deployment: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rank: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HistoryRow(Base):
    __tablename__ = "history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str] = mapped_column(String(80), index=True)
    before: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")


class FinetuneTaskRow(Base):
    __tablename__ = "finetune_tasks"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str] = mapped_column(Text)
    dataset_path: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(8))
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_gb: Mapped[float] = mapped_column(default=0.0)
    timeout_s: Mapped[float] = mapped_column(default=6 * 3600.0)
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    units: Mapped[list] = mapped_column(JSON, default=list)  # GPU unit ids held while running
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_start: Mapped[str | None] = mapped_column(String(32), nullable=True)
    bypassed: Mapped[int] = mapped_column(Integer, default=0)
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    # pool → unassigned replicas scaled in for this task, to be restored when it ends (NULL: none)
    reclaimed: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # May a higher-priority business's replica take its GPUs (it checkpoints, waits, resumes)?
    preemptible: Mapped[bool] = mapped_column(Boolean, default=True)
    # Set before the trainer is signalled (the intent): {"business", "priority", "pool"}; cleared when it starts again.
    preempted_by: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # A mix's sources (`datasets`: path, ratio, examples, taken); NULL: the one datasetPath.
    datasets: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # easy-backfill: while it waits with GPUs reserved, the start promised to it (kept between rounds, domain.queue)
    promised_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The business its GPU-seconds are billed to (NULL: none, billed under `(finetune)`)
    business_tag: Mapped[str | None] = mapped_column(String(63), nullable=True)
    # Every run: [{"startedAt", "endedAt", "gpus"}] (endedAt NULL while it runs; corral.domain.usage.runs_after), written
    # with the status change that opens or closes it. NULL: a task written before runs were recorded.
    runs: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ServiceRoutingRow(Base):
    """A business service's replica picking (`corral.domain.replica_picking.Routing`, in its wire form); absent:
    least-load. Apart from the service, which a backend stores (SQLite here, a Service object on Kubernetes)."""

    __tablename__ = "service_routing"
    service: Mapped[str] = mapped_column(String(63), primary_key=True)
    routing: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class BusinessPolicyRow(Base):
    """A business service's autopilot policy, in its wire form (`corral.api.schemas.BusinessPolicyBody`)."""

    __tablename__ = "business_policies"
    service: Mapped[str] = mapped_column(String(63), primary_key=True)
    policy: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class AutopilotRow(Base):
    """A pool's autopilot settings, in their wire form (`corral.api.schemas.AutopilotSettingsBody`)."""

    __tablename__ = "autopilot_settings"
    pool: Mapped[str] = mapped_column(String(63), primary_key=True)
    settings: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class PinRow(Base):
    """A replica a person placed by hand while the autopilot was on: the autopilot leaves it there."""

    __tablename__ = "pins"
    pod: Mapped[str] = mapped_column(String(80), primary_key=True)
    pool: Mapped[str] = mapped_column(String(63), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UsageHourlyRow(Base):
    """Traffic a business (and key) sent in one hour, added to at each metering flush (corral.metering). GPU-seconds
    are not stored: they are integrated from the history's assignment rows when asked (corral.domain.usage)."""

    __tablename__ = "usage_hourly"
    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    business: Mapped[str] = mapped_column(String(63), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True, default="")  # "": no key
    requests: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    held: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)


class UsageCursorRow(Base):
    """The data plane's counters as last flushed into `usage_hourly`, and the plane's run (epoch) they belong to:
    written in the same transaction as the rows, so a flush after a restart adds only what is new."""

    __tablename__ = "usage_cursor"
    plane: Mapped[str] = mapped_column(String(16), primary_key=True)
    epoch: Mapped[str] = mapped_column(String(80))
    counters: Mapped[list] = mapped_column(JSON, default=list)  # [[service, key id, [counts...]], ...]
    flushed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ServiceAccessRow(Base):
    """Who may call a business service (`auth`: `corral.domain.tenancy.AuthMode`) and its quotas (`limits`, in their
    wire form). A service without a row is open: every service created before keys existed keeps serving as it did.
    A table of its own, not columns of `services`: a service may live in a cluster, its access always lives here."""

    __tablename__ = "service_access"
    service: Mapped[str] = mapped_column(String(63), primary_key=True)
    auth: Mapped[str] = mapped_column(String(8), default="none")
    limits: Mapped[dict] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ApiKeyRow(Base):
    """An API key of a business service: its SHA-256 (`digest`), never the key (`corral.domain.tenancy`). A revoked
    key's row is deleted (its history row stays)."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    service: Mapped[str] = mapped_column(String(63), index=True)
    name: Mapped[str | None] = mapped_column(String(63), nullable=True)
    prefix: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    limits: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    weight: Mapped[int] = mapped_column(Integer, default=1)  # an older database's rows read as 1 (`_api_key`)
