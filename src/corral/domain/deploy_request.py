"""The checks of a deploy request that need nothing but its values: pure, no I/O.

Each raises `InvalidInput` naming the first problem; `check_deploy` runs them in the order a request is read, so a
request with several problems is refused for its first one wherever it comes from (the API, the UI, a finetune
task's deploy). What depends on an engine (the flags it gets from Corral) is passed in as its `check_args`; what
depends on the state (an existing deployment, a backend that cannot take secretEnv) is the controller's.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from corral.domain import labels as L
from corral.domain.errors import InvalidInput
from corral.domain.labels import control_character
from corral.domain.scaling import MAX_REPLICAS

MAX_GPUS_PER_REPLICA = 16
MAX_MODEL_ID = 4096  # characters of a modelId (a path or a hub id)
MAX_ENGINE_ARGS = 256  # items of engineArgs
MAX_ENGINE_ARG = 4096  # characters of one item
MAX_ENGINE_ARGS_TEXT = MAX_ENGINE_ARGS * 64  # characters of engineArgs given as one string
MAX_SECRET_ENV = 32  # entries of secretEnv
MAX_ENV_NAME = 128
MAX_SECRET_VALUE = 16384
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # `fullmatch`: `$` would pass a name ending in a newline
# Environment a replica gets from Corral, or that changes how its process starts rather than carrying a secret.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "PATH")
RESERVED_ENV_PREFIXES = ("CORRAL_", "LD_", "PYTHON")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class DeploySpec:
    """A deploy request as given (by the API, the UI or a finetune task's deploy), before any check."""

    engine: str
    model_id: str
    model_tag: str
    replicas: int = 1
    deploy_as_pool: bool = False
    gpus_per_replica: int | None = None
    engine_args: list[str] | str = ()  # type: ignore[assignment]
    # Environment variables given to every replica (API keys, tokens): stored, never shown (only their names).
    secret_env: Mapping[str, str] | None = field(default=None, repr=False, compare=False)  # never in a repr (logs)
    shared_gpus: bool = False  # `sharedGpus`: replicas may share GPU units with sleeping ones of other such pools


@dataclass(frozen=True)
class CheckedDeploy:
    """A deploy request's values once every check passed: what the controller deploys."""

    model_id: str
    model_tag: str
    replicas: int
    gpus_per_replica: int
    engine_args: list[str]
    secret_env: dict[str, str] = field(repr=False)


def check_deploy(spec: DeploySpec, *, needs_gpu: bool, check_args: Callable[[list[str]], None]) -> CheckedDeploy:
    """`spec` checked for an engine that `needs_gpu` (its default GPUs per replica) and refuses the flags
    `check_args` refuses."""
    model_tag = L.check_name(spec.model_tag, "modelTag")
    if not spec.model_id or not spec.model_id.strip():
        raise InvalidInput("modelId is required: a local model directory or a hub id such as 'Qwen/Qwen3-0.6B'")
    model_id = spec.model_id.strip()
    check_model_id(model_id)
    if not 0 <= spec.replicas <= MAX_REPLICAS:
        raise InvalidInput(f"replicas must be from 0 to {MAX_REPLICAS}, got {spec.replicas}")
    gpus = spec.gpus_per_replica if spec.gpus_per_replica is not None else (1 if needs_gpu else 0)
    if not 0 <= gpus <= MAX_GPUS_PER_REPLICA:
        raise InvalidInput(f"gpusPerReplica must be from 0 to {MAX_GPUS_PER_REPLICA}, got {gpus}")
    return CheckedDeploy(model_id=model_id, model_tag=model_tag, replicas=spec.replicas, gpus_per_replica=gpus,
                         engine_args=parse_engine_args(spec.engine_args, check_args),
                         secret_env=check_secret_env(spec.secret_env))


def check_model_id(model_id: str) -> None:
    if len(model_id) > MAX_MODEL_ID:
        raise InvalidInput(f"modelId is {len(model_id)} characters long; at most {MAX_MODEL_ID} are allowed")
    if (char := control_character(model_id)) is not None:
        raise InvalidInput(f"modelId contains {char}; give a directory path or a hub id such as 'Qwen/Qwen3-0.6B'")
    if model_id.startswith("-"):
        raise InvalidInput("modelId may not start with '-' (it would be read as an engine flag); "
                           "give a directory path or a hub id such as 'Qwen/Qwen3-0.6B'")


def parse_engine_args(value: list[str] | str | tuple, check_args: Callable[[list[str]], None] | None = None) -> list[str]:
    """Engine arguments as an argv list; a string is split like a shell would split it, never run by one.
    Refused: more than MAX_ENGINE_ARGS items or MAX_ENGINE_ARG characters in one, control characters (a NUL
    byte cannot be passed to a process at all), and what `check_args` refuses (the engine's `Engine.check_args`:
    the flags it gets from Corral)."""
    if isinstance(value, str):
        if len(value) > MAX_ENGINE_ARGS_TEXT:
            raise InvalidInput(f"engineArgs is {len(value)} characters long; at most {MAX_ENGINE_ARGS_TEXT} are allowed")
        try:
            args = shlex.split(value)
        except ValueError as exc:
            raise InvalidInput(f"engineArgs could not be parsed: {exc}") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value):
        args = list(value)
    else:
        raise InvalidInput("engineArgs must be a list of strings or one string")
    if len(args) > MAX_ENGINE_ARGS:
        raise InvalidInput(f"engineArgs has {len(args)} arguments; at most {MAX_ENGINE_ARGS} are allowed")
    for i, arg in enumerate(args):
        if len(arg) > MAX_ENGINE_ARG:
            raise InvalidInput(f"engineArgs[{i}] is {len(arg)} characters long; at most {MAX_ENGINE_ARG} are allowed")
        if (char := control_character(arg)) is not None:
            raise InvalidInput(f"engineArgs[{i}] contains {char}; engine arguments cannot carry control characters: "
                               "remove it")
    if check_args is not None:
        check_args(args)
    return args


def check_secret_env(value: Mapping[str, str] | None) -> dict[str, str]:
    """`secretEnv` checked: environment variable names, at most MAX_SECRET_ENV of them, none that Corral sets.
    A message names the variable, never its value."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput('secretEnv must be an object of environment variables, e.g. {"VLLM_API_KEY": "..."}')
    if len(value) > MAX_SECRET_ENV:
        raise InvalidInput(f"secretEnv has {len(value)} variables; at most {MAX_SECRET_ENV} are allowed")
    for name, secret in value.items():
        if not isinstance(name, str) or len(name) > MAX_ENV_NAME or not ENV_NAME.fullmatch(name):
            shown = name[:64] if isinstance(name, str) and not _CONTROL.search(name) else "(unprintable)"
            raise InvalidInput(f"secretEnv name '{shown}' is not an environment variable name: use letters, digits "
                               f"and '_', not starting with a digit, at most {MAX_ENV_NAME} characters")
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
            raise InvalidInput(f"secretEnv may not set {name}: Corral sets it, or it changes how the engine starts "
                               f"(reserved: {', '.join(RESERVED_ENV)} and names starting with "
                               f"{', '.join(RESERVED_ENV_PREFIXES)}); secretEnv is for secrets such as API keys")
        if not isinstance(secret, str):
            raise InvalidInput(f"secretEnv {name} must be a string")
        if len(secret) > MAX_SECRET_VALUE:
            raise InvalidInput(f"secretEnv {name} is longer than {MAX_SECRET_VALUE} characters")
        if "\x00" in secret:
            raise InvalidInput(f"secretEnv {name} contains a NUL byte, which an environment variable cannot hold")
    return dict(value)
