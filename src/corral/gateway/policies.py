"""Load-balancing policies: which replica of a service takes the next request.

A policy is a pure choice over the candidates and their in-flight counts; new policies (prefix-cache
aware, KV-load aware) implement the same `choose`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from corral.gateway.routing import Target


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Target], in_flight: Mapping[str, int]) -> Target: ...


class LeastOutstanding:
    """The replica with the fewest requests in flight; ties broken at random so load spreads."""

    name = "least-outstanding"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Target], in_flight: Mapping[str, int]) -> Target:
        fewest = min(in_flight.get(t.name, 0) for t in candidates)
        return self._rng.choice([t for t in candidates if in_flight.get(t.name, 0) == fewest])


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Target], in_flight: Mapping[str, int]) -> Target:
        return candidates[next(self._counter) % len(candidates)]


POLICIES = {"least-outstanding": LeastOutstanding, "round-robin": RoundRobin}


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
