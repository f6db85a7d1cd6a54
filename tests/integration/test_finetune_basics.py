"""The finetuning basics of issue 27 item 5, on the tiny model on the CPU with the real trainer process: packing (fewer
padding tokens, counted, and each packed example attending to itself only); datasets mixed with ratios from JSONL, Parquet
and a Hugging Face `datasets` directory, previewed and submitted through the API; TensorBoard event files; early
stopping on the eval loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import CorralServer
from tests.integration.test_finetune import finished, tiny_model  # noqa: F401 (fixtures)

pytest.importorskip("peft")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def uneven_rows() -> list[dict]:
    """Answers of very different lengths: unpacked, a batch is mostly padding."""
    return [{"prompt": f"count to {n}:", "completion": " " + " ".join(str(i) for i in range(n))} for n in (1, 2, 30, 3, 1, 25, 2, 4)]


def train(task_dir: Path, model: Path, data: Path, method: str = "lora", **hp) -> list[dict]:
    """The trainer on `task_dir` as Corral starts it; its progress lines."""
    task_dir.mkdir(parents=True, exist_ok=True)
    hyperparameters = {"epochs": 1, "batchSize": 4, "maxSeqLen": 256, "saveSteps": 1000, "gradientCheckpointing": False} | hp
    (task_dir / "task.json").write_text(json.dumps({"baseModel": str(model), "datasetPath": str(data), "method": method,
                                                    "hyperparameters": hyperparameters}))
    done = subprocess.run([sys.executable, "-m", "corral.finetune.trainer", str(task_dir)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [json.loads(line) for line in (task_dir / "progress.jsonl").read_text().splitlines()]


def last(lines: list[dict], event: str) -> dict:
    return [line for line in lines if line["event"] == event][-1]


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:  # noqa: F811
    """Two runs on the same uneven examples (two held out): unpacked, reporting to TensorBoard (reportTo auto, as
    tensorboard is installed); packed, reporting to nothing."""
    root = tmp_path_factory.mktemp("basics")
    data = write_jsonl(root / "uneven.jsonl", uneven_rows() + uneven_rows()[:2])
    return {"plain": train(root / "plain", tiny_model, data, valSize=2),
            "packed": train(root / "packed", tiny_model, data, valSize=2, packing=True, reportTo="none")}


def test_packing_trains_with_fewer_padding_tokens(runs: dict[str, list[dict]]) -> None:
    plain, packed = runs["plain"], runs["packed"]
    plain_done, packed_done = last(plain, "completed"), last(packed, "completed")
    assert last(packed, "dataset")["packedRows"] < 8 and "packedRows" not in last(plain, "dataset")
    assert packed_done["totalSteps"] < plain_done["totalSteps"]  # fewer rows: fewer steps for the same examples
    assert plain_done["padTokens"] > 0
    assert packed_done["padTokens"] < plain_done["padTokens"] / 2, (packed_done, plain_done)
    # the same tokens are trained: only the padding differs
    assert packed_done["batchTokens"] - packed_done["padTokens"] == plain_done["batchTokens"] - plain_done["padTokens"]
    assert all(line["padTokens"] <= line["batchTokens"] for line in packed if line["event"] == "step")


def test_tensorboard_event_files_appear_unless_reporting_is_off(runs: dict[str, list[dict]]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(last(runs["plain"], "dataset")["logDir"])
    assert log_dir.name == "tensorboard" and list(log_dir.rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir)).Reload()
    assert {"train/loss", "eval/loss"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == last(runs["plain"], "completed")["step"]
    assert "logDir" not in last(runs["packed"], "dataset") and not (log_dir.parent.parent / "packed" / "tensorboard").exists()


def test_a_packed_example_attends_to_itself_only(tiny_model: Path) -> None:  # noqa: F811
    """The second example of a packed row has the logits it has alone: no attention to the first, its positions
    restart at 0 (the packed-sequence mask of transformers, on this CPU's sdpa attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from corral.finetune.packing import Collator, packed_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    first, second = [5, 9, 14, 3, 7, 22], [11, 4, 8, 30]
    rows = packed_rows([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}], capacity=16)
    assert len(rows) == 1 and rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert rows[0]["labels"][6] == -100  # the second example's first token is no target of the first one's last
    batch = Collator(pad_id=0, packed=True)([rows[0]])
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
        unmasked = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert torch.allclose(together[len(first):], alone, atol=1e-5)
    assert not torch.allclose(unmasked[len(first):], alone, atol=1e-3)  # the check can fail: unmasked, it attends across


