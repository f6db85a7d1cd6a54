"""Request bodies, with spec 01's field names. Unknown fields are refused: a typo is an error, not a no-op.

Response bodies are the shared view models of `corral.views`; the error responses are declared here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from corral.views import ErrorBody


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


# Error responses, declared on each route (`responses=errors(...)`) so /openapi.json documents them. -------
_ERRORS: dict[int, tuple[Any, str]] = {
    400: (ErrorBody, "Invalid request: a malformed body or parameter (`details`: one line per problem), "
                     "or a value Corral refuses (the message says what to fix). Nothing was changed."),
    401: (ErrorBody, "A token is configured (CORRAL_API_TOKEN) and the request has no `Authorization: Bearer <token>`, "
                     "or a wrong one."),
    404: (ErrorBody, "What the request names does not exist; the message says where to list what does."),
    409: (ErrorBody, "Valid, but the current state does not allow it (it exists already, it is still in use, "
                     "not enough unassigned pods or free GPUs, ...). Nothing was changed."),
    503: (ErrorBody, "The change is recorded and carried out, but the data plane has not confirmed the new routing "
                     "in time; Corral keeps applying it."),
}


def errors(*codes: int, **models: Any) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the error bodies it may answer with; `models` overrides the body of one
    code (as `c409=ScaleRefusal | ErrorBody`)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model, description = _ERRORS[code]
        responses[code] = {"model": models.get(f"c{code}", model), "description": description}
    return responses


def plain_text(description: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a 200 answered as text/plain."""
    return {200: {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}}
