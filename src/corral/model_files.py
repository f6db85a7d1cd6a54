"""Size any model from its files on this machine, without loading weights: the I/O half of memory sizing.

Where a model's files are found, in order:
1. a catalogue name (`qwen2.5-coder-7b`): the estimator's own table;
2. a local directory: its config.json, and its safetensors headers when the weights are there;
3. a hub id (`Org/Name`) in the Hugging Face cache — `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
   `~/.cache/huggingface/hub` — as `models--Org--Name/snapshots/<revision>/` (the revision `refs/main` names, else
   the newest snapshot holding a config.json);
4. the catalogue by name, ignoring the organisation and a chat/instruct suffix
   (`Qwen/Qwen2.5-Coder-7B-Instruct` → `qwen2.5-coder-7b`: the chat-tuned weights have the same shape).
Otherwise `InvalidInput` (400) says what to give: a local model directory, or `memoryGb` on the task.

A safetensors file starts with an 8-byte little-endian header length, then a JSON header listing each tensor's
dtype and shape: reading that header gives the exact parameter count and dtype of a model of any size in
milliseconds. Sharded models list their shards in `model.safetensors.index.json`. Every read is bounded (a
huge or malformed config, index or header is refused with a message, never read whole into memory), and the
arithmetic lives in `corral.domain.model_shape` (pure, tested without a disk).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from corral.domain.errors import Conflict, InvalidInput
from corral.domain.memory import KNOWN_MODELS, ModelSpec
from corral.domain.model_shape import (
    DTYPE_BYTES,
    StoredTensors,
    catalogue_name,
    shape_from_config,
    stored_tensors,
)

MAX_CONFIG_BYTES = 16 * 1024**2  # real config.json files are a few KB
MAX_INDEX_BYTES = 64 * 1024**2  # the largest public shard indexes are a few MB
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its header
MAX_SHARDS = 4096
# Matched with `fullmatch`: `$` would also pass an id ending in a newline.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

Source = Literal["catalogue", "directory", "hf-cache"]
Counted = Literal["catalogue", "safetensors", "index", "config"]


@dataclass(frozen=True)
class SizedModel:
    """A model the estimator can size, and where its numbers come from (shown to users beside the estimate)."""

    spec: ModelSpec
    source: Source
    counted_from: Counted  # what gave the parameter count: headers (exact), the shard index's byte total, the formula
    path: Path | None = None
    note: str = ""  # why the count may be approximate, where it may be

    @property
    def exact(self) -> bool:
        return self.counted_from == "safetensors" and not self.note


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache, as `huggingface_hub` resolves it (read from `env` each call, not at import)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):  # the older name
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def cached_snapshot(repo_id: str, cache: Path | None = None) -> Path | None:
    """The snapshot directory of a cached hub model that holds its config.json, or None."""
    if not HUB_ID.fullmatch(repo_id) or ".." in repo_id:
        return None
    org, name = repo_id.split("/")
    repo = (cache or hub_cache_dir()) / f"models--{org}--{name}"
    snapshots = repo / "snapshots"
    try:
        ref = (repo / "refs" / "main").read_text(encoding="utf-8")[:128].strip()
    except (OSError, UnicodeDecodeError):
        ref = ""
    try:
        if ref and re.fullmatch(r"[0-9a-f]{7,64}", ref) and (snapshots / ref / "config.json").is_file():
            return snapshots / ref
        candidates = [d for d in snapshots.iterdir() if (d / "config.json").is_file()] if snapshots.is_dir() else []
    except OSError:
        return None
    return max(candidates, key=lambda d: (d.stat().st_mtime, d.name)) if candidates else None


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InvalidInput(f"{what} {path} is larger than {limit // 1024**2} MB: not a model's {what}")
    return data


def _json(data: bytes, what: str, path: Path) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidInput(f"{what} {path} is not valid JSON ({str(exc)[:120]})") from None


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise InvalidInput(f"model directory {directory} has no config.json: give a directory saved with "
                           "save_pretrained (or a hub model), or memoryGb on the task")
    config = _json(_read_bounded(path, MAX_CONFIG_BYTES, "config.json"), "config.json", path)
    if not isinstance(config, dict):
        raise InvalidInput(f"config.json {path} is not a JSON object")
    return config


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file: 8 bytes of little-endian length, then that many bytes of JSON."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InvalidInput(f"{path} is too short to be a safetensors file")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise InvalidInput(f"{path} declares a {length}-byte safetensors header (the file has {size} bytes, "
                                   f"the format allows {MAX_HEADER_BYTES}): not a valid safetensors file")
            data = handle.read(length)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    header = _json(data, "safetensors header of", path)
    if not isinstance(header, dict):
        raise InvalidInput(f"safetensors header of {path} is not a JSON object")
    return header


def _shards(directory: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The weight files to read, and the shard index when there is one. `model.safetensors.index.json` wins; then
    `model.safetensors`; then `model-*-of-*.safetensors` — never every *.safetensors, since some repositories keep a
    second copy of the weights (Mistral's `consolidated.safetensors`) beside them."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = _json(_read_bounded(index_path, MAX_INDEX_BYTES, "shard index"), "shard index", index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidInput(f"shard index {index_path} has no weight_map of tensor → file names")
        names = sorted(set(weight_map.values()))
        if len(names) > MAX_SHARDS or any(Path(n).name != n or not n.endswith(".safetensors") for n in names):
            raise InvalidInput(f"shard index {index_path} names files outside its directory or too many of them")
        return [directory / n for n in names], index
    single = directory / "model.safetensors"
    if single.is_file():
        return [single], None
    return sorted(directory.glob("model-*-of-*.safetensors"))[:MAX_SHARDS], None


def stored_in(directory: Path, config_dtype: str = "") -> tuple[StoredTensors | None, Counted | None]:
    """The stored parameters of a model directory: from every shard's header when all shards are here, else from
    the index's `metadata.total_size` (bytes) ÷ the config's dtype, else None (no weights here)."""
    files, index = _shards(directory)
    present = [f for f in files if f.is_file()]
    if files and len(present) == len(files):
        total = StoredTensors({})
        for path in present:
            total = total + stored_tensors(read_safetensors_header(path), f"safetensors header of {path}")
        return total, "safetensors"
    if index is not None:
        size = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0 and config_dtype in DTYPE_BYTES:
            return StoredTensors({config_dtype: size // DTYPE_BYTES[config_dtype]}), "index"
    return None, None


def size_directory(directory: Path, name: str, source: Source) -> SizedModel:
    config = read_config(directory)
    shape = shape_from_config(config)
    stored, counted = stored_in(directory, shape.dtype)
    notes = []
    if shape.quantized and stored is not None:  # packed 4-bit tensors hold several parameters per element
        notes.append(f"a {shape.quantized}-quantised checkpoint: parameters counted from config.json")
        stored, counted = None, None
    if stored is None and shape.approximate:
        notes.append(shape.approximate)
    if counted == "index":
        notes.append("shards not all on disk: parameters from the index's total size")
    display = directory.name if source == "directory" else name
    spec = shape.spec(name, display, stored.parameters if stored else None, stored.dtype if stored else "")
    if shape.moe_layers and shape.approximate:
        notes.append("active parameters approximate")
    return SizedModel(spec, source, counted or "config", directory, "; ".join(dict.fromkeys(notes)))


def _is_dir(model: str) -> bool:
    try:
        return Path(model).expanduser().is_dir()
    except (OSError, ValueError):
        return False


def size_model(model: str, cache: Path | None = None) -> SizedModel:
    """Size `model` (a catalogue name, a local directory or a hub id) from what this machine has; `InvalidInput`
    saying what to give when nothing here tells its size."""
    model = (model or "").strip()
    if not model or len(model) > 4096 or "\x00" in model:
        raise InvalidInput("model must be a catalogue name, a local model directory or a hub id (Org/Name)")
    if model.lower() in KNOWN_MODELS:
        return SizedModel(KNOWN_MODELS[model.lower()], "catalogue", "catalogue")
    if _is_dir(model):
        directory = Path(model).expanduser()
        return size_directory(directory, str(directory), "directory")
    if (snapshot := cached_snapshot(model, cache)) is not None:
        return size_directory(snapshot, model, "hf-cache")
    if (known := catalogue_name(model)) is not None:
        return SizedModel(KNOWN_MODELS[known], "catalogue", "catalogue", note=f"sized as the catalogue's {known}")
    where = "a local directory" if not HUB_ID.fullmatch(model) else f"in the Hugging Face cache ({cache or hub_cache_dir()})"
    raise InvalidInput(
        f"model '{model[:200]}' is unknown to the estimator: it is not {where}, and not a catalogue model "
        f"({', '.join(KNOWN_MODELS)}). Give a local model directory (with config.json and ideally its safetensors), "
        "download the hub model first, or give memoryGb (GB per GPU) on the finetune task")


def size_model_or_none(model: str, cache: Path | None = None) -> SizedModel | None:
    """`size_model`, with None instead of the refusal: for hints (the UI's estimate) that must not fail."""
    try:
        return size_model(model, cache)
    except InvalidInput:
        return None


def adapter_rank(adapter: Path) -> int:
    """The largest LoRA rank in a peft adapter (its `r`, or a larger one in `rank_pattern`)."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise Conflict(f"the adapter in {adapter} has no readable adapter_config.json")
    ranks = [config.get("r") or 8, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks if isinstance(r, (int, float)))