def test_the_preview_counts_padding_with_and_without_packing(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    from corral.finetune.preview import preview

    data = write_jsonl(tmp_path / "uneven.jsonl", uneven_rows())
    shown = preview(str(tiny_model), data, 256, False, shown=0, batch_size=4)["packing"]
    assert (shown["batchSize"], shown["rows"]) == (4, 8) and shown["packedRows"] < 8
    assert 0 <= shown["packedPadTokens"] < shown["padTokens"]


def test_early_stopping_ends_the_training_when_the_eval_loss_stops_improving(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """A threshold no drop reaches: the first evaluation is the best, the next `patience` ones do not improve on it, so
    training stops at the third evaluation (every 10% of the steps), long before its last step."""
    data = write_jsonl(tmp_path / "uneven.jsonl", uneven_rows() + uneven_rows()[:4])
    lines = train(tmp_path / "early", tiny_model, data, valSize=2, batchSize=1, epochs=2, reportTo="none",
                  earlyStoppingPatience=2, earlyStoppingThreshold=100)
    done, evals = last(lines, "completed"), [line["step"] for line in lines if line["event"] == "eval"]
    assert done["totalSteps"] == 20 and evals == [2, 4, 6]
    assert done["earlyStopped"] == done["step"] == 6


def test_a_pure_bf16_full_finetune_learns_and_saves_bf16_weights(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    from safetensors import safe_open

    data = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "the answer:", "completion": " forty two"}] * 8)
    lines = train(tmp_path / "bf16", tiny_model, data, method="full", pureBf16=True, learningRate=1e-3, epochs=3, reportTo="none")
    losses = [line["loss"] for line in lines if line["event"] == "step"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1, losses  # bf16 updates at this learning rate are not lost
    with safe_open(str(tmp_path / "bf16" / "output" / "model.safetensors"), "pt") as weights:
        assert {str(weights.get_slice(name).get_dtype()) for name in weights.keys()} == {"BF16"}


PAIRS = [{"prompt": [{"role": "user", "content": "is the sky blue?"}], "chosen": [{"role": "assistant", "content": "yes"}],
          "rejected": [{"role": "assistant", "content": "no, it is green"}]}] * 8


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_training_lowers_its_loss(method: str, tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """TRL's DPO (the reference: the base with the adapter off) and ORPO (none) train a LoRA adapter on the pairs."""
    pytest.importorskip("trl")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    lines = train(tmp_path / method, tiny_model, data, method=method, epochs=2, learningRate=5e-3, reportTo="none")
    losses = [line["loss"] for line in lines if line["event"] == "step"]
    assert len(losses) == 4 and losses[-1] < losses[0] - (0.1 if method == "dpo" else 0.3), losses
    assert (tmp_path / method / "output" / "adapter_model.safetensors").is_file()  # a LoRA adapter, as lora's


def test_the_preview_shows_preference_pairs_with_their_chosen_answer(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    from corral.finetune.preview import preview

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    shown = preview(str(tiny_model), data, 256, False, shown=1, method="dpo")
    assert (shown["format"], shown["count"], shown["packing"]) == ("preference-messages", 3, None)
    example = shown["examples"][0]
    assert [example["text"][s["start"]:s["end"]] for s in example["spans"]] == ["yes<|im_end|>\n"]
    assert any("preference pairs (dpo)" in warning for warning in shown["warnings"])


@pytest.fixture
def data_plane() -> str:
    return "python"  # no pool here serves traffic: the lighter plane


def test_a_mix_of_jsonl_parquet_and_a_datasets_directory_is_previewed_and_submitted(corral: CorralServer, tiny_model: Path,  # noqa: F811
                                                                                  tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    jsonl = write_jsonl(tmp_path / "uneven.jsonl", uneven_rows())
    datasets.Dataset.from_list([{"text": f"the number {i} is small"} for i in range(6)]).to_parquet(str(tmp_path / "text.parquet"))
    datasets.Dataset.from_list([{"instruction": f"double {i}", "input": "", "output": str(2 * i)} for i in range(4)]).save_to_disk(
        str(tmp_path / "saved"))
    mix = [{"path": str(jsonl), "ratio": 0.5}, {"path": str(tmp_path / "text.parquet"), "ratio": 1},
           {"path": str(tmp_path / "saved"), "ratio": 0.5}]
    shown = corral.ok("POST", "/api/finetune/preview", json={"baseModel": str(tiny_model), "datasets": mix, "examples": 0})
    assert [(s["examples"], s["taken"], s["format"]) for s in shown["sources"]] == [
        (8, 4, "prompt-completion"), (6, 6, "text"), (4, 2, "alpaca")]
    assert shown["count"] == 12
    body = {"baseModel": str(tiny_model), "datasets": mix, "hyperparameters": {"epochs": 1, "maxSeqLen": 128, "packing": True}}
    task = corral.ok("POST", "/api/finetune/tasks", json=body)
    assert task["examples"] == 12 and [s["taken"] for s in task["datasets"]] == [4, 6, 2]
    # what the trainer reads (the JSONL snapshot of the records taken); the training itself is the tests' above
    snapshot = corral.data_dir / "finetune" / task["id"] / "dataset.snapshot"
    records = [json.loads(line) for line in snapshot.read_text().splitlines()]
    assert len(records) == 12 and sum("text" in r for r in records) == 6 and sum("instruction" in r for r in records) == 2
    corral.ok("POST", f"/api/finetune/tasks/{task['id']}/cancel")
    assert finished(corral, task["id"])["status"] == "cancelled"
    # refused before anything is created: a bad ratio, a source outside the dataset folders
    bad = corral.http.post("/api/finetune/tasks", json=body | {"datasets": [{"path": str(jsonl), "ratio": 2}]})
    assert bad.status_code == 400 and "datasets[0].ratio must be a number above 0 and at most 1" in bad.json()["error"]
    outside = corral.http.post("/api/finetune/tasks", json=body | {"datasets": [*mix[:1], {"path": "/etc/hostname"}]})
    assert outside.status_code == 400 and "datasets[1].path '/etc/hostname' is outside the dataset folders" in outside.json()["error"]
    assert len(corral.ok("GET", "/api/finetune/tasks")) == 1
