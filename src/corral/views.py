"""Typed contracts: every body the API answers, as pydantic models shared by the API and the UI.

The controller and the finetune manager build these; the API declares them as response models (so
`/openapi.json` documents every response, errors included) and the UI reads the same objects. Field
names are the API's JSON names (spec 01/02, camelCase) and a model's wire form,
`model.wire()` (= `model_dump(mode="json", by_alias=True)`), is exactly the JSON the API answers:

- unknown fields are refused (`extra="forbid"`): a view that drifts from its model fails loudly;
- integers stay integers (`Number` keeps an int an int where a value may be either);
- a key that is absent rather than null in the JSON (a standard scale has no `unassignedPods`) is listed
  in the contract's `omitted_when_none`: `None` in Python, left out of the wire form;
- deployments are a union on `type`: a pool has `podDistribution`/`assignment`/`availableForScaleDown`,
  a standard deployment has `service`/`baseUrl`.

Code reads a view by attribute (`view.modelName`); what leaves as JSON is `view.wire()`.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from typing_extensions import TypedDict

from corral.domain.errors import ErrorKind, Hint
from corral.domain.history import Action, Outcome
from corral.domain.memory import GIB
from corral.domain.models import PodPhase
from corral.domain.recommendation import PREFLIGHT_MARGIN_GB, DeviceMemory, recommend
from corral.domain.replica_picking import WEIGHT_MAX, Routing, RoutingPolicy, RoutingWeights
from corral.domain.sleep import SleepState
from corral.domain.tasks import TaskState
from corral.engines.base import redact_args
from corral.gpus.inventory import GpuDevice, GpuInventory

Number = Union[int, float]  # smart union: 3 stays 3, 2e-4 stays 2e-4


class Contract(BaseModel):
    """A response body, read by attribute; `wire()` is its JSON."""

    model_config = ConfigDict(extra="forbid")
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()  # JSON keys absent (not null) when None

    def wire(self) -> dict[str, Any]:
        """The JSON body, exactly as the API answers it."""
        return self.model_dump(mode="json", by_alias=True)


class OmittingContract(Contract):
    """A contract with keys that are left out (not null) when their value is None: `omitted_when_none`."""

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler):  # no return annotation: keeps the schema
        data = handler(self)
        for name in self.omitted_when_none:
            if getattr(self, name) is None:
                field = type(self).model_fields[name]
                data.pop(name, None)
                data.pop(field.serialization_alias or field.alias or name, None)
        return data


# errors ----------------------------------------------------------------------------------------
class ErrorBody(OmittingContract):
    """Every refusal: `{"error": message}`, plus details where there are some (the validation problems
    of a malformed request; the counts of a refused scale-down; what a hint refers to, e.g. `pool`).
    A refusal with hints also has them typed, for clients that word them their own way."""

    model_config = ConfigDict(extra="allow")
    omitted_when_none = frozenset({"details", "code", "problem", "hints"})
    error: str = Field(description="what is wrong and what to do about it")
    details: list[str] | None = Field(default=None, description="a malformed request: one line per problem")
    code: ErrorKind | None = Field(default=None, description="with hints: the kind of refusal")
    problem: str | None = Field(default=None, description="with hints: what is wrong, without what to do")
    hints: list[Hint] | None = Field(default=None, description="what to do next, typed (`error` words them)")


class ScaleRefusal(ErrorBody):
    """409 of a scale-down that would remove assigned replicas."""

    success: Literal[False] = False
    currentReplicas: int
    targetReplicas: int
    unassignedPods: int


# serving: views --------------------------------------------------------------------------------
class EjectionView(Contract):
    """A replica the gateway took out of rotation (outlier detection: issue 25, `corral.domain.outliers`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    since: str = Field(description="when it was ejected (ISO 8601)")
    until: str = Field(description="when its ejection time ends; from then on it is health-checked, and back in "
                                   "rotation after CORRAL_HEALTH_SUCCESS_THRESHOLD passed checks in a row")
    count: int = Field(description="ejections in a row: its ejection time is this many times "
                                   "CORRAL_GATEWAY_BASE_EJECTION_S, at most CORRAL_GATEWAY_MAX_EJECTION_S")
    reason: str = Field(description="why: gateway failures in a row, failed health checks, or hung")


class PodView(Contract):
    """A replica. Frozen: the controller reuses a pod's view until the pod changes (`Controller._pod_views`),
    so one view may be in several answers at once and must not be altered by any of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    deployment: str
    labels: dict[str, str]
    status: PodPhase
    ready: bool
    isPoolPod: bool
    business: str | None = Field(description="a pool pod's business (`unassigned` when none); null for a standard pod")
    model: str | None
    endpoint: str | None
    restarts: int
    gpuIds: list[int]
    createdAt: str | None
    ejection: EjectionView | None = Field(default=None, description="set while the gateway keeps the replica out of "
                                                                    "rotation (its failures; it may still be ready)")
    sleep: SleepState = Field(default=SleepState.AWAKE, description="awake | sleeping | waking (sleep mode: only an "
                                                                    "awake replica serves)")
    sleepLevel: int | None = Field(default=None, description="the level it sleeps (or is going to sleep) at: 1 weights "
                                                             "in host memory, 2 discarded; null when wanted awake")


class _DeploymentFields(OmittingContract):
    omitted_when_none = frozenset({"secretEnv"})
    name: str
    type: str
    isPool: bool
    engine: str
    isSimulator: bool
    modelId: str
    modelName: str = Field(description="the `model` label (the deploy request's modelTag)")
    replicas: int = Field(description="desired replicas")
    currentReplicas: int
    readyReplicas: int
    gpusPerReplica: int
    sharedGpus: bool = Field(default=False, description="its replicas may share GPUs with sleeping replicas of other "
                                                        "sharedGpus pools")
    engineArgs: list[str] = Field(description="extra engine arguments; the values of secret flags (--api-key, ...) "
                                              "are shown as ***")
    secretEnv: list[str] | None = Field(default=None, description="names of the environment variables given to its "
                                                                 "replicas as secrets (values are never returned); absent "
                                                                 "when it has none")
    selector: dict[str, str]
    createdAt: str | None

    @field_validator("engineArgs")
    @classmethod
    def _redacted(cls, value: list[str]) -> list[str]:
        """Whoever builds a view, a secret engine argument never leaves in one (API, UI, events)."""
        return redact_args(value)


class SleepResult(Contract):
    """A replica put to sleep or woken (POST /api/pods/{name}/sleep|wake), once the engine answered."""

    pod: str
    sleep: SleepState
    sleepLevel: int | None
    seconds: float = Field(description="how long the engine took (0 when it was there already)")
    historyId: int | None = Field(description="the history row of the change; null when nothing changed")


class SleeperView(Contract):
    pod: str
    model: str
    level: int = Field(description="1: weights in host memory (fast wake); 2: weights discarded")


class SharedGpuView(Contract):
    """One GPU unit: its awake replica and the replicas asleep on it (sharedGpus pools)."""

    unit: str
    awake: str | None = Field(description="the replica holding the GPU's memory now (null: none)")
    awakeModel: str | None
    sleeping: list[SleeperView]


class SleepTimingView(Contract):
    """One model's sleep and wake times, measured by Corral over its last calls (seconds)."""

    model: str
    sleepP50S: float | None
    sleepP95S: float | None
    wakeP50S: float | None
    wakeP95S: float | None
    sleeps: int
    wakes: int


class GpuSharingView(Contract):
    """GET /api/gpus/sharing: each GPU with its awake and sleeping replicas, the times measured, host memory."""

    gpus: list[SharedGpuView]
    models: list[SleepTimingView]
    hostBytesUsed: float = Field(description="level-1 sleepers' weights in host memory")
    hostBytesBudget: float | None = Field(description="CORRAL_SLEEP_HOST_MEMORY_GB in bytes; null: not limited")


class AdapterView(Contract):
    """A LoRA adapter of a running vLLM pool: desired on every replica, loaded by Corral's adapter reconciler."""

    name: str = Field(description="the `model` name clients send to the pool's business services")
    taskId: str | None = Field(description="the finetune task it came from")
    path: str = Field(description="the adapter directory the replicas load")
    rank: int = Field(description="its LoRA rank")
    loadedOn: int = Field(description="ready replicas that have it loaded now")
    readyReplicas: int = Field(description="ready replicas of the pool (all of them load it)")


class AdapterResult(Contract):
    success: bool
    pool: str
    adapter: AdapterView
    message: str


class AdapterRemoveResult(Contract):
    success: bool
    pool: str
    removed: str


class PoolDeploymentView(_DeploymentFields):
    type: Literal["pool"] = "pool"
    podDistribution: dict[str, int] = Field(description="pods per business, `unassigned` first, every business even at 0")
    assignment: str = Field(description="`production(2) | testing(1) | unassigned(1)`")
    availableForScaleDown: int = Field(description="unassigned pods: the most a scale-down may remove")
    adapters: list[AdapterView] = Field(default_factory=list, description="LoRA adapters added to the running pool "
                                        "(vLLM, multi-LoRA): requests with `model: <name>` get them")


class StandardDeploymentView(_DeploymentFields):
    type: Literal["standard"] = "standard"
    service: str | None = Field(description="its own service")
    baseUrl: str | None


DeploymentView = Annotated[Union[PoolDeploymentView, StandardDeploymentView], Field(discriminator="type")]


class RoutingWeightsSpec(Contract):
    """The prefix-aware scorers' weights (domain/replica_picking.py); each 0-100."""

    prefix: float = Field(default=RoutingWeights.prefix, ge=0, le=WEIGHT_MAX,
                          description="share of the prompt's leading blocks the replica served last")
    queue: float = Field(default=RoutingWeights.queue, ge=0, le=WEIGHT_MAX,
                         description="requests in flight at the gateway plus the engine's waiting ones (fewer is better)")
    kvCache: float = Field(default=RoutingWeights.kv_cache, ge=0, le=WEIGHT_MAX,
                           description="the engine's free KV cache")


class RoutingSpec(Contract):
    """`PUT/GET /api/business-services/{name}/routing`: how the gateway picks the replica of each request."""

    policy: RoutingPolicy = Field(default=RoutingPolicy.LEAST_LOAD,
                                  description="least-load (fewest in flight) or prefix-aware (prefix cache, queue, KV cache)")
    weights: RoutingWeightsSpec = Field(default_factory=RoutingWeightsSpec)

    def domain(self) -> Routing:
        return Routing.from_wire(self.wire())


class BusinessServiceView(Contract):
    name: str
    displayName: str
    businessTag: str | None
    modelName: str
    modelPool: str | None
    baseUrl: str | None = Field(description="its OpenAI-compatible endpoint")
    isExternal: bool
    llmRouting: bool
    type: Literal["LoadBalancer", "ClusterIP"]
    selector: dict[str, str]
    labels: dict[str, str]
    replicas: int
    readyReplicas: int
    createdAt: str | None
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="how the gateway picks its replica per request")


