"""The autopilot's pure decision: the rules one by one, then properties over random pools."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain import labels as L
from corral.domain.autopilot import (
    AutopilotMemory,
    BusinessDemand,
    BusinessPolicy,
    Decision,
    PoolAutopilot,
    ReplicaState,
    decide,
)

U = L.UNASSIGNED
ON = PoolAutopilot(enabled=True, warm_spares=0, cooldown_seconds=10, stabilization_seconds=1, release_after_seconds=5)


def replicas(**by_business: int) -> list[ReplicaState]:
    out = []
    for business, n in by_business.items():
        name = U if business == "spare" else business
        out += [ReplicaState(f"{business}-{i}", name, ready=True) for i in range(n)]
    return out


def loaded(rs: list[ReplicaState], business: str, running: float, waiting: float) -> list[ReplicaState]:
    return [replace(r, running=running, waiting=waiting) if r.business == business else r for r in rs]


def run(rs, demands, memory=AutopilotMemory(), now=100.0, pool=ON, free=None, gpus=0) -> Decision:
    return decide(rs, demands, pool, memory, now, free_gpu_units=free, gpus_per_replica=gpus)


def apply(rs: list[ReplicaState], decision: Decision, now: float) -> list[ReplicaState]:
    targets = {m.pod: m.target for m in decision.moves}
    out = [replace(r, business=targets[r.name], moved_at=now) if r.name in targets else r for r in rs
           if r.name not in decision.remove]
    if decision.scale_to is not None:
        out += [ReplicaState(f"new-{now}-{i}", U, ready=False) for i in range(decision.scale_to - len(rs))]
    return out


def test_pressure_must_hold_for_the_stabilization_window_before_a_spare_moves():
    rs = loaded(replicas(prod=1, spare=1), "prod", running=8, waiting=5)
    demands = {"prod": BusinessDemand(requests_per_second=10)}
    first = run(rs, demands, now=100.0)
    assert not first.moves and first.memory.pressure_since == {"prod": 100.0}
    second = run(rs, demands, memory=first.memory, now=101.0)
    assert [(m.pod, m.source, m.target) for m in second.moves] == [("spare-0", U, "prod")]
    assert "waiting per replica 5.0 > 1.0" in second.moves[0].reason and "warm spare" in second.moves[0].reason


def test_spares_first_then_calm_businesses_lowest_priority_first():
    rs = loaded(replicas(prod=1, a=3, b=3, spare=1), "prod", running=8, waiting=30)
    demands = {"prod": BusinessDemand(BusinessPolicy(priority=5), requests_per_second=50),
               "a": BusinessDemand(BusinessPolicy(priority=2)), "b": BusinessDemand(BusinessPolicy(priority=1))}
    d = run(rs, demands, memory=AutopilotMemory({"prod": 0.0}))
    sources = [m.source for m in d.moves]
    assert sources[0] == U
    assert sources[1:4] == ["b", "b", "b"]  # idle, lowest priority first: b gives all it does not need
    assert all(m.target == "prod" for m in d.moves)


def test_a_calm_business_keeps_what_its_own_load_needs():
    rs = loaded(loaded(replicas(prod=1, other=3), "prod", 8, 20), "other", running=10, waiting=0)
    demands = {"prod": BusinessDemand(requests_per_second=9), "other": BusinessDemand(requests_per_second=3)}
    d = run(rs, demands, memory=AutopilotMemory({"prod": 0.0}))
    # other runs 30 sequences; at 80 % of 8 slots it keeps ceil(30 / 6.4) = 5 > 3: gives nothing (equal priority)
    assert not d.moves and d.waiting_for


def test_min_and_max_replicas():
    rs = replicas(prod=0, other=2, spare=0)
    demands = {"prod": BusinessDemand(BusinessPolicy(min_replicas=1)), "other": BusinessDemand(BusinessPolicy(max_replicas=1))}
    d = run(rs, demands)
    assert ("other", "prod") in [(m.source, m.target) for m in d.moves]  # min at once, no stabilization
    assert len([r for r in apply(rs, d, 100.0) if r.business == "other"]) <= 1


def test_pinned_and_cooling_replicas_never_move():
    rs = loaded(replicas(prod=1, idle=2), "prod", 8, 9)
    rs = [replace(r, pinned=True) if r.name == "idle-0" else r for r in rs]
    rs = [replace(r, moved_at=95.0) if r.name == "idle-1" else r for r in rs]
    demands = {"prod": BusinessDemand(), "idle": BusinessDemand()}
    d = run(rs, demands, memory=AutopilotMemory({"prod": 0.0}), now=100.0)
    assert not d.moves  # idle-0 pinned, idle-1 moved 5 s ago (cooldown 10 s)
    later = run(rs, demands, memory=AutopilotMemory({"prod": 0.0}), now=106.0)
    assert [m.pod for m in later.moves] == ["idle-1"]


def test_scarcity_takes_from_lower_priority_down_to_its_min_never_from_equal():
    rs = loaded(loaded(replicas(hi=1, lo=3, eq=2), "hi", 8, 10), "lo", 8, 10)
    rs = loaded(rs, "eq", 8, 10)
    demands = {"hi": BusinessDemand(BusinessPolicy(priority=10)), "lo": BusinessDemand(BusinessPolicy(priority=0, min_replicas=2)),
               "eq": BusinessDemand(BusinessPolicy(priority=10))}
    d = run(rs, demands, memory=AutopilotMemory({"hi": 0.0, "lo": 0.0, "eq": 0.0}))
    assert [(m.source, m.target) for m in d.moves] == [("lo", "eq")] or [(m.source, m.target) for m in d.moves] == [("lo", "hi")]
    assert "priority 0 < 10" in d.moves[0].reason


def test_surplus_goes_back_to_the_spares_after_the_release_window():
    rs = replicas(prod=4, spare=0)
    demands = {"prod": BusinessDemand(requests_per_second=1)}
    first = run(rs, demands, now=100.0)
    assert not first.moves and "prod" in first.memory.surplus_since
    later = run(rs, demands, memory=first.memory, now=105.0)
    assert [m.target for m in later.moves] == [U, U, U]  # keeps one while it has traffic
    assert "released" in later.moves[0].reason


def test_scale_out_when_moves_cannot_help_and_gpus_are_free():
    rs = loaded(replicas(prod=2), "prod", 8, 40)
    demands = {"prod": BusinessDemand()}
    pool = replace(ON, scale_out=True, max_replicas=4)
    d = run(rs, demands, memory=AutopilotMemory({"prod": 0.0}), pool=pool, free=8, gpus=1)
    assert d.scale_to == 4 and "scale out 2 → 4" in d.scale_reason
    no_gpu = run(rs, demands, memory=AutopilotMemory({"prod": 0.0}), pool=pool, free=0, gpus=1)
    assert no_gpu.scale_to is None and any("no free GPU" in w for w in no_gpu.waiting_for)
    starting = rs + [ReplicaState("s0", U, ready=False), ReplicaState("s1", U, ready=False)]
    assert run(starting, demands, memory=AutopilotMemory({"prod": 0.0}), pool=pool, free=8, gpus=1).scale_to is None


def test_idle_spares_scale_in_after_the_quiet_period_only_unassigned():
    rs = replicas(prod=1, spare=3)
    pool = replace(ON, scale_in=True, warm_spares=1, scale_in_after_seconds=60)
    demands = {"prod": BusinessDemand(requests_per_second=1)}
    first = run(rs, demands, pool=pool, now=0.0)
    assert not first.remove and first.memory.spares_surplus_since == 0.0
    later = run(rs, demands, memory=first.memory, pool=pool, now=61.0)
    assert len(later.remove) == 2 and all(name.startswith("spare") for name in later.remove)


def test_a_stale_ttft_without_a_queue_takes_nothing():
    """bench/autopilot.py: a business running 1 sequence whose TTFT p90 (a window of history) was over its
    target took every spare in 2 s; latency counts only while the business queues or fills its batches."""
    pool = replace(ON, replica_concurrency=4)
    rs = loaded(replicas(chat=1, spare=5), "chat", running=1, waiting=0)
    demands = {"chat": BusinessDemand(BusinessPolicy(ttft_p90_ms=500), requests_per_second=1, ttft_p90_ms=900)}
    assert not run(rs, demands, memory=AutopilotMemory({"chat": 0.0}), pool=pool).moves
    busy = loaded(rs, "chat", running=4, waiting=0)  # its batch is full: the latency is real
    assert run(busy, demands, memory=AutopilotMemory({"chat": 0.0}), pool=pool).moves


def test_after_an_acquisition_pressure_must_hold_a_new_window_before_more():
    pool = replace(ON, replica_concurrency=4)
    rs = loaded(replicas(chat=1, spare=5), "chat", running=4, waiting=3)
    demands = {"chat": BusinessDemand(requests_per_second=5)}
    first = run(rs, demands, memory=AutopilotMemory({"chat": 0.0}), pool=pool, now=10.0)
    assert len(first.moves) == 1  # ceil(7 / 4) = 2 replicas: one more
    after = apply(rs, first, 10.0)
    assert not run(after, demands, memory=first.memory, pool=pool, now=10.5).moves  # the same queue, seen 0.5 s later
    assert run(after, demands, memory=first.memory, pool=pool, now=11.0).moves  # still there a window later


def test_a_release_keeps_the_most_the_business_needed_during_the_window():
    """bench/autopilot.py: releasing down to the need of the moment (a dip between peaks) made chat
    oscillate 1 → 6 → 1 replicas on a steady Poisson load."""
    pool = replace(ON, replica_concurrency=4, release_after_seconds=10)
    rs = replicas(chat=6)
    demands = {"chat": BusinessDemand(requests_per_second=2)}
    memory = AutopilotMemory()
    for t, running in [(0.0, 1), (5.0, 2), (9.0, 1)]:  # per replica: 6 sequences, a peak of 12, 6 again
        d = run(loaded(rs, "chat", running=running, waiting=0), demands, memory=memory, pool=pool, now=t)
        assert not d.moves
        memory = d.memory
    d = run(loaded(rs, "chat", running=1, waiting=0), demands, memory=memory, pool=pool, now=10.0)
    assert len(d.moves) == 2  # keeps ceil(12 / 3.2) = 4, not the ceil(6 / 3.2) = 2 of this moment
    assert "needed at most 4" in d.moves[0].reason
    # A need that reaches what it has ends the surplus: the window starts again.
    memory = run(loaded(rs, "chat", running=4, waiting=0), demands, memory=AutopilotMemory({}, {"chat": 0.0}, {"chat": 1}),
                 pool=pool, now=5.0).memory
    assert "chat" not in memory.surplus_since


def test_a_concurrency_target_brings_replicas_before_requests_queue():
    """bench/autopilot.py: with 4 batch slots a request that queues misses a 500 ms TTFT target, so a business that
    waits for its queue to grow reacts too late; `concurrencyPerReplica` (KPA's target) acts on running sequences."""
    pool = replace(ON, replica_concurrency=4)
    rs = loaded(replicas(chat=2, spare=4), "chat", running=3, waiting=0)  # 6 sequences on 8 slots, nothing queued
    without = {"chat": BusinessDemand(BusinessPolicy(), requests_per_second=3)}
    assert not run(rs, without, memory=AutopilotMemory({"chat": 0.0}), pool=pool).moves
    demands = {"chat": BusinessDemand(BusinessPolicy(concurrency_per_replica=2.8), requests_per_second=3)}
    d = run(rs, demands, memory=AutopilotMemory({"chat": 0.0}), pool=pool)
    assert [m.target for m in d.moves] == ["chat"]  # ceil(6 / 2.8) = 3 replicas
    assert "concurrency per replica 3.0 > 2.8" in d.moves[0].reason


def test_a_growing_load_gets_its_level_every_tick_but_one_more_only_after_a_window():
    """A burst: the replicas the load needs arrive tick after tick while it grows (a level: it cannot overshoot);
    the '+1 while pressured' waits until what it got shows (no +1 every tick on a stale signal)."""
    pool = replace(ON, replica_concurrency=4)
    demands = {"chat": BusinessDemand(BusinessPolicy(concurrency_per_replica=2.8), requests_per_second=6)}
    rs = loaded(replicas(chat=2, spare=6), "chat", running=3, waiting=0)
    first = run(rs, demands, memory=AutopilotMemory({"chat": 0.0}), pool=pool, now=10.0)
    assert len(first.moves) == 1
    grown = loaded(apply(rs, first, 10.0), "chat", running=4, waiting=0)  # 12 sequences on 3 replicas
    second = run(grown, demands, memory=first.memory, pool=pool, now=10.5)
    assert len(second.moves) == 2  # ceil(12 / 2.8) = 5, at once, though it received a replica 0.5 s ago
    steady = loaded(apply(grown, second, 10.5), "chat", running=12 / 5, waiting=0)  # the same 12 on 5: at target
    assert not run(steady, demands, memory=second.memory, pool=pool, now=11.0).moves


def test_a_donor_keeps_what_its_concurrency_target_needs():
    pool = replace(ON, replica_concurrency=8)
    rs = loaded(loaded(replicas(hi=1, lo=4), "hi", running=8, waiting=4), "lo", running=1.5, waiting=0)
    demands = {"hi": BusinessDemand(BusinessPolicy(priority=5), requests_per_second=10),
               "lo": BusinessDemand(BusinessPolicy(concurrency_per_replica=2), requests_per_second=1)}
    d = run(rs, demands, memory=AutopilotMemory({"hi": 0.0}), pool=pool)
    # lo runs 6 sequences: 80% of 8 slots would keep 1 replica, its target of 2 per replica keeps 3.
    assert [m.source for m in d.moves] == ["lo"]


# --- properties -----------------------------------------------------------------------------------

BUSINESSES = ["a", "b", "c"]


@st.composite
def pools(draw):
    rs = []
    for i in range(draw(st.integers(0, 12))):
        business = draw(st.sampled_from([*BUSINESSES, U]))
        rs.append(ReplicaState(f"r{i}", business, ready=draw(st.booleans()) or business != U,
                               pinned=draw(st.booleans()) and draw(st.booleans()),
                               running=draw(st.integers(0, 8)), waiting=draw(st.integers(0, 12))))
    demands = {}
    for b in BUSINESSES:
        lo = draw(st.integers(0, 3))
        hi = draw(st.one_of(st.none(), st.integers(lo, 8)))
        demands[b] = BusinessDemand(BusinessPolicy(min_replicas=lo, max_replicas=hi, priority=draw(st.integers(0, 3)),
                                                   concurrency_per_replica=draw(st.sampled_from([None, 0.5, 2.8, 6.0]))),
                                    requests_per_second=draw(st.sampled_from([0.0, 1.0, 20.0])))
    pool = PoolAutopilot(enabled=True, warm_spares=draw(st.integers(0, 2)), cooldown_seconds=draw(st.sampled_from([0.0, 5.0])),
                         scale_out=draw(st.booleans()), scale_in=draw(st.booleans()), max_replicas=16,
                         stabilization_seconds=1.0, release_after_seconds=3.0, scale_in_after_seconds=5.0)
    return rs, demands, pool


@settings(max_examples=300, deadline=None)
@given(pools())
def test_properties_hold_and_constant_load_converges(case):
    rs, demands, pool = case
    memory = AutopilotMemory()
    quiet = 0
    for tick in range(60):
        now = float(tick)
        before = {r.name: r for r in rs}
        d = decide(rs, demands, pool, memory, now, free_gpu_units=4, gpus_per_replica=1)
        for m in d.moves:
            r = before[m.pod]
            assert not r.pinned, "a pinned replica moved"
            assert r.business == m.source
        for name in d.remove:
            assert before[name].business == U, "an assigned replica was removed"
        after = apply(rs, d, now)
        for b, demand in demands.items():
            had = sum(1 for r in rs if r.business == b)
            has = sum(1 for r in after if r.business == b)
            lo, hi = demand.policy.min_replicas, demand.policy.max_replicas
            pinned_here = sum(1 for r in rs if r.business == b and r.pinned)
            if had >= lo:
                assert has >= lo, f"{b} dropped below its min"
            if hi is not None and has > hi:
                assert has <= max(had, pinned_here), f"{b} grew above its max"
        # starting replicas become ready (same constant load signals: their own counters stay 0)
        rs = [replace(r, ready=True) for r in after]
        memory = d.memory
        quiet = quiet + 1 if not d.acts else 0
    assert quiet >= 5, "decisions did not settle on constant load"
