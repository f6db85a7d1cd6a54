"""What a finetuning practitioner trusts end to end (issue 27), on the tiny model on the CPU, with the real trainer and
merge processes: a base model trained on a built-in chat template stops where it was trained to (its EOS and
generation_config become the template's end-of-turn token, in the adapter and in the merged model); the same seed
gives the same run; the dataset trained is the one submitted, whatever happens to the file afterwards; a timeout
checkpoints before it stops; a refused deploy merges nothing; a merge left by a killed control plane dies with it and
never races a new one (issue 26, item 7)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import CorralServer
from tests.integration.test_finetune import finished, submit, task, tiny_model  # noqa: F401 (fixtures)

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("data_plane")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
QUESTIONS = [f"what is {i} + {i}?" for i in range(12)]


@pytest.fixture
def data_plane() -> str:
    return "python"  # no pool here serves traffic: the lighter plane


def chat_rows(count: int = 12) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "answer with a number"}, {"role": "user", "content": q},
                          {"role": "assistant", "content": str(2 * i)}]} for i, q in enumerate(QUESTIONS[:count])]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def base_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny model as a *base* model: no chat template, EOS `<|endoftext|>` (not ChatML's `<|im_end|>`)."""
    target = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(tiny_model, target)
    (target / "chat_template.jinja").unlink()
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    for name in ("config.json", "generation_config.json"):
        data = json.loads((target / name).read_text())
        (target / name).write_text(json.dumps({**data, "eos_token_id": 0}))
    return target