class ReplicaTraffic(Contract):
    requests: int
    errors: int
    inFlight: int
    meanLatencyMs: Number


class PoolStatus(Contract):
    deploymentName: str
    modelName: str
    totalPods: int
    readyPods: int
    podDistribution: dict[str, int]
    availableForScaleDown: int
    traffic: dict[str, ReplicaTraffic] = Field(description="gateway counters per replica")


# serving: load (GET /api/business-services/{name}/load, GET /api/load, `load` on /ws) ---------------
class LatencyMs(Contract):
    """Percentiles interpolated in the gateway's latency histogram (corral.domain.load); null without requests."""

    p50: float | None
    p95: float | None
    p99: float | None


class TtfbMs(Contract):
    """Time to the first byte of streamed responses; null without streamed responses in the window."""

    p50: float | None
    p95: float | None


class HeldWaitMs(Contract):
    """How long the requests the gateway held (no free replica) waited, over the window; null when none left
    the hold."""

    p50: float | None = None
    p95: float | None = None


class ReplicaLoad(Contract):
    pod: str
    requestsPerSecond: float
    inFlight: int
    errorsPerSecond: float
    latencyMs: LatencyMs
    ttfbMs: TtfbMs
    tokensPerSecond: float | None = Field(description="completion tokens per second; null when no response reported usage")


