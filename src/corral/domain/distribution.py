"""Batch assignment: distribute a pool's pods over businesses by ratio or by explicit counts.

Two pure steps. `targets_from_ratios` / `targets_from_counts` turn the request into a target count
per business that sums to the pool size (the rest stays `unassigned`). `plan_moves` then finds the
smallest set of relabels from the current assignment: only pods in groups above their target move,
so the number of moves is the total surplus, which no plan can beat, and a second call with the same
request plans nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from fractions import Fraction

from corral.domain import labels as L
from corral.domain.errors import InvalidInput
from corral.domain.models import Move, Pod


def _check_keys(values: Mapping[str, float], field: str) -> None:
    if not values:
        raise InvalidInput(f"{field} must name at least one business, e.g. {{\"production\": 3, \"testing\": 1}}")
    for business in values:
        L.check_name(business, f"business in {field}")


def targets_from_ratios(ratios: Mapping[str, float], total: int) -> dict[str, int]:
    """Largest-remainder apportionment of `total` pods; deterministic on ties (larger ratio, then name)."""
    _check_keys(ratios, "ratios")
    for business, weight in ratios.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise InvalidInput(f"ratio of '{business}' must be a number ≥ 0, got {weight!r}")
    # Exact arithmetic: float quotas would make ties (and so the result) depend on rounding.
    weights = {b: Fraction(w).limit_denominator(10**6) for b, w in ratios.items()}
    weight_sum = sum(weights.values())
    if weight_sum == 0:
        raise InvalidInput("ratios must not all be 0")
    quotas = {b: w * total / weight_sum for b, w in weights.items()}
    targets = {b: math.floor(q) for b, q in quotas.items()}
    leftover = total - sum(targets.values())
    order = sorted(quotas, key=lambda b: (-(quotas[b] - targets[b]), -weights[b], b))
    for business in order[:leftover]:
        targets[business] += 1
    return _with_unassigned(targets, total)


def targets_from_counts(counts: Mapping[str, int], total: int) -> dict[str, int]:
    """Explicit counts; pods not counted stay (or become) unassigned."""
    _check_keys(counts, "counts")
    for business, count in counts.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidInput(f"count of '{business}' must be an integer ≥ 0, got {count!r}")
    wanted = sum(counts.values())
    if wanted > total:
        raise InvalidInput(f"counts ask for {wanted} pods but the pool has only {total}; scale the pool up first")
    return _with_unassigned(dict(counts), total)


def _with_unassigned(targets: dict[str, int], total: int) -> dict[str, int]:
    assigned = sum(n for b, n in targets.items() if b != L.UNASSIGNED)
    targets[L.UNASSIGNED] = total - assigned
    return targets


def plan_moves(pods: Sequence[Pod], targets: Mapping[str, int]) -> list[Move]:
    """Fewest relabels that turn the current assignment into `targets` (businesses not named → 0).

    Preferences, all deterministic: an unassigned group gives its ready pods first and a business
    gives its not-ready pods first (movers bring capacity, donors keep theirs); recipients are served
    round-robin so that ready pods spread over them.
    """
    if sum(targets.values()) != len(pods):
        raise ValueError(f"targets sum to {sum(targets.values())}, pool has {len(pods)} pods")
    groups: dict[str, list[Pod]] = defaultdict(list)
    for pod in sorted(pods, key=lambda p: p.name):
        groups[pod.business or L.UNASSIGNED].append(pod)

    movers: list[Pod] = []
    for business, members in groups.items():
        surplus = len(members) - targets.get(business, 0)
        if surplus <= 0:
            continue
        give_ready_first = business == L.UNASSIGNED
        ranked = sorted(members, key=lambda p: (p.ready != give_ready_first, p.name))
        movers.extend(ranked[:surplus])

    deficits = {b: n - len(groups.get(b, [])) for b, n in sorted(targets.items()) if n > len(groups.get(b, []))}
    slots: list[str] = []
    while deficits:
        for business in list(deficits):
            slots.append(business)
            deficits[business] -= 1
            if deficits[business] == 0:
                del deficits[business]

    movers.sort(key=lambda p: (not p.ready, p.name))
    return [Move(pod=p.name, source=p.business or L.UNASSIGNED, target=t) for p, t in zip(movers, slots, strict=True)]
