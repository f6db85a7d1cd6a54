"""LLaMA-Factory-like defaults, all settable through the one validator; precision by hardware; the eval split;
the submit-time checks (chat template, memory) and what vLLM gets to serve an adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from corral.domain import hyperparameters
from corral.domain.errors import Conflict, InvalidInput
from corral.finetune.checks import chat_template_problem, has_chat_template, vllm_lora_args
from corral.finetune.intake import check_fits, training_estimate
from corral.finetune.trainer import pick_precision, split_for_eval
from corral.gpus.inventory import GpuDevice, GpuInventory

GIB = 1024**3


def test_defaults_follow_llama_factory() -> None:
    lora = hyperparameters.validate({})
    assert lora["learningRate"] == 1e-4 and hyperparameters.validate({}, "qlora")["learningRate"] == 1e-4
    assert hyperparameters.validate({}, "full")["learningRate"] == 1e-5
    assert hyperparameters.validate({"learningRate": 3e-4}, "full")["learningRate"] == 3e-4  # given: kept
    assert hyperparameters.validate({"learningRate": None}, "full")["learningRate"] == 1e-5  # null: by method
    assert (lora["lrScheduler"], lora["warmupRatio"], lora["maxGradNorm"]) == ("cosine", 0.1, 1.0)
    assert lora["gradientCheckpointing"] is True and lora["trainOnPrompt"] is False and lora["precision"] == "auto"
    assert lora["valSize"] == 0 and lora["saveTotalLimit"] == 2 and lora["loraTarget"] == "all"
    assert lora["useDora"] is False and lora["useRslora"] is False
    assert ("learningRate: a positive number at most 1 (default 1e-4 for lora and qlora, 1e-5 for full, 5e-6 for dpo and orpo)"
            in hyperparameters.HYPERPARAMETERS_HELP)


def test_lora_alpha_is_twice_the_rank_and_dropout_zero_unless_given() -> None:
    """LLaMA-Factory's LoRA defaults: alpha = 2 × rank (the scale alpha/rank stays 2 at any rank), dropout 0."""
    assert (hyperparameters.validate({})["loraAlpha"], hyperparameters.validate({})["loraDropout"]) == (16, 0.0)
    assert hyperparameters.validate({"loraRank": 64})["loraAlpha"] == 128
    assert hyperparameters.validate({"loraRank": 64, "loraAlpha": None})["loraAlpha"] == 128  # null: by rank
    given = hyperparameters.validate({"loraRank": 64, "loraAlpha": 16.0, "loraDropout": 0.1})
    assert given["loraAlpha"] == 16 and type(given["loraAlpha"]) is int and given["loraDropout"] == 0.1
    assert hyperparameters.validate({"loraRank": 1024})["loraAlpha"] == 2048
    with pytest.raises(InvalidInput, match="loraAlpha must be an integer from 1 to 4096, got 2.5"):
        hyperparameters.validate({"loraAlpha": 2.5})
    assert hyperparameters.for_trainer({"loraRank": 32})["loraAlpha"] == 64  # stored without one: by its rank
    assert hyperparameters.for_trainer({"loraRank": 32, "loraAlpha": 16})["loraAlpha"] == 16  # an older task's stays
    assert "loraAlpha: an integer from 1 to 4096 (default 2 × loraRank)" in hyperparameters.HYPERPARAMETERS_HELP