class LoadPoint(Contract):
    t: int = Field(description="unix seconds: the end of the 5 s this point covers")
    requestsPerSecond: float
    p95Ms: float | None
    capacity: int = Field(description="ready replicas assigned (routed to) at t")


class ServiceLoad(Contract):
    service: str
    pool: str | None
    windowSeconds: int
    requestsPerSecond: float
    inFlight: int
    errorsPerSecond: float
    latencyMs: LatencyMs
    ttfbMs: TtfbMs
    tokensPerSecond: float | None = Field(description="completion tokens per second; null when no response reported usage")
    readyReplicas: int
    replicas: list[ReplicaLoad] = Field(description="the replicas it routes to, and any that served it in the window")
    series: list[LoadPoint] = Field(description="the last 5 minutes, one point per 5 s")
    held: int = Field(default=0, description="requests the gateway holds now, waiting for a replica to be assigned or "
                                             "to free up (none ready, or every one at its batch limit): demand no "
                                             "replica has seen yet")
    heldWaitMs: HeldWaitMs = Field(default_factory=HeldWaitMs,
                                   description="how long held requests waited, over the window")
    clientCancelled: int = Field(default=0, description="requests whose client disconnected before the response "
                                                        "ended (held, waiting for the replica's answer, or "
                                                        "streaming), over the window; the gateway stopped their work")


