"""API keys on a business service's card, in a real browser: a key created, shown once with a copy button, gone from
the page once its dialog closes, working at the gateway, its weight changed in place, then revoked from the card."""

from __future__ import annotations

import httpx
from playwright.sync_api import Page, expect

from tests.integration.conftest import CorralServer, deploy_sim_pool

SERVICE = "acme-nlb"


def test_a_key_is_created_shown_once_and_revoked_from_the_card(corral: CorralServer, page: Page) -> None:
    pool = deploy_sim_pool(corral, replicas=1)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "acme", "modelPool": pool, "businessTag": "acme",
                                                   "isExternal": True})
    corral.ok("POST", "/api/assign-pod", json={"podName": corral.wait_ready(pool, 1)[0]["name"], "businessTag": "acme"})
    page.goto(corral.url + "/")
    expect(page.get_by_test_id(f"keys-{SERVICE}")).to_have_text("0 key(s)")
    page.get_by_test_id(f"keys-button-{SERVICE}").click()
    dialog = page.get_by_test_id("keys-dialog")
    expect(dialog.get_by_test_id("keys-auth")).to_be_visible()
    dialog.get_by_test_id("key-name").fill("from the page")
    dialog.get_by_test_id("key-weight").fill("4")
    dialog.get_by_test_id("key-create").click()
    shown = page.get_by_test_id("key-shown")
    secret = shown.get_by_test_id("key-secret").input_value()
    assert secret.startswith("crl-")
    expect(shown.get_by_test_id("key-copy")).to_be_visible()
    listed = corral.ok("GET", f"/api/business-services/{SERVICE}/keys")
    assert [(k["name"], k["weight"]) for k in listed] == [("from the page", 4)]
    url = f"{corral.gateway_url}/s/{SERVICE}/v1/models"
    assert httpx.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    shown.get_by_test_id("key-shown-close").click()
    expect(page.get_by_test_id("key-shown")).to_have_count(0)
    assert secret not in page.content()  # shown once: gone with its dialog
    expect(dialog.get_by_test_id(f"key-{listed[0]['id']}")).to_contain_text(listed[0]["prefix"])
    expect(dialog.get_by_test_id(f"key-weight-{listed[0]['id']}")).to_have_text("weight 4")
    edit = dialog.get_by_test_id(f"key-weight-edit-{listed[0]['id']}")  # changed in place (PATCH), not re-issued
    edit.fill("7")
    edit.press("Enter")
    expect(dialog.get_by_test_id(f"key-weight-{listed[0]['id']}")).to_have_text("weight 7")
    assert [k["weight"] for k in corral.ok("GET", f"/api/business-services/{SERVICE}/keys")] == [7]
    assert httpx.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 200  # the same key still works
    dialog.get_by_test_id(f"revoke-{listed[0]['id']}").click()
    expect(dialog.get_by_test_id(f"key-{listed[0]['id']}")).to_have_count(0)
    assert httpx.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert corral.ok("GET", f"/api/business-services/{SERVICE}/keys") == []
