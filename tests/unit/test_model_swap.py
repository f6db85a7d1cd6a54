"""Hand-overs of shared GPUs between models (domain/model_swap.py): who wakes, who sleeps, and when not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.model_swap import (
    HandoverKind,
    ModelDemand,
    Occupancy,
    Occupant,
    Reason,
    SwapPolicy,
    decide,
)

POLICY = SwapPolicy(calm_s=10, min_awake_s=30, starving_s=5, idle_sleep_s=600)  # (idle: not the default)
A, S = Occupancy.AWAKE, Occupancy.SLEEPING


def occ(name: str, model: str, unit: str, state: Occupancy, in_flight: int = 0, last: float | None = None,
        since: float = 0.0) -> Occupant:
    return Occupant(name, model, unit, state, in_flight, last, since)


def test_a_model_with_held_requests_wakes_on_a_unit_with_nothing_awake() -> None:
    occupants = [occ("a0", "a", "0", S), occ("b0", "b", "0", S)]
    [handover] = decide(occupants, {"b": ModelDemand(3, 99.0)}, now=100.0, policy=POLICY)
    assert (handover.kind, handover.unit, handover.wake, handover.reason) == (HandoverKind.WAKE, "0", "b0", Reason.UNIT_FREE)


def test_a_calm_replica_gives_its_unit_and_a_busy_one_does_not_until_the_model_starves() -> None:
    calm_a = [occ("a0", "a", "0", A, last=50.0), occ("b0", "b", "0", S)]
    [swap] = decide(calm_a, {"b": ModelDemand(1, 99.0)}, now=100.0, policy=POLICY)
    assert (swap.kind, swap.sleep, swap.wake, swap.drain, swap.reason) == (HandoverKind.SWAP, "a0", "b0", False, Reason.DONOR_CALM)

    busy_a = [occ("a0", "a", "0", A, in_flight=2, last=99.0), occ("b0", "b", "0", S)]
    demand = {"a": ModelDemand(rate=1.0)}
    assert decide(busy_a, demand | {"b": ModelDemand(3, 98.0, 2.0)}, now=100.0, policy=POLICY) == []  # 2 s: not starving
    [taken] = decide(busy_a, demand | {"b": ModelDemand(3, 94.0, 2.0)}, now=100.0, policy=POLICY)  # 6 s: starving
    assert (taken.sleep, taken.drain, taken.reason) == ("a0", True, Reason.DONOR_LESS_DEMAND)
    # not from a model asked as much as the starving one, until its requests near their hold deadline: turns
    assert decide(busy_a, demand | {"b": ModelDemand(9, 90.0, 1.0)}, now=100.0, policy=POLICY) == []
    [turn] = decide(busy_a, demand | {"b": ModelDemand(9, 70.0, 1.0)}, now=100.0, policy=POLICY)
    assert (turn.sleep, turn.reason) == ("a0", Reason.TAKING_TURNS)


def test_a_replica_woken_recently_keeps_its_unit_hysteresis() -> None:
    occupants = [occ("a0", "a", "0", A, since=90.0), occ("b0", "b", "0", S)]  # awake for 10 s < min_awake_s
    assert decide(occupants, {"b": ModelDemand(5, 50.0)}, now=100.0, policy=POLICY) == []


def test_a_starving_model_takes_from_the_model_asked_least_per_awake_replica() -> None:
    occupants = [occ("a0", "a", "0", A, in_flight=1), occ("a1", "a", "1", A, in_flight=3), occ("c2", "c", "2", A),
                 occ("b0", "b", "0", S), occ("b1", "b", "1", S), occ("b2", "b", "2", S)]
    demand = {"a": ModelDemand(rate=3.0), "b": ModelDemand(4, 80.0, 2.0), "c": ModelDemand(1, 99.0, 2.5)}
    [taken] = decide(occupants, demand, now=100.0, policy=POLICY)  # a: 1.5/s per replica; c: 2.5/s on one
    assert (taken.unit, taken.sleep, taken.reason) == ("0", "a0", Reason.DONOR_LESS_DEMAND)  # a keeps a1


def test_the_oldest_wait_is_served_first_and_each_unit_once() -> None:
    occupants = [occ("x0", "x", "0", S), occ("y0", "y", "0", S)]
    [handover] = decide(occupants, {"x": ModelDemand(10, 95.0), "y": ModelDemand(1, 90.0)}, now=100.0, policy=POLICY)
    assert handover.model == "y"


def test_idle_replicas_sleep_and_a_model_sleeping_nowhere_is_cold_started() -> None:
    occupants = [occ("a0", "a", "0", A, last=0.0)]
    [idle] = decide(occupants, {}, now=700.0, policy=POLICY)
    assert (idle.kind, idle.sleep, idle.reason) == (HandoverKind.SLEEP, "a0", Reason.IDLE)
    assert decide(occupants, {}, now=500.0, policy=POLICY) == []
    [cold] = decide(occupants, {"n": ModelDemand(1, 499.0)}, now=500.0, policy=POLICY, cold_start_units=["0", "1"])
    assert (cold.kind, cold.unit, cold.reason) == (HandoverKind.COLD_START, "1", Reason.NO_SLEEPER)  # unit 0 is taken


def test_policy_ranges() -> None:
    with pytest.raises(ValueError, match="calm_s"):
        SwapPolicy(calm_s=-1)


states = st.sampled_from(list(Occupancy))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("0123"), states, st.integers(0, 3),
                          st.floats(0, 100), st.floats(0, 100)), max_size=12),
       st.dictionaries(st.sampled_from("abcde"), st.tuples(st.integers(0, 5), st.floats(0, 100), st.floats(0, 10)),
                       max_size=5),
       st.floats(100, 1000))
def test_properties(raw, raw_demand, now) -> None:  # noqa: ANN001
    """Whatever the state: at most one hand-over per unit; never a wake where the unit stays taken by someone who
    is not put to sleep; a model only gains a unit where it sleeps (or by a cold start); never two models woken on a
    unit; a busy donor is drained, never slept with requests in flight."""
    occupants, taken = [], set()
    for i, (m, u, s, f, last, since) in enumerate(raw):  # the ledger's rule: at most one replica takes a unit
        if s is not S:
            s = S if u in taken else s
            taken.add(u)
        occupants.append(occ(f"{m}{u}{i}", m, u, s, f, last, since))
    demand = {m: ModelDemand(h, t, r) for m, (h, t, r) in raw_demand.items()}
    decisions = decide(occupants, demand, now, POLICY, cold_start_units=["0", "1", "2", "3", "4"])
    units = [d.unit for d in decisions]
    assert len(units) == len(set(units))
    by_name = {o.name: o for o in occupants}
    for d in decisions:
        takers = [o for o in occupants if o.unit == d.unit and o.state in (A, Occupancy.WAKING, Occupancy.DRAINING,
                                                                              Occupancy.STARTING)]
        if d.kind is HandoverKind.WAKE:
            assert takers == [] and by_name[d.wake].state is S and by_name[d.wake].model == d.model
        elif d.kind is HandoverKind.SWAP:
            assert [t.name for t in takers] == [d.sleep] and by_name[d.sleep].state is A
            assert d.drain == (by_name[d.sleep].in_flight > 0)
            assert by_name[d.wake].state is S and by_name[d.wake].unit == d.unit
        elif d.kind is HandoverKind.SLEEP:
            assert by_name[d.sleep].in_flight == 0
        else:
            assert takers == [] and not any(o.model == d.model and o.state is S for o in occupants)
