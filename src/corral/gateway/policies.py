"""Load-balancing policies of the Python data plane for least-load services: which replica takes the next request.

A policy is a pure choice over the candidates and their in-flight counts (`CORRAL_GATEWAY_POLICY`). A business
service set to `prefix-aware` is picked by `corral.domain.replica_picking` instead (prefix cache, engine queue, KV
cache), the same way on both data planes.
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
