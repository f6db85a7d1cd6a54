"""Request bodies, with spec 01's field names. Unknown fields are refused: a typo is an error, not a no-op.

Response bodies are the shared view models of `corral.views`; the error responses are declared here."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from corral.domain import labels as L
from corral.domain.deploy_request import (
    MAX_ENGINE_ARG,
    MAX_ENGINE_ARGS,
    MAX_ENGINE_ARGS_TEXT,
    MAX_ENV_NAME,
    MAX_MODEL_ID,
    MAX_SECRET_ENV,
    MAX_SECRET_VALUE,
)
from corral.domain.errors import CorralError, ErrorKind, Hint, Wording
from corral.views import ErrorBody

# Size limits of request fields: a string the API accepts is one Corral can store, show and pass on. Names
# follow the label rules (DNS-1123 labels, 63 characters); paths and model ids 4096 (PATH_MAX).
NAME_LENGTH = L.MAX_NAME_LENGTH
POD_NAME_LENGTH = 80  # a replica's name: its deployment's name and a 5-character suffix
PATH_LENGTH = 4096
ENGINE_LENGTH = 32

Name = Annotated[str, Field(max_length=NAME_LENGTH)]
EngineArg = Annotated[str, Field(max_length=MAX_ENGINE_ARG)]
# pydantic-core matches `pattern` with Rust's regex, whose `$` is the end of the text (not before a trailing newline,
# as Python's `re` has it): 'KEY\n' is refused here (tests/unit/test_names.py), and again by `check_secret_env`.
EnvName = Annotated[str, Field(max_length=MAX_ENV_NAME, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
SecretValue = Annotated[str, Field(max_length=MAX_SECRET_VALUE)]
# An argv list or one string, told apart before validation so that a refusal names only the form given.
EngineArgs = Annotated[
    Union[Annotated[list[EngineArg], Field(max_length=MAX_ENGINE_ARGS), Tag("list")],
          Annotated[str, Field(max_length=MAX_ENGINE_ARGS_TEXT), Tag("string")]],
    Discriminator(lambda value: "string" if isinstance(value, str) else "list"),
]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class DeployRequest(Body):
    engine: str = Field(max_length=ENGINE_LENGTH, description="vllm | sglang | transformers | simulator")
    modelId: str = Field(max_length=MAX_MODEL_ID, description="local model directory or hub id")
    modelTag: Name = Field(description="the `model` label value, e.g. qwen-06b")
    replicas: int = 1
    deployAsPool: bool = False
    gpusPerReplica: int | None = Field(default=None, description="default: 1 for vllm/sglang, 0 otherwise")
    engineArgs: EngineArgs = Field(
        default_factory=list,
        description="extra engine arguments (argv list or one string). Not allowed: the flags Corral sets (host, port, "
                    "model, served model name) and control characters. The values of secret flags (--api-key, "
                    "--hf-token, ...) are shown as ***; better, pass secrets as secretEnv.")
    secretEnv: Annotated[dict[EnvName, SecretValue], Field(max_length=MAX_SECRET_ENV)] = Field(
        default_factory=dict,
        description="environment variables for every replica, e.g. {\"VLLM_API_KEY\": \"...\"}: stored, passed to the "
                    "engine's process, never returned (deployments list their names only) and never logged")
    sharedGpus: bool = Field(default=False, description="a pool whose replicas may share a GPU with sleeping replicas of "
                             "other sharedGpus pools (at most one awake per GPU); its engine needs a sleep mode "
                             "(vLLM/simulator: --enable-sleep-mode in engineArgs)")


class SleepRequest(Body):
    level: int = Field(default=1, ge=1, le=2, description="1: weights offloaded to host memory (fast wake); 2: weights discarded "
                                              "(no host memory, slower wake)")


class DeployServiceRequest(Body):
    serviceName: Name
    modelPool: Name
    businessTag: Name
    isExternal: bool = False
    llmRouting: bool = Field(default=False, description="kubernetes: a vllm-router (KV-cache-aware) beside the service")
    auth: Literal["none", "keys"] | None = Field(default=None, description="who may call it: `keys` (the default when "
                                                 "isExternal) needs one of its API keys, `none` (otherwise) anyone")


class AssignPodRequest(Body):
    podName: str = Field(max_length=POD_NAME_LENGTH)
    businessTag: Name
    modelName: Name | None = None
    pin: bool | None = Field(default=None, description="while the pool's autopilot is on, a manual assignment pins the "
                                                       "replica (the autopilot never moves it); false: do not pin (and unpin)")


class DistributePodsRequest(Body):
    deploymentName: Name
    ratios: Annotated[dict[Name, float], Field(max_length=256)] | None = None
    counts: Annotated[dict[Name, int], Field(max_length=256)] | None = None
    dryRun: bool = Field(default=False, description="return the moves without applying them")


class ScaleRequest(Body):
    deploymentName: Name
    targetReplicas: int
    preempt: bool = Field(default=False, description="when the new replicas need GPUs that are not free, preemptible "
                          "finetune tasks below the pool's priority (its businesses' highest policy priority; low/normal/"
                          "high tasks are -10/0/10) save a checkpoint and give theirs; they resume when GPUs free up")


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


# Refusals as the API answers them: a status code per kind, the hints worded with the API's own paths. ---------
STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.UNAVAILABLE: 503,
}

API_WORDING: Wording = {
    Hint.LIST_PODS: "; list pods with GET /api/pods",
    Hint.LIST_SERVICES: "; list them with GET /api/business-services",
    Hint.LIST_DEPLOYMENTS: "; list deployments with GET /api/deployments",
    Hint.LIST_FINETUNE_TASKS: "; list them with GET /api/finetune/tasks",
    Hint.LIST_ADAPTERS: "; list them with GET /api/deployments/{pool}/adapters",
    Hint.REMOVE_ADAPTER: "; remove it first (DELETE /api/deployments/{pool}/adapters/{adapter}) or choose another name",
    Hint.CREATE_SERVICE: ": create one first (POST /api/deploy-service) or choose one of: {choices}",
    Hint.SCALE_STANDARD: "; scale it with POST /api/scale-deployment",
    Hint.FORCE: " or delete with force=true",
    Hint.FORCE_UNASSIGN: " or delete with force=true (unassigns them)",
    Hint.DEPLOY_AS_POOL: "; deploy it as its own pool (POST /api/finetune/tasks/{{id}}/deploy with modelTag)",
    Hint.SEND_TOKEN: ": send 'Authorization: Bearer <token>' (CORRAL_API_TOKEN)",
}


def error_body(refusal: CorralError) -> ErrorBody:
    """`error`: the problem with the API's words for its hints. An error with hints also carries them typed (`code`,
    the bare `problem`, `hints`), so a client words them its own way (the CLI as commands); its details are fields."""
    typed = {"code": refusal.kind, "problem": refusal.message, "hints": list(refusal.hints)} if refusal.hints else {}
    return ErrorBody(error=refusal.worded(API_WORDING), **typed, **refusal.details)
