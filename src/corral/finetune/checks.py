"""What the control plane checks about a base model and a finished adapter by reading their files (no
transformers, no torch): does the tokenizer have a chat template, and what vLLM needs to serve an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def vllm_lora_args(model_tag: str, adapter: Path) -> list[str]:
    """vLLM's arguments to serve `adapter` under `model_tag`, with room for its rank."""
    rank = adapter_rank(adapter)
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise Conflict(f"the adapter's LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}): deploy with merge "
                       "(merged weights) instead")
    return ["--enable-lora", "--lora-modules", f"{model_tag}={adapter}", "--max-lora-rank", str(fitting[0])]
