"""A model's size from what its files say, without loading weights. Pure: dictionaries in, numbers out.

`corral.model_files` reads the files (config.json, safetensors headers, the shard index) and hands their parsed
JSON here, so the arithmetic is tested without a disk, and a malformed file becomes an `InvalidInput` that says
what is wrong instead of a crash.

Why both sources: a safetensors header lists every stored tensor's dtype and shape, so the sum of the shapes'
products is the exact parameter count (tied embeddings are stored once, as `model.parameters()` counts them).
config.json gives the architecture the estimator needs anyway (hidden size, layers, heads, MLP width, vocabulary,
experts), and a parameter count when no weights are on disk (a cache holding only the config, a model mounted
elsewhere). The config formula covers the decoders Corral trains — the Llama, Mistral, Qwen2/Qwen3 and Gemma 1/2/3
families, grouped-query attention, mixture-of-experts (Mixtral, Qwen2-MoE, Qwen3-MoE), tied embeddings — and
tests check it against `sum(p.numel() for p in model.parameters())` of models built with transformers. Another
architecture is sized as a Llama-shaped decoder and marked approximate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.domain.errors import InvalidInput
from corral.domain.memory import KNOWN_MODELS, AttentionWidths, ModelSpec

# Bytes per element of safetensors' dtypes (the format's own list).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F6_E2M3": 1, "F6_E3M2": 1,
    "F4": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}
# config.json's torch_dtype / dtype → the safetensors name, to report one vocabulary.
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "float8_e4m3fn": "F8_E4M3"}
MAX_DIM = 10_000_000  # no real hidden size, vocabulary or expert count comes near: a larger value is a broken file
MAX_TENSOR_PARAMS = 10**13

# Families whose parameter formula tests check exactly against transformers' modules.
VERIFIED = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "mixtral",
                      "qwen2_moe", "qwen3_moe"})
TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})  # their config classes' default
QKV_BIAS = frozenset({"qwen2", "qwen2_vl", "qwen2_5_vl"})  # q/k/v carry a bias whatever the config says
QK_NORM = frozenset({"qwen3", "qwen3_moe", "gemma3", "gemma3_text"})  # an RMSNorm over head_dim on q and on k
FOUR_NORMS = frozenset({"gemma2", "gemma3", "gemma3_text"})  # pre/post norms around attention and MLP
# Suffixes that name a variant of the same weights' shape (the chat-tuned or converted copy), stripped before
# looking a hub id up in the catalogue: `Qwen/Qwen2.5-Coder-7B-Instruct` has the size of `qwen2.5-coder-7b`.
VARIANT_SUFFIXES = ("-instruct", "-chat", "-it", "-hf", "-base")


@dataclass(frozen=True)
class ParameterCount:
    total: int  # every parameter held in memory
    active: int  # the ones one token goes through (equal to total for a dense model)


@dataclass(frozen=True)
class ModelShape(AttentionWidths):
    """A decoder's architecture as config.json states it: enough to count its parameters exactly."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int  # grouped-query attention: fewer key/value heads than query heads
    head_dim: int
    ffn: int  # dense MLP width
    vocab: int
    tie_embeddings: bool  # the output projection is the input embedding: stored and counted once
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    experts: int = 0  # routed experts per MoE layer; 0: dense
    experts_per_token: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0  # the shared expert's width (all shared experts together)
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert (hidden → 1)
    moe_layers: int = 0
    dtype: str = ""  # config.json's torch_dtype, as a safetensors name
    quantized: str = ""  # quantization_config's method: the stored tensors are packed, not one element per parameter
    approximate: str = ""  # why the formula may not match this architecture exactly; "" when it does

    def parameters(self) -> ParameterCount:
        h = self.hidden
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        attention += (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        attention += h if self.o_bias else 0
        attention += 2 * self.head_dim if self.qk_norm else 0
        per_layer = attention + self.norms_per_layer * h
        dense = 3 * h * self.ffn + ((2 * self.ffn + h) if self.mlp_bias else 0)
        expert = 3 * h * self.expert_ffn
        shared = 3 * h * self.shared_ffn + (h if self.shared_expert_gate and self.shared_ffn else 0)
        router = h * self.experts
        moe_total = router + self.experts * expert + shared
        moe_active = router + self.experts_per_token * expert + shared
        embeddings = self.vocab * h * (1 if self.tie_embeddings else 2)
        base = embeddings + h + self.layers * per_layer + (self.layers - self.moe_layers) * dense  # h: the final norm
        return ParameterCount(total=base + self.moe_layers * moe_total, active=base + self.moe_layers * moe_active)

    def spec(self, name: str, display: str, stored_params: int | None = None, dtype: str = "") -> ModelSpec:
        """The estimator's view. `stored_params`, from the safetensors headers, replaces the formula's total when
        known (exact); the active count keeps the formula's difference between all experts and k of them."""
        count = self.parameters()
        total = stored_params if stored_params else count.total
        active = total - (count.total - count.active) if self.moe_layers else 0
        return ModelSpec(
            name=name, display=display, params=float(total), hidden=self.hidden, layers=self.layers, ffn=self.ffn,
            heads=self.heads, kv_heads=self.kv_heads, vocab=self.vocab,
            explicit_head_dim=self.head_dim if self.head_dim != self.hidden // self.heads else 0,
            experts=self.experts, experts_per_token=self.experts_per_token, expert_ffn=self.expert_ffn,
            shared_ffn=self.shared_ffn, moe_layers=self.moe_layers, active_params=float(max(active, 0)),
            dtype=dtype or self.dtype, tied_embeddings=self.tie_embeddings,
        )


def _int(config: Mapping[str, Any], key: str, default: int | None = None, *, low: int = 1) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise InvalidInput(f"config.json has no {key}: not a decoder Corral can size from its config")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_DIM:
        raise InvalidInput(f"config.json's {key} must be an integer from {low} to {MAX_DIM}, got {str(value)[:40]!r}")
    return value


def _bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"config.json's {key} must be true or false, got {str(value)[:40]!r}")
    return value


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """A config.json's decoder. A multimodal config's language model is its `text_config` (its vision tower is
    not counted by the formula; the safetensors headers do count it)."""
    if not isinstance(config, Mapping):
        raise InvalidInput("config.json must be a JSON object")
    text = config.get("text_config")
    merged: dict[str, Any] = {**config, **text} if isinstance(text, Mapping) else dict(config)
    model_type = str(merged.get("model_type") or "")[:64]
    hidden = _int(merged, "hidden_size")
    layers = _int(merged, "num_hidden_layers")
    heads = _int(merged, "num_attention_heads")
    kv_heads = _int(merged, "num_key_value_heads", heads)
    head_dim = _int(merged, "head_dim", hidden // heads or 1)
    vocab = _int(merged, "vocab_size")
    experts = _int(merged, "num_local_experts", 0, low=0) or _int(merged, "num_experts", 0, low=0) \
        or _int(merged, "n_routed_experts", 0, low=0)
    ffn = _int(merged, "intermediate_size", 0 if experts else None, low=0)
    shared_ffn = expert_ffn = moe_layers = per_token = 0
    if experts:
        per_token = _int(merged, "num_experts_per_tok", 2)
        if per_token > experts:
            raise InvalidInput(f"config.json's num_experts_per_tok ({per_token}) exceeds its number of experts ({experts})")
        expert_ffn = _int(merged, "moe_intermediate_size", 0, low=0) or ffn  # Mixtral: intermediate_size is per expert
        if not expert_ffn:
            raise InvalidInput("config.json has experts but neither moe_intermediate_size nor intermediate_size")
        shared_ffn = _int(merged, "shared_expert_intermediate_size", 0, low=0) \
            or _int(merged, "n_shared_experts", 0, low=0) * expert_ffn
        only_dense = merged.get("mlp_only_layers") or []
        if not isinstance(only_dense, list) or not all(isinstance(i, int) for i in only_dense):
            raise InvalidInput("config.json's mlp_only_layers must be a list of layer indexes")
        step = _int(merged, "decoder_sparse_step", 1)
        first_dense = _int(merged, "first_k_dense_replace", 0, low=0)
        moe_layers = sum(1 for i in range(layers) if i not in only_dense and (i + 1) % step == 0 and i >= first_dense)
    approximate = ""
    if "kv_lora_rank" in merged or "q_lora_rank" in merged:
        approximate = f"'{model_type}' uses multi-head latent attention, counted here as grouped-query attention"
    elif model_type not in VERIFIED:
        approximate = f"architecture '{model_type or 'unknown'}' counted as a Llama-shaped decoder"
    dtype = merged.get("torch_dtype") or merged.get("dtype") or ""
    quantization = merged.get("quantization_config")
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        ffn=ffn, vocab=vocab,
        tie_embeddings=_bool(config, "tie_word_embeddings", _bool(merged, "tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
        qkv_bias=model_type in QKV_BIAS or _bool(merged, "qkv_bias", model_type == "qwen2_moe")
        or _bool(merged, "attention_bias", False),
        o_bias=_bool(merged, "attention_bias", False), mlp_bias=_bool(merged, "mlp_bias", False),
        qk_norm=model_type in QK_NORM, norms_per_layer=4 if model_type in FOUR_NORMS else 2,
        experts=experts, experts_per_token=per_token, expert_ffn=expert_ffn, shared_ffn=shared_ffn,
        shared_expert_gate=model_type == "qwen2_moe", moe_layers=moe_layers,
        dtype=TORCH_DTYPES.get(str(dtype), "") if isinstance(dtype, str) else "",
        quantized=str(quantization.get("quant_method", "yes"))[:32] if isinstance(quantization, Mapping) else "",
        approximate=approximate,
    )


@dataclass(frozen=True)
class StoredTensors:
    """What safetensors headers say: parameters per dtype (elements, not bytes)."""

    by_dtype: Mapping[str, int]

    @property
    def parameters(self) -> int:
        return sum(self.by_dtype.values())

    @property
    def dtype(self) -> str:
        """The dtype most parameters are stored in."""
        return max(self.by_dtype.items(), key=lambda kv: (kv[1], kv[0]))[0] if self.by_dtype else ""

    def __add__(self, other: StoredTensors) -> StoredTensors:
        merged = dict(self.by_dtype)
        for dtype, n in other.by_dtype.items():
            merged[dtype] = merged.get(dtype, 0) + n
        return StoredTensors(merged)


def stored_tensors(header: Any, where: str = "safetensors header") -> StoredTensors:
    """The parameters a safetensors header declares: every entry but `__metadata__` is a tensor
    `{"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}`."""
    if not isinstance(header, Mapping):
        raise InvalidInput(f"{where} is not a JSON object")
    counts: dict[str, int] = {}
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        dtype = tensor.get("dtype") if isinstance(tensor, Mapping) else None
        shape = tensor.get("shape") if isinstance(tensor, Mapping) else None
        if dtype not in DTYPE_BYTES or not isinstance(shape, list) or len(shape) > 16 \
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_TENSOR_PARAMS for d in shape):
            raise InvalidInput(f"{where}: tensor '{str(name)[:80]}' has no valid dtype and shape")
        n = 1
        for d in shape:
            n *= d
        if n > MAX_TENSOR_PARAMS:
            raise InvalidInput(f"{where}: tensor '{str(name)[:80]}' declares {n} elements, more than any model holds")
        counts[dtype] = counts.get(dtype, 0) + n
    return StoredTensors(counts)


def catalogue_name(model: str) -> str | None:
    """The catalogue entry a hub id or directory name stands for, ignoring the organisation and a chat/instruct
    variant suffix: `Qwen/Qwen2.5-Coder-7B-Instruct` → `qwen2.5-coder-7b`, `meta-llama/Llama-2-70b-chat-hf` →
    `llama-2-70b`. None when nothing matches (a quantised copy, `-AWQ`, has another size and does not match)."""
    name = re.split(r"[\\/]", model.strip().rstrip("/\\"))[-1].lower()
    while name and name not in KNOWN_MODELS:
        stripped = next((name[: -len(s)] for s in VARIANT_SUFFIXES if name.endswith(s)), None)
        if stripped is None:
            return None
        name = stripped
    return name or None