class LoadOverview(Contract):
    windowSeconds: int
    services: list[ServiceLoad]


class HistoryEntry(Contract):
    id: int
    timestamp: str
    action: Action
    target: str
    before: Any = Field(description="the state the change started from (JSON)")
    after: Any = Field(description="the state it meant to reach (JSON)")
    outcome: Outcome
    message: str


# serving: results of changes -------------------------------------------------------------------
class DeployResult(Contract):
    success: bool
    deployment: DeploymentView
    pods: list[PodView]
    manifestPath: str | None


class DeleteResult(Contract):
    success: bool
    deleted: str


class DeployServiceResult(Contract):
    success: bool
    service: BusinessServiceView
    manifestPath: str | None


class DeleteServiceResult(Contract):
    success: bool
    deleted: str
    unassignedPods: list[str] = Field(description="pods unassigned because they would have been stranded (force=true)")


class AssignResult(Contract):
    success: bool
    podName: str
    modelName: str | None
    previousBusiness: str
    businessTag: str
    changed: bool
    pinned: bool = False  # the autopilot leaves it where it was put (POST /api/pods/{name}/unpin)


class Move(Contract):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    podName: str
    from_: str = Field(alias="from")
    to: str


class DistributeResult(Contract):
    success: bool
    deploymentName: str
    targets: dict[str, int]
    moves: list[Move]
    podDistribution: dict[str, int] = Field(description="after the moves")


class DistributeDryRun(Contract):
    success: bool
    dryRun: Literal[True]
    deploymentName: str
    targets: dict[str, int]
    moves: list[Move] = Field(description="what an apply would move; nothing was changed")
    podDistribution: dict[str, int] = Field(description="now")


class ScaleResult(OmittingContract):
    omitted_when_none = frozenset({"unassignedPods", "preempted"})
    success: bool
    deploymentName: str
    currentReplicas: int
    targetReplicas: int
    added: list[str]
    removed: list[str]
    unassignedPods: int | None = Field(default=None, description="pools only")
    preempted: list[str] | None = Field(default=None, description='`"preempt": true` only: the finetune tasks that gave '
                                        "their GPUs (they checkpointed and wait in the queue to resume)")


# finetune --------------------------------------------------------------------------------------
class TaskProgress(TypedDict, total=False):
    """What the trainer has reported so far; keys appear as it reports them."""

    step: int
    totalSteps: int
    loss: Number | None
    learningRate: Number | None
    epoch: Number
    eta: Number | None
    etaAt: Number | None  # when the trainer expects to finish (Unix seconds): the report's time + eta
    evalLoss: Number | None
    datasetFormat: str
    truncated: int
    turnsCut: int  # messages left out of truncated conversations (system turns kept)
    dropped: int
    trainExamples: int
    evalExamples: int
    packedRows: int  # with packing: the rows the training examples were packed into (what a batch holds)
    padTokens: int  # padding tokens in the training batches so far (since the trainer last started)
    batchTokens: int  # all tokens of those batches, padding included (padTokens / batchTokens: the share wasted)
    earlyStopped: int  # the step where early stopping ended the training (its eval loss stopped improving)
    logDir: str  # reportTo tensorboard: the TensorBoard event files' directory (`tensorboard --logdir` it)


