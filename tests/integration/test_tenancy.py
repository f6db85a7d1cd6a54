"""Businesses as tenants (issue 28, items 1, 2 and 5), on both data planes: a key-protected business service refuses
a request without a valid key (401, OpenAI's shape) before any replica sees it, a revoked key is refused once the
revocation returns, quotas answer 429 with Retry-After at the right count (requests, and tokens from non-streamed
usage, streamed usage and streamed chunks without usage), bad input changes nothing, and a key appears nowhere but in
the answer that created it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from corral.gateway.tenants import MSG_BAD_KEY, MSG_NO_KEY
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, running_corral
from tests.integration.test_gateway_hold import metric
from tests.integration.test_load import corral_cli

POOL = "simulator-m-pool"
SERVICE, OPEN = "acme-nlb", "open-nlb"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}


@pytest.fixture(scope="module", params=["python", "nginx"])
def tenants(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorralServer]:
    """A Corral per data plane: one simulator replica assigned to `acme` (external: key-protected by default);
    `open`, internal, has no replica and no key check."""
    from corral.gateway.nginx_plane import missing_parts

    if request.param == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    env = {"CORRAL_GATEWAY_DATA_PLANE": request.param}
    with running_corral(tmp_path_factory.mktemp(f"tenancy-{request.param}") / "data", env) as server:
        server.ok("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": "m", "replicas": 1,
                                               "deployAsPool": True, "engineArgs": "--ttft-ms 1 --tokens-per-second 5000"})
        pod = server.wait_ready(POOL, 1)[0]["name"]
        server.ok("POST", "/api/deploy-service", json={"serviceName": "acme", "modelPool": POOL, "businessTag": "acme",
                                                       "isExternal": True})
        server.ok("POST", "/api/deploy-service", json={"serviceName": "open", "modelPool": POOL, "businessTag": "open"})
        server.ok("POST", "/api/assign-pod", json={"podName": pod, "businessTag": "acme"})
        yield server


def chat(server: CorralServer, key: str | None = None, body: dict | None = None, header: str = "authorization",
         service: str = SERVICE) -> httpx.Response:
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    return httpx.post(f"{server.gateway_url}/s/{service}/v1/chat/completions", json=body or CHAT, headers=headers,
                      timeout=30)


def forwarded(server: CorralServer) -> int:
    """Requests the gateway sent to a replica of `acme` (each one a replica saw)."""
    return int(metric(server, "corral_gateway_requests", "corral_gateway_requests_total", SERVICE))


def new_key(server: CorralServer, **body) -> dict:
    response = server.http.post(f"/api/business-services/{SERVICE}/keys", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def set_limits(server: CorralServer, **limits) -> None:
    server.ok("PUT", f"/api/business-services/{SERVICE}/access", json={"limits": limits})


def away_from_a_minute_edge() -> None:
    """A minute's count starts again at each whole minute: a test counting to a limit starts well inside one."""
    wait_for(lambda: time.time() % 60 < 52, timeout=10, interval=0.2, what="a fresh minute")


