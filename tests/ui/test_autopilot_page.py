"""The autopilot in a real browser: a business's policy and a pool's settings set from the inference page,
a refusal shown next to the form, and the decision that follows shown with its reason, live."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.integration.conftest import CorralServer, deploy_sim_pool


def test_policy_and_settings_from_the_page_and_the_decision_shown_live(corral: CorralServer, page: Page) -> None:
    pool = deploy_sim_pool(corral, replicas=2)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "production", "modelPool": pool, "businessTag": "production"})
    page.goto(corral.url + "/")
    expect(page.get_by_test_id("policy-production-nlb")).to_have_text("priority 0 · replicas 0..∞ · waiting/replica ≤ 1")
    expect(page.get_by_test_id("autopilot")).to_contain_text("The autopilot is off for every pool")

    # A policy the API refuses: the message shows in the dialog, nothing is saved.
    page.get_by_test_id("policy-button-production-nlb").click()
    dialog = page.get_by_test_id("policy-dialog")
    dialog.get_by_label("min replicas").fill("5")
    dialog.get_by_label("max replicas (empty: none)").fill("2")
    dialog.get_by_test_id("policy-save").click()
    expect(dialog.get_by_test_id("policy-problem")).to_contain_text("maxReplicas (2) must be >= minReplicas (5)")
    assert corral.ok("GET", "/api/business-services/production-nlb/policy")["minReplicas"] is None  # not set: unchanged
    dialog.get_by_label("min replicas").fill("1")
    dialog.get_by_label("max replicas (empty: none)").fill("")
    dialog.get_by_label("priority (higher wins under scarcity)").fill("5")
    dialog.get_by_label("target: running + waiting per replica (empty: none)").fill("2.8")
    dialog.get_by_test_id("policy-save").click()
    expect(page.get_by_test_id("policy-production-nlb")).to_have_text(
        "priority 5 · replicas 1..∞ · waiting/replica ≤ 1, concurrency/replica ≤ 2.8")
    saved = corral.ok("GET", "/api/business-services/production-nlb/policy")
    assert saved["priority"] == 5 and saved["target"]["concurrencyPerReplica"] == 2.8

    # The pool's autopilot on: its min of 1 is met from the spares, and the decision appears with its reason.
    page.get_by_test_id(f"autopilot-{pool}").click()
    page.get_by_test_id("autopilot-dialog").get_by_test_id("autopilot-enabled").click()
    page.get_by_test_id("autopilot-save").click()
    expect(page.get_by_test_id(f"autopilot-on-{pool}")).to_be_visible()
    decisions = page.get_by_test_id(f"decisions-{pool}")
    expect(decisions).to_contain_text("unassigned → production", timeout=15_000)
    expect(decisions).to_contain_text("production 0 replica(s) < minReplicas 1")
    assert corral.ok("GET", f"/api/autopilot/{pool}")["settings"]["enabled"] is True
