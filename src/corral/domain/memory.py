"""GPU memory needed to finetune or serve a model, from its architecture, and what fits a GPU.

Training (bytes), term by term, each with where its figure comes from:

- Frozen weights at their storage precision. LoRA: 2 bytes (bf16/fp16, the compute dtype the trainer loads in).
  QLoRA 4-bit: the linear layers in NF4 with double quantisation, as the trainer's `BitsAndBytesConfig` asks
  (`bnb_4bit_use_double_quant=True`): 4 bits per weight + 8-bit absmax per 64-weight block + one fp32 constant per
  256 blocks = 4.127 bits (QLoRA paper, Dettmers et al. 2023, section 3: "reduces the memory footprint from
  32/64 = 0.5 bits to 8/64 + 32/(64·256) = 0.127 bits per parameter"). QLoRA 8-bit (LLM.int8): 1 byte.
- `fp32Casts` (QLoRA only): bitsandbytes quantises the linear layers only; the embeddings, the output layer (unless
  tied to the embeddings) and the norms stay in 16 bits, and peft's `prepare_model_for_kbit_training` casts every
  16-bit parameter left to fp32 (peft/utils/other.py: "cast all non INT8 parameters to fp32"): 4 bytes each. For a
  7B model with a 152k vocabulary that is 1.09 G parameters, ~4 GiB, ~3.5 GiB more than counting them as 4-bit
  (issue 27). It also turns gradient checkpointing on (the activations term below).
- `trainable`: LoRA/QLoRA adapters on every linear layer (peft's "all-linear") kept in fp32 (peft casts adapters to
  fp32, `autocast_adapter_dtype`), + their fp32 gradient + AdamW's two fp32 moments: 16 bytes a parameter. Full
  finetune with fp32 master weights (the trainer loads it in fp32 and computes in bf16 autocast): 4 + 4 + 8 = 16
  bytes (ZeRO paper, Rajbhandari et al. 2020, section 3.1: mixed-precision Adam needs 16 bytes a parameter).
  Full finetune in pure bf16 (`full_bf16_training_memory`): weights, gradients and both AdamW moments in bf16,
  8 bytes a parameter (LLaMA-Factory's "Full (bf16 or fp16)" row: 7B ~60 GB, against ~120 GB for AMP).
- Activations: with gradient checkpointing each layer's input (bf16) plus one layer recomputed at a time
  (attention and MLP intermediates, Korthikanti et al. 2022's per-layer count without the attention matrix, which
  SDPA/flash attention does not store); without it, every layer's intermediates.
- `logits`: fp32 logits and their gradient, tokens × vocabulary × 8 bytes (transformers upcasts them for the loss;
  large for 150k-token vocabularies).
- `ddp_buckets`: several data-parallel processes all-reduce from a flat copy of the trainable gradients.
- `overhead`: a fixed 1 GiB of CUDA context and cuBLAS workspace (PyTorch's context alone is 0.3-0.5 GiB), plus 10%
  of the rest for the caching allocator's fragmentation.

Serving: weights + KV cache (2 × layers × kv heads × head dim × 2 bytes per token) + the same margin.

tests/unit/test_memory.py checks the estimates against published figures with tolerances: LLaMA-Factory's hardware
table (7B: QLoRA 4-bit ~6 GB, LoRA ~16 GB, full bf16 ~60 GB, full AMP ~120 GB; 13B to 70B) and the QLoRA paper's
"65B on one 48 GB GPU". A check against memory measured on a GPU is left for when one is lent (nothing here has one).
The finetune page's recommendation sizes tasks with the defaults a submit uses (`submit_setup`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from corral.domain import hyperparameters as hyperparameter_rules
from corral.domain.errors import InvalidInput

GIB = 1024**3
CONTEXT_OVERHEAD_BYTES = 1 * GIB  # CUDA context and cuBLAS workspace
FRAGMENTATION = 0.10  # PyTorch's caching allocator holds more than the tensors need
NF4_DOUBLE_QUANT_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4.127 bits a weight (QLoRA paper, section 3)
INT8_BYTES = 1.0  # LLM.int8(): one byte a weight (its per-row fp32 scales are negligible)

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
    tied_embeddings: bool = False  # the output layer is the input embedding (stored once: Qwen2.5 ≤ 3B, Gemma)

    @property
    def head_dim(self) -> int:  # type: ignore[override]  # a field in ModelShape, derived here
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def embedding_params(self) -> int:
        """The input embedding and the output layer (once when tied): what bitsandbytes leaves unquantised."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        """Two RMSNorm weights a layer and the final one: unquantised too (small, but cast to fp32 with the rest)."""
        return (2 * self.layers + 1) * self.hidden

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
    ModelSpec("qwen2.5-coder-0.5b", "Qwen 2.5 Coder 0.5B", 0.494e9, 896, 24, 4864, 14, 2, 151936, tied_embeddings=True),
    ModelSpec("qwen2.5-coder-1.5b", "Qwen 2.5 Coder 1.5B", 1.544e9, 1536, 28, 8960, 12, 2, 151936, tied_embeddings=True),
    ModelSpec("qwen2.5-coder-3b", "Qwen 2.5 Coder 3B", 3.086e9, 2048, 36, 11008, 16, 2, 151936, tied_embeddings=True),
    ModelSpec("qwen2.5-coder-7b", "Qwen 2.5 Coder 7B", 7.616e9, 3584, 28, 18944, 28, 4, 152064),
    ModelSpec("qwen2.5-coder-14b", "Qwen 2.5 Coder 14B", 14.77e9, 5120, 48, 13824, 40, 8, 152064),
    ModelSpec("qwen2.5-coder-32b", "Qwen 2.5 Coder 32B", 32.76e9, 5120, 64, 27648, 40, 8, 152064),
)
# LLaMA sizes behind LLaMA-Factory's hardware table, to check the estimator against published figures.
LLAMA = (
    ModelSpec("llama-7b", "LLaMA 7B", 6.74e9, 4096, 32, 11008, 32, 32, 32000),
    ModelSpec("llama-13b", "LLaMA 13B", 13.0e9, 5120, 40, 13824, 40, 40, 32000),
    ModelSpec("llama-30b", "LLaMA 30B", 32.5e9, 6656, 60, 17920, 52, 52, 32000),
    ModelSpec("llama-65b", "LLaMA 65B", 65.2e9, 8192, 80, 22016, 64, 64, 32000),  # the QLoRA paper's 65B on 48 GB
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
    # full only: weights, gradients and AdamW's moments all in bf16 (8 bytes a parameter) instead of fp32 master weights
    # and moments under bf16 autocast (16 bytes): `full_bf16_training_memory`.
    pure_bf16: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.pure_bf16 and self.method != "full":
            raise InvalidInput(f"pure bf16 training is a full finetune's, not {self.method}'s")
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


def submit_setup(method: str, hyperparameters: Mapping[str, Any] | None = None, gpus: int = 1) -> TrainingSetup:
    """What a finetune task of `method` is sized with: its hyperparameters (the submit's defaults, `domain.hyperparameters`,
    for those not given: maxSeqLen 1024, batchSize 4, loraRank 8, gradient checkpointing on) on `gpus` processes. The
    one mapping from a request to the estimator, used by the submit's preflight (`finetune.intake`) and the finetune
    page's recommendation (`domain.recommendation`), so the advice is about the task a submit would create."""
    hp = hyperparameter_rules.for_trainer(hyperparameter_rules.validate(hyperparameters, method), method)
    return TrainingSetup(method=method, seq_len=int(hp["maxSeqLen"]), batch_size=int(hp["batchSize"]),  # type: ignore[arg-type]
                         lora_rank=int(hp["loraRank"]), gradient_checkpointing=bool(hp["gradientCheckpointing"]),
                         processes=max(1, gpus), pure_bf16=method == "full" and bool(hp.get("pureBf16")))