def test_keys_guard_the_service_and_revocation_takes_effect_at_once(tenants: CorralServer) -> None:
    access = tenants.ok("GET", f"/api/business-services/{SERVICE}/access")
    assert access["auth"] == "keys" and access["keys"] == 0
    assert tenants.ok("GET", f"/api/business-services/{OPEN}/access")["auth"] == "none"  # internal: open by default
    seen = forwarded(tenants)
    for key, message in [(None, MSG_NO_KEY), ("crl-" + "x" * 32, MSG_BAD_KEY), ("sk-not-ours", MSG_NO_KEY)]:
        refused = chat(tenants, key)
        assert refused.status_code == 401, refused.text
        assert refused.json() == {"error": {"message": message, "type": "invalid_request_error",
                                            "code": "invalid_api_key", "param": None}}
    made = new_key(tenants, name="ci bot")
    assert made["key"].startswith("crl-") and len(made["key"]) >= 36 and made["prefix"] == made["key"][:10]
    listed = tenants.ok("GET", f"/api/business-services/{SERVICE}/keys")
    assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0] and listed[0]["name"] == "ci bot"
    assert forwarded(tenants) == seen, "a refused request reached a replica"
    assert chat(tenants, made["key"][:-1] + ("A" if made["key"][-1] != "A" else "B")).status_code == 401
    for header in ("authorization", "api-key", "x-api-key"):
        answered = chat(tenants, made["key"], header=header)
        assert answered.status_code == 200, answered.text
    assert wait_for(lambda: forwarded(tenants) == seen + 3, timeout=5, what="the three requests counted")
    assert tenants.http.get(f"/api/business-services/{SERVICE}/access").json()["keys"] == 1
    used = tenants.ok("GET", f"/api/business-services/{SERVICE}/keys")[0]["lastUsedAt"]
    assert used is not None and datetime.fromisoformat(used) > datetime.now(timezone.utc) - timedelta(minutes=1)
    revoked_at = time.monotonic()
    tenants.ok("DELETE", f"/api/business-services/{SERVICE}/keys/{made['id']}")
    wait_for(lambda: chat(tenants, made["key"]).status_code == 401, timeout=1, interval=0.02, what="the key refused")
    assert time.monotonic() - revoked_at < 1.5
    assert tenants.ok("GET", f"/api/business-services/{SERVICE}/keys") == []
    assert forwarded(tenants) == seen + 3
    assert metric(tenants, "corral_gateway_rejected", "corral_gateway_rejected_total", SERVICE) >= 4
    soon = datetime.now(timezone.utc) + timedelta(seconds=3)
    expiring = new_key(tenants, expiresAt=soon.isoformat())
    assert chat(tenants, expiring["key"]).status_code == 200
    wait_for(lambda: chat(tenants, expiring["key"]).status_code == 401, timeout=10, what="the expired key refused")
    assert datetime.now(timezone.utc) >= soon


def test_requests_per_minute_on_the_service_and_on_a_key(tenants: CorralServer) -> None:
    key = new_key(tenants)["key"]
    away_from_a_minute_edge()
    set_limits(tenants, requestsPerMinute=3)
    try:
        # (the minute's count may already hold requests of an earlier test; it is the count that matters)
        answers = [chat(tenants, key) for _ in range(5)]
        codes = [a.status_code for a in answers]
        assert 429 in codes and codes.index(429) <= 3 and all(c == 429 for c in codes[codes.index(429):]), codes
        refused = answers[-1]
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 60
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["param"] == "requestsPerMinute"
        assert f"business service '{SERVICE}' allows 3 requests per minute" in error["message"]
        assert metric(tenants, "corral_gateway_rejected", "corral_gateway_rejected_total", SERVICE) >= 2
    finally:
        set_limits(tenants)
    limited = new_key(tenants, limits={"requestsPerMinute": 1})
    assert chat(tenants, limited["key"]).status_code == 200
    second = chat(tenants, limited["key"])
    assert second.status_code == 429 and f"key '{limited['id']}' allows 1 requests" in second.json()["error"]["message"]
    assert chat(tenants, key).status_code == 200  # the other key is not limited by it
    set_limits(tenants, requestsPerMinute=0)  # 0 refuses all
    try:
        assert chat(tenants, key).status_code == 429
    finally:
        set_limits(tenants)


def tokens_used(response: httpx.Response, mode: str) -> int:
    """What the data planes count for a response: the usage's total_tokens, or one per streamed event without it."""
    if mode == "usage":
        return response.json()["usage"]["total_tokens"]
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    if mode == "streamed usage":
        return max(e["usage"]["total_tokens"] for e in events if e.get("usage"))
    return len(events)