class FinetuneTask(Contract):
    id: str
    status: TaskState
    reason: str
    baseModel: str
    datasetPath: str
    method: str
    priority: str
    gpus: int
    memoryGb: float
    timeoutSeconds: float
    hyperparameters: dict[str, Union[bool, Number, str]]
    examples: int
    progress: TaskProgress
    units: list[str] = Field(description="the GPU units it holds while running")
    output: str | None
    reclaimed: dict[str, int] = Field(description="pool → replicas scaled in for it, restored when it ends")
    preemptible: bool = Field(default=True, description="a business of higher priority may take its GPUs: it saves a "
                              "checkpoint, waits in the queue and resumes from it")
    datasets: list[DatasetSource] | None = Field(default=None, description="a mix's sources (the request's `datasets`) with "
                                                  "their counts; null: the one datasetPath (then the first source's path)")
    businessTag: str | None = Field(default=None, description="the business its GPU-seconds are billed to (`GET /api/usage`); "
                                   "null: none, billed under `(finetune)`")
    startBy: str | None = Field(default=None, description="while queued with GPUs reserved for it (easy-backfill with "
                                "slack): it starts by then at the latest, if running tasks end by their estimated ends "
                                "(timeouts, or their trainers' ETAs when sooner)")
    createdAt: str | None
    startedAt: str | None
    finishedAt: str | None


class PreviewSpan(Contract):
    start: int = Field(description="character offset in `text` where trained tokens begin")
    end: int


class PreviewExample(Contract):
    text: str = Field(description="the example as the model sees it (after truncation), special tokens included")
    totalTokens: int
    trainedTokens: int = Field(description="tokens the loss covers")
    spans: list[PreviewSpan] = Field(description="the parts of `text` the loss covers")
    truncated: bool
    originalTokens: int = Field(description="tokens before truncation")


class LengthBin(Contract):
    min: int
    max: int
    count: int
    overMaxSeqLen: bool = Field(description="examples in this bin are cut (or dropped) at maxSeqLen")


class DatasetSource(Contract):
    """One source of a mix (`datasets`): its examples, and those taken at its ratio."""

    path: str
    ratio: float
    examples: int = Field(description="examples in the source")
    taken: int = Field(description="examples trained from it: its ratio of them, at least one")
    format: str


class PackingPreview(Contract):
    """Rows and padding of one epoch, unpacked and packed (the `packing` hyperparameter), at the preview's batchSize and
    maxSeqLen; padding estimated in one shuffled order (the Trainer's is its own), over the analyzed examples."""

    batchSize: int
    rows: int = Field(description="rows unpacked: one per example kept")
    packedRows: int = Field(description="rows packed: several examples in each, at most maxSeqLen tokens a row")
    padTokens: int = Field(description="padding tokens per epoch unpacked (each row filled to its batch's longest)")
    packedPadTokens: int = Field(description="padding tokens per epoch packed")


class PreviewResult(Contract):
    format: str = Field(description="messages, sharegpt, alpaca, prompt-completion, text, or mixed (…)")
    formats: dict[str, int]
    count: int = Field(description="examples in the dataset")
    analyzed: int = Field(description="examples tokenized for the counts below (the first 20,000)")
    examples: list[PreviewExample]
    truncated: int = Field(description="examples cut to fit maxSeqLen: a conversation's earliest exchanges left out (its "
                                       "system turn kept), then the oldest part of its last prompt; a prompt's oldest tokens")
    turnsCut: int = Field(default=0, description="messages left out of truncated conversations (never the system turn, never "
                                                 "part of an answer)")
    dropped: int = Field(description="examples left out (their answer alone does not fit)")
    dropReasons: dict[str, int]
    warnings: list[str] = Field(default_factory=list, description="what to know before training: the chat template's end of "
                                                                  "turn against the model's EOS (and what the result's EOS "
                                                                  "becomes), markers that are not tokens")
    trainedTokens: int
    totalTokens: int
    maxSeqLen: int
    trainOnPrompt: bool
    lengthHistogram: list[LengthBin] = Field(description="examples by token length before truncation")
    packing: PackingPreview | None = Field(default=None, description="padding with and without packing")
    sources: list[DatasetSource] = Field(default_factory=list, description="a mix's sources (`datasets`), with their counts")


class TaskCurves(Contract):
    """A task's curves for charts, as [step, value] pairs; a step replayed after a resume appears once (its latest value)."""

    loss: list[tuple[int, float]]
    evalLoss: list[tuple[int, float]]
    learningRate: list[tuple[int, float]]


class ExportState(Contract):
    """Merged weights of a completed task (the LoRA adapter merged into its base model, or a full finetune's model as is)."""

    taskId: str
    state: Literal["none", "running", "done", "failed"]
    directory: str | None = Field(description="where the merged model (weights + tokenizer) is, once done")
    reason: str


