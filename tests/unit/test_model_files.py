"""Memory sizing for any model, without loading weights: config.json and safetensors headers against the exact
parameter counts of models built with transformers, published model sizes, the Hugging Face cache layout, the
catalogue fallback by name, and refusals of malformed or oversized files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from corral.api.schemas import STATUS
from corral.domain.errors import InvalidInput
from corral.domain.memory import TrainingSetup, find_model, training_memory
from corral.domain.model_shape import ModelShape, catalogue_name, shape_from_config, stored_tensors
from corral.model_files import cached_snapshot, hub_cache_dir, read_safetensors_header, size_model, stored_in

# Published config.json values (the models' own files on the hub), with their published parameter counts.
QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}
MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
                "num_experts_per_tok": 2, "tie_word_embeddings": False}
QWEN15_MOE_A27B = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
                   "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
                   "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False}
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                 "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False}
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid safetensors file with zeroed data: 8-byte little-endian header length, JSON header, data."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def model_dir(root: Path, config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        write_safetensors(root / "model.safetensors", tensors)
    return root


# --- the formula against transformers' own modules ----------------------------------------------------------------

SMALL = {"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 96, "max_position_embeddings": 128}
ARCHITECTURES = {  # transformers class names and what each case exercises
    "llama (GQA, biases, untied)": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True,
                                                                         "tie_word_embeddings": False}),
    "llama (tied)": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2 (qkv bias, untied)": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3 (head_dim, qk norm)": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 32}),
    "gemma2 (four norms)": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 32}),
    "mixtral (MoE)": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-moe (shared expert, dense layer)": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "mlp_only_layers": [1]}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                          "moe_intermediate_size": 32, "head_dim": 16}),
}


@pytest.mark.parametrize("case", list(ARCHITECTURES))
def test_config_and_safetensors_counts_equal_the_models_numel(case: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config_class, model_class, extra = ARCHITECTURES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**SMALL, **extra))
    model.save_pretrained(tmp_path)
    numel = sum(p.numel() for p in model.parameters())
    shape = shape_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert shape.parameters().total == numel and not shape.approximate
    stored, counted = stored_in(tmp_path)
    assert stored is not None and counted == "safetensors" and stored.parameters == numel
    sized = size_model(str(tmp_path))
    assert sized.exact and sized.source == "directory" and sized.spec.params == numel
    if shape.experts:  # active: all but (experts - k) routed experts of each MoE layer, computed by hand
        inactive = shape.moe_layers * (shape.experts - shape.experts_per_token) * 3 * shape.hidden * shape.expert_ffn
        assert shape.parameters().active == numel - inactive and sized.spec.active_params == numel - inactive
        assert shape.moe_layers == (2 if "dense layer" in case else 3)
    else:
        assert shape.parameters().active == numel and sized.spec.active_params == 0


def test_the_tiny_model_the_tests_build(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from tests.tiny_model import build_tiny_model

    directory = build_tiny_model(tmp_path / "tiny")
    numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(directory).parameters())
    sized = size_model(str(directory))
    assert sized.counted_from == "safetensors" and sized.spec.params == numel
    assert shape_from_config(json.loads((directory / "config.json").read_text())).parameters().total == numel
    assert sized.spec.hidden == 128 and sized.spec.layers == 2 and sized.spec.head_dim == 64
    assert training_memory(sized.spec).total_gb < 2  # a tiny model: the CUDA context dominates


# --- published sizes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "total", "active"), [
    (QWEN25_7B, 7_615_616_512, 7_615_616_512),  # Qwen2.5-7B's model card: 7.61B
    (LLAMA_7B, 6_738_415_616, 6_738_415_616),  # LLaMA 7B: 6.7B
    (MIXTRAL_8X7B, 46_702_792_704, 12_879_925_248),  # Mixtral 8x7B: 46.7B total, 12.9B active
    (QWEN15_MOE_A27B, 14_315_784_192, 2_689_173_504),  # Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B active
    (QWEN3_30B_A3B, 30_532_122_624, 3_353_032_704),  # Qwen3-30B-A3B: 30.5B total, 3.3B active
])
def test_published_model_sizes_from_config_alone(config: dict[str, Any], total: int, active: int) -> None:
    count = shape_from_config(config).parameters()
    assert (count.total, count.active) == (total, active)


def test_config_sized_model_matches_the_catalogue_estimate(tmp_path: Path) -> None:
    """A directory holding only Qwen2.5-7B's config.json sizes like the catalogue's 7B (same architecture)."""
    sized = size_model(str(model_dir(tmp_path / "q7", QWEN25_7B)))
    assert sized.counted_from == "config" and sized.spec.dtype == "BF16"
    catalogue = find_model("qwen2.5-coder-7b")
    ours, theirs = training_memory(sized.spec).total_gb, training_memory(catalogue).total_gb
    assert abs(ours - theirs) / theirs < 0.001


def test_moe_memory_holds_every_expert_and_activates_k() -> None:
    spec = shape_from_config(MIXTRAL_8X7B).spec("mixtral", "Mixtral 8x7B")
    lora = training_memory(spec, TrainingSetup(method="lora"))
    assert lora.parts["weights"] == spec.params * 2  # all 46.7B parameters sit in GPU memory
    assert spec.active_ffn == 2 * 14336  # two experts' MLPs per token
    dense_alike = shape_from_config({**MIXTRAL_8X7B, "num_local_experts": 0}).spec("d", "d")
    assert training_memory(dense_alike).parts["activations"] < lora.parts["activations"]
    assert spec.lora_params(8) > dense_alike.lora_params(8)  # an adapter on every expert


def test_tied_embeddings_are_counted_once() -> None:
    untied = shape_from_config({**QWEN25_7B, "tie_word_embeddings": False}).parameters().total
    tied = shape_from_config({**QWEN25_7B, "tie_word_embeddings": True}).parameters().total
    assert untied - tied == 152064 * 3584
    no_key = {k: v for k, v in QWEN25_7B.items() if k != "tie_word_embeddings"}
    assert shape_from_config(no_key).tie_embeddings is False  # Qwen2's default
    assert shape_from_config({**no_key, "model_type": "gemma"}).tie_embeddings is True  # Gemma's default


def test_multimodal_config_reads_its_text_config() -> None:
    shape = shape_from_config({"model_type": "gemma3", "text_config": {**LLAMA_7B, "model_type": "gemma3_text"},
                               "vision_config": {"hidden_size": 1152}})
    assert shape.model_type == "gemma3_text" and shape.hidden == 4096 and shape.norms_per_layer == 4


def test_unknown_architectures_are_sized_but_marked_approximate(tmp_path: Path) -> None:
    shape = shape_from_config({**LLAMA_7B, "model_type": "deepseek_v3", "kv_lora_rank": 512})
    assert "multi-head latent attention" in shape.approximate
    sized = size_model(str(model_dir(tmp_path / "other", {**LLAMA_7B, "model_type": "olmo"})))
    assert not sized.exact and "'olmo' counted as a Llama-shaped decoder" in sized.note


# --- safetensors headers and shard indexes --------------------------------------------------------------------------

def test_sharded_model_sums_every_shard_and_falls_back_to_the_index(tmp_path: Path) -> None:
    directory = model_dir(tmp_path / "sharded", {**LLAMA_7B, "torch_dtype": "bfloat16"})
    write_safetensors(directory / "model-00001-of-00002.safetensors", {"a": ("BF16", [1000, 64]), "b": ("F32", [10])})
    write_safetensors(directory / "model-00002-of-00002.safetensors", {"c": ("BF16", [500, 64])})
    index = {"metadata": {"total_size": 1500 * 64 * 2 + 40},
             "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "consolidated.safetensors").write_bytes(b"not read: a second copy of the weights")
    sized = size_model(str(directory))
    assert sized.counted_from == "safetensors" and sized.spec.params == 1500 * 64 + 10 and sized.spec.dtype == "BF16"
    (directory / "model-00002-of-00002.safetensors").unlink()  # a download in progress
    sized = size_model(str(directory))
    assert sized.counted_from == "index" and sized.spec.params == (1500 * 64 * 2 + 40) // 2 and "index" in sized.note
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/x.safetensors"}}))
    with pytest.raises(InvalidInput, match="names files outside its directory"):
        size_model(str(directory))


def test_quantised_checkpoint_is_counted_from_its_config(tmp_path: Path) -> None:
    config = {**QWEN25_7B, "quantization_config": {"quant_method": "awq", "bits": 4}}
    sized = size_model(str(model_dir(tmp_path / "awq", config, {"packed": ("I8", [100, 4])})))
    assert sized.counted_from == "config" and sized.spec.params == 7_615_616_512 and "awq-quantised" in sized.note


def test_malformed_and_oversized_files_are_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import corral.model_files as files

    directory = model_dir(tmp_path / "bad", QWEN25_7B)
    weights = directory / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 10**12) + b"{}")  # claims a terabyte of header
    with pytest.raises(InvalidInput, match="declares a 1000000000000-byte safetensors header"):
        size_model(str(directory))
    weights.write_bytes(struct.pack("<Q", 6) + b"{nope}")
    with pytest.raises(InvalidInput, match="safetensors header of .* is not valid JSON"):
        read_safetensors_header(weights)
    weights.write_bytes(b"abc")
    with pytest.raises(InvalidInput, match="too short to be a safetensors file"):
        size_model(str(directory))
    write_safetensors(weights, {"w": ("F32", [2, 2])})
    header = read_safetensors_header(weights)
    header["w"]["shape"] = [-1, 2]
    with pytest.raises(InvalidInput, match="tensor 'w' has no valid dtype and shape"):
        stored_tensors(header)
    with pytest.raises(InvalidInput, match="more than any model holds"):
        stored_tensors({"w": {"dtype": "F32", "shape": [10**7, 10**7]}})
    weights.unlink()
    (directory / "config.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="config.json .* is not valid JSON"):
        size_model(str(directory))
    (directory / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidInput, match="is not a JSON object"):
        size_model(str(directory))
    monkeypatch.setattr(files, "MAX_CONFIG_BYTES", 100)
    (directory / "config.json").write_text(json.dumps(QWEN25_7B))
    with pytest.raises(InvalidInput, match="larger than 0 MB"):
        size_model(str(directory))
    (directory / "config.json").unlink()
    with pytest.raises(InvalidInput, match="has no config.json: .* or memoryGb on the task"):
        size_model(str(directory))


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "gpt2", "n_embd": 768}, "config.json has no hidden_size"),
    ({**LLAMA_7B, "hidden_size": "4096"}, "hidden_size must be an integer"),
    ({**LLAMA_7B, "num_hidden_layers": 10**9}, "num_hidden_layers must be an integer from 1 to"),
    ({**LLAMA_7B, "num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    ({**LLAMA_7B, "tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({**MIXTRAL_8X7B, "num_experts_per_tok": 9}, "num_experts_per_tok \\(9\\) exceeds its number of experts \\(8\\)"),
    ({**QWEN15_MOE_A27B, "mlp_only_layers": "all"}, "mlp_only_layers must be a list"),
])
def test_malformed_configs(config: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        shape_from_config(config)


# --- where models are found ---------------------------------------------------------------------------------------

def fake_hub_model(cache: Path, repo_id: str, config: dict[str, Any], revision: str = "0123abcd" * 5) -> Path:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = model_dir(repo / "snapshots" / revision, config, {"embed": ("BF16", [100, 8]), "w": ("BF16", [8, 8])})
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_found_in_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    snapshot = fake_hub_model(tmp_path / "hf" / "hub", "Acme/Coder-9B-Instruct", QWEN25_7B)
    sized = size_model("Acme/Coder-9B-Instruct")
    assert sized.source == "hf-cache" and sized.path == snapshot and sized.counted_from == "safetensors"
    assert sized.spec.params == 100 * 8 + 64 and sized.spec.name == "Acme/Coder-9B-Instruct"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    assert hub_cache_dir() == tmp_path / "elsewhere"
    with pytest.raises(InvalidInput, match="in the Hugging Face cache"):
        size_model("Acme/Coder-9B-Instruct")
    # refs/main naming a snapshot that is not there: the newest snapshot holding a config.json
    other = fake_hub_model(tmp_path / "elsewhere", "Acme/Coder-9B-Instruct", LLAMA_7B, revision="feedbeef" * 5)
    (other.parent.parent / "refs" / "main").write_text("deadbeef" * 5)
    assert cached_snapshot("Acme/Coder-9B-Instruct") == other
    assert cached_snapshot("../../etc") is None and cached_snapshot("Acme/../x") is None
    assert hub_cache_dir({"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/huggingface/hub")


def test_a_hub_id_not_on_disk_falls_back_to_the_catalogue_by_name(tmp_path: Path) -> None:
    sized = size_model("Qwen/Qwen2.5-Coder-7B-Instruct", cache=tmp_path)
    assert sized.source == "catalogue" and sized.spec.name == "qwen2.5-coder-7b" and "qwen2.5-coder-7b" in sized.note
    assert catalogue_name("meta-llama/Llama-2-70b-chat-hf") == "llama-2-70b"
    assert catalogue_name("/models/Qwen2.5-Coder-0.5B") == "qwen2.5-coder-0.5b"  # a path mounted elsewhere (a pod)
    assert catalogue_name("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ") is None  # a quantised copy is another size
    assert catalogue_name("Qwen/Qwen2.5-Coder-8B") is None
    assert size_model("QWEN2.5-CODER-3B").spec.name == "qwen2.5-coder-3b"


def test_a_model_nothing_here_sizes_gets_a_400_that_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as refused:
        size_model("someorg/some-model-13b", cache=tmp_path)
    assert STATUS[refused.value.kind] == 400
    message = refused.value.message
    assert message.startswith("model 'someorg/some-model-13b' is unknown to the estimator")
    assert "a local model directory" in message and "memoryGb" in message
    with pytest.raises(InvalidInput, match="is not a local directory"):
        size_model(str(tmp_path / "missing" / "dir with spaces"), cache=tmp_path)
    with pytest.raises(InvalidInput, match="model must be"):
        size_model("")


def test_the_estimate_api_and_the_finetune_submit_use_the_resolver(tmp_path: Path) -> None:
    from corral.api.system import estimate
    from corral.domain import hyperparameters
    from corral.finetune.intake import estimate_gb, training_estimate

    directory = model_dir(tmp_path / "mixtral", MIXTRAL_8X7B)
    body = estimate(model=str(directory), method="qlora", quantBits=4, seqLen=2048, batchSize=1, loraRank=8,
                    contextTokens=4096, concurrency=8)
    assert body.parameters == 46_702_792_704 and body.activeParameters == 12_879_925_248
    assert body.source == "directory" and body.countedFrom == "config" and 24 < body.training.totalGb < 48
    hub = estimate(model="Qwen/Qwen2.5-Coder-7B-Instruct", method="lora", quantBits=4, seqLen=2048, batchSize=1,
                   loraRank=8, contextTokens=4096, concurrency=8)
    assert hub.model == "qwen2.5-coder-7b" and hub.activeParameters is None
    hp = hyperparameters.validate({}, "lora")
    assert training_estimate("nobody/knows-this", "lora", hp) is None  # hints (the UI) never fail
    with pytest.raises(InvalidInput, match="memoryGb"):
        estimate_gb("nobody/knows-this", "lora", hp, 1)  # a GPU task must be sized
    assert estimate_gb("nobody/knows-this", "lora", hp, 0) == 0.0  # a CPU task needs no GPU memory
    assert estimate_gb(str(directory), "qlora", hp, 1) > 24


def test_model_shape_is_a_plain_value() -> None:
    shape = ModelShape("llama", 8, 1, 2, 1, 4, 16, 10, tie_embeddings=True)
    assert shape.parameters().total == 10 * 8 + 8 + (8 * 8 + 2 * 8 * 4 + 8 * 8) + 2 * 8 + 3 * 8 * 16
