"""Request bodies, with spec 01's field names. Unknown fields are refused: a typo is an error, not a no-op."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class DeployRequest(Body):
    engine: str = Field(description="vllm | sglang | transformers | simulator")
    modelId: str = Field(description="local model directory or hub id")
    modelTag: str = Field(description="the `model` label value, e.g. qwen-06b")
    replicas: int = 1
    deployAsPool: bool = False
    gpusPerReplica: int | None = Field(default=None, description="default: 1 for vllm/sglang, 0 otherwise")
    engineArgs: list[str] | str = Field(default_factory=list, description="extra engine arguments (argv list or one string)")


class DeployServiceRequest(Body):
    serviceName: str
    modelPool: str
    businessTag: str
    isExternal: bool = False
    llmRouting: bool = Field(default=False, description="kubernetes: a vllm-router (KV-cache-aware) beside the service")


class AssignPodRequest(Body):
    podName: str
    businessTag: str
    modelName: str | None = None


class DistributePodsRequest(Body):
    deploymentName: str
    ratios: dict[str, float] | None = None
    counts: dict[str, int] | None = None
    dryRun: bool = Field(default=False, description="return the moves without applying them")


class ScaleRequest(Body):
    deploymentName: str
    targetReplicas: int