class QueueSummary(Contract):
    waiting: int
    running: list[str]
    strategy: str
    backfillSlackSeconds: float = Field(default=0.0, description="easy-backfill: how long after its reservation a normal or "
                                        "low head may start (CORRAL_BACKFILL_SLACK_S)")
    warning: str | None = Field(description="set when more tasks wait than the configured threshold")


# system ----------------------------------------------------------------------------------------
class GpuProcessView(Contract):
    pid: int
    memory_gb: float


class GpuDeviceView(Contract):
    id: int | str = Field(description="the GPU index, or `0/mig1` for a MIG instance")
    name: str
    memory_gb: float
    memory_used_gb: float
    memory_free_gb: float
    utilization: int | None
    uuid: str
    processes: list[GpuProcessView]
    mig: bool
    parent: int | None

    @classmethod
    def of(cls, device: GpuDevice) -> GpuDeviceView:
        return cls(
            id=device.index if device.parent_index is None else device.id,
            name=device.name,
            memory_gb=round(device.memory_total_bytes / GIB, 1),
            memory_used_gb=round(device.memory_used_bytes / GIB, 2),
            memory_free_gb=round(device.memory_free_bytes / GIB, 2),
            utilization=device.utilization_percent,
            uuid=device.uuid,
            processes=[GpuProcessView(pid=p.pid, memory_gb=round(p.used_memory_bytes / GIB, 2)) for p in device.processes],
            mig=device.mig_enabled,
            parent=device.parent_index,
        )


class GpuInfo(Contract):
    available: bool
    count: int
    devices: list[GpuDeviceView]
    recommendation: str
    warning: str | None
    driverVersion: str | None
    migInstances: int


def gpu_info(inventory: GpuInventory, catalogue: list, margin_gb: float = PREFLIGHT_MARGIN_GB) -> GpuInfo:
    """The detected GPUs (whole GPUs and MIG instances) with a recommendation computed from them: sized as the
    submit's preflight sizes a task (`margin_gb`: `CORRAL_FINETUNE_MEMORY_MARGIN_GB`), QLoRA advised only where
    bitsandbytes is installed (looked up, not imported)."""
    units = inventory.schedulable_units()
    text, warning = recommend([DeviceMemory(d.name, d.memory_total_bytes) for d in units], catalogue,
                              no_gpu_reason=inventory.error, qlora_available=_importable("bitsandbytes"), margin_gb=margin_gb)
    return GpuInfo(available=inventory.available, count=len(units), devices=[GpuDeviceView.of(d) for d in units],
                   recommendation=text, warning=warning, driverVersion=inventory.driver_version,
                   migInstances=len(inventory.mig_instances))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return False


class MemoryFigures(Contract):
    totalGb: Number
    breakdownGb: dict[str, Number]


class ServingMemory(MemoryFigures):
    contextTokens: int
    concurrency: int


class Estimate(Contract):
    model: str
    displayName: str
    parameters: Number
    method: str
    activeParameters: Number | None = Field(default=None, description="mixture-of-experts: parameters one token uses")
    source: str = Field(default="catalogue", description="catalogue | directory | hf-cache: where the model was found")
    countedFrom: str = Field(default="catalogue", description="catalogue | safetensors (exact) | index | config")
    dtype: str = Field(default="", description="the weights' storage dtype, where the files say it")
    note: str = Field(default="", description="why the figures may be approximate")
    training: MemoryFigures
    serving: ServingMemory


class DataPlaneStatus(Contract):
    dataPlane: str
    desiredVersion: int
    appliedVersion: int = Field(description="below desiredVersion: the gateway has not confirmed the latest routing table")
    lastError: str | None
    pushes: int
    faults: int = Field(description="times the gateway served a routing table version above the desired one (a table "
                                    "Corral never pushed), each replaced at once")
    lastFault: str | None = None


class EngineInfo(Contract):
    name: str
    isSimulator: bool
    description: str


class Health(Contract):
    status: Literal["ok"]
    version: str
    backend: str
    gatewayDataPlane: str
    gatewayPolicy: str
    engines: list[EngineInfo]


