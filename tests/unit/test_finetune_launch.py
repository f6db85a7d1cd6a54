"""How a trainer is launched and resumed, and the chat templates one can choose: the torch.distributed.run command
for several GPUs (and its Job), memory per data-parallel process, QLoRA kept on one GPU, the newest *complete*
checkpoint, only rank 0 reporting progress, ETA as a time, and the built-in chat templates on a tokenizer that has
none (labels still only on the answers), in the preview too."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.domain import hyperparameters
from corral.domain.errors import InvalidInput
from corral.finetune import templates
from corral.finetune.intake import training_estimate
from corral.finetune.progress import ProgressEvent, event_of, progress_update
from corral.finetune.runners import job_manifest, trainer_command
from corral.finetune.store import TaskRecord
from corral.finetune.trainer import ProgressFile, newest_checkpoint

GIB = 1024**3


def test_one_process_per_gpu_through_torch_distributed_run(tmp_path: Path) -> None:
    assert trainer_command("py", tmp_path, 0) == ["py", "-m", "corral.finetune.trainer", str(tmp_path)]
    assert trainer_command("py", tmp_path, 1) == ["py", "-m", "corral.finetune.trainer", str(tmp_path)]
    assert trainer_command("py", tmp_path, 4, "--log-to", "x") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "4",
        "-m", "corral.finetune.trainer", str(tmp_path), "--log-to", "x"]
    task = TaskRecord(id="ft-1", status="queued", base_model="/m", dataset_path="/d", method="lora", priority="normal",
                      hyperparameters={}, gpus=2)
    job = job_manifest(task, tmp_path, "ns", "img", tmp_path, "claim", "nvidia.com/gpu", None, [])
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:8] == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                                        "--nproc_per_node", "2"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]  # NCCL needs more than 64 MiB
    single = job_manifest(TaskRecord(**{**task.__dict__, "gpus": 1}), tmp_path, "ns", "img", tmp_path, "claim", "nvidia.com/gpu", None, [])
    assert single["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["python", "-m", "corral.finetune.trainer"]


def test_each_gpu_is_reserved_what_its_process_holds() -> None:
    """Data parallelism copies the model to every GPU: the per-GPU figure grows (DDP's gradient buckets), never ÷ N."""
    for method in ("lora", "full"):
        hp = hyperparameters.validate({}, method)
        one = training_estimate("Qwen/Qwen2.5-Coder-7B", method, hp, 1)[1]  # type: ignore[index]
        four = training_estimate("Qwen/Qwen2.5-Coder-7B", method, hp, 4)[1]  # type: ignore[index]
        assert four.total_gb > one.total_gb and "ddp_buckets" in four.parts and "ddp_buckets" not in one.parts
        assert four.parts["weights"] == one.parts["weights"] and four.parts["activations"] == one.parts["activations"]
    full = training_estimate("Qwen/Qwen2.5-Coder-7B", "full", hyperparameters.validate({}, "full"), 2)[1]  # type: ignore[index]
    assert full.parts["ddp_buckets"] == full.parts["trainable"] / 4  # 4 bytes (an fp32 gradient) per trainable parameter


def test_qlora_on_several_gpus_is_refused(tmp_path: Path) -> None:
    from corral.config import Settings
    from corral.events import EventBus
    from corral.finetune.manager import FinetuneManager
    from corral.gpus.inventory import GpuDevice, GpuInventory
    from corral.store.state import StateStore

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    settings = Settings(data_dir=tmp_path / "data", dataset_roots=[tmp_path])
    inventory = GpuInventory(devices=(GpuDevice(0, "NVIDIA A10", 24 * GIB), GpuDevice(1, "NVIDIA A10", 24 * GIB)))
    manager = FinetuneManager(settings, StateStore(settings.data_dir / "corral.db"), EventBus(), lambda: inventory,
                              lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidInput, match=r"qlora trains on one GPU .* got gpus 2: submit it with gpus 1, or use lora or full"):
        manager.submit(base_model=str(tmp_path), dataset_path=str(data), method="qlora", gpus=2)
    assert manager.list() == []


def test_resume_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert newest_checkpoint(tmp_path / "none") is None
    for step, complete in ((5, True), (10, True), (15, False), (100, False)):  # 15, 100: stopped while saving
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(tmp_path) == "checkpoint-10"  # by step, not by name: 10 after 5


def test_only_rank_zero_reports_progress(tmp_path: Path) -> None:
    ProgressFile(tmp_path / "p.jsonl", rank=1).write(ProgressEvent.STEP, step=1)
    assert not (tmp_path / "p.jsonl").exists()
    ProgressFile(tmp_path / "p.jsonl", rank=0).write(ProgressEvent.STEP, step=1)
    assert json.loads((tmp_path / "p.jsonl").read_text())["step"] == 1


def test_the_manager_reads_the_trainers_progress_events_as_json(tmp_path: Path) -> None:
    """The trainer's lines (`ProgressFile`) read back as `ProgressEvent`s: the last one (a preempted trainer's exit),
    whether a run ever completed, the curves; whatever the JSON's spacing, and past a line cut off mid-write."""
    from corral.finetune.task_files import TaskFiles

    files = TaskFiles(tmp_path)
    (tmp_path / "ft-1").mkdir()
    assert files.last_event("ft-1") is None and not files.reported("ft-1", ProgressEvent.COMPLETED)
    progress = ProgressFile(tmp_path / "ft-1" / "progress.jsonl")
    progress.write(ProgressEvent.STEP, step=1, loss=2.0)
    progress.write(ProgressEvent.EVAL, step=1, evalLoss=1.5)
    assert files.last_event("ft-1") is ProgressEvent.EVAL
    assert [event_of(line) for line in files.new_progress("ft-1")] == [ProgressEvent.STEP, ProgressEvent.EVAL]
    with open(tmp_path / "ft-1" / "progress.jsonl", "a", encoding="utf-8") as f:
        f.write('{"event":"preempted","step":1}\n{"event": "ste')  # compact JSON, then a line being written
    assert files.last_event("ft-1") is None  # the unfinished line is no event
    assert [event_of(line) for line in files.new_progress("ft-1")] == [ProgressEvent.PREEMPTED]
    with open(tmp_path / "ft-1" / "progress.jsonl", "a", encoding="utf-8") as f:
        f.write('p", "step": 2, "loss": 1.0}\n')
    assert files.last_event("ft-1") is ProgressEvent.STEP and files.new_progress("ft-1")[0]["step"] == 2
    assert files.curve("ft-1") == [(1, 2.0), (2, 1.0)] and files.curve("ft-1", "evalLoss") == [(1, 1.5)]
    progress.write(ProgressEvent.COMPLETED, output="/out")
    assert files.reported("ft-1", ProgressEvent.COMPLETED)
    assert event_of({"event": "something newer"}) is None and event_of(None) is None


def test_eta_is_kept_as_a_time() -> None:
    progress = progress_update({}, {"event": "step", "time": 1000.0, "step": 3, "totalSteps": 10, "eta": 70.0, "learningRate": 1e-4})
    assert progress["etaAt"] == 1070.0 and progress["learningRate"] == 1e-4
    assert progress_update(progress, {"event": "step", "time": 1001.0, "step": 1, "eta": None})["etaAt"] is None
    assert progress_update(progress, {"event": "eval", "time": 1002.0, "step": 3, "evalLoss": 1.5})["etaAt"] == 1070.0


# chat templates ---------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
                     {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "again"},
                     {"role": "assistant", "content": "lazy dog"}]}


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import build_templateless_tokenizer

    return build_templateless_tokenizer(tmp_path_factory.mktemp("bare") / "m")


