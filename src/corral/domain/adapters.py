"""LoRA adapters on running vLLM pools (multi-LoRA): the pure decisions.

A pool's adapters are desired state: (name → adapter directory) recorded by Corral. Each ready replica
reports what it has loaded (vLLM's `GET /v1/models` lists LoRA modules with a `parent`); `plan_sync`
says what to load and unload so the replica matches, whoever started it and whenever (a scale-up, a
crash restart, a replica that lost its adapters). No I/O here: `corral.adapters` carries it out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from corral.domain.errors import Conflict, Hint, InvalidInput
from corral.domain.labels import shown
from corral.domain.models import Deployment

ENGINE = "vllm"  # the only engine with runtime adapter loading that Corral drives
MAX_ADAPTERS_PER_POOL = 32  # each one costs the replicas host memory (vLLM's CPU LoRA cache) and a load per start
MAX_NAME_LENGTH = 63
VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's `--max-lora-rank` when a pool does not set it
# The `model` name clients send: letters, digits, '.', '_' and '-', starting with a letter or digit. No '/' (it
# would read as a hub id), no ':' or spaces (clients and URLs mangle them).
# Matched with `fullmatch`: `$` would also pass a name ending in a newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Adapter:
    """One desired adapter of a pool."""

    pool: str
    name: str
    path: str  # the adapter directory (a peft `adapter_config.json` + weights), as the replicas read it
    task_id: str | None = None  # the finetune task it came from
    rank: int = 0


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter directory says about how it was trained (read by `corral.finetune.checks.adapter_files`; the
    defaults when it cannot be read here, e.g. a path only the replicas see)."""

    base_model: str | None = None  # adapter_config.json's base_model_name_or_path (a resolved path, or a hub id)
    dora: bool = False  # use_dora: weight-decomposed LoRA
    chat: tuple[str | None, str | None] | None = None  # (chat template, EOS) of the tokenizer saved with it
    pool_chat: tuple[str | None, str | None] | None = None  # the same of the tokenizer the pool serves with


@dataclass(frozen=True)
class SyncPlan:
    """What one replica needs: unload first (a stale name may be re-loaded from another path), then load."""

    unload: tuple[str, ...] = ()
    load: tuple[tuple[str, str], ...] = ()  # (name, path)

    def __bool__(self) -> bool:
        return bool(self.unload or self.load)


