"""The finetune page's GPU recommendation, computed from detected memory — never a table of GPU names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from corral.domain.memory import GIB, ModelSpec, TrainingSetup, models_that_fit, training_memory


@dataclass(frozen=True)
class DeviceMemory:
    name: str
    memory_bytes: int


def _size(model: ModelSpec) -> str:
    return model.display.rsplit(" ", 1)[-1]  # "Qwen 2.5 Coder 0.5B" → "0.5B"


def recommend(devices: Sequence[DeviceMemory], catalogue: Sequence[ModelSpec], setup: TrainingSetup = TrainingSetup(),
              no_gpu_reason: str | None = None) -> tuple[str, str | None]:
    """(recommendation, warning). The largest catalogue model whose finetune fits one GPU, and the next
    smaller one; several GPUs add a multi-card hint; no GPU gives a warning instead."""
    if not devices:
        reason = f" ({no_gpu_reason})" if no_gpu_reason else ""
        warning = (f"No NVIDIA GPU detected{reason}: finetuning runs on the CPU, one task at a time; "
                   "only tiny models train in reasonable time")
        return warning, warning
    smallest = min(devices, key=lambda d: d.memory_bytes)
    memory_gb = smallest.memory_bytes / GIB
    label = f"{smallest.name} ({memory_gb:.1f}GB)" if len(devices) == 1 else f"{len(devices)} × {smallest.name} ({memory_gb:.1f}GB each)"
    fitting = models_that_fit(catalogue, smallest.memory_bytes, setup)
    method = setup.method.upper() if setup.method in ("lora", "qlora") else setup.method
    if not fitting:  # < the smallest model's default needs: suggest the lightest setup that fits
        smallest_model = min(catalogue, key=lambda m: m.params)
        need = training_memory(smallest_model, setup).total_gb
        for lighter in (replace(setup, method="qlora", quant_bits=4), replace(setup, method="qlora", quant_bits=4, seq_len=512)):
            if models_that_fit([smallest_model], smallest.memory_bytes, lighter):
                text = (f"{label}: recommended {smallest_model.display} with QLoRA 4-bit, sequence length {lighter.seq_len} "
                        f"({method} at these settings needs about {need:.1f}GB)")
                return text, None
        text = (f"{label}: too small to finetune {smallest_model.display} ({method} needs about {need:.1f}GB, "
                "and even QLoRA 4-bit at sequence length 512 does not fit)")
        return text, text
    best = fitting[0]
    text = f"{label}: recommended {best.display} (best balance)"
    if len(fitting) > 1:
        text += f" or {_size(fitting[1])} (fastest training)"
    if len(devices) > 1:
        text += (f"; {len(devices)} GPUs: train up to {len(devices)} such tasks in parallel, one per GPU, "
                 "or a larger model across cards (DeepSpeed/FSDP)")
    return text, None