__all__ = [
    "AssignResult", "BusinessServiceView", "Contract", "DataPlaneStatus", "DeleteResult", "DeleteServiceResult",
    "DeployResult", "DeployServiceResult", "DeploymentView", "DistributeDryRun", "DistributeResult", "EngineInfo",
    "ErrorBody", "Estimate", "GpuSharingView", "SharedGpuView", "SleeperView", "SleepTimingView", "FinetuneTask", "GpuDeviceView", "GpuInfo", "GpuProcessView", "Health", "HistoryEntry",
    "LatencyMs", "LengthBin", "LoadOverview", "LoadPoint", "MemoryFigures", "Move", "Number", "OmittingContract", "PodView", "PoolDeploymentView", "PoolStatus",
    "PreviewExample", "PreviewResult", "PreviewSpan", "QueueSummary", "HeldWaitMs",
    "ReplicaLoad", "ReplicaTraffic", "ScaleRefusal", "ScaleResult", "ServiceLoad", "ServingMemory", "StandardDeploymentView", "TaskProgress", "TtfbMs", "gpu_info",
]


# the autopilot -----------------------------------------------------------------------------------
class PolicyTarget(Contract):
    """The load a business wants to stay under; above it, it is *pressured* and gets replicas."""

    ttftP90Ms: float | None = Field(default=None, ge=1, le=600_000, description="time to first token, p90, ms")
    waitingPerReplica: float | None = Field(default=1.0, ge=0, le=100_000,
                                            description="requests waiting for a batch slot, per ready replica")
    concurrencyPerReplica: float | None = Field(
        default=None, ge=0.1, le=65_536,
        description="running + waiting requests per ready replica (Knative KPA's target concurrency; e.g. 70% of "
                    "the engine's --max-num-seqs): replicas arrive before requests queue")


class BusinessPolicySpec(Contract):
    """`PUT/GET /api/business-services/{name}/policy` (the body and the answer)."""

    minReplicas: int | None = Field(
        default=None, ge=0, le=256,
        description="null (not set): one replica while the business has had traffic in the stable window; an explicit "
                    "0 lets it go to none")
    maxReplicas: int | None = Field(default=None, ge=0, le=256, description="null: no maximum")
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher wins under scarcity")
    target: PolicyTarget = Field(default_factory=PolicyTarget)

    @field_validator("maxReplicas")
    @classmethod
    def _max_not_below_min(cls, value: int | None, info: Any) -> int | None:
        low = info.data.get("minReplicas") or 0
        if value is not None and value < low:
            raise ValueError(f"maxReplicas ({value}) must be >= minReplicas ({low})")
        return value


class AutopilotSpec(Contract):
    """`PUT/GET /api/autopilot/{pool}` settings (the body, and `settings` in the answer)."""

    enabled: bool = False
    warmSpares: int = Field(default=1, ge=0, le=64, description="unassigned ready replicas to keep when possible")
    cooldownSeconds: float = Field(default=30.0, ge=0, le=86_400, description="a moved replica stays at least this long")
    scaleOut: bool = Field(default=False, description="add replicas when moves cannot meet demand and GPUs are free")
    scaleIn: bool = Field(default=False, description="remove idle spares above warmSpares after scaleInAfterSeconds")
    maxReplicas: int | None = Field(default=None, ge=0, le=256, description="the pool's ceiling for scale-out")
    stabilizationSeconds: float = Field(default=1.0, ge=0, le=3600, description="how long pressure must hold before a move")
    releaseAfterSeconds: float = Field(default=300.0, ge=0, le=86_400,
                                       description="how long a surplus must hold before it goes back to the spares")
    scaleInAfterSeconds: float = Field(default=300.0, ge=0, le=86_400)
    replicaConcurrency: int | None = Field(
        default=None, ge=1, le=65_536,
        description="sequences one replica runs at once; null: the engine's own limit in the pool's engine args "
                    "(--max-num-seqs for vLLM and the simulator, --max-running-requests for SGLang) or its default")
    targetUtilisation: float = Field(default=0.8, gt=0, le=1,
                                     description="of replicaConcurrency: the concurrency target's margin")
    hysteresisBand: float = Field(default=0.2, ge=0, lt=1,
                                  description="a donor keeps its load this far below every one of its targets")
    stableWindowSeconds: float = Field(default=30.0, ge=0.5, le=3600,
                                       description="loads averaged for what a business needs and may give")
    panicWindowSeconds: float = Field(default=3.0, ge=0.5, le=600,
                                      description="loads averaged for whether a business is pressured now")
    movesPerWindow: int | None = Field(default=None, ge=1, le=100_000,
                                       description="moves per stable window; null: half the pool (at least 4)")

    @model_validator(mode="after")
    def _panic_within_stable(self) -> AutopilotSpec:
        # The panic window reacts to a surge inside what the stable one averages: a longer one would make the
        # "panic" reading the slower of the two.
        if self.panicWindowSeconds > self.stableWindowSeconds:
            raise ValueError(f"panicWindowSeconds ({self.panicWindowSeconds:g}) must not exceed stableWindowSeconds "
                             f"({self.stableWindowSeconds:g})")
        return self


