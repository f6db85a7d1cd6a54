"""Replica picking (domain/replica_picking.py) and the Python gateway's filters around it: properties of the scorers."""

from __future__ import annotations

import json
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.replica_picking import (
    BLOCK_BYTES,
    MAX_BLOCKS,
    Affinity,
    ReplicaInputs,
    Routing,
    RoutingPolicy,
    RoutingWeights,
    adapter_holders,
    pick,
    prefix_keys,
    prompt_bytes,
    read_request,
)
from corral.gateway.policies import LeastOutstanding
from corral.gateway.proxy import Gateway
from corral.gateway.routing import Route, Target

PREFIX = Routing(RoutingPolicy.PREFIX_AWARE)
REPLICAS = [f"r{i}" for i in range(6)]


def chat(system: str, *turns: str, model: str = "m") -> bytes:
    messages = [{"role": "system", "content": system}] + [{"role": "user", "content": t} for t in turns]
    return json.dumps({"model": model, "messages": messages}).encode()


def test_prompt_bytes_and_keys_follow_the_leading_blocks() -> None:
    body = {"messages": [{"role": "system", "content": "S" * 600},
                         {"role": "user", "content": [{"type": "text", "text": "héllo"}, {"type": "image_url"}]}]}
    text = prompt_bytes(body)
    assert text == ("system\n" + "S" * 600 + "\nuser\nhéllo\n").encode()
    keys = prefix_keys(text)
    assert len(keys) == len(text) // BLOCK_BYTES
    assert keys[0] == zlib.crc32(text[:BLOCK_BYTES])  # what ngx.crc32_long computes over the same bytes
    longer = prefix_keys(prompt_bytes({"messages": body["messages"] + [{"role": "user", "content": "x" * 900}]}))
    assert longer[:len(keys)] == keys  # a conversation that goes on keeps its leading keys
    assert len(prefix_keys(b"x" * (BLOCK_BYTES * MAX_BLOCKS * 2))) == MAX_BLOCKS  # bounded work per request
    assert prompt_bytes({"prompt": "abc"}) == b"abc" and prompt_bytes([1, 2]) == b""
    assert read_request(b"not json") == read_request(b"[1]") == read_request(b"{}")  # nothing to go by


@settings(max_examples=60, deadline=None)
@given(tenants=st.integers(1, 12), seed=st.integers(0, 10**6), turns=st.integers(1, 6))
def test_same_prefix_same_replica_while_load_allows(tenants: int, seed: int, turns: int) -> None:
    """Every conversation of a tenant (a long shared system prompt) lands where its first one went, whatever
    was picked in between, while no replica is full."""
    rng = random.Random(seed)
    affinity, placed = Affinity(), {}
    in_flight = {r: rng.randrange(4) for r in REPLICAS}
    for _ in range(turns):
        for tenant in rng.sample(range(tenants), tenants):
            keys = read_request(chat(f"tenant {tenant} " * 80, "q" * rng.randrange(2000))).keys
            chosen = pick(REPLICAS, PREFIX, in_flight, {}, keys, affinity, rng)
            assert placed.setdefault(tenant, chosen) == chosen


def test_load_outweighs_a_prefix_only_by_its_weights() -> None:
    keys = read_request(chat("shared " * 200)).keys
    affinity = Affinity()
    first = pick(REPLICAS, PREFIX, {}, {}, keys, affinity)
    busy = {first: 5}
    full_cache = {first: ReplicaInputs(waiting=20, kv_cache_usage=1.0)}
    assert pick(REPLICAS, PREFIX, busy, full_cache, keys, affinity) == first  # a whole-prompt hit outweighs load
    no_prefix = Routing(RoutingPolicy.PREFIX_AWARE, RoutingWeights(prefix=0.0))
    assert pick(REPLICAS, no_prefix, busy, {}, keys, affinity) != first
    light = Routing(RoutingPolicy.PREFIX_AWARE, RoutingWeights(prefix=1.0, queue=2.0, kv_cache=2.0))
    assert pick(REPLICAS, light, busy, full_cache, keys, affinity) != first  # the engine's queue and KV count


def test_least_load_is_fewest_in_flight() -> None:
    in_flight = {"r0": 3, "r1": 1, "r2": 1, "r3": 2}
    seen = {pick(["r0", "r1", "r2", "r3"], Routing(), in_flight, {}, (1, 2), Affinity(), random.Random(s)) for s in range(40)}
    assert seen == {"r1", "r2"}


