"""Finetuning that trains what it should, through the real queue and trainer on the CPU: a LoRA run on a dataset
with one fixed answer lowers the assistant-only loss by a clear margin; the task reports what maxSeqLen cut; its result,
deployed as a pool (transformers engine), answers through a business service the way the Test panel asks; merged
weights can be exported; the preview shows the trained tokens before anything is queued; a chat dataset for a
tokenizer without a chat template is refused at submit unless a built-in template is chosen.

The LoRA run is done once for the module (CI time): the quality, deploy and export tests share it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral
from tests.integration.test_finetune import finished, submit, tiny_model  # noqa: F401 (fixtures)
from tests.tiny_model import build_templateless_tokenizer

pytest.importorskip("peft")

ANSWER = "Corral moves GPU capacity between business services."
QUESTIONS = ["hello", "what is a pool?", "who are you?", "tell me about GPUs", "the quick brown fox", "what is corral?",
             "a replica?", "finetune tasks?"]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)


@pytest.fixture(scope="module")
def fixed_answer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 conversations with the same answer, plus one too long in its prompt (cut) and one in its answer (dropped)."""
    rows = [{"messages": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": f"{q} ({i})"},
                          {"role": "assistant", "content": ANSWER}]} for i in range(4) for q in QUESTIONS]
    rows.append({"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": ANSWER}]})
    rows.append({"instruction": "Repeat", "output": LONG})
    path = tmp_path_factory.mktemp("quality") / "fixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def assistant_loss(model_dir: Path, data: Path, adapter: Path | None = None) -> float:
    """The mean loss on the assistant's tokens only, over the dataset's examples that fit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.finetune.dataset import load_dataset
    from corral.finetune.examples import Encoder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    encoding = Encoder(tokenizer, 96).encode_all(load_dataset(data))
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item() for e in encoding.encoded]
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """One `corral serve` for the tests that share the module's LoRA run."""
    with running_corral(tmp_path_factory.mktemp("quality-serve") / "data") as server:
        yield server


@pytest.fixture(scope="module")
def trained(served: CorralServer, tiny_model: Path, fixed_answer: Path) -> dict:  # noqa: F811
    """The module's LoRA run on the fixed answer, submitted as the API takes it; the finished task."""
    hp = {"epochs": 5, "learningRate": 5e-3, "loraRank": 16, "loraAlpha": 32, "maxSeqLen": 96, "valSize": 4}
    task = submit(served, tiny_model, fixed_answer, hyperparameters=hp)
    assert task["hyperparameters"]["lrScheduler"] == "cosine" and task["hyperparameters"]["gradientCheckpointing"] is True
    return finished(served, task["id"], timeout=120)


def test_lora_learns_the_fixed_answer_and_reports_what_was_cut(served: CorralServer, trained: dict, tiny_model: Path,  # noqa: F811
                                                               fixed_answer: Path) -> None:
    corral, done, task = served, trained, trained
    assert done["status"] == "completed", done["reason"]
    progress = done["progress"]
    assert (progress["truncated"], progress["dropped"]) == (1, 1)
    assert (progress["trainExamples"], progress["evalExamples"]) == (29, 4) and progress["datasetFormat"] == "mixed (messages 33, alpaca 1)"
    assert progress["evalLoss"] is not None
    log = corral.http.get(f"/api/finetune/tasks/{task['id']}/logs", params={"tail": 5000}).text
    assert ("1 truncated to maxSeqLen 96 at turn boundaries (0 earlier messages left out, system turns kept); 1 dropped "
            "(1 × the answer alone is longer than maxSeqLen (96 tokens))") in log
    # The checkpoints are gone once the result is written; the adapter stays.
    output = Path(done["output"])
    assert (output / "adapter_model.safetensors").exists() and not (output.parent / "checkpoints").exists()

    before = assistant_loss(tiny_model, fixed_answer)
    after = assistant_loss(tiny_model, fixed_answer, output)
    print(f"assistant-only loss: {before:.3f} before, {after:.3f} after")  # noqa: T201 (the figure the note reports)
    assert after < 0.75 * before, (before, after)


