"""GPU memory needed to finetune or serve a model, from its architecture, and what fits a GPU.

Training (bytes): frozen weights at their storage precision (2 for 16-bit, 1 for 8-bit, ~0.56 for
4-bit NF4 with double-quantised constants) + trainable parameters with their gradient, fp32 master
copy and two fp32 Adam moments (16 bytes each; mixed precision) + activations (with gradient
checkpointing: each layer's input, plus one layer recomputed at a time) + fp32 logits and their
gradient (large for 150k-token vocabularies) + a fixed CUDA context + 10% allocator fragmentation.
Serving: weights + KV cache (2 × layers × kv heads × head dim × 2 bytes per token) + the same margin.

The defaults reproduce spec 02's recommendation thresholds for Qwen2.5-Coder LoRA and stay within
25% of LLaMA-Factory's published hardware table (tests/unit/test_memory.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from corral.domain.errors import InvalidInput

GIB = 1024**3
CONTEXT_OVERHEAD_BYTES = 1 * GIB  # CUDA context and cuBLAS workspace
FRAGMENTATION = 0.10  # PyTorch's caching allocator holds more than the tensors need

Method = Literal["full", "lora", "qlora", "freeze"]
METHODS: tuple[Method, ...] = ("full", "lora", "qlora", "freeze")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    display: str
    params: float
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def lora_params(self, rank: int) -> int:
        """Adapters on every linear projection (q, k, v, o, gate, up, down): rank × (in + out) each."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        per_layer = (h + h) + 2 * (h + kv) + (h + h) + 3 * (h + f)
        return rank * per_layer * self.layers


# Qwen2.5-Coder, from the models' config.json: the default catalogue for recommendations.
QWEN25_CODER = (
    ModelSpec("qwen2.5-coder-0.5b", "Qwen 2.5 Coder 0.5B", 0.494e9, 896, 24, 4864, 14, 2, 151936),
    ModelSpec("qwen2.5-coder-1.5b", "Qwen 2.5 Coder 1.5B", 1.544e9, 1536, 28, 8960, 12, 2, 151936),
    ModelSpec("qwen2.5-coder-3b", "Qwen 2.5 Coder 3B", 3.086e9, 2048, 36, 11008, 16, 2, 151936),
    ModelSpec("qwen2.5-coder-7b", "Qwen 2.5 Coder 7B", 7.616e9, 3584, 28, 18944, 28, 4, 152064),
    ModelSpec("qwen2.5-coder-14b", "Qwen 2.5 Coder 14B", 14.77e9, 5120, 48, 13824, 40, 8, 152064),
    ModelSpec("qwen2.5-coder-32b", "Qwen 2.5 Coder 32B", 32.76e9, 5120, 64, 27648, 40, 8, 152064),
)
# LLaMA sizes behind LLaMA-Factory's hardware table, to check the estimator against published figures.
LLAMA = (
    ModelSpec("llama-7b", "LLaMA 7B", 6.74e9, 4096, 32, 11008, 32, 32, 32000),
    ModelSpec("llama-13b", "LLaMA 13B", 13.0e9, 5120, 40, 13824, 40, 40, 32000),
    ModelSpec("llama-30b", "LLaMA 30B", 32.5e9, 6656, 60, 17920, 52, 52, 32000),
    ModelSpec("llama-2-70b", "Llama 2 70B", 69.0e9, 8192, 80, 28672, 64, 8, 32000),
)
KNOWN_MODELS = {m.name: m for m in (*QWEN25_CODER, *LLAMA)}


def find_model(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name.lower()]
    except KeyError:
        raise InvalidInput(f"model '{name}' is unknown to the estimator; known: {', '.join(KNOWN_MODELS)}") from None


@dataclass(frozen=True)
class TrainingSetup:
    method: Method = "lora"
    quant_bits: int = 4  # qlora only: 4 or 8
    seq_len: int = 2048
    batch_size: int = 1
    lora_rank: int = 8
    gradient_checkpointing: bool = True
    freeze_trainable_layers: int = 2  # freeze: the last N layers train

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.method == "qlora" and self.quant_bits not in (4, 8):
            raise InvalidInput(f"quant_bits must be 4 or 8 for qlora, got {self.quant_bits}")
        for name in ("seq_len", "batch_size", "lora_rank", "freeze_trainable_layers"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be at least 1")


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total_bytes(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    def as_dict(self) -> dict[str, object]:
        return {"totalGb": round(self.total_gb, 2), "breakdownGb": {k: round(v / GIB, 3) for k, v in self.parts.items()}}


def training_memory(model: ModelSpec, setup: TrainingSetup = TrainingSetup()) -> MemoryEstimate:
    p = model.params
    if setup.method == "full":
        frozen_bytes, trainable = 0.0, p
    elif setup.method == "freeze":
        trainable = p * setup.freeze_trainable_layers / model.layers
        frozen_bytes = (p - trainable) * 2
    else:
        trainable = float(model.lora_params(setup.lora_rank))
        per_param = 2.0 if setup.method == "lora" else (1.0 if setup.quant_bits == 8 else 0.5625)
        frozen_bytes = p * per_param
    tokens = setup.seq_len * setup.batch_size
    if setup.gradient_checkpointing:
        activations = tokens * model.hidden * model.layers * 2 + tokens * (16 * model.hidden + 4 * model.ffn) * 2
    else:
        activations = tokens * (16 * model.hidden + 4 * model.ffn) * 2 * model.layers
    parts = {
        "weights": frozen_bytes,
        "trainable": trainable * 16,  # 16-bit weight + 16-bit gradient + fp32 master + 2 fp32 Adam moments, rounded up
        "activations": float(activations),
        "logits": tokens * model.vocab * 4 * 2.0,  # fp32 logits and their gradient
    }
    return MemoryEstimate(parts | {"overhead": CONTEXT_OVERHEAD_BYTES + FRAGMENTATION * sum(parts.values())})


def serving_memory(model: ModelSpec, context_tokens: int = 4096, concurrency: int = 8) -> MemoryEstimate:
    kv_per_token = 2 * model.layers * model.kv_dim * 2
    parts = {"weights": model.params * 2, "kvCache": float(kv_per_token * context_tokens * concurrency)}
    return MemoryEstimate(parts | {"overhead": CONTEXT_OVERHEAD_BYTES + FRAGMENTATION * sum(parts.values())})


def models_that_fit(catalogue: Sequence[ModelSpec], memory_bytes: float, setup: TrainingSetup = TrainingSetup()) -> list[ModelSpec]:
    """Catalogue models whose training fits in `memory_bytes`, largest first."""
    fitting = [m for m in catalogue if training_memory(m, setup).total_bytes <= memory_bytes]
    return sorted(fitting, key=lambda m: m.params, reverse=True)