@pytest.mark.parametrize("mode", ["usage", "streamed usage", "streamed chunks"])
def test_tokens_per_minute_count_the_usage_of_ended_requests(tenants: CorralServer, mode: str) -> None:
    """The token limit is checked with the tokens already used (a request's own are unknown until it ends): with a
    limit of one request's tokens + 1, the first request (0 used) and the second (T used) pass, the third is refused."""
    body = dict(CHAT)
    if mode != "usage":
        body["stream"] = True
    if mode == "streamed usage":
        body["stream_options"] = {"include_usage": True}
    probe = chat(tenants, new_key(tenants)["key"], body)
    assert probe.status_code == 200
    per_request = tokens_used(probe, mode)
    limited = new_key(tenants, limits={"tokensPerMinute": per_request + 1})
    away_from_a_minute_edge()
    first, second = chat(tenants, limited["key"], body), chat(tenants, limited["key"], body)
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    refused = chat(tenants, limited["key"], body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["param"] == "tokensPerMinute" and 1 <= int(refused.headers["retry-after"]) <= 60


def test_quota_counts_survive_a_restart_of_nginx(tenants: CorralServer, request: pytest.FixtureRequest) -> None:
    """The control plane reads the windows once a second and gives them back to an nginx that restarted with empty
    shared memory, before its routing table: a key's count goes on where it was."""
    if "python" in request.node.callspec.id:
        pytest.skip("the Python data plane runs inside `corral serve`: its windows start again with it (README)")
    made = new_key(tenants, limits={"requestsPerMinute": 3})
    away_from_a_minute_edge()
    assert [chat(tenants, made["key"]).status_code for _ in range(2)] == [200, 200]

    def seen() -> int:
        keys = tenants.ok("GET", f"/api/business-services/{SERVICE}/keys")
        return next(k for k in keys if k["id"] == made["id"])["used"]["requestsThisMinute"]

    wait_for(lambda: seen() == 2, timeout=5, what="the control plane to read the key's window")
    pid_file = tenants.data_dir / "gateway" / "nginx.pid"
    master = int(pid_file.read_text())
    os.kill(master, signal.SIGTERM)
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() not in ("", str(master)), timeout=15,
             what="nginx started again")

    def serving() -> bool:  # the new nginx has the table: it knows the service and refuses a wrong key
        try:
            return chat(tenants, "crl-" + "z" * 32).status_code == 401
        except httpx.TransportError:
            return False

    wait_for(serving, timeout=15, what="the new nginx serving its table")
    assert chat(tenants, made["key"]).status_code == 200  # the third of the minute
    refused = chat(tenants, made["key"])
    assert refused.status_code == 429, refused.text


def test_a_service_s_keys_go_with_it(tenants: CorralServer, request: pytest.FixtureRequest) -> None:
    if "nginx" in request.node.callspec.id:
        pytest.skip("the control plane's bookkeeping: one data plane is enough")
    body = {"serviceName": "temp", "modelPool": POOL, "businessTag": "temp", "isExternal": True}
    tenants.ok("POST", "/api/deploy-service", json=body)
    tenants.ok("POST", "/api/business-services/temp-nlb/keys", json={})
    assert tenants.ok("GET", "/api/business-services/temp-nlb/access")["keys"] == 1
    tenants.ok("DELETE", "/api/business-services/temp-nlb")
    tenants.ok("POST", "/api/deploy-service", json={**body, "isExternal": False})  # re-created, internal: open, no key
    assert tenants.ok("GET", "/api/business-services/temp-nlb/access") | {"used": None} == {
        "service": "temp-nlb", "auth": "none", "keys": 0, "used": None,
        "limits": {"requestsPerMinute": None, "tokensPerMinute": None, "tokensPerDay": None}}
    tenants.ok("DELETE", "/api/business-services/temp-nlb")