class AutopilotBusiness(Contract):
    business: str
    services: list[str]
    policy: BusinessPolicySpec
    replicas: int
    readyReplicas: int
    pinned: int
    running: float | None
    waiting: float | None
    ttftP90Ms: float | None
    requestsPerSecond: float
    rejectedPerSecond: float
    pressure: str | None  # why it needs more capacity now, or null
    source: Literal["engine", "gateway", "unknown"] = "engine"  # where its load came from (the least sure replica's)
    held: float = 0.0  # requests the gateway holds for it
    stableLoad: float | None = None  # running + waiting + held, averaged over the stable window (null: unknown)
    panicLoad: float | None = None  # ... over the panic window


class AutopilotReplica(Contract):
    pod: str
    business: str
    ready: bool
    pinned: bool
    running: float | None
    waiting: float | None
    kvCacheUsage: float | None
    ttftP90Ms: float | None
    movedAt: str | None  # when the autopilot last moved it (ISO 8601)
    source: Literal["engine", "gateway", "unknown"] = "engine"  # engine /metrics, the gateway's in-flight count, none
    load: float | None = None  # running + waiting as the autopilot reads it (null: unknown)
    ageSeconds: float | None = None  # age of its newest engine reading (null: never read)


class AutopilotMoveView(Contract):
    podName: str
    source: str = Field(alias="from")
    target: str = Field(alias="to")
    reason: str

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AutopilotDecisionView(Contract):
    at: str  # ISO 8601
    moves: list[AutopilotMoveView]
    scaledTo: int | None
    removed: list[str]
    reason: str
    error: str | None = None


class UnpinResult(Contract):
    success: bool
    podName: str
    pinned: bool
    changed: bool


class AutopilotStatus(Contract):
    pool: str
    settings: AutopilotSpec
    businesses: list[AutopilotBusiness]
    replicas: list[AutopilotReplica]
    decisions: list[AutopilotDecisionView]  # newest first
    waitingFor: list[str]  # what the last decision could not do, and why
    replicaConcurrency: int = 8  # the batch limit the autopilot uses ...
    replicaConcurrencySource: Literal["settings", "engine", "default"] = "default"  # ... and where it came from


# businesses as tenants: keys and quotas (corral.tenancy) ------------------------------------------
class QuotaLimits(Contract):
    """A business service's or a key's limits; null: no limit of that kind; 0: refuse every request."""

    requestsPerMinute: int | None = None
    tokensPerMinute: int | None = Field(default=None, description="prompt + completion tokens a minute")
    tokensPerDay: int | None = Field(default=None, description="prompt + completion tokens a UTC day")


class QuotaUsed(Contract):
    """What the gateway counted in the current windows (the minute, the UTC day), as last read from it."""

    requestsThisMinute: int = 0
    tokensThisMinute: int = 0
    tokensToday: int = 0


class ServiceAccessView(Contract):
    service: str
    auth: Literal["none", "keys"] = Field(description="`keys`: only requests with one of its keys reach a replica")
    limits: QuotaLimits
    keys: int = Field(description="how many keys it has")
    used: QuotaUsed = Field(default_factory=QuotaUsed, description="counted against its limits now")


class ApiKeyView(Contract):
    """A key as listed: never the key itself (only its first characters, `prefix`)."""

    id: str
    name: str | None
    prefix: str
    createdAt: str | None
    lastUsedAt: str | None
    expiresAt: str | None
    limits: QuotaLimits
    weight: int = Field(description="its share when the business's keys compete for its replicas (1 to 1000)")
    used: QuotaUsed = Field(default_factory=QuotaUsed, description="counted against its own limits now")


class ApiKeyCreated(Contract):
    """A new key: `key` is shown here once and never again (Corral keeps its SHA-256 only)."""

    id: str
    key: str
    name: str | None
    prefix: str
    createdAt: str | None
    expiresAt: str | None
    limits: QuotaLimits
    weight: int = Field(description="its share when the business's keys compete for its replicas (1 to 1000)")


class ApiKeyRevoked(Contract):
    revoked: str
    service: str
