"""What the control plane checks about a base model and a finished adapter by reading their files (no
transformers, no torch): does the tokenizer have a chat template, and what vLLM needs to serve an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corral.domain.adapters import AdapterFiles, flag_value
from corral.domain.errors import Conflict
from corral.model_files import adapter_rank

# vLLM's accepted `--max-lora-rank` values (vllm.config.lora.MaxLoRARanks); its default, 16, refuses larger adapters.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tokenizer_files(base_model: str) -> Path | None:
    """The directory holding the base model's tokenizer files: the model directory, or the hub cache's snapshot
    of a hub id (None when neither is here: nothing to check before the trainer downloads it)."""
    try:
        local = Path(base_model)
        if local.is_dir():
            return local
    except (OSError, ValueError):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(base_model, "tokenizer_config.json")
    except Exception:  # an id the hub library refuses
        return None
    return Path(found).parent if isinstance(found, str) else None


def has_chat_template(directory: Path) -> bool | None:
    """True or False when `directory` holds a tokenizer; None when it holds none (nothing to tell)."""
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    extra = directory / "additional_chat_templates"
    if extra.is_dir() and any(extra.iterdir()):
        return True
    config = _read_json(directory / "tokenizer_config.json")
    if config is None:
        return None if not (directory / "tokenizer.json").is_file() else False
    return bool(config.get("chat_template"))


def chat_template_problem(base_model: str, dataset_format: str) -> str | None:
    """Why chat examples cannot be rendered for `base_model`, with what to do; None when they can (or when the
    tokenizer is not here to tell)."""
    directory = _tokenizer_files(base_model)
    if directory is None or has_chat_template(directory) is not False:
        return None
    return no_chat_template(base_model, dataset_format)


def no_chat_template(base_model: str, dataset_format: str) -> str:
    return (f"the tokenizer of baseModel '{base_model}' has no chat template, and the dataset's examples are chat "
            f"({dataset_format}): use the instruct/chat version of the model, add a chat template to its tokenizer "
            "(chat_template.jinja, or \"chat_template\" in tokenizer_config.json), choose a built-in one with the "
            "chatTemplate hyperparameter (chatml, qwen, llama3, mistral, gemma), or give the examples as plain text "
            "('text', or 'prompt'/'completion' strings)")


def vllm_lora_args(model_tag: str, adapter: Path, own_tokenizer: bool = False) -> list[str]:
    """vLLM's arguments to serve `adapter` under `model_tag`, with room for its rank. `own_tokenizer` (a task trained
    with a built-in chat template): the tokenizer saved with the adapter (`--tokenizer`), which carries that template
    and its end-of-turn token as EOS, so the pool formats chats as trained and stops at the end of an answer; the base
    model's tokenizer would do neither."""
    rank = adapter_rank(adapter)
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise Conflict(f"the adapter's LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): deploy with merge "
                       "(merged weights) instead")
    tokenizer = ["--tokenizer", str(adapter)] if own_tokenizer and (adapter / "tokenizer_config.json").is_file() else []
    return ["--enable-lora", "--lora-modules", f"{model_tag}={adapter}", "--max-lora-rank", str(fitting[0]), *tokenizer]


def adapter_config(adapter: Path) -> dict[str, Any]:
    return _read_json(adapter / "adapter_config.json") or {}


def resolved_model(model: str) -> str:
    """A model id as compared: a local directory resolved (symlinks, `..`, a trailing slash), a hub id as given."""
    try:
        local = Path(model)
        if local.is_dir():
            return str(local.resolve())
    except (OSError, ValueError):
        pass
    return model.strip()


def chat_signature(directory: Path) -> tuple[str | None, str | None] | None:
    """(chat template, EOS) of the tokenizer saved in `directory`; None when it holds no tokenizer."""
    config = _read_json(directory / "tokenizer_config.json")
    if config is None:
        return None
    template = config.get("chat_template")
    try:
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        pass
    eos = config.get("eos_token")
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    return (template if isinstance(template, str) else None, eos if isinstance(eos, str) else None)


def adapter_files(adapter: Path, pool_model: str, pool_args: list[str]) -> AdapterFiles:
    """What `adapter` says about its training, and the chat signature of the tokenizer the pool serves with (its
    `--tokenizer`, else its model's); the defaults for what cannot be read here."""
    config = adapter_config(adapter)
    base = config.get("base_model_name_or_path")
    tokenizer = flag_value(pool_args, "--tokenizer") or pool_model
    try:
        pool_dir = Path(tokenizer) if Path(tokenizer).is_dir() else None
    except (OSError, ValueError):
        pool_dir = None
    return AdapterFiles(base_model=resolved_model(base) if isinstance(base, str) and base else None,
                        dora=bool(config.get("use_dora")), chat=chat_signature(adapter),
                        pool_chat=chat_signature(pool_dir) if pool_dir is not None else None)