def test_the_cli_creates_lists_and_revokes_keys(tenants: CorralServer, request: pytest.FixtureRequest) -> None:
    if "nginx" in request.node.callspec.id:
        pytest.skip("the CLI talks to the API: one data plane is enough")
    made = corral_cli(tenants, "keys", "create", SERVICE, "--name", "from-cli", "--rpm", "100", "--weight", "2")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("crl-") and chat(tenants, key).status_code == 200
    listed = corral_cli(tenants, "keys", "list", SERVICE, "-o", "json")
    assert listed.returncode == 0 and key not in listed.stdout
    mine = next(k for k in json.loads(listed.stdout) if k["name"] == "from-cli")
    assert mine["limits"]["requestsPerMinute"] == 100 and mine["prefix"] == key[:10] and mine["weight"] == 2
    access = corral_cli(tenants, "keys", "access", SERVICE, "--tpd", "1000000")
    assert access.returncode == 0 and "tokensPerDay=1000000" in access.stdout, access.stdout + access.stderr
    assert corral_cli(tenants, "keys", "access", SERVICE, "--tpd", "none").returncode == 0
    assert corral_cli(tenants, "keys", "access", SERVICE, "--rpm", "lots").returncode != 0
    updated = corral_cli(tenants, "keys", "update", SERVICE, mine["id"], "--weight", "5", "--tpm", "500", "--expires", "never")
    assert updated.returncode == 0 and "weight 5" in updated.stdout, updated.stdout + updated.stderr
    mine = next(k for k in tenants.ok("GET", f"/api/business-services/{SERVICE}/keys") if k["id"] == mine["id"])
    assert mine["weight"] == 5 and mine["limits"]["tokensPerMinute"] == 500 and mine["limits"]["requestsPerMinute"] == 100
    refused = corral_cli(tenants, "keys", "update", SERVICE, mine["id"], "--weight", "0")
    assert refused.returncode != 0 and "weight" in refused.stderr, refused.stdout + refused.stderr
    assert corral_cli(tenants, "keys", "update", SERVICE, "key-000000000000", "--name", "x").returncode != 0
    assert corral_cli(tenants, "keys", "revoke", SERVICE, mine["id"]).returncode == 0
    assert chat(tenants, key).status_code == 401
    assert key not in (tenants.data_dir / "serve.log").read_text()


def test_a_key_has_a_weight_from_1_to_1000(tenants: CorralServer) -> None:
    before = tenants.ok("GET", f"/api/business-services/{SERVICE}/keys")
    for weight in [0, 1001, "x", "3", 2.5, True]:
        response = tenants.http.post(f"/api/business-services/{SERVICE}/keys", json={"weight": weight})
        assert response.status_code in (400, 422), (weight, response.text)
    assert tenants.ok("GET", f"/api/business-services/{SERVICE}/keys") == before
    made = new_key(tenants, name="weighted", weight=3)
    plain = new_key(tenants, name="unweighted")
    try:
        assert made["weight"] == 3 and plain["weight"] == 1
        listed = {k["id"]: k for k in tenants.ok("GET", f"/api/business-services/{SERVICE}/keys")}
        assert listed[made["id"]]["weight"] == 3 and listed[plain["id"]]["weight"] == 1
        assert chat(tenants, made["key"]).status_code == 200  # the data plane takes the table with a weight in it
    finally:
        for key in (made, plain):
            tenants.ok("DELETE", f"/api/business-services/{SERVICE}/keys/{key['id']}")


