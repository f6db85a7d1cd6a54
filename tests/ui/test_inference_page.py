"""The inference page in a real browser: deploy from the form, services, assignment, refusals, the board."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.integration.conftest import CorralServer
from tests.ui.conftest import screenshot

POOL = "simulator-qwen-06b-pool"


def pick(page: Page, select_test_id: str, option: str) -> None:
    page.get_by_test_id(select_test_id).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_deploy_assign_refuse_and_drag(corral: CorralServer, page: Page) -> None:
    page.goto(corral.url + "/")
    expect(page.get_by_text("Nothing deployed yet")).to_be_visible()

    # Deploy a pool from the form; the button text follows the checkbox.
    deploy = page.get_by_test_id("deploy")
    expect(deploy).to_have_text("Deploy as Model Pool")
    page.get_by_test_id("as-pool").click()
    expect(deploy).to_have_text("Deploy")
    page.get_by_test_id("as-pool").click()
    expect(deploy).to_have_text("Deploy as Model Pool")
    pick(page, "engine", "simulator (simulator)")
    page.get_by_test_id("model").fill("sim")
    page.get_by_test_id("model-tag").fill("qwen-06b")
    page.get_by_test_id("replicas-input").fill("3")
    page.get_by_test_id("engine-args").fill("--ttft-ms 5 --tokens-per-second 1000")
    deploy.click()
    row = page.get_by_test_id(f"deployment-{POOL}")
    expect(row.get_by_test_id("replicas")).to_have_text("replicas 3, ready 3", timeout=60_000)  # live, no reload
    expect(row.get_by_test_id("assignment")).to_have_text("Assignment: unassigned(3)")
    expect(row.get_by_test_id("scale-warning")).to_have_count(0)  # all unassigned: any scale-down is allowed

    # Two business services from the Service Configuration tab; the test panel keeps its state.
    page.get_by_test_id("test-panel").get_by_role("textbox").fill("kept across tab switches")
    page.get_by_role("tab", name="Service Configuration").click()
    expect(page.get_by_test_id("service-pool")).to_contain_text(f"{POOL} (qwen-06b)")  # the new pool, chosen live
    for business in ("production", "testing"):
        page.get_by_test_id("service-business").fill(business)
        page.get_by_test_id("service-name").fill(f"{business}-chat")
        page.get_by_test_id("create-service").click()
        expect(row.get_by_test_id("assignment")).to_contain_text(f"{business}(0)")
    page.get_by_role("tab", name="Model Configuration").click()
    expect(page.get_by_test_id("test-panel").get_by_role("textbox")).to_have_value("kept across tab switches")

    # Assign from the pods table: ✓, and the deployment's counts change without a reload.
    pods = sorted(p["name"] for p in corral.pods(POOL))
    pick(page, f"business-{pods[0]}", "production")
    expect(page.get_by_test_id(f"result-{pods[0]}")).to_have_text("✓")
    expect(row.get_by_test_id("assignment")).to_have_text("Assignment: production(1) | testing(0) | unassigned(2)")
    assert {p["name"]: p["business"] for p in corral.pods(POOL)}[pods[0]] == "production"
    pick(page, f"business-{pods[1]}", "testing")
    expect(page.get_by_test_id(f"result-{pods[1]}")).to_have_text("✓")
    expect(row).to_contain_text("available for scale-down: 1")
    expect(row.get_by_test_id("scale-warning")).to_have_text("Can only scale down unassigned pods")

    # The test panel: a streamed reply, and which replica answered (the production one).
    pick(page, "test-service", "production-chat → qwen-06b (1 ready)")
    page.get_by_test_id("test-send").click()
    expect(page.get_by_test_id("test-replica")).to_have_text(f"answered by {pods[0]} (HTTP 200)")
    expect(page.get_by_test_id("test-reply")).not_to_have_text("…")
    screenshot(page, "inference")

    # A refused scale-down shows the exact message, after a confirmation.
    row.get_by_test_id("scale-target").fill("0")
    row.get_by_test_id("scale").click()
    page.get_by_test_id("confirm").click()
    expect(row.get_by_test_id("refusal")).to_have_text("Cannot scale down: need 3 unassigned pods, but only 1 available")
    assert len(corral.pods(POOL)) == 3

    # Drag a card on the assignment board from unassigned to testing.
    page.get_by_role("tab", name="Assignment board").click()
    card = page.get_by_test_id(f"card-{pods[2]}")
    expect(page.get_by_test_id("board-column-unassigned").get_by_test_id(f"card-{pods[2]}")).to_be_visible()
    card.drag_to(page.get_by_test_id("board-column-testing"))
    expect(page.get_by_test_id("board-column-testing").get_by_test_id(f"card-{pods[2]}")).to_be_visible()
    expect(row.get_by_test_id("assignment")).to_have_text("Assignment: production(1) | testing(2) | unassigned(0)")
    assert {p["name"]: p["business"] for p in corral.pods(POOL)}[pods[2]] == "testing"

    # Distribute by ratio: a preview of the moves, then apply.
    page.get_by_test_id("distribute").click()
    page.get_by_role("spinbutton", name="production").fill("2")
    page.get_by_role("spinbutton", name="testing").fill("1")
    page.get_by_test_id("distribute-preview-button").click()
    expect(page.get_by_test_id("distribute-preview")).to_contain_text("targets: production 2, testing 1")
    assert sum(p["business"] == "production" for p in corral.pods(POOL)) == 1  # a preview changes nothing
    page.get_by_test_id("distribute-apply").click()
    expect(row.get_by_test_id("assignment")).to_have_text("Assignment: production(2) | testing(1) | unassigned(0)")
    screenshot(page, "assignment-board", page.get_by_test_id("status-monitor"))

    # The history page lists every action, newest first, and filters.
    page.get_by_role("link", name="History").click()
    expect(page.get_by_test_id("history")).to_contain_text("distribute")
    expect(page.get_by_test_id("history")).to_contain_text("Cannot scale down: need 3 unassigned pods, but only 1 available")
    # (the history screenshot: test_load_and_history.py, at 1280 px)
