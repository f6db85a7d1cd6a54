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


class AttentionWidths:
    """The query and key/value projection widths of a decoder, for any class with `heads`, `kv_heads` and
    `head_dim` (the estimator's `ModelSpec`, and `model_shape.ModelShape` read from config.json)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ModelSpec(AttentionWidths):
    """What the estimator needs of a model. The catalogue below gives it by hand; `ModelShape.spec` builds it from
    any decoder's config.json (`corral.model_files` reads the files). The fields after `vocab` default to a dense
    decoder whose head dim is hidden ÷ heads, so the catalogue entries stay one line each."""

    name: str
    display: str
    params: float  # all parameters (a mixture-of-experts model: every expert — all of them sit in GPU memory)
    hidden: int
    layers: int
    ffn: int  # dense MLP width (intermediate_size)
    heads: int
    kv_heads: int
    vocab: int
    explicit_head_dim: int = 0  # config.json's head_dim where it is not hidden ÷ heads (Gemma, Qwen3)
    experts: int = 0  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int = 0
    expert_ffn: int = 0  # one routed expert's MLP width
    shared_ffn: int = 0  # the always-on shared expert(s), their total width
    moe_layers: int = 0  # layers whose MLP is the mixture (the others are dense, `ffn` wide)
    active_params: float = 0.0  # parameters one token goes through (MoE); 0: all of them (dense)
    dtype: str = ""  # the weights' storage dtype, where the files say it (information: training and serving use 16-bit)

    @property
    def head_dim(self) -> int:  # type: ignore[override]  # a field in ModelShape, derived here
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def active_ffn(self) -> int:
        """The MLP width one token's activations go through: k routed experts plus the shared one in an MoE layer."""
        if not self.moe_layers:
            return self.ffn
        moe = self.experts_per_token * self.expert_ffn + self.shared_ffn
        return max(moe, self.ffn) if self.moe_layers < self.layers else moe

    def lora_params(self, rank: int) -> int:
        """Adapters on every linear projection (q, k, v, o, gate, up, down): rank × (in + out) each. In an MoE layer
        every routed expert and the shared one get theirs: an upper bound (transformers ≥ 5 keeps routed experts in
        fused tensors that peft's "all-linear" skips), and the preflight would rather over- than under-estimate."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attention = (h + q) + 2 * (h + kv) + (q + h)
        dense = 3 * (h + self.ffn)
        moe = self.experts * 3 * (h + self.expert_ffn) + (3 * (h + self.shared_ffn) if self.shared_ffn else 0)
        return rank * (attention * self.layers + dense * (self.layers - self.moe_layers) + moe * self.moe_layers)


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
    # Data-parallel processes (one per GPU). Each holds the whole model, its optimizer state and the activations of
    # its own batch (batch_size is per GPU), plus DDP's gradient buckets: the figure is per GPU, never total ÷ N.
    processes: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.method == "qlora" and self.quant_bits not in (4, 8):
            raise InvalidInput(f"quant_bits must be 4 or 8 for qlora, got {self.quant_bits}")
        for name in ("seq_len", "batch_size", "lora_rank", "freeze_trainable_layers", "processes"):
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
        activations = tokens * model.hidden * model.layers * 2 + tokens * (16 * model.hidden + 4 * model.active_ffn) * 2
    else:
        activations = tokens * (16 * model.hidden + 4 * model.active_ffn) * 2 * model.layers
    parts = {
        "weights": frozen_bytes,
        "trainable": trainable * 16,  # 16-bit weight + 16-bit gradient + fp32 master + 2 fp32 Adam moments, rounded up
        "activations": float(activations),
        "logits": tokens * model.vocab * 4 * 2.0,  # fp32 logits and their gradient
    }
    if setup.processes > 1:  # DistributedDataParallel all-reduces from a flat copy of the (fp32) trainable gradients
        parts["ddp_buckets"] = trainable * 4.0
    return MemoryEstimate(parts | {"overhead": CONTEXT_OVERHEAD_BYTES + FRAGMENTATION * sum(parts.values())})


def serving_memory(model: ModelSpec, context_tokens: int = 4096, concurrency: int = 8) -> MemoryEstimate:
    kv_per_token = 2 * model.layers * model.kv_dim * 2
    parts = {"weights": model.params * 2, "kvCache": float(kv_per_token * context_tokens * concurrency)}
    return MemoryEstimate(parts | {"overhead": CONTEXT_OVERHEAD_BYTES + FRAGMENTATION * sum(parts.values())})


def models_that_fit(catalogue: Sequence[ModelSpec], memory_bytes: float, setup: TrainingSetup = TrainingSetup()) -> list[ModelSpec]:
    """Catalogue models whose training fits in `memory_bytes`, largest first."""
    fitting = [m for m in catalogue if training_memory(m, setup).total_bytes <= memory_bytes]
    return sorted(fitting, key=lambda m: m.params, reverse=True)
