"""Issue 30's UI items in a real browser at 1280×800 against a real `corral serve`: the Test panel's bounded,
stoppable, re-sendable answer that names the replica of the current answer (item 2); the autopilot and policy
dialogs with every label whole, a good upload that clears the stale dataset error, the preview that says what it
does (item 4); and the figures' formatting (latency in a unit per figure, the CLI's Loss column)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from corral.cli import TASK_COLUMNS
from corral.ui.inference import MAX_TOKENS_DEFAULT, answer_status, bounded_max_tokens, chat_body
from corral.ui.load import ms, percentiles
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer
from tests.integration.test_finetune import dataset, tiny_model  # noqa: F401 (fixtures)
from tests.ui.conftest import screenshot
from tests.ui.test_inference_page import pick

POOL = "simulator-qwen-06b-pool"
# Every label that must show whole: a field's, a switch's, the title's, a button's.
CLIPPED = """root => [...root.querySelectorAll('.q-field__label, .q-toggle__label, .q-checkbox__label, .text-lg, .q-btn__content')]
    .filter(e => e.scrollWidth > e.clientWidth).map(e => [e.textContent.trim(), e.scrollWidth, e.clientWidth])"""


# the formatting, without a browser ---------------------------------------------------------------------------
def test_latency_figures_each_in_a_unit_that_fits() -> None:
    assert percentiles((5.0, 2600.0, 2920.0)) == "5.0 ms / 2.60 s / 2.92 s"  # was "0.00 / 2.60 / 2.92 s"
    assert percentiles((42.0, 50.0, 67.4)) == "42 ms / 50 ms / 67 ms"
    assert percentiles((None, None, None)) == "– / – / –"
    assert percentiles((3.25, None)) == "3.2 ms / –"
    assert ms(999.7) == "1.00 s" and ms(999.4) == "999 ms" and ms(9.96) == "10 ms"  # never "1000 ms" or "10.0 ms"


def test_the_cli_loss_column_is_rounded() -> None:
    loss = next(c for c in TASK_COLUMNS if c.header == "Loss")
    assert loss.value({"progress": {"loss": 5.92929744720459}}) == "5.929"
    assert loss.value({"progress": {"loss": 0.000123456}}) == "0.0001235"
    assert loss.value({"progress": {}}) is None


def test_the_test_panels_request_is_bounded() -> None:
    assert MAX_TOKENS_DEFAULT == 128
    assert chat_body("qwen-06b", "hi", 128) == {"model": "qwen-06b", "messages": [{"role": "user", "content": "hi"}],
                                                "stream": True, "max_tokens": 128}
    assert [bounded_max_tokens(v) for v in (1, 4096, 128.0, "64")] == [1, 4096, 128, 64]
    assert [bounded_max_tokens(v) for v in (0, 4097, 2.5, None, "", "x", True, float("nan"))] == [None] * 8
    assert answer_status(1.25, 128, "length", 128) == "done in 1.2 s · 128 chunks · finish: length (max_tokens 128 reached)"
    assert answer_status(3.0, 1, None, 128, stopped=True) == "stopped after 3.0 s · 1 chunk"


# item 2: the Test panel ---------------------------------------------------------------------------------------
def _in_flight(corral: CorralServer, service: str) -> int:
    return corral.ok("GET", f"/api/business-services/{service}/load")["inFlight"]


def test_test_panel_bounded_stoppable_resendable_and_names_the_current_replica(corral: CorralServer, laptop_page: Page) -> None:
    page = laptop_page
    # 100 tokens/s: 128 tokens in ~1.3 s, 4,096 in ~41 s (a stream long enough to stop or replace).
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 2,
                                           "deployAsPool": True, "engineArgs": "--ttft-ms 5 --tokens-per-second 100"})
    corral.wait_ready(POOL, 2)
    for business in ("production", "testing"):
        corral.ok("POST", "/api/deploy-service", json={"serviceName": f"{business}-chat", "modelPool": POOL, "businessTag": business})
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "counts": {"production": 1, "testing": 1}})
    replica_of = {p["business"]: p["name"] for p in corral.pods(POOL)}

    page.goto(corral.url + "/")
    panel = page.get_by_test_id("test-panel")
    max_tokens, send, stop = page.get_by_test_id("test-max-tokens"), page.get_by_test_id("test-send"), page.get_by_test_id("test-stop")
    reply, replica, status = page.get_by_test_id("test-reply"), page.get_by_test_id("test-replica"), page.get_by_test_id("test-status")
    expect(max_tokens).to_have_value("128")
    expect(stop).to_be_disabled()  # nothing in flight

    # The request carries max_tokens: the simulator answers exactly that many tokens (16 without it) and says "length".
    pick(page, "test-service", "production-chat → qwen-06b (1 ready)")
    max_tokens.fill("5")
    send.click()
    expect(reply).to_have_text("tok0 tok1 tok2 tok3 tok4")
    expect(replica).to_have_text(f"answered by {replica_of['production']} (HTTP 200)")
    expect(status).to_have_text(re.compile(r"done in \d+\.\d s · 5 chunks · finish: length \(max_tokens 5 reached\)"))
    expect(stop).to_be_disabled()
    max_tokens.fill("128")  # the default bound, streamed to its end
    send.click()
    expect(status).to_contain_text("128 chunks · finish: length (max_tokens 128 reached)", timeout=30_000)
    expect(reply).to_contain_text("tok126 tok127")
    max_tokens.fill("5000")  # out of range: clamped to the panel's bound
    max_tokens.blur()
    expect(max_tokens).to_have_value("4096")

    # Stop: the stream is closed (the gateway sees the client leave) and the answer stays as it was.
    send.click()
    expect(status).to_contain_text("streaming")  # this answer's: a new request clears the line first
    wait_for(lambda: _in_flight(corral, "production-chat-nlb") == 1, what="the streamed request in flight at the gateway")
    stop.click()
    expect(status).to_contain_text("stopped after")
    expect(stop).to_be_disabled()
    kept = reply.inner_text()
    wait_for(lambda: _in_flight(corral, "production-chat-nlb") == 0, what="the stopped request to leave the gateway")
    assert reply.inner_text() == kept and "tok4095" not in kept

    # Send again while an answer streams, after switching service: the older one is stopped, and the replica line
    # only ever names the new answer's replica (every text it takes is recorded from here on).
    send.click()
    expect(status).to_contain_text("streaming")  # set after the replica line, from this answer's first chunk
    expect(replica).to_have_text(f"answered by {replica_of['production']} (HTTP 200)")
    replica.evaluate("""el => { window.replicaTexts = [];
        new MutationObserver(() => window.replicaTexts.push(el.textContent))
            .observe(el, {childList: true, subtree: true, characterData: true}); }""")
    pick(page, "test-service", "testing-chat → qwen-06b (1 ready)")
    send.click()
    expect(replica).to_have_text(f"answered by {replica_of['testing']} (HTTP 200)")
    wait_for(lambda: _in_flight(corral, "production-chat-nlb") == 0, what="the replaced answer's stream to close")
    wait_for(lambda: _in_flight(corral, "testing-chat-nlb") == 1, what="the new answer to stream")
    seen = page.evaluate("window.replicaTexts")
    assert seen and not any(replica_of["production"] in text for text in seen), seen
    expect(stop).to_be_enabled()
    screenshot(page, "test-panel", panel)
    stop.click()
    expect(status).to_contain_text("stopped after")
    wait_for(lambda: _in_flight(corral, "testing-chat-nlb") == 0, what="the stopped request to leave the gateway")


# item 4: the dialogs at 1280 px ---------------------------------------------------------------------------------
def _no_label_clipped(dialog: Locator, what: str) -> None:
    expect(dialog).to_be_visible()
    clipped = dialog.evaluate(CLIPPED)
    assert clipped == [], f"{what}: labels cut off at 1280 px (text, scrollWidth, clientWidth): {clipped}"
    width = dialog.evaluate("d => [d.scrollWidth, d.clientWidth]")
    assert width[0] <= width[1], f"{what} scrolls sideways: {width}"


def test_autopilot_and_policy_dialogs_show_every_label_whole_at_1280_px(corral: CorralServer, laptop_page: Page) -> None:
    page = laptop_page
    corral.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 1,
                                           "deployAsPool": True, "engineArgs": "--ttft-ms 5 --tokens-per-second 1000"})
    corral.wait_ready(POOL, 1)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "production-chat", "modelPool": POOL, "businessTag": "production"})
    page.goto(corral.url + "/")

    page.get_by_test_id("policy-button-production-chat-nlb").click()
    dialog = page.get_by_test_id("policy-dialog")
    _no_label_clipped(dialog, "the policy dialog (empty fields: full-size labels)")
    for label, value in (("min replicas", "1"), ("max replicas (empty: none)", "4"), ("target: TTFT p90, ms (empty: none)", "500"),
                         ("target: running + waiting per replica (empty: none)", "2.5")):
        dialog.get_by_label(label).fill(value)
    dialog.get_by_label("target: running + waiting per replica (empty: none)").blur()
    _no_label_clipped(dialog, "the policy dialog (filled fields: floating labels)")
    screenshot(page, "policy-dialog", dialog)
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)

    page.get_by_test_id(f"autopilot-{POOL}").click()
    dialog = page.get_by_test_id("autopilot-dialog")
    _no_label_clipped(dialog, "the autopilot dialog")
    dialog.get_by_label("max replicas (empty: none)").fill("8")
    dialog.get_by_label("replica concurrency (empty: the engine's --max-num-seqs)").fill("16")
    dialog.get_by_label("replica concurrency (empty: the engine's --max-num-seqs)").blur()
    _no_label_clipped(dialog, "the autopilot dialog (filled fields)")
    screenshot(page, "autopilot-dialog", dialog)


# item 4: the finetune form ----------------------------------------------------------------------------------------
def test_a_good_upload_clears_the_stale_dataset_error_and_the_preview_says_what_it_does(
        corral: CorralServer, laptop_page: Page, tiny_model: Path, dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("transformers")  # the preview's tokenizer
    page = laptop_page
    page.goto(corral.url + "/finetune")
    upload = page.get_by_test_id("ft-upload")
    expect(page.get_by_test_id("ft-upload-state")).to_have_text(".jsonl, ≤ 256 MB")
    expect(upload).not_to_contain_text("0.0B")

    # A bad dataset: the submit is refused with the line, in red.
    page.get_by_test_id("ft-model").fill(str(tiny_model))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    page.get_by_test_id("ft-dataset").fill(str(bad))
    page.get_by_test_id("ft-business").fill("Research")  # the business billed: deploy-service's rules, checked first
    page.get_by_test_id("ft-submit").click()
    error = page.get_by_test_id("ft-error")
    expect(error).to_contain_text("businessTag 'Research' is not a valid name")
    page.get_by_test_id("ft-business").fill("")  # empty: none (billed under (finetune))
    page.get_by_test_id("ft-submit").click()
    expect(error).to_contain_text("dataset line")
    expect(page.get_by_test_id("ft-dataset-note")).to_have_class(re.compile(r"\btext-negative\b"))

    # A good upload: the dataset field takes the uploaded file, the note says ✓, and the red error is gone.
    upload.locator("input[type=file]").set_input_files(str(dataset))
    expect(page.get_by_test_id("ft-dataset")).to_have_value(re.compile(r"/uploads/[0-9a-f]{8}-train\.jsonl$"))
    expect(page.get_by_test_id("ft-dataset-note")).to_have_text("✓ 50 examples")
    expect(page.get_by_test_id("ft-dataset-note")).to_have_class(re.compile(r"\btext-positive\b"))
    expect(error).to_have_text("")
    expect(upload).not_to_contain_text("0.0B")
    expect(upload).not_to_contain_text("0.00%")
    expect(page.get_by_test_id("ft-upload-state")).to_have_text(".jsonl, ≤ 256 MB")
    assert corral.ok("GET", "/api/finetune/tasks") == []

    # The preview says what it does and for how long; it can be cancelled, and shows its result when it ends.
    page.get_by_test_id("ft-preview").click()
    progress = page.get_by_test_id("ft-preview-progress")
    expect(progress).to_contain_text("loading the tokenizer of tiny-qwen2 and tokenizing")
    expect(page.get_by_test_id("ft-preview")).to_be_disabled()
    page.get_by_test_id("ft-preview-cancel").click()
    expect(page.get_by_test_id("ft-preview-error")).to_contain_text("preview cancelled after")
    expect(page.get_by_test_id("ft-preview")).to_be_enabled()
    page.get_by_test_id("ft-preview").click()
    expect(progress).to_contain_text(re.compile(r"… [1-9]\d* s \(gives up after 120 s\)"))  # the seconds count up
    expect(page.get_by_test_id("ft-preview-summary")).to_contain_text("50 examples", timeout=120_000)
    expect(progress).to_have_count(0)
