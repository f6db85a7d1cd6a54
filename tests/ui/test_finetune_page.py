"""The finetune page in a real browser: the no-GPU banner, three tasks from the form going queued →
training → completed live, the queued tag's reason, the loss curve and the log."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from corral.ui.inference import engine_choices
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer
from tests.integration.test_finetune import dataset, tiny_model  # noqa: F401 (fixtures)
from tests.ui.conftest import screenshot

pytest.importorskip("peft")


def test_three_tasks_from_the_form(corral: CorralServer, page: Page, tiny_model: Path, dataset: Path) -> None:  # noqa: F811
    page.goto(corral.url + "/finetune")
    expect(page.get_by_test_id("no-gpu-warning")).to_contain_text("No GPU detected")

    # Bad input is shown inline and queues nothing.
    page.get_by_test_id("ft-model").fill(str(tiny_model))
    bad = dataset.parent / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    page.get_by_test_id("ft-dataset").fill(str(bad))
    page.get_by_test_id("ft-submit").click()
    expect(page.get_by_test_id("ft-error")).to_contain_text("line")
    assert corral.ok("GET", "/api/finetune/tasks") == []

    page.get_by_test_id("ft-dataset").fill(str(dataset))
    expect(page.get_by_test_id("ft-dataset-note")).to_have_text("✓ 50 examples")
    page.get_by_test_id("hp").click()
    page.get_by_test_id("hp-epochs").fill("2")
    for _ in range(3):
        page.get_by_test_id("ft-submit").click()
    tasks = wait_for(lambda: len(t := corral.ok("GET", "/api/finetune/tasks")) == 3 and t, what="three tasks")
    first, second, third = (t["id"] for t in sorted(tasks, key=lambda t: t["createdAt"]))

    # Live: the first trains while the others wait, with the reason on hover.
    expect(page.get_by_test_id(f"status-{first}")).to_have_text("training", timeout=60_000)
    expect(page.get_by_test_id(f"status-{third}")).to_have_text("queued")
    page.get_by_test_id(f"status-{third}").hover()
    expect(page.get_by_role("tooltip")).to_contain_text(f"waiting for a CPU training slot (currently running: {first})")
    page.get_by_test_id(f"detail-{first}").click()
    expect(page.get_by_test_id("task-log")).to_contain_text("starting on the CPU")
    screenshot(page, "finetune")

    for task_id in (first, second, third):
        expect(page.get_by_test_id(f"status-{task_id}")).to_have_text("completed", timeout=180_000)
    results = {t["id"]: t for t in corral.ok("GET", "/api/finetune/tasks")}
    assert results[first]["finishedAt"] <= results[second]["startedAt"] <= results[second]["finishedAt"] <= results[third]["startedAt"]

    # The detail: loss curve points from every logged step, and deploy-as-pool for a completed task.
    steps = results[first]["progress"]["totalSteps"]
    expect(page.get_by_test_id("loss-summary")).to_contain_text(f"{steps} logged steps, last loss")
    expect(page.get_by_test_id("loss-chart").locator("canvas")).to_be_visible()
    expect(page.get_by_test_id("deploy-as-pool")).to_be_visible()


def test_failed_reason_curves_and_export_at_1280_px(corral: CorralServer, browser: object, tiny_model: Path,  # noqa: F811
                                                    dataset: Path) -> None:  # noqa: F811
    """Issue 13 and 16's UI: a failed task says why in its row; the table fits its card at 1280 px (no sideways
    scroll); a finished task shows its loss, eval-loss and learning-rate curves, and exports merged weights."""
    failing = corral.ok("POST", "/api/finetune/tasks", json={"baseModel": str(tiny_model), "datasetPath": str(dataset),
                                                             "hyperparameters": {"epochs": 1, "loraTarget": "no_such_proj"}})["id"]
    good = corral.ok("POST", "/api/finetune/tasks", json={"baseModel": str(tiny_model), "datasetPath": str(dataset),
                                                          "hyperparameters": {"epochs": 1, "valSize": 5}})["id"]
    wait_for(lambda: [corral.ok("GET", f"/api/finetune/tasks/{i}")["status"] for i in (failing, good)] == ["failed", "completed"],
             timeout=180, what="one task to fail and one to complete")

    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        page.goto(corral.url + "/finetune")
        reason = page.get_by_test_id(f"reason-{failing}")
        expect(reason).to_contain_text("trainer exited")
        expect(reason).to_contain_text("no_such_proj")  # the log's last line: what was wrong
        expect(page.get_by_test_id(f"status-{good}")).to_have_text("completed")
        card = page.get_by_test_id("tasks-card")
        for element in (card, card.locator(".q-table__middle")):
            sizes = element.evaluate("e => [e.scrollWidth, e.clientWidth]")
            assert sizes[0] <= sizes[1], f"the finetune card scrolls sideways: {sizes}"
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        box = card.bounding_box()
        assert box is not None and box["x"] + box["width"] <= 1280

        page.get_by_test_id(f"detail-{good}").click()
        expect(page.get_by_test_id("loss-chart").locator("canvas")).to_be_visible()
        expect(page.get_by_test_id("lr-chart").locator("canvas")).to_be_visible()
        summary = page.get_by_test_id("loss-summary")
        expect(summary).to_contain_text("logged steps, last loss")
        expect(summary).to_contain_text("eval loss")
        expect(summary).to_contain_text("learning rate")
        curves = corral.ok("GET", f"/api/finetune/tasks/{good}/curves")
        assert curves["loss"] and curves["evalLoss"] and len(curves["learningRate"]) == len(curves["loss"])
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        # Deploy as pool offers an engine installed here (issue 30: it offered vLLM where vLLM is not installed).
        labels, default = engine_choices("local")
        engine = page.get_by_test_id("deploy-engine")
        expect(engine).to_contain_text(labels["vllm"] if "not installed" not in labels["vllm"] else labels[default])
        expect(engine).not_to_contain_text("not installed")
        engine.click()
        for label in labels.values():  # each engine offered, the ones that cannot run here saying so
            expect(page.get_by_role("option", name=label, exact=True)).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.get_by_role("option")).to_have_count(0)  # the menu gone before the screenshot
        screenshot(page, "finetune-detail")

        page.get_by_test_id("export").click()
        expect(page.get_by_test_id("export-state")).to_contain_text("merged weights in", timeout=120_000)
        assert corral.ok("GET", f"/api/finetune/tasks/{good}/export")["state"] == "done"
    finally:
        context.close()
