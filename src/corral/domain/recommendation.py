"""The finetune page's GPU recommendation, computed from detected memory — never a table of GPU names. Pure.

The advice is about the task a submit would create, and only what Corral can carry out:

- Sized with the submit's own defaults (`memory.submit_setup`: maxSeqLen 1024, batchSize 4, loraRank 8 — the same
  function the submit's preflight uses), and against what the preflight admits: the estimate plus
  `CORRAL_FINETUNE_MEMORY_MARGIN_GB` within the GPU's memory. A model recommended here is one whose default task is
  not refused on this GPU.
- Only methods and hyperparameters the submit accepts (`finetune_request.METHODS`, `hyperparameters`): a lighter
  setup is named by its fields (`method qlora`, `batchSize 1, gradientAccumulation 4`, `maxSeqLen 512`).
- QLoRA only where bitsandbytes is installed (`qlora_available`), and on one GPU (the submit refuses qlora on more).
- Several GPUs: one task per GPU, or one task data parallel over them (each GPU holds a whole copy, so it is faster,
  not bigger) — never DeepSpeed/FSDP, which Corral does not run, and never more GPUs than were detected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.domain.errors import InvalidInput
from corral.domain.finetune_request import METHODS as SUBMIT_METHODS
from corral.domain.memory import GIB, ModelSpec, TrainingSetup, models_that_fit, submit_setup, training_memory

PREFLIGHT_MARGIN_GB = 1.0  # CORRAL_FINETUNE_MEMORY_MARGIN_GB's default: free memory the preflight wants beyond the estimate
# Lighter setups to suggest, in order, when the default task fits no catalogue model: the same effective batch first
# (gradient accumulation), then 4-bit weights, then shorter sequences. Each is a submit's method and hyperparameters.
ONE_BY_FOUR: Mapping[str, Any] = {"batchSize": 1, "gradientAccumulation": 4}
LIGHTER: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("lora", ONE_BY_FOUR),
    ("qlora", {}),
    ("qlora", ONE_BY_FOUR),
    ("lora", {**ONE_BY_FOUR, "maxSeqLen": 512}),
    ("qlora", {**ONE_BY_FOUR, "maxSeqLen": 512}),
)


@dataclass(frozen=True)
class DeviceMemory:
    name: str
    memory_bytes: int


def _size(model: ModelSpec) -> str:
    return model.display.rsplit(" ", 1)[-1]  # "Qwen 2.5 Coder 0.5B" → "0.5B"


def _settings(method: str, hp: Mapping[str, Any]) -> str:
    return ", ".join([f"method {method}", *(f"{k} {v}" for k, v in hp.items())])


def recommend(devices: Sequence[DeviceMemory], catalogue: Sequence[ModelSpec], method: str = "lora",
              no_gpu_reason: str | None = None, *, qlora_available: bool = False,
              margin_gb: float = PREFLIGHT_MARGIN_GB) -> tuple[str, str | None]:
    """(recommendation, warning). The largest catalogue model whose default `method` task fits one GPU (the smallest
    detected) with the preflight's margin, and the next smaller one; the larger model QLoRA would fit, where
    bitsandbytes is here; several GPUs add a hint; no GPU gives a warning instead."""
    if method not in SUBMIT_METHODS:
        raise InvalidInput(f"method must be one of {', '.join(SUBMIT_METHODS)}, got '{method}'")
    if method == "qlora" and not qlora_available:
        raise InvalidInput("qlora needs bitsandbytes, which is not installed here: advise lora instead")
    if not devices:
        reason = f" ({no_gpu_reason})" if no_gpu_reason else ""
        warning = (f"No NVIDIA GPU detected{reason}: finetuning runs on the CPU, one task at a time; "
                   "only tiny models train in reasonable time")
        return warning, warning
    smallest = min(devices, key=lambda d: d.memory_bytes)
    memory_gb = smallest.memory_bytes / GIB
    room = smallest.memory_bytes - margin_gb * GIB  # what the preflight admits an estimate into
    label = f"{smallest.name} ({memory_gb:.1f}GB)" if len(devices) == 1 else f"{len(devices)} × {smallest.name} ({memory_gb:.1f}GB each)"
    setup = submit_setup(method)
    fitting = models_that_fit(catalogue, room, setup)
    if not fitting:
        return _lighter(label, catalogue, method, setup, room, margin_gb, qlora_available)
    best = fitting[0]
    text = f"{label}: recommended {best.display} (best balance)"
    if len(fitting) > 1:
        text += f" or {_size(fitting[1])} (fastest training)"
    if qlora_available and method != "qlora":
        larger = [m for m in models_that_fit(catalogue, room, submit_setup("qlora")) if m.params > best.params]
        if larger:
            text += f"; {_size(larger[0])} with method qlora"
    if len(devices) > 1:
        text += f"; {len(devices)} GPUs: train up to {len(devices)} such tasks in parallel, one per GPU"
        if method != "qlora":  # the submit refuses qlora on more than one GPU
            text += (f", or one {method} task on several (data parallel: each GPU holds the whole model, so it trains "
                     "faster, not a larger model)")
    return text, None


def _lighter(label: str, catalogue: Sequence[ModelSpec], method: str, setup: TrainingSetup, room: float,
             margin_gb: float, qlora_available: bool) -> tuple[str, str | None]:
    """Nothing fits with the defaults: the first lighter setup (`LIGHTER`) that fits the smallest model, by the
    fields a submit takes; else a warning."""
    smallest_model = min(catalogue, key=lambda m: m.params)
    need = training_memory(smallest_model, setup).total_gb + margin_gb
    defaults = f"the defaults (method {method}, maxSeqLen {setup.seq_len}, batchSize {setup.batch_size}) need about {need:.1f}GB with the preflight's margin"
    for lighter_method, hp in LIGHTER:
        if lighter_method == "qlora" and not qlora_available:
            continue
        if models_that_fit([smallest_model], room, submit_setup(lighter_method, hp)):
            return f"{label}: recommended {smallest_model.display} with {_settings(lighter_method, hp)}; {defaults}", None
    text = f"{label}: too small to finetune {smallest_model.display}: {defaults}, and no lighter setup fits"
    return text, text
