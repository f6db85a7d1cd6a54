from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.distribution import plan_moves, targets_from_counts, targets_from_ratios
from corral.domain.errors import InvalidInput
from corral.domain.models import Pod

BUSINESSES = ["production", "testing", "staging", "research"]


def pool(assignment: list[str], ready: list[bool] | None = None) -> list[Pod]:
    ready = ready or [True] * len(assignment)
    labels = {"model": "m", "pool": "p", "pool-type": "vllm", "deployment-type": "model-pool"}
    return [Pod(name=f"p-{i:03d}", deployment="p", labels={**labels, "business": b}, ready=r)
            for i, (b, r) in enumerate(zip(assignment, ready, strict=True))]


def apply(pods: list[Pod], moves) -> list[Pod]:
    by_move = {m.pod: m.target for m in moves}
    return [Pod(name=p.name, deployment=p.deployment, labels={**p.labels, "business": by_move.get(p.name, p.business)},
                ready=p.ready) for p in pods]


def test_largest_remainder_examples() -> None:
    assert targets_from_ratios({"production": 3, "testing": 1}, 4) == {"production": 3, "testing": 1, "unassigned": 0}
    assert targets_from_ratios({"production": 3, "testing": 1}, 5) == {"production": 4, "testing": 1, "unassigned": 0}
    # Equal remainders: the larger ratio wins, then the name.
    assert targets_from_ratios({"b": 1, "a": 1}, 3) == {"a": 2, "b": 1, "unassigned": 0}
    assert targets_from_ratios({"production": 1, "unassigned": 1}, 4) == {"production": 2, "unassigned": 2}
    assert targets_from_ratios({"production": 0.5, "testing": 0.25}, 3) == {"production": 2, "testing": 1, "unassigned": 0}


def test_counts_leave_the_rest_unassigned_and_refuse_too_many() -> None:
    assert targets_from_counts({"production": 2}, 5) == {"production": 2, "unassigned": 3}
    with pytest.raises(InvalidInput, match="ask for 6 pods but the pool has only 5"):
        targets_from_counts({"production": 4, "testing": 2}, 5)


@pytest.mark.parametrize(
    ("ratios", "fragment"),
    [({}, "at least one business"), ({"production": -1}, "≥ 0"), ({"production": 0}, "must not all be 0"),
     ({"Prod": 1}, "not a valid name"), ({"production": float("nan")}, "≥ 0")],
)
def test_bad_ratios(ratios: dict, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        targets_from_ratios(ratios, 4)


def test_unassigned_donors_give_ready_pods_first() -> None:
    pods = pool(["unassigned"] * 4, ready=[False, True, False, True])
    moves = plan_moves(pods, {"production": 2, "unassigned": 2})
    assert sorted(m.pod for m in moves) == ["p-001", "p-003"]


def test_business_donors_keep_their_ready_pods() -> None:
    pods = pool(["production"] * 3 + ["unassigned"], ready=[True, False, True, True])
    moves = plan_moves(pods, {"production": 2, "testing": 1, "unassigned": 1})
    assert [(m.pod, m.source, m.target) for m in moves] == [("p-001", "production", "testing")]


ratio_requests = st.dictionaries(st.sampled_from([*BUSINESSES, "unassigned"]), st.integers(0, 10), min_size=1).filter(
    lambda r: sum(r.values()) > 0
)
assignments = st.lists(st.sampled_from([*BUSINESSES, "unassigned"]), min_size=0, max_size=40)


@settings(max_examples=300)
@given(assignment=assignments, ratios=ratio_requests, ready=st.data())
def test_distribution_properties(assignment: list[str], ratios: dict[str, int], ready) -> None:
    readiness = ready.draw(st.lists(st.booleans(), min_size=len(assignment), max_size=len(assignment)))
    pods = pool(assignment, readiness)
    targets = targets_from_ratios(ratios, len(pods))
    # Targets sum to the pool size and never go negative.
    assert sum(targets.values()) == len(pods) and min(targets.values()) >= 0
    # Deterministic: the same input plans the same result.
    assert targets_from_ratios(dict(reversed(list(ratios.items()))), len(pods)) == targets
    moves = plan_moves(pods, targets)
    after = apply(pods, moves)
    counts = Counter(p.business for p in after)
    assert {b: counts.get(b, 0) for b in targets} == targets and sum(counts.values()) == len(pods)
    # Minimal: exactly the pods above their group's target move, each at most once.
    current = Counter(p.business for p in pods)
    assert len(moves) == sum(max(0, n - targets.get(b, 0)) for b, n in current.items())
    assert len({m.pod for m in moves}) == len(moves) and all(m.source != m.target for m in moves)
    # Idempotent: the second call plans nothing.
    assert plan_moves(after, targets) == []


@given(assignment=assignments, counts=st.dictionaries(st.sampled_from(BUSINESSES), st.integers(0, 10), min_size=1))
def test_counts_properties(assignment: list[str], counts: dict[str, int]) -> None:
    pods = pool(assignment)
    if sum(counts.values()) > len(pods):
        with pytest.raises(InvalidInput):
            targets_from_counts(counts, len(pods))
        return
    targets = targets_from_counts(counts, len(pods))
    after = apply(pods, plan_moves(pods, targets))
    assert all(Counter(p.business for p in after)[b] == n for b, n in counts.items())