@pytest.mark.slow
def test_the_deployed_pool_answers_through_its_business_service(served: CorralServer, trained: dict) -> None:
    """The Test panel's path: a business service on the pool (the gateway), asked for the pool's tag."""
    import httpx

    corral = served
    deployed = corral.ok("POST", f"/api/finetune/tasks/{trained['id']}/deploy",
                         json={"engine": "transformers", "modelTag": "tiny-fixed", "replicas": 1})
    pool = deployed["deployment"]["name"]
    assert deployed["deployment"]["modelId"].endswith("/merged")  # transformers serves plain weights: merged first
    pod = corral.wait_ready(pool, 1, timeout=180)[0]
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "fixed", "modelPool": pool, "businessTag": "support"})
    corral.ok("POST", "/api/assign-pod", json={"podName": pod["name"], "businessTag": "support"})
    service = wait_for(lambda: next((s for s in corral.ok("GET", "/api/business-services") if s["readyReplicas"] == 1), None),
                       timeout=30, what="the business service's replica")
    body = {"model": service["modelName"], "messages": [{"role": "user", "content": "hello (0)"}], "max_tokens": 12,
            "temperature": 0}
    reply = httpx.post(f"{service['baseUrl']}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.headers.get("x-corral-replica") == pod["name"]
    answer = reply.json()["choices"][0]["message"]
    assert answer["role"] == "assistant" and answer["content"]
    print(f"the tuned pool answered: {answer['content']!r}")  # noqa: T201 (random tiny weights: the first words of ANSWER)
    # The export is the same merged directory (already written by the deploy): done at once.
    export = corral.ok("POST", f"/api/finetune/tasks/{trained['id']}/export")
    assert export["state"] == "done" and export["directory"] == deployed["deployment"]["modelId"]


def test_export_writes_merged_weights(served: CorralServer, trained: dict) -> None:
    """Export: merged weights (model + tokenizer with its chat template) in a directory, the state followed by GET."""
    corral = served
    first = corral.ok("POST", f"/api/finetune/tasks/{trained['id']}/export")
    assert first["state"] in ("running", "done")
    state = wait_for(lambda: (s := corral.ok("GET", f"/api/finetune/tasks/{trained['id']}/export"))["state"] != "running" and s,
                     timeout=120, what="the export")
    assert state["state"] == "done", state
    merged = Path(state["directory"])
    assert (merged / "model.safetensors").exists() and (merged / "chat_template.jinja").exists()
    assert not merged.with_name("merged.partial").exists()
    running = submit(corral, Path(trained["baseModel"]), Path(trained["datasetPath"]), hyperparameters={"epochs": 100})["id"]
    refused = corral.http.post(f"/api/finetune/tasks/{running}/export")
    assert refused.status_code == 409 and "only a completed task can be exported" in refused.json()["error"]
    corral.ok("POST", f"/api/finetune/tasks/{running}/cancel")


def test_preview_shows_what_the_loss_covers(corral: CorralServer, tiny_model: Path, fixed_answer: Path) -> None:  # noqa: F811
    body = {"baseModel": str(tiny_model), "datasetPath": str(fixed_answer), "maxSeqLen": 96, "examples": 2}
    preview = corral.ok("POST", "/api/finetune/preview", json=body)
    assert preview["format"] == "mixed (messages 33, alpaca 1)" and preview["count"] == 34
    assert (preview["truncated"], preview["dropped"]) == (1, 1) and len(preview["examples"]) == 2
    example = preview["examples"][0]
    assert [example["text"][s["start"]:s["end"]] for s in example["spans"]] == [ANSWER + "<|im_end|>\n"]
    assert example["text"].startswith("<|im_start|>system\nYou answer briefly.") and 0 < example["trainedTokens"] < example["totalTokens"]
    bins = preview["lengthHistogram"]
    assert sum(b["count"] for b in bins) == 34 and sum(b["count"] for b in bins if b["overMaxSeqLen"]) == 2
    # trainOnPrompt: every token is trained.
    everything = corral.ok("POST", "/api/finetune/preview", json=body | {"trainOnPrompt": True})["examples"][0]
    assert everything["trainedTokens"] == everything["totalTokens"] and everything["spans"] == [{"start": 0, "end": len(everything["text"])}]
    # Refusals: a bad line (with its number), a path outside the dataset folders; nothing is queued by a preview.
    bad = fixed_answer.parent / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"conversations": [{"from": "robot", "value": "x"}]}\n')
    refused = corral.http.post("/api/finetune/preview", json=body | {"datasetPath": str(bad)})
    assert refused.status_code == 400 and "dataset line 2: conversations[0]: 'from' must be one of" in refused.json()["error"]
    outside = corral.http.post("/api/finetune/preview", json=body | {"datasetPath": "/etc/hostname"})
    assert outside.status_code == 400 and "outside the dataset folders" in outside.json()["error"]
    assert corral.ok("GET", "/api/finetune/tasks") == []