def train(task_dir: Path, base: Path, data: Path, **hp) -> list[dict]:
    """The trainer on `task_dir` as Corral starts it; its progress lines."""
    task_dir.mkdir(parents=True, exist_ok=True)
    hyperparameters = {"epochs": 1, "batchSize": 4, "maxSeqLen": 128, "saveSteps": 1000} | hp
    (task_dir / "task.json").write_text(json.dumps({"baseModel": str(base), "datasetPath": str(data), "method": "lora",
                                                    "hyperparameters": hyperparameters}))
    done = subprocess.run([sys.executable, "-m", "corral.finetune.trainer", str(task_dir)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [json.loads(line) for line in (task_dir / "progress.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chatml_task(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chatml")
    train(root / "task", base_model, write_jsonl(root / "data.jsonl", chat_rows()), chatTemplate="chatml")
    return root / "task"


def stops_at(model_dir: Path, forced: int, at: int = 3, limit: int = 12) -> int:
    """New tokens `model_dir` generates when its logits force token `forced` as the `at`-th one: `at` when generation
    stops there (it is an EOS of the model's generation_config), `limit` when it runs on."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __init__(self, start: int) -> None:
            self.start = start

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] - self.start == at - 1:
                scores = torch.full_like(scores, -1e9)
                scores[:, forced] = 0
            else:
                scores[:, forced] = -1e9
            return scores

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=limit, do_sample=False, logits_processor=LogitsProcessorList([Force(3)]))
    return out.shape[1] - prompt.shape[1]


def test_a_base_model_trained_on_chatml_stops_at_its_end_of_turn(chatml_task: Path, base_model: Path) -> None:
    """LLaMA-Factory's replace_eos: the result's EOS is `<|im_end|>`, in the adapter directory and the merged model, and
    generation_config stops at it (with the base EOS too); before, the merged model kept `<|endoftext|>` and ran on."""
    from transformers import AutoTokenizer, GenerationConfig

    output = chatml_task / "output"
    tokenizer = AutoTokenizer.from_pretrained(output)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in (tokenizer.chat_template or "")
    assert GenerationConfig.from_pretrained(output).eos_token_id == [end, 0]
    merged = subprocess.run([sys.executable, "-m", "corral.finetune.merge", str(chatml_task)], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-2000:]
    merged_dir = chatml_task / "merged"
    assert AutoTokenizer.from_pretrained(merged_dir).eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(merged_dir).eos_token_id == [end, 0]
    assert stops_at(merged_dir, end) == 3  # generation ends at the template's end of turn
    assert stops_at(base_model, end) == 12  # the base model's config would run on past it


def test_the_same_seed_gives_the_same_run(base_model: Path, tmp_path: Path) -> None:
    """`set_seed` before the LoRA weights are initialised: two runs with the same seed give identical losses."""
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows())

    def losses(name: str, seed: int) -> list[float]:
        lines = train(tmp_path / name, base_model, data, chatTemplate="chatml", seed=seed, epochs=2)
        return [line["loss"] for line in lines if line["event"] == "step"][:4]

    first, second = losses("a", 7), losses("b", 7)
    assert len(first) == 4 and first == second, (first, second)  # before: equal for 2 steps (LoRA's B starts at 0), then not


def test_the_preview_warns_that_the_end_of_turn_becomes_the_eos(corral: CorralServer, base_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(3))
    body = {"baseModel": str(base_model), "datasetPath": str(data), "chatTemplate": "chatml", "examples": 1}
    preview = corral.ok("POST", "/api/finetune/preview", json=body)
    assert any("ends a turn with <|im_end|>, not the model's EOS <|endoftext|>" in w for w in preview["warnings"]), preview
    assert preview["examples"][0]["text"].endswith("0<|im_end|>\n")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    write_jsonl(data, [{**chat_rows(1)[0], "tools": tools}])
    shown = corral.ok("POST", "/api/finetune/preview", json=body)["examples"][0]["text"]
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in shown  # the schema is shown where the model reads it


def test_a_dataset_replaced_after_submit_changes_nothing(corral: CorralServer, tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """Snapshotted at submit: the file replaced while the task waits (and before its resume) is not what trains."""
    blocker = submit(corral, tiny_model, write_jsonl(tmp_path / "blocker.jsonl", chat_rows(4)), hyperparameters={"epochs": 200})["id"]
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(12))
    waiting = submit(corral, tiny_model, data)
    assert waiting["status"] == "queued" and waiting["examples"] == 12
    write_jsonl(data, chat_rows(3))  # replaced while queued
    corral.ok("POST", f"/api/finetune/tasks/{blocker}/cancel")
    done = finished(corral, waiting["id"])
    assert done["status"] == "completed" and done["progress"]["trainExamples"] == 12, done["progress"]
    assert done["datasetPath"] == str(data)  # the task still names the file it was given
    snapshot = corral.data_dir / "finetune" / waiting["id"] / "dataset.snapshot"
    assert len(snapshot.read_text().splitlines()) == 12


def test_a_timeout_checkpoints_before_it_stops(corral: CorralServer, tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """The preemption signal first (save at the step end), then stop: resume continues from that checkpoint."""
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows(12))
    slow = submit(corral, tiny_model, data, hyperparameters={"epochs": 400, "batchSize": 1, "saveSteps": 100000},
                  timeoutSeconds=12)["id"]
    result = finished(corral, slow, timeout=120)
    assert result["status"] == "cancelled" and result["reason"] == "timed out after 12 s (timeoutSeconds)"
    log = wait_for(lambda: (text := corral.http.get(f"/api/finetune/tasks/{slow}/logs").text).count("timed out") >= 3 and text,
                   timeout=60, what="the timed-out trainer to be stopped")  # the reason, the request to save, the outcome
    checkpoints = sorted((corral.data_dir / "finetune" / slow / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and (checkpoints[-1] / "trainer_state.json").is_file(), f"no checkpoint: the steps are lost\n{log[-1500:]}"
    assert "timed out: asked the trainer to save a checkpoint" in log and f"{checkpoints[-1].name} saved" in log
    resumed = corral.ok("POST", f"/api/finetune/tasks/{slow}/resume")
    assert resumed["status"] in ("queued", "preparing", "training")
    corral.ok("POST", f"/api/finetune/tasks/{slow}/cancel")


def test_a_refused_deploy_merges_nothing(corral: CorralServer, tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    done = finished(corral, submit(corral, tiny_model, write_jsonl(tmp_path / "data.jsonl", chat_rows(4)))["id"])
    assert done["status"] == "completed"
    corral.ok("POST", "/api/deploy", json={"engine": "transformers", "modelId": str(tiny_model), "modelTag": "taken", "replicas": 0,
                                           "deployAsPool": True})
    refused = corral.http.post(f"/api/finetune/tasks/{done['id']}/deploy", json={"engine": "transformers", "modelTag": "taken"})
    assert refused.status_code == 409 and "already exists" in refused.json()["error"], refused.text
    assert not (corral.data_dir / "finetune" / done["id"] / "merged").exists()
    assert not (corral.data_dir / "finetune" / done["id"] / "merged.partial").exists()


def _blocked_on_lock(pid: int) -> bool:
    """Whether `pid` waits for a file lock (/proc/locks lists waiters with '->')."""
    return any("->" in line and f" {pid} " in line for line in Path("/proc/locks").read_text().splitlines())


def test_a_merge_waits_for_the_one_in_flight_and_dies_with_its_control_plane(chatml_task: Path) -> None:
    import fcntl

    shutil.rmtree(chatml_task / "merged", ignore_errors=True)
    lock = open(chatml_task / "merge.lock", "a")  # noqa: SIM115 (an earlier merge, still running, holds it)
    fcntl.flock(lock, fcntl.LOCK_EX)
    # A stand-in for `corral serve`: it starts the merge as Merges does, then is killed.
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-m', 'corral.finetune.merge', {str(chatml_task)!r}],"
        " env={**os.environ, 'CORRAL_MERGE_PARENT': str(os.getpid())})\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        wait_for(lambda: _blocked_on_lock(child), timeout=120, what="the second merge to wait for the first one's lock")
        assert not (chatml_task / "merged.partial").exists()  # it touched nothing while the other merge works
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[-1][:3],
                 timeout=30, what="the orphaned merge to die with its control plane")
    finally:
        parent.kill()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    assert not (chatml_task / "merged").exists()
    again = subprocess.run([sys.executable, "-m", "corral.finetune.merge", str(chatml_task)], env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and (chatml_task / "merged" / "config.json").is_file(), again.stderr[-2000:]