def test_every_new_setting_is_checked_by_the_one_validator() -> None:
    checked = hyperparameters.validate({"lrScheduler": "linear", "warmupRatio": 0, "maxGradNorm": 0.5, "gradientCheckpointing": False,
                                        "trainOnPrompt": True, "precision": "fp16", "valSize": 0.1, "saveTotalLimit": 3,
                                        "loraTarget": "q_proj, v_proj", "useDora": True, "useRslora": True})
    assert checked["loraTarget"] == "q_proj,v_proj" and checked["gradientCheckpointing"] is False and checked["valSize"] == 0.1
    assert hyperparameters.validate({"valSize": 20.0})["valSize"] == 20 and type(hyperparameters.validate({"valSize": 20.0})["valSize"]) is int
    for bad, message in [
        ({"lrScheduler": "cosine_please"}, "lrScheduler must be one of cosine, linear"),
        ({"lrScheduler": 1}, "lrScheduler must be one of"),
        ({"warmupRatio": 1}, "warmupRatio must be a number from 0 to less than 1"),
        ({"gradientCheckpointing": 1}, "gradientCheckpointing must be true or false, got 1"),
        ({"trainOnPrompt": "yes"}, r"trainOnPrompt must be true or false \(false: the loss covers the assistant's turns only\), got 'yes'"),
        ({"precision": "fp8"}, "precision must be one of auto"),
        ({"valSize": 2.5}, "valSize must be a share of the examples below 1"),
        ({"valSize": math.nan}, "got NaN"),
        ({"maxGradNorm": -1}, "maxGradNorm must be a number from 0"),
        ({"saveTotalLimit": 0}, "saveTotalLimit must be an integer from 1 to 1000"),
        ({"loraTarget": "q_proj;rm -rf"}, "loraTarget must be 'all'"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            hyperparameters.validate(bad)
    # A task stored by an older Corral gets the new defaults, and its learning rate by method when it has none.
    old = hyperparameters.for_trainer({"epochs": 1, "learningRate": 2e-4})
    assert old["lrScheduler"] == "cosine" and old["learningRate"] == 2e-4
    assert hyperparameters.for_trainer({}, "full")["learningRate"] == 1e-5


def test_precision_by_hardware() -> None:
    assert pick_precision("auto", cuda=False, bf16_supported=False) == "fp32"
    assert pick_precision("bf16", cuda=False, bf16_supported=False) == "fp32"  # the CPU trains in fp32
    assert pick_precision("auto", cuda=True, bf16_supported=True) == "bf16"
    assert pick_precision("auto", cuda=True, bf16_supported=False) == "fp16"  # pre-Ampere: never forced to bf16
    assert pick_precision("fp32", cuda=True, bf16_supported=True) == "fp32"
    with pytest.raises(SystemExit, match="bf16 needs an Ampere or newer GPU"):
        pick_precision("bf16", cuda=True, bf16_supported=False)


def test_eval_split() -> None:
    train, held = split_for_eval(100, 0.1, 42)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held) and split_for_eval(100, 0.1, 42) == (train, held)
    assert len(split_for_eval(100, 7, 1)[1]) == 7
    assert split_for_eval(1, 0.5, 1) == ([0], []) and len(split_for_eval(3, 0.01, 1)[1]) == 1 and len(split_for_eval(3, 50, 1)[0]) == 1
    assert split_for_eval(10, 0, 1) == (list(range(10)), [])


def test_chat_template_check_reads_the_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert has_chat_template(empty) is None and chat_template_problem(str(empty), "messages") is None  # nothing to tell
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert has_chat_template(config) is True
    jinja = tmp_path / "jinja"
    jinja.mkdir()
    (jinja / "tokenizer_config.json").write_text("{}")
    (jinja / "chat_template.jinja").write_text("{{ messages }}")
    assert has_chat_template(jinja) is True
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    (base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    problem = chat_template_problem(str(base), "alpaca")
    assert problem and "has no chat template, and the dataset's examples are chat (alpaca)" in problem
    assert "plain text ('text', or 'prompt'/'completion' strings)" in problem
    assert chat_template_problem("org/not-in-any-cache-xyz", "messages") is None


def test_vllm_gets_the_adapter_under_the_tag_with_its_rank(tmp_path: Path) -> None:
    def adapter(rank: int, pattern: dict | None = None) -> Path:
        path = tmp_path / f"a{rank}"
        path.mkdir(exist_ok=True)
        (path / "adapter_config.json").write_text(json.dumps({"r": rank, "rank_pattern": pattern or {}}))
        return path

    assert vllm_lora_args("my-tag", adapter(8)) == ["--enable-lora", "--lora-modules", f"my-tag={tmp_path / 'a8'}", "--max-lora-rank", "8"]
    assert vllm_lora_args("t", adapter(20))[-1] == "32"
    assert vllm_lora_args("t", adapter(16, {"q_proj": 100}))[-1] == "128"
    with pytest.raises(Conflict, match="above vLLM's largest"):
        vllm_lora_args("t", adapter(600))
    with pytest.raises(Conflict, match="no readable adapter_config.json"):
        vllm_lora_args("t", tmp_path)
    # Trained with a built-in chat template: vLLM gets the adapter's tokenizer (that template, its end of turn as EOS).
    (tmp_path / "a8" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert vllm_lora_args("t", adapter(8), own_tokenizer=True)[-2:] == ["--tokenizer", str(tmp_path / "a8")]
    assert "--tokenizer" not in vllm_lora_args("t", adapter(8))


def test_memory_must_fit_the_largest_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import corral.finetune.intake as intake

    inventory = GpuInventory(devices=(GpuDevice(0, "NVIDIA GeForce RTX 3060", 12 * GIB), GpuDevice(1, "NVIDIA A10", 24 * GIB)))
    hp = hyperparameters.validate({}, "full")
    need = training_estimate("Qwen/Qwen2.5-Coder-7B", "full", hp)[1].total_gb  # type: ignore[index]
    monkeypatch.setattr(intake, "importable", lambda name: True)  # bitsandbytes installed: qlora is advice Corral follows
    with pytest.raises(InvalidInput) as refused:
        check_fits(need, False, inventory, "Qwen/Qwen2.5-Coder-7B", "full", hp, 1)
    message = refused.value.message
    assert f"Qwen 2.5 Coder 7B full needs an estimated {need:.1f} GB per GPU" in message
    assert "the largest GPU here (NVIDIA A10, 24.0 GB): use qlora" in message
    with pytest.raises(InvalidInput, match=r"24.0 GB\): use a smaller maxSeqLen") as refused:  # qlora: one GPU only
        check_fits(need, False, inventory, "Qwen/Qwen2.5-Coder-7B", "full", hp, 2)
    monkeypatch.setattr(intake, "importable", lambda name: name != "bitsandbytes")
    with pytest.raises(InvalidInput, match=r"24.0 GB\): use a smaller maxSeqLen"):  # no bitsandbytes: no qlora advice
        check_fits(need, False, inventory, "Qwen/Qwen2.5-Coder-7B", "full", hp, 1)
    small = training_estimate("qwen2.5-coder-0.5b", "lora", hyperparameters.validate({}))[1].total_gb  # type: ignore[index]
    check_fits(small, False, inventory, "qwen2.5-coder-0.5b", "lora", hyperparameters.validate({}), 1)  # fits: no refusal
    with pytest.raises(InvalidInput, match=r"gpus.memoryGb asks for 30.0 GB per GPU, more than the largest GPU here \(NVIDIA A10"):
        check_fits(30.0, True, inventory, "x/y", "lora", hp, 1)
    check_fits(0.0, False, inventory, "x/y", "lora", hp, 1)  # unknown model: any GPU will do


def test_vllm_serves_an_adapter_named_after_the_tag_and_the_base_as_tag_base() -> None:
    from corral.engines import get_engine

    vllm = get_engine("vllm")
    plain = vllm.server_args(model_id="Qwen/Q", model_tag="chat", port=1, host="h", gpus=1, extra=[])
    assert plain[plain.index("--served-model-name") + 1] == "chat"
    for lora in (["--lora-modules", "chat=/out"], ["--lora-modules={\"name\": \"chat\", \"path\": \"/out\"}"]):
        args = vllm.server_args(model_id="Qwen/Q", model_tag="chat", port=1, host="h", gpus=1, extra=["--enable-lora", *lora])
        assert args[args.index("--served-model-name") + 1] == "chat-base", lora
    other = vllm.server_args(model_id="Qwen/Q", model_tag="chat", port=1, host="h", gpus=1,
                             extra=["--enable-lora", "--lora-modules", "ft-1=/out"])
    assert other[other.index("--served-model-name") + 1] == "chat"