def test_chat_examples_need_a_chat_template(corral: CorralServer, tmp_path: Path, fixed_answer: Path) -> None:
    base = build_templateless_tokenizer(tmp_path / "base-model")
    response = corral.http.post("/api/finetune/tasks", json={"baseModel": str(base), "datasetPath": str(fixed_answer)})
    assert response.status_code == 400
    assert "has no chat template, and the dataset's examples are chat (mixed (messages 33, alpaca 1))" in response.json()["error"]
    assert "choose a built-in one with the chatTemplate hyperparameter" in response.json()["error"]
    assert corral.ok("GET", "/api/finetune/tasks") == []
    # A built-in template chosen: previewed with it, and accepted.
    chosen = corral.ok("POST", "/api/finetune/preview", json={"baseModel": str(base), "datasetPath": str(fixed_answer),
                                                              "chatTemplate": "chatml", "examples": 1})
    example = chosen["examples"][0]
    assert [example["text"][s["start"]:s["end"]] for s in example["spans"]] == [ANSWER + "<|im_end|>\n"]
    bad = corral.http.post("/api/finetune/preview", json={"baseModel": str(base), "datasetPath": str(fixed_answer), "chatTemplate": "x" * 33})
    assert bad.status_code == 400
    unknown = corral.http.post("/api/finetune/preview", json={"baseModel": str(base), "datasetPath": str(fixed_answer), "chatTemplate": "vicuna"})
    assert unknown.status_code == 400 and "chatTemplate must be one of model, chatml" in unknown.json()["error"]
    accepted = corral.ok("POST", "/api/finetune/tasks", json={"baseModel": str(base), "datasetPath": str(fixed_answer),
                                                              "hyperparameters": {"chatTemplate": "chatml", "epochs": 1}})
    assert accepted["hyperparameters"]["chatTemplate"] == "chatml"
    corral.ok("POST", f"/api/finetune/tasks/{accepted['id']}/cancel")
    # Plain text needs no template: it is previewed (and would train) as is.
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"prompt": "hello", "completion": " world"}) + "\n")
    preview = corral.ok("POST", "/api/finetune/preview", json={"baseModel": str(base), "datasetPath": str(plain)})
    assert preview["formats"] == {"text": 1, "prompt-completion": 1}
    second = preview["examples"][1]
    assert [second["text"][s["start"]:s["end"]] for s in second["spans"]] == [" world<|im_end|>"]


async def test_the_submit_form_previews_the_dataset(tmp_path: Path, tiny_model: Path, fixed_answer: Path) -> None:  # noqa: F811
    """The form's Preview: the summary, the first examples with the trained tokens highlighted, the histogram."""
    from nicegui import ui
    from nicegui.testing.user_simulation import user_simulation

    from corral.backends.local.process import free_port
    from corral.config import Settings
    from corral.runtime import Runtime
    from corral.ui import live
    from corral.ui.shell import root

    runtime = Runtime(Settings(data_dir=tmp_path / "data", port=free_port(), gateway_port=free_port(), gateway_data_plane="python"))
    await runtime.start()
    live.bind(runtime)
    try:
        async with user_simulation(root=root) as user:
            await user.open("/finetune")
            fields = {e.props.get("data-testid"): e for e in user.find(kind=ui.input).elements}
            fields["ft-model"].set_value(str(tiny_model))
            fields["ft-dataset"].set_value(str(fixed_answer))
            numbers = {e.props.get("data-testid"): e for e in user.find(kind=ui.number).elements}
            numbers["hp-maxSeqLen"].set_value(96)
            user.find(kind=ui.button, content="Preview").click()
            await user.should_see("mixed (messages 33, alpaca 1): 34 examples; 1 truncated at turn boundaries (0 earlier messages left out), 1 dropped", retries=200)
            example = next(e for e in user.find(kind=ui.html).elements if e.props.get("data-testid") == "ft-preview-example-0")
            assert f'<mark class="bg-green-2">{ANSWER}&lt;|im_end|&gt;\n</mark>' in example.content
            chart = next(e for e in user.find(kind=ui.echart).elements if e.props.get("data-testid") == "ft-preview-histogram")
            assert sum(point["value"] for point in chart.options["series"][0]["data"]) == 34
    finally:
        await runtime.close()