def test_a_key_is_updated_in_place(tenants: CorralServer) -> None:
    """PATCH changes a key's name, weight, limits and expiry without re-issuing it: checked as on create (nothing
    changed on an error), in force at the gateway once it returns, recorded without key material."""
    made = new_key(tenants, name="to-update")
    keys = f"/api/business-services/{SERVICE}/keys"
    path = f"{keys}/{made['id']}"
    try:
        before = tenants.ok("GET", keys)
        for body in [{"weight": 0}, {"weight": 1001}, {"weight": "3"}, {"weight": True}, {"weight": 2.5},
                     {"expiresAt": "2030-01-01T00:00:00"}, {"expiresAt": "2999-01-01T00:00:00Z"}, {"name": "bad\nname"},
                     {"name": ""}, {"limits": {"requestsPerMinute": -1}}, {"unknown": 1}, {"weight": 2, "name": "x" * 64}]:
            response = tenants.http.patch(path, json=body)
            assert response.status_code in (400, 422), (body, response.text)
        past = tenants.http.patch(path, json={"expiresAt": "2000-01-01T00:00:00Z"})
        assert past.status_code == 400 and "expiresAt must be in the future" in past.json()["error"], past.text
        assert tenants.http.patch(f"{keys}/key-000000000000", json={"weight": 2}).status_code == 404
        assert tenants.http.patch(f"/api/business-services/{OPEN}/keys/{made['id']}", json={"weight": 2}).status_code == 404
        assert tenants.http.patch(f"/api/business-services/nobody-nlb/keys/{made['id']}", json={}).status_code == 404
        assert tenants.ok("GET", keys) == before

        away_from_a_minute_edge()
        updated = tenants.ok("PATCH", path, json={"name": "renamed", "weight": 4, "limits": {"requestsPerMinute": 1}})
        assert "key" not in updated and updated["id"] == made["id"] and updated["prefix"] == made["prefix"]
        assert (updated["name"], updated["weight"], updated["limits"]["requestsPerMinute"]) == ("renamed", 4, 1)
        listed = next(k for k in tenants.ok("GET", keys) if k["id"] == made["id"])
        assert (listed["name"], listed["weight"], listed["limits"]["requestsPerMinute"]) == ("renamed", 4, 1)
        assert chat(tenants, made["key"]).status_code == 200  # the same key works after the change
        second = chat(tenants, made["key"])
        assert second.status_code == 429 and f"key '{made['id']}' allows 1 requests" in second.json()["error"]["message"]
        lifted = tenants.ok("PATCH", path, json={"limits": None})  # replaced whole: no limits of its own
        assert lifted["limits"]["requestsPerMinute"] is None and lifted["weight"] == 4 and lifted["name"] == "renamed"
        assert chat(tenants, made["key"]).status_code == 200

        later = (datetime.now(timezone.utc) + timedelta(days=1)).replace(microsecond=0)
        assert datetime.fromisoformat(tenants.ok("PATCH", path, json={"expiresAt": later.isoformat()})["expiresAt"]) == later
        cleared = tenants.ok("PATCH", path, json={"expiresAt": None, "name": None})
        assert cleared["expiresAt"] is None and cleared["name"] is None and cleared["weight"] == 4

        rows = tenants.ok("GET", "/api/history", params={"action": "api-key", "limit": 5000})
        mine = [r for r in rows if (r["message"] or "").startswith(f"key {made['id']} ({made['prefix']}…) updated")]
        assert len(mine) == 4 and all(r["outcome"] == "success" for r in mine), mine
        first = next(r for r in mine if (r["after"] or {}).get("weight") == 4)
        assert first["before"]["weight"] == 1 and set(first["after"]) == {"name", "weight", "limits"}
        text = json.dumps(rows)
        assert made["key"] not in text and hashlib.sha256(made["key"].encode()).hexdigest() not in text
    finally:
        tenants.ok("DELETE", path)


def test_bad_input_is_refused_and_keys_appear_only_once(tenants: CorralServer) -> None:
    before = tenants.ok("GET", f"/api/business-services/{SERVICE}/keys")
    for body in [{"name": "x" * 64}, {"name": "bad\nname"}, {"name": ""}, {"expiresAt": "2000-01-01T00:00:00Z"},
                 {"expiresAt": "2999-01-01T00:00:00Z"}, {"expiresAt": "2030-01-01T00:00:00"}, {"limits": {"requestsPerMinute": -1}},
                 {"limits": {"tokensPerDay": 10**13}}, {"limits": {"tokensPerMinute": "many"}}, {"unknown": 1}]:
        response = tenants.http.post(f"/api/business-services/{SERVICE}/keys", json=body)
        assert response.status_code in (400, 422), (body, response.text)
    for body in [{"auth": "maybe"}, {"limits": {"requestsPerMinute": 1.5}}]:
        assert tenants.http.put(f"/api/business-services/{SERVICE}/access", json=body).status_code in (400, 422)
    assert tenants.http.post(f"/api/business-services/{OPEN}/keys", json={}).status_code == 400  # an open service
    assert tenants.http.post("/api/business-services/nobody-nlb/keys", json={}).status_code == 404
    assert tenants.http.delete(f"/api/business-services/{SERVICE}/keys/key-000000000000").status_code == 404
    assert tenants.ok("GET", f"/api/business-services/{SERVICE}/keys") == before
    made = new_key(tenants, name="secret-check")
    assert chat(tenants, made["key"]).status_code == 200
    tenants.ok("DELETE", f"/api/business-services/{SERVICE}/keys/{made['id']}")
    history = json.dumps(tenants.ok("GET", "/api/history", params={"limit": 5000}))
    assert made["id"] in history and made["key"] not in history
    for path in ("/api/metrics", f"/api/business-services/{SERVICE}/keys", f"/api/business-services/{SERVICE}/access",
                 "/api/business-services"):
        assert made["key"] not in tenants.http.get(path).text
    secret = made["key"].encode()
    for path in tenants.data_dir.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert secret not in path.read_bytes(), f"the key is in {path}"