def full_bf16_training_memory(model: ModelSpec, setup: TrainingSetup = TrainingSetup(method="full")) -> MemoryEstimate:
    """A full finetune in pure bf16: weights, gradients and both AdamW moments in bf16, 8 bytes a parameter (the
    `trainable` part) instead of mixed precision's 16; activations, logits and overhead as any other method."""
    return training_memory(model, replace(setup, method="full", pure_bf16=True))


def training_memory(model: ModelSpec, setup: TrainingSetup = TrainingSetup()) -> MemoryEstimate:
    """Per GPU (per data-parallel process), in bytes by part: see the module's docstring for each term's source."""
    p = model.params
    casts = 0.0
    gradient_bytes = 4.0  # an fp32 gradient a trainable parameter (DDP's buckets copy them)
    if setup.method == "full":
        frozen_bytes, trainable = 0.0, p
        per_trainable = 8.0 if setup.pure_bf16 else 16.0
        gradient_bytes = 2.0 if setup.pure_bf16 else 4.0
    elif setup.method == "freeze":
        trainable = p * setup.freeze_trainable_layers / model.layers
        frozen_bytes, per_trainable = (p - trainable) * 2, 16.0
    else:
        trainable, per_trainable = float(model.lora_params(setup.lora_rank)), 16.0
        if setup.method == "lora":
            frozen_bytes = p * 2.0
        else:  # only the linear layers are quantised; prepare_model_for_kbit_training casts the rest to fp32
            unquantised = min(p, float(model.embedding_params + model.norm_params))
            frozen_bytes = (p - unquantised) * (INT8_BYTES if setup.quant_bits == 8 else NF4_DOUBLE_QUANT_BYTES)
            casts = unquantised * 4.0
    tokens = setup.seq_len * setup.batch_size
    if setup.gradient_checkpointing:
        activations = tokens * model.hidden * model.layers * 2 + tokens * (16 * model.hidden + 4 * model.active_ffn) * 2
    else:
        activations = tokens * (16 * model.hidden + 4 * model.active_ffn) * 2 * model.layers
    parts = {
        "weights": frozen_bytes,
        **({"fp32Casts": casts} if casts else {}),
        "trainable": trainable * per_trainable,  # weight + gradient + 2 AdamW moments (fp32: 16 bytes; pure bf16: 8)
        "activations": float(activations),
        "logits": tokens * model.vocab * 4 * 2.0,  # fp32 logits and their gradient
    }
    if setup.processes > 1:  # DistributedDataParallel all-reduces from a flat copy of the trainable gradients
        parts["ddp_buckets"] = trainable * gradient_bytes
    return MemoryEstimate(parts | {"overhead": CONTEXT_OVERHEAD_BYTES + FRAGMENTATION * sum(parts.values())})


def serving_memory(model: ModelSpec, context_tokens: int = 4096, concurrency: int = 8) -> MemoryEstimate:
    kv_per_token = 2 * model.layers * model.kv_dim * 2
    parts = {"weights": model.params * 2, "kvCache": float(kv_per_token * context_tokens * concurrency)}
    return MemoryEstimate(parts | {"overhead": CONTEXT_OVERHEAD_BYTES + FRAGMENTATION * sum(parts.values())})


def models_that_fit(catalogue: Sequence[ModelSpec], memory_bytes: float, setup: TrainingSetup = TrainingSetup()) -> list[ModelSpec]:
    """Catalogue models whose training fits in `memory_bytes`, largest first."""
    fitting = [m for m in catalogue if training_memory(m, setup).total_bytes <= memory_bytes]
    return sorted(fitting, key=lambda m: m.params, reverse=True)
