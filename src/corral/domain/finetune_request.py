"""The checks of a finetune submit or preview request that need nothing but its values: pure, no I/O.

Each raises `InvalidInput` with the message the API, the CLI and the UI show. The checks that need this machine
(the dataset file, a model directory, the trainer's packages, the GPUs' memory) are the manager's
(`corral.finetune.intake`), which calls these in the order a request is read: a request with several problems is
refused for its first one, the same way everywhere. The hyperparameters have their own module
(`corral.domain.hyperparameters`).
"""

from __future__ import annotations

import math
from typing import Any

from corral.domain.errors import InvalidInput
from corral.domain.queue import Priority

METHODS = ("lora", "qlora", "full", "dpo", "orpo")
# The preference methods (TRL's DPO and ORPO trainers on `chosen`/`rejected` data) train a LoRA adapter, like lora.
PREFERENCE_METHODS = ("dpo", "orpo")
ADAPTER_METHODS = ("lora", "qlora", *PREFERENCE_METHODS)  # a result that is a LoRA adapter (merged, or added to a pool)
MAX_PATH = 4096  # characters of baseModel and datasetPath
MAX_GPUS = 64
MAX_MEMORY_GB = 1_000_000.0
MAX_TIMEOUT_S = 366 * 86400.0  # timeoutSeconds: a year; the queue turns it into a time (a reservation, a start-by date)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short(value: Any, limit: int = 200) -> str:
    """A value quoted in a refusal: readable (NaN, not nan), and never megabytes long."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidInput(f"method must be one of {', '.join(METHODS)}, got '{short(method)}'")
    return method


def check_priority(priority: Any) -> str:
    """The priority's name as stored (`high`, `normal` or `low`; any case is accepted)."""
    try:
        Priority.parse(priority)
    except (KeyError, AttributeError, TypeError):
        raise InvalidInput(f"priority must be high, normal or low, got '{short(priority)}'") from None
    return priority.lower()


def check_preemptible(preemptible: Any, priority: str) -> bool:
    """Whether a business of higher priority may take the task's GPUs: as given, else true below `high`."""
    if preemptible is not None and not isinstance(preemptible, bool):
        raise InvalidInput(f"preemptible must be true or false, got {short(preemptible)}")
    return priority != "high" if preemptible is None else preemptible


def check_path_text(value: Any, field: str) -> None:
    """A path or hub id Corral can store and hand to a process: a string, at most MAX_PATH characters, no NUL."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} is required")
    if len(value) > MAX_PATH:
        raise InvalidInput(f"{field} is {len(value)} characters long; at most {MAX_PATH} are allowed")
    if "\x00" in value:
        raise InvalidInput(f"{field} must not contain a NUL byte")


def check_gpus(count: Any, method: str, has_gpu: bool) -> int:
    """The GPUs a task asks for (`count`: as given, or the default for this machine), and whether `method` can train
    on them; `has_gpu`: the machine has a GPU at all."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0 or count > MAX_GPUS:
        raise InvalidInput(f"gpus must be an integer from 0 to {MAX_GPUS}, got {short(count)}")
    if count and not has_gpu:
        raise InvalidInput("this machine has no GPU: submit with gpus 0 to train on the CPU")
    if method == "qlora" and not count:
        raise InvalidInput("qlora needs a GPU (bitsandbytes 4-bit); use method 'lora' on the CPU")
    if method == "qlora" and count > 1:
        raise InvalidInput(f"qlora trains on one GPU (its 4-bit weights are not spread over data-parallel processes "
                           f"here), got gpus {count}: submit it with gpus 1, or use lora or full on {count} GPUs "
                           "(distributed data parallel, one process per GPU)")
    return count


def check_memory_gb(memory_gb: Any) -> None:
    """gpus.memoryGb, when given: the memory per GPU the task needs instead of the estimate."""
    if memory_gb is not None and (not finite(memory_gb) or not 0 <= memory_gb <= MAX_MEMORY_GB):
        raise InvalidInput(f"gpus.memoryGb must be a number of GB from 0 to {MAX_MEMORY_GB:.0f}, got {short(memory_gb)}")


def check_timeout(timeout: Any) -> float:
    if not finite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise InvalidInput(f"timeoutSeconds must be a positive number of seconds, at most {MAX_TIMEOUT_S:.0f} (366 days), "
                           f"got {short(timeout)}")
    return float(timeout)


MAX_DATASET_SOURCES = 16  # `datasets` entries of a mix


def check_dataset_sources(dataset_path: Any, datasets: Any) -> list[tuple[str, float]]:
    """The dataset(s) a request names, as (path, ratio): `datasetPath` alone (ratio 1), or `datasets`, a list of
    1 to 16 `{path, ratio}` (ratio in (0, 1]: the share of that source's examples trained; default 1), each path
    once. Exactly one of the two."""
    if datasets is None:
        check_path_text(dataset_path, "datasetPath")
        return [(dataset_path, 1.0)]
    if dataset_path is not None:
        raise InvalidInput("give datasetPath or datasets, not both")
    if not isinstance(datasets, list) or not 1 <= len(datasets) <= MAX_DATASET_SOURCES:
        raise InvalidInput(f"datasets must be a list of 1 to {MAX_DATASET_SOURCES} {{path, ratio}} entries, got "
                           f"{len(datasets) if isinstance(datasets, list) else short(datasets)}")
    sources: list[tuple[str, float]] = []
    for i, entry in enumerate(datasets):
        if not isinstance(entry, dict) or set(entry) - {"path", "ratio"}:
            raise InvalidInput(f"datasets[{i}] must be {{path, ratio}}, got {short(entry)}")
        path, ratio = entry.get("path"), entry.get("ratio", 1.0)
        check_path_text(path, f"datasets[{i}].path")
        if not finite(ratio) or not 0 < ratio <= 1:
            raise InvalidInput(f"datasets[{i}].ratio must be a number above 0 and at most 1 (the share of its examples "
                               f"trained), got {short(ratio)}")
        if any(path == seen for seen, _ in sources):
            raise InvalidInput(f"datasets[{i}].path '{short(path)}' is named twice: give each source once, with its ratio")
        sources.append((path, float(ratio)))
    return sources
