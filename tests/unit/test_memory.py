"""The memory estimator against published figures, and the recommendation against spec 02's thresholds."""

from __future__ import annotations

import pytest

from corral.domain.errors import InvalidInput
from corral.domain.memory import GIB, QWEN25_CODER, TrainingSetup, find_model, serving_memory, training_memory
from corral.domain.recommendation import DeviceMemory, recommend

# LLaMA-Factory's README hardware table (GB, 16-bit unless noted).
PUBLISHED = [
    ("llama-7b", TrainingSetup(method="lora"), 16),
    ("llama-7b", TrainingSetup(method="qlora", quant_bits=8), 10),
    ("llama-7b", TrainingSetup(method="qlora", quant_bits=4), 6),
    ("llama-7b", TrainingSetup(method="freeze"), 20),
    ("llama-13b", TrainingSetup(method="lora"), 32),
    ("llama-13b", TrainingSetup(method="qlora"), 12),
    ("llama-30b", TrainingSetup(method="lora"), 80),
    ("llama-30b", TrainingSetup(method="qlora"), 24),
    ("llama-2-70b", TrainingSetup(method="lora"), 160),
    ("llama-2-70b", TrainingSetup(method="qlora"), 48),
]


@pytest.mark.parametrize(("model", "setup", "published_gb"), PUBLISHED)
def test_estimates_are_within_15_percent_of_published_figures(model: str, setup: TrainingSetup, published_gb: float) -> None:
    estimate = training_memory(find_model(model), setup).total_gb
    assert abs(estimate - published_gb) / published_gb <= 0.15, f"{model} {setup.method}: {estimate:.1f} vs {published_gb}"


def test_estimates_order_methods_as_physics_does() -> None:
    model = find_model("qwen2.5-coder-7b")
    gb = {m: training_memory(model, TrainingSetup(method=m)).total_gb for m in ("full", "freeze", "lora", "qlora")}
    assert gb["full"] > gb["freeze"] > gb["lora"] > gb["qlora"]
    longer = training_memory(model, TrainingSetup(seq_len=8192)).total_gb
    assert longer > gb["lora"]
    assert training_memory(model, TrainingSetup(gradient_checkpointing=False)).total_gb > gb["lora"]


def test_serving_is_weights_plus_kv_cache() -> None:
    model = find_model("qwen2.5-coder-7b")
    one = serving_memory(model, context_tokens=1, concurrency=1).parts["kvCache"]
    assert one == 2 * 28 * (4 * 128) * 2  # k and v × layers × kv heads × head dim × bf16
    assert serving_memory(model, 4096, 8).parts["kvCache"] == one * 4096 * 8


def rec(memory_gb: float, count: int = 1) -> str:
    devices = [DeviceMemory("GPU", int(memory_gb * GIB))] * count
    return recommend(devices, QWEN25_CODER)[0]


@pytest.mark.parametrize(
    ("memory_gb", "best", "fastest"),
    [(6, "0.5B", None), (8, "1.5B", "0.5B"), (10, "1.5B", "0.5B"), (12, "3B", "1.5B"),
     (16, "3B", "1.5B"), (20, "3B", "1.5B"), (24, "7B", "3B"), (32, "7B", "3B")],
)
def test_recommendation_reproduces_spec_thresholds(memory_gb: float, best: str, fastest: str | None) -> None:
    """≥ 24 GB → 7B or 3B; ≥ 12 GB → 3B or 1.5B; ≥ 8 GB → 1.5B or 0.5B; < 8 GB → 0.5B (default LoRA settings)."""
    text = rec(memory_gb)
    assert f"recommended Qwen 2.5 Coder {best} (best balance)" in text
    if fastest:
        assert text.endswith(f"or {fastest} (fastest training)")
    else:
        assert "fastest" not in text


def test_recommendation_text_names_the_gpu_and_scales_with_catalogue() -> None:
    text, warning = recommend([DeviceMemory("NVIDIA GeForce RTX 3060", 12 * GIB)], QWEN25_CODER)
    assert text == "NVIDIA GeForce RTX 3060 (12.0GB): recommended Qwen 2.5 Coder 3B (best balance) or 1.5B (fastest training)"
    assert warning is None
    assert "Qwen 2.5 Coder 32B" in rec(80)  # not capped by a table of names


def test_multi_gpu_hint_and_no_gpu_warning() -> None:
    text = rec(80, count=8)
    assert text.startswith("8 × GPU (80.0GB each)") and "8 GPUs: train up to 8 such tasks in parallel" in text
    text, warning = recommend([], QWEN25_CODER, no_gpu_reason="NVML: NVML Shared Library Not Found")
    assert warning == text and text.startswith("No NVIDIA GPU detected (NVML: NVML Shared Library Not Found)")
    small, warn = recommend([DeviceMemory("Small", 4 * GIB)], QWEN25_CODER)
    assert small == ("Small (4.0GB): recommended Qwen 2.5 Coder 0.5B with QLoRA 4-bit, sequence length 512 "
                     "(LORA at these settings needs about 4.9GB)") and warn is None
    tiny, warn = recommend([DeviceMemory("Tiny", GIB)], QWEN25_CODER)
    assert tiny.startswith("Tiny (1.0GB): too small to finetune Qwen 2.5 Coder 0.5B") and warn == tiny


def test_bad_estimator_input() -> None:
    with pytest.raises(InvalidInput, match="method must be one of full, lora, qlora, freeze"):
        TrainingSetup(method="dora")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="quant_bits must be 4 or 8"):
        TrainingSetup(method="qlora", quant_bits=3)
    with pytest.raises(InvalidInput, match="model 'gpt-9' is unknown"):
        find_model("gpt-9")
