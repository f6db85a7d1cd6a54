"""The pure rules of keys and quotas (domain/tenancy.py) and the Python data plane's windows (gateway/tenants.py)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.domain.errors import InvalidInput
from corral.domain.history import Action, Observed, Outcome, judge_interrupted
from corral.domain.tenancy import (
    DAY_S,
    KEY_PREFIX,
    ApiKey,
    AuthMode,
    KeyEntry,
    LimitKind,
    Limits,
    RouteAccess,
    ServiceAccess,
    TokenScan,
    Usage,
    add_tokens,
    check_expiry,
    check_key_name,
    check_weight,
    default_auth,
    new_key,
    presented_key,
    refusal,
    route_access,
    seconds_left,
)
from corral.gateway.nginx_plane import access_payload
from corral.gateway.policies import LeastOutstanding
from corral.gateway.proxy import Gateway
from corral.gateway.routing import Route, Target
from corral.gateway.tenants import Admission, Refused, TenantWindows

T0 = 1_800_000_000.0  # a whole minute (and 20 s into no particular day)


def test_a_key_is_long_random_prefixed_and_only_its_digest_is_kept() -> None:
    keys = [new_key() for _ in range(50)]
    assert len({k.key for k in keys}) == 50 and len({k.id for k in keys}) == 50
    for k in keys:
        assert k.key.startswith(KEY_PREFIX) and len(k.key) == len(KEY_PREFIX) + 32  # 24 random bytes, base64url
        assert k.digest == hashlib.sha256(k.key.encode()).hexdigest() and k.key not in k.digest
        assert k.prefix == k.key[:10] and k.key[10:] not in k.id


@pytest.mark.parametrize(("headers", "found"), [
    ([(b"authorization", b"Bearer crl-abc")], "crl-abc"),
    ([(b"authorization", b"bearer   crl-abc  ")], "crl-abc"),
    ([(b"api-key", b"crl-abc")], "crl-abc"),
    ([(b"x-api-key", b"crl-abc")], "crl-abc"),
    ([(b"authorization", b"Bearer sk-openai"), (b"api-key", b"crl-abc")], "crl-abc"),
    ([(b"authorization", b"Basic crl-abc")], None),
    ([(b"authorization", b"Bearer crl-a bc")], None),
    ([(b"authorization", b"Bearer " + b"crl-" + b"a" * 200)], None),
    ([], None),
])
def test_the_key_a_request_presents(headers: list[tuple[bytes, bytes]], found: str | None) -> None:
    assert presented_key(headers) == found


def test_new_services_are_protected_when_external_and_old_ones_stay_open() -> None:
    assert default_auth(True) is AuthMode.KEYS and default_auth(False) is AuthMode.NONE
    assert route_access(None, "acme", []) is None  # no access row: a service from before keys
    assert route_access(ServiceAccess("s", AuthMode.NONE), "acme", []) is None
    protected = route_access(ServiceAccess("s", AuthMode.KEYS), "acme", [])
    assert protected is not None and protected.keys == ()  # no key yet: every request refused


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_retry_after_is_the_rest_of_the_window(now: float) -> None:
    left = seconds_left(now, 60)
    assert 1 <= left <= 60 and now + left >= (now // 60 + 1) * 60 - 1e-6


def test_requests_per_minute_refuse_at_the_limit_and_start_again_next_minute() -> None:
    limits, usage = Limits(requests_per_minute=2), Usage()
    for _ in range(2):
        assert refusal(limits, usage, T0 + 1, "s") is None
        usage.requests += 1
    refused = refusal(limits, usage, T0 + 20.5, "business service 'acme-nlb'")
    assert refused is not None and refused.kind is LimitKind.REQUESTS_PER_MINUTE and refused.retry_after_s == 40
    assert "allows 2 requests per minute (requestsPerMinute); retry after 40 s" in refused.message()
    assert refusal(limits, usage, T0 + 60, "s") is None  # a new minute


def test_tokens_count_with_what_was_used_and_a_day_budget_lasts_the_utc_day() -> None:
    limits, usage = Limits(tokens_per_minute=100, tokens_per_day=150), Usage()
    assert refusal(limits, usage, T0, "s") is None
    add_tokens(usage, 99, T0)
    assert refusal(limits, usage, T0, "s") is None  # under: admitted (its own tokens are unknown yet)
    add_tokens(usage, 60, T0)
    refused = refusal(limits, usage, T0 + 1, "s")
    assert refused is not None and refused.kind is LimitKind.TOKENS_PER_MINUTE
    refused = refusal(limits, usage, T0 + 61, "s")  # the minute is over, the day's budget is not
    assert refused is not None and refused.kind is LimitKind.TOKENS_PER_DAY
    assert refused.retry_after_s == seconds_left(T0 + 61, DAY_S)
    assert refusal(limits, usage, (T0 // DAY_S + 1) * DAY_S, "s") is None


@pytest.mark.parametrize("limits", [Limits(requests_per_minute=0), Limits(tokens_per_minute=0), Limits(tokens_per_day=0)])
def test_a_quota_of_zero_refuses_all(limits: Limits) -> None:
    assert refusal(limits, Usage(), T0, "s") is not None


def test_bad_input() -> None:
    now = datetime.now(timezone.utc)
    for name in ["", "x" * 64, "a\nb", "-lead", 3]:
        with pytest.raises(InvalidInput):
            check_key_name(name)
    assert check_key_name("ci bot-1.prod_x") == "ci bot-1.prod_x"
    for expiry in [now - timedelta(seconds=1), now.replace(tzinfo=None) + timedelta(days=1), now + timedelta(days=3700)]:
        with pytest.raises(InvalidInput):
            check_expiry(expiry, now)
    for wire in [{"requestsPerMinute": -1}, {"tokensPerDay": 10**13}, {"tokensPerMinute": True}, {"tokensPerMinute": 1.5}]:
        with pytest.raises(InvalidInput):
            Limits.from_wire(wire)


def test_a_key_weight_is_a_whole_number_from_1_to_1000_and_1_by_default() -> None:
    for bad in [0, 1001, -1, True, "2", 2.5]:
        with pytest.raises(InvalidInput, match="1 to 1000"):
            check_weight(bad)
    assert check_weight(None) == 1 and check_weight(7) == 7 and check_weight(1000) == 1000
    made = new_key()
    assert ApiKey(made.id, "acme-nlb", made.prefix, made.digest).entry().weight == 1
    assert ApiKey(made.id, "acme-nlb", made.prefix, made.digest, weight=3).entry().weight == 3


def test_the_nginx_payload_carries_a_weight_only_when_it_is_not_1() -> None:
    one, three = new_key(), new_key()
    keys = [ApiKey(one.id, "acme-nlb", one.prefix, one.digest),
            ApiKey(three.id, "acme-nlb", three.prefix, three.digest, weight=3)]
    access = route_access(ServiceAccess("acme-nlb", AuthMode.KEYS), "acme", keys)
    assert access is not None
    assert access_payload(access)["keys"] == {one.digest: {"id": one.id}, three.digest: {"id": three.id, "weight": 3}}


def test_token_scan_takes_the_reported_total_or_counts_the_events() -> None:
    scan = TokenScan()
    for chunk in [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b'data: {"usage": {"prompt_tokens": 5, "total',
                  b'_tokens": 12}}\n\n', b"data: [DONE]\n\n"]:
        scan.feed(chunk)
    assert scan.tokens == 12
    events = TokenScan()
    for _ in range(4):
        events.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    assert events.tokens == 4


def test_the_python_plane_checks_keys_and_counts_per_service_and_key() -> None:
    made = new_key()
    access = RouteAccess("acme", (KeyEntry(made.id, made.digest, None, Limits(requests_per_minute=1)),),
                         Limits(requests_per_minute=5))
    windows = TenantWindows()
    windows.set_table([access])
    assert isinstance(refused := windows.admit("acme-nlb", access, [], T0), Refused) and refused.status == 401
    wrong = [(b"authorization", b"Bearer " + (made.key[:-1] + "!").encode())]
    assert isinstance(windows.admit("acme-nlb", access, wrong, T0), Refused)
    good = [(b"authorization", f"Bearer {made.key}".encode())]
    admitted = windows.admit("acme-nlb", access, good, T0)
    assert isinstance(admitted, Admission) and admitted.key_id == made.id and admitted.business == "acme"
    limited = windows.admit("acme-nlb", access, good, T0 + 1)
    assert isinstance(limited, Refused) and limited.status == 429 and limited.body["error"]["param"] == "requestsPerMinute"
    assert made.id in limited.body["error"]["message"] and limited.retry_after_s == 59
    windows.set_table([RouteAccess("acme", (), Limits())])  # revoked
    assert f"k:{made.id}" not in windows.usage and made.id not in windows.last_used


def test_the_nginx_payload_carries_digests_never_keys() -> None:
    made = new_key()
    expires = datetime(2030, 1, 1, tzinfo=timezone.utc)
    stored = ApiKey(made.id, "acme-nlb", made.prefix, made.digest, limits=Limits(tokens_per_day=7), expires_at=expires)
    access = route_access(ServiceAccess("acme-nlb", AuthMode.KEYS, Limits(requests_per_minute=3)), "acme", [stored])
    assert access is not None
    payload = access_payload(access)
    assert payload == {"auth": "keys", "business": "acme", "limits": {"requestsPerMinute": 3},
                       "keys": {made.digest: {"id": made.id, "exp": expires.timestamp(), "limits": {"tokensPerDay": 7}}}}
    assert made.key not in repr(payload)


def test_a_key_change_left_pending_by_a_restart_is_judged_applied() -> None:
    for action in (Action.API_KEY, Action.ACCESS):
        row = {"action": action.value, "target": "acme-nlb", "after": {"id": "key-1"}, "message": ""}
        outcome, _ = judge_interrupted(row, Observed(deployments={}, pods=[], services={}))
        assert outcome is Outcome.SUCCESS


async def test_the_python_plane_passes_no_key_to_the_replica(unused_tcp_port: int) -> None:
    """A key-protected service's key (any of the three headers) stops at the gateway: an echoing replica sees none."""
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    made = new_key()
    access = RouteAccess("acme", (KeyEntry(made.id, made.digest),))
    route = Route("acme-nlb", "m", "acme", "pool", (Target("r1", f"http://127.0.0.1:{unused_tcp_port}"),), access=access)
    gateway = Gateway(LeastOutstanding(), 1.0, 5.0, lambda _: "/health")
    gateway.start()
    try:
        await gateway.push({"acme-nlb": route}, 1)
        transport = httpx.ASGITransport(app=gateway)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answer = await client.post("/s/acme-nlb/v1/chat/completions", json={}, headers={
                "Authorization": f"Bearer {made.key}", "api-key": made.key, "x-api-key": made.key, "x-trace": "kept"})
        assert answer.status_code == 200, answer.text
        seen = answer.json()
        assert seen["x-trace"] == "kept" and not {"authorization", "api-key", "x-api-key"} & set(seen)
    finally:
        await gateway.close()
        await runner.cleanup()