def test_the_chat_template_is_a_bounded_choice() -> None:
    assert hyperparameters.validate({})["chatTemplate"] == "model"
    assert hyperparameters.validate({"chatTemplate": "llama3"})["chatTemplate"] == "llama3"
    for bad in ("jinja: {{ evil }}", "ChatML", 3, None):
        with pytest.raises(InvalidInput, match="chatTemplate must be one of model, chatml, qwen, llama3, mistral, gemma"):
            hyperparameters.validate({"chatTemplate": bad})
    assert set(templates.NAMES) == {"model", *templates.TEMPLATES} and set(templates.MARKERS) == set(templates.TEMPLATES)


@pytest.mark.parametrize("name", sorted(templates.TEMPLATES))
def test_a_built_in_template_trains_only_the_answers(bare: Path, name: str) -> None:
    from corral.finetune.examples import IGNORE, Encoder
    from corral.finetune.formats import parse

    tokenizer = transformers.AutoTokenizer.from_pretrained(bare)
    assert not tokenizer.chat_template and not templates.apply(tokenizer, "model")
    assert templates.apply(tokenizer, name)
    encoded = Encoder(tokenizer, 512).encode(parse(CHAT, 1))
    trained = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE])
    assert "the quick fox" in trained and "lazy dog" in trained
    assert "hello world" not in trained and "be brief" not in trained and "again" not in trained
    # Markers the tiny tokenizer lacks are named (its vocabulary has ChatML's, not the others').
    assert (templates.missing_markers(tokenizer, name) == []) == (name in ("chatml", "qwen"))


