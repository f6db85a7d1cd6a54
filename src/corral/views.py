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

Models can also be read like the dicts they replace (`view["modelName"]`, `"assignment" in view`,
`view | {...}` gives a dict), so code written against the dicts keeps working while it migrates to
attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from typing_extensions import TypedDict

from corral.domain.history import Action, Outcome
from corral.domain.memory import GIB
from corral.domain.models import PodPhase
from corral.domain.recommendation import DeviceMemory, recommend
from corral.engines.base import redact_args
from corral.finetune.store import TaskState
from corral.gpus.inventory import GpuDevice, GpuInventory

Number = Union[int, float]  # smart union: 3 stays 3, 2e-4 stays 2e-4
_JSON_NAMES: dict[type, dict[str, str]] = {}  # per contract: JSON name → attribute name


class Contract(BaseModel):
    """A response body. Read by attribute, or like the dict it replaces (by JSON name)."""

    model_config = ConfigDict(extra="forbid")
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()  # JSON keys absent (not null) when None

    def wire(self) -> dict[str, Any]:
        """The JSON body, exactly as the API answers it."""
        return self.model_dump(mode="json", by_alias=True)

    # dict-style reading ------------------------------------------------------------------------
    @classmethod
    def _attribute_names(cls) -> dict[str, str]:
        names = _JSON_NAMES.get(cls)
        if names is None:
            names = _JSON_NAMES[cls] = {(f.serialization_alias or f.alias or n): n for n, f in cls.model_fields.items()}
        return names

    def _attribute(self, key: object) -> str | None:
        name = self._attribute_names().get(key) if isinstance(key, str) else None
        if name is None or (name in self.omitted_when_none and getattr(self, name) is None):
            return None
        return name

    def __getitem__(self, key: str) -> Any:
        name = self._attribute(key)
        if name is not None:
            return getattr(self, name)
        if self.model_extra and key in self.model_extra:  # extra="allow" contracts (error details)
            return self.model_extra[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return self._attribute(key) is not None or bool(self.model_extra and key in self.model_extra)

    def keys(self) -> list[str]:
        return [key for key in self._attribute_names() if key in self] + list(self.model_extra or ())

    def __or__(self, other: Any) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.wire() | dict(other)

    def __ror__(self, other: Any) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(other) | self.wire()


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
    of a malformed request; the counts of a refused scale-down)."""

    model_config = ConfigDict(extra="allow")
    omitted_when_none = frozenset({"details"})
    error: str = Field(description="what is wrong and what to do about it")
    details: list[str] | None = Field(default=None, description="a malformed request: one line per problem")


class ScaleRefusal(ErrorBody):
    """409 of a scale-down that would remove assigned replicas."""

    success: Literal[False] = False
    currentReplicas: int
    targetReplicas: int
    unassignedPods: int


# serving: views --------------------------------------------------------------------------------
class PodView(Contract):
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


class PoolDeploymentView(_DeploymentFields):
    type: Literal["pool"] = "pool"
    podDistribution: dict[str, int] = Field(description="pods per business, `unassigned` first, every business even at 0")
    assignment: str = Field(description="`production(2) | testing(1) | unassigned(1)`")
    availableForScaleDown: int = Field(description="unassigned pods: the most a scale-down may remove")


class StandardDeploymentView(_DeploymentFields):
    type: Literal["standard"] = "standard"
    service: str | None = Field(description="its own service")
    baseUrl: str | None


DeploymentView = Annotated[Union[PoolDeploymentView, StandardDeploymentView], Field(discriminator="type")]


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


class Move(Contract):
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
    omitted_when_none = frozenset({"unassignedPods"})
    success: bool
    deploymentName: str
    currentReplicas: int
    targetReplicas: int
    added: list[str]
    removed: list[str]
    unassignedPods: int | None = Field(default=None, description="pools only")


# finetune --------------------------------------------------------------------------------------
class TaskProgress(TypedDict, total=False):
    """What the trainer has reported so far; keys appear as it reports them."""

    step: int
    totalSteps: int
    loss: Number | None
    learningRate: Number | None
    epoch: Number
    eta: Number | None
    evalLoss: Number | None
    datasetFormat: str
    truncated: int
    dropped: int
    trainExamples: int
    evalExamples: int


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


class PreviewResult(Contract):
    format: str = Field(description="messages, sharegpt, alpaca, prompt-completion, text, or mixed (…)")
    formats: dict[str, int]
    count: int = Field(description="examples in the dataset")
    analyzed: int = Field(description="examples tokenized for the counts below (the first 20,000)")
    examples: list[PreviewExample]
    truncated: int = Field(description="examples cut on the prompt side to fit maxSeqLen")
    dropped: int = Field(description="examples left out (their answer alone does not fit)")
    dropReasons: dict[str, int]
    trainedTokens: int
    totalTokens: int
    maxSeqLen: int
    trainOnPrompt: bool
    lengthHistogram: list[LengthBin] = Field(description="examples by token length before truncation")


class QueueSummary(Contract):
    waiting: int
    running: list[str]
    strategy: str
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


def gpu_info(inventory: GpuInventory, catalogue: list) -> GpuInfo:
    """The detected GPUs (whole GPUs and MIG instances) with a recommendation computed from them."""
    units = inventory.schedulable_units()
    text, warning = recommend([DeviceMemory(d.name, d.memory_total_bytes) for d in units], catalogue,
                              no_gpu_reason=inventory.error)
    return GpuInfo(available=inventory.available, count=len(units), devices=[GpuDeviceView.of(d) for d in units],
                   recommendation=text, warning=warning, driverVersion=inventory.driver_version,
                   migInstances=len(inventory.mig_instances))


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
    training: MemoryFigures
    serving: ServingMemory


class DataPlaneStatus(Contract):
    dataPlane: str
    desiredVersion: int
    appliedVersion: int = Field(description="below desiredVersion: the gateway has not confirmed the latest routing table")
    lastError: str | None
    pushes: int


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
    "ErrorBody", "Estimate", "FinetuneTask", "GpuDeviceView", "GpuInfo", "GpuProcessView", "Health", "HistoryEntry",
    "LengthBin", "MemoryFigures", "Move", "Number", "OmittingContract", "PodView", "PoolDeploymentView", "PoolStatus",
    "PreviewExample", "PreviewResult", "PreviewSpan", "QueueSummary",
    "ReplicaTraffic", "ScaleRefusal", "ScaleResult", "ServingMemory", "StandardDeploymentView", "TaskProgress", "gpu_info",
]