def check_adapter_name(value: object) -> str:
    """An adapter name clients can send as `model`; refused with a message that says how to fix it."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("adapterName is required: the model name clients will send, e.g. 'support-v1'")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidInput(f"adapterName is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed")
    if not _NAME.fullmatch(value):
        raise InvalidInput(f"adapterName '{shown(value)}' may contain only letters, digits, '.', '_' and '-', starting with a "
                           "letter or digit (it is the `model` clients send)")
    return value


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value of `--flag V` or `--flag=V` in an argument list (argparse's rule: the last one wins)."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.partition("=")[2]
    return found


def lora_enabled(deployment: Deployment) -> bool:
    return deployment.engine == ENGINE and any(a == "--enable-lora" or a.startswith("--enable-lora=") for a in deployment.engine_args)


def max_lora_rank(deployment: Deployment) -> int:
    value = flag_value(deployment.engine_args, "--max-lora-rank")
    try:
        return int(value) if value is not None else VLLM_DEFAULT_MAX_LORA_RANK
    except ValueError:
        return VLLM_DEFAULT_MAX_LORA_RANK


def lora_module_names(extra: list[str]) -> set[str]:
    """The names `--lora-modules` gives its adapters (`name=path`, or vLLM's JSON form with "name")."""
    names: set[str] = set()
    taking = False
    for arg in extra:
        if arg.startswith("--lora-modules="):
            arg, taking = arg.partition("=")[2], True
        elif arg == "--lora-modules":
            taking = True
            continue
        elif arg.startswith("-"):
            taking = False
            continue
        if taking:
            try:
                names.add(json.loads(arg)["name"] if arg.lstrip().startswith("{") else arg.partition("=")[0])
            except (ValueError, KeyError, TypeError):
                pass
    return names


def static_names(deployment: Deployment) -> set[str]:
    """Names the pool serves by its own command line (the tag, `<tag>-base`, `--lora-modules` names): an adapter
    may not take them, and the reconciler never unloads them."""
    return {deployment.model_tag, f"{deployment.model_tag}-base", *lora_module_names(list(deployment.engine_args))}


def check_can_add(deployment: Deployment, name: str, rank: int, existing: Iterable[Adapter]) -> None:
    """Refuse an adapter the pool cannot take, before anything is recorded: not vLLM, LoRA not enabled at start
    (vLLM cannot turn it on in a running server), a rank above the pool's `--max-lora-rank`, a name taken."""
    if not deployment.is_pool:
        raise Conflict(f"'{deployment.name}' is a standard deployment; adapters are added to model pools")
    if deployment.engine != ENGINE:
        raise Conflict(f"pool '{deployment.name}' runs {deployment.engine}; adapters can be added only to vLLM pools "
                       "(vLLM loads LoRA adapters at run time); deploy the task as its own pool instead")
    if not lora_enabled(deployment):
        raise Conflict(f"pool '{deployment.name}' was not started with LoRA enabled, and vLLM cannot enable it in a running "
                       f"server: deploy the pool with engineArgs '--enable-lora --max-lora-rank {max(rank, 8)}'")
    limit = max_lora_rank(deployment)
    if rank > limit:
        raise Conflict(f"the adapter's LoRA rank {rank} is above pool '{deployment.name}''s --max-lora-rank {limit}; "
                       f"redeploy the pool with '--max-lora-rank {rank}' or higher")
    if name in static_names(deployment):
        raise Conflict(f"adapterName '{name}' is already a model name of pool '{deployment.name}' (its tag, base model or "
                       "command-line LoRA modules); choose another")
    existing = list(existing)
    if any(a.name == name for a in existing):
        raise Conflict(f"pool '{deployment.name}' already has an adapter named '{name}'", Hint.REMOVE_ADAPTER,
                       pool=deployment.name, adapter=name)
    if len(existing) >= MAX_ADAPTERS_PER_POOL:
        raise Conflict(f"pool '{deployment.name}' has {len(existing)} adapters, the most a pool may have; remove one first")


def check_adapter_files(deployment: Deployment, pool_model: str, files: AdapterFiles) -> None:
    """Refuse an adapter the pool would serve wrongly, naming both sides: trained on another base model (its weights
    mean nothing on this one), DoRA (vLLM cannot serve it: merged weights can), or trained with another chat template or
    EOS than the pool's tokenizer (vLLM formats and stops every adapter's chats with the pool's tokenizer, so the
    adapter would see prompts it was not trained on and never stop). `pool_model`: the pool's model, resolved like
    `files.base_model`."""
    if files.base_model is not None and files.base_model != pool_model:
        raise Conflict(f"the adapter was trained on base model '{files.base_model[:300]}', but pool '{deployment.name}' serves "
                       f"'{pool_model[:300]}': add it to a pool of its base model, or deploy the task as its own pool")
    if files.dora:
        raise Conflict(f"the adapter is a DoRA adapter (use_dora), which vLLM cannot load at run time: deploy the task as its own "
                       f"pool with merge (its weights merged into the base model) instead of adding it to pool '{deployment.name}'")
    if files.chat is not None and files.pool_chat is not None and files.chat != files.pool_chat:
        (template, eos), (pool_template, pool_eos) = files.chat, files.pool_chat
        what = "chat template" if template != pool_template else f"EOS ({eos}, the pool's is {pool_eos})"
        raise Conflict(f"the adapter was trained with another {what} than pool '{deployment.name}''s tokenizer, and vLLM serves "
                       "every adapter of a pool with the pool's tokenizer (its chats would be formatted otherwise and would not "
                       "stop): deploy the task as its own pool (vLLM then gets the adapter's tokenizer) or merged")


def parse_loaded(models: object) -> dict[str, str]:
    """The LoRA adapters a vLLM replica has loaded (name → path), from its `GET /v1/models` answer: entries with a
    `parent` (the base model) are adapters. Anything unexpected reads as none loaded."""
    data = models.get("data") if isinstance(models, Mapping) else None
    loaded: dict[str, str] = {}
    for entry in data if isinstance(data, list) else ():
        if isinstance(entry, Mapping) and entry.get("parent") and isinstance(entry.get("id"), str):
            loaded[entry["id"]] = str(entry.get("root") or "")
    return loaded


def plan_sync(desired: Iterable[Adapter], loaded: Mapping[str, str], keep: Iterable[str] = ()) -> SyncPlan:
    """Loads and unloads that make a replica's adapters the desired ones. `keep`: names the replica serves by its
    command line (never unloaded). An adapter loaded from another path than desired is unloaded and re-loaded."""
    wanted = {a.name: a.path for a in desired}
    keep = set(keep)
    unload = sorted(n for n, path in loaded.items() if n not in keep and (n not in wanted or (path and path != wanted[n])))
    load = sorted((n, p) for n, p in wanted.items() if n not in loaded or n in unload)
    return SyncPlan(unload=tuple(unload), load=tuple(load))