def test_affinity_is_bounded_least_recently_used_first_out() -> None:
    affinity = Affinity(capacity=3)
    affinity.record([1, 2], "a")
    affinity.record([3], "b")
    affinity.record([1], "c")  # 1 is the most recent now
    affinity.record([4], "d")
    assert len(affinity) == 3
    assert affinity.matches([1, 2, 3, 4], {"a", "b", "c", "d"}) == {"d": 4, "b": 3, "c": 1, "a": 1}  # 2 went first
    affinity.record([1], "e")
    affinity.record([1], "f")
    assert affinity.matches([1], {"a", "c", "e", "f"}) == {"f": 1, "e": 1, "c": 1}  # the last 3 owners of a key


def gateway(targets: list[Target], inputs: dict[str, ReplicaInputs] | None = None) -> tuple[Gateway, Route]:
    g = Gateway(LeastOutstanding(), 1.0, 1.0, health_path=lambda _: "/health")
    g.inputs = inputs or {}
    route = Route("svc", "m", "b", "pool", tuple(targets), routing=PREFIX)
    return g, route


@settings(max_examples=60, deadline=None)
@given(loads=st.lists(st.integers(0, 6), min_size=2, max_size=6), seed=st.integers(0, 10**6))
def test_never_a_replica_at_its_batch_limit_while_another_has_room(loads: list[int], seed: int) -> None:
    targets = [Target(f"r{i}", f"http://127.0.0.1:{9000 + i}", concurrency=4) for i in range(len(loads))]
    g, route = gateway(targets)
    for t, n in zip(targets, loads, strict=True):
        g.stats.in_flight_by_replica[t.name] = n
    want = read_request(chat("tenant " * 100))
    g.affinity.record(want.keys, "r0")  # the prefix points at r0, full or not
    candidates = g.free_targets(route)
    if any(n < 4 for n in loads):
        chosen = g._choose(route, candidates, want)
        assert g.stats.in_flight_by_replica[chosen.name] < 4
    else:
        assert candidates == []  # the hold queue takes it


def test_lora_requests_only_reach_replicas_with_the_adapter() -> None:
    targets = [Target(f"r{i}", f"http://127.0.0.1:{9000 + i}", concurrency=8) for i in range(4)]
    inputs = {"r1": ReplicaInputs(adapters=frozenset({"sql-lora"})), "r3": ReplicaInputs(adapters=frozenset({"sql-lora", "x"}))}
    g, route = gateway(targets, inputs)
    want = g._pick_request(route, chat("hello " * 100, model="sql-lora"))
    assert want is not None
    only = adapter_holders(want.model, [t.name for t in targets], g.inputs)
    assert only == {"r1", "r3"}
    for n in range(20):
        g.stats.in_flight_by_replica["r1"] = n % 3
        assert g._choose(route, g.free_targets(route, only=only), want).name in only
    g.stats.in_flight_by_replica.update({"r1": 8, "r3": 8})
    assert g.free_targets(route, only=only) == []  # both holders full: held, never sent elsewhere
    assert adapter_holders("m", [t.name for t in targets], g.inputs) is None  # the tag: every replica


@pytest.mark.parametrize("raw,policy", [(None, RoutingPolicy.LEAST_LOAD),
                                        ({"policy": "prefix-aware", "weights": {"prefix": 5}}, RoutingPolicy.PREFIX_AWARE)])
def test_routing_from_wire(raw: dict | None, policy: RoutingPolicy) -> None:
    routing = Routing.from_wire(raw)
    assert routing.policy is policy
    assert Routing.from_wire(routing.wire()) == routing


async def test_the_feed_pushes_the_engines_figures_of_prefix_aware_replicas_and_loaded_adapters() -> None:
    """corral.replica_inputs: a real /metrics page over HTTP, scraped for the prefix-aware service's replica only."""
    from aiohttp import web

    from corral.domain.models import Pod, PodPhase
    from corral.replica_inputs import ReplicaInputsFeed

    page = ("vllm:num_requests_waiting{model_name=\"m\"} 3.0\n"
            "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=page)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pods = [Pod("r0", "pool", {}, PodPhase.RUNNING, True, f"http://127.0.0.1:{port}"),
            Pod("r1", "pool", {}, PodPhase.RUNNING, True, "http://127.0.0.1:9")]  # least-load: never scraped
    table = {"a": Route("a", "m", "a", "pool", (Target("r0", pods[0].endpoint or ""),), routing=PREFIX),
             "b": Route("b", "m", "b", "pool", (Target("r1", "http://127.0.0.1:9"),))}
    pushed: list[dict] = []

    async def push(inputs) -> None:  # noqa: ANN001
        pushed.append(dict(inputs))

    feed = ReplicaInputsFeed(lambda: table, lambda: pods, lambda: {"r1": frozenset({"sql-lora"})}, push)
    try:
        await feed.tick()
    finally:
        await feed.close()
        await runner.cleanup()
    assert pushed == [{"r0": ReplicaInputs(waiting=3.0, kv_cache_usage=0.25),
                       "r1": ReplicaInputs(adapters=frozenset({"sql-lora"}))}]