def test_the_preview_uses_the_chosen_template(bare: Path, tmp_path: Path) -> None:
    from corral.domain.errors import CorralError
    from corral.finetune.preview import preview

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(CHAT) + "\n")
    with pytest.raises(CorralError, match="has no chat template.*chatTemplate hyperparameter"):
        preview(str(bare), data, 256, False)
    shown: dict[str, Any] = preview(str(bare), data, 1024, False, chat_template="llama3")  # its markers are many tokens here
    example = shown["examples"][0]
    assert example["text"].startswith("<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>")
    assert [example["text"][s["start"]:s["end"]] for s in example["spans"]] == ["the quick fox<|eot_id|>", "lazy dog<|eot_id|>"]


def test_the_preview_child_passes_the_choice_on(bare: Path, tmp_path: Path) -> None:
    """The manager runs the preview in a child process: the choice crosses that boundary."""
    import subprocess

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(CHAT) + "\n")
    request = {"baseModel": str(bare), "datasetPath": str(data), "maxSeqLen": 256, "trainOnPrompt": False, "chatTemplate": "chatml"}
    done = subprocess.run([sys.executable, "-m", "corral.finetune.preview"], input=json.dumps(request), capture_output=True,
                          text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["examples"][0]["text"].startswith("<|im_start|>system\nbe brief<|im_end|>"), answer


def test_the_table_shows_eta_as_a_time_and_a_failed_tasks_reason() -> None:
    import time
    from datetime import datetime, timezone

    from corral.ui.finetune import eta_text, task_row
    from corral.views import FinetuneTask

    now = time.mktime((2026, 11, 23, 14, 27, 0, 0, 0, -1))
    assert eta_text(now + 300, now) == "ETA 14:32 (in 5 min)"
    assert eta_text(now + 42, now) == "ETA 14:27 (in 42 s)"
    assert eta_text(now + 2 * 3600 + 600, now) == "ETA 16:37 (in 2 h 10 min)"
    assert eta_text(now - 5, now) == "ETA 14:26 (in 0 s)" and eta_text(None) is None
    base = {"id": "ft-1", "reason": "", "baseModel": "/m/tiny", "datasetPath": "/d", "method": "lora", "priority": "normal",
            "gpus": 0, "memoryGb": 0.0, "timeoutSeconds": 60.0, "hyperparameters": {}, "examples": 1, "units": [], "output": None,
            "reclaimed": {}, "createdAt": "2026-11-23T14:00:00+00:00", "startedAt": None, "finishedAt": None}
    training = task_row(FinetuneTask(**base, status="training", progress={"step": 3, "totalSteps": 10, "loss": 1.5,
                                                                           "etaAt": time.time() + 600}))
    assert "step 3/10 · loss 1.500 · ETA " in training["progressText"] and "(in 10 min)" in training["progressText"]
    assert training["shownReason"] == "" and training["cancellable"] and not training["resumable"]
    failed = task_row(FinetuneTask(**{**base, "reason": "trainer exited (code 1): boom"}, status="failed", progress={}), True)
    assert failed["shownReason"] == "trainer exited (code 1): boom" and failed["resumable"] and not failed["cancellable"]
    start_by = datetime.fromtimestamp(time.time() + 3 * 3600 + 330, timezone.utc).isoformat()
    head = task_row(FinetuneTask(**base, status="queued", progress={}, startBy=start_by))
    assert "GPUs reserved, starts by " in head["progressText"] and "(in 3 h 5 min)" in head["progressText"]
