"""Fair sharing inside a business: the virtual token counter (VTC; Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024), the rule both data planes use to pick which held request goes next.

Why: a business's keys share its replicas. While the business has a free place, every request goes at once and
there is nothing to share. Once every replica is at its batch limit the gateway holds requests (the activator,
proxy.py), and the order in which it lets them go *is* the sharing: first come first served hands a key that
sends ten times as much ten elevenths of the business's capacity, and a quiet key waits behind the noisy key's
whole backlog. VTC keeps, per key, the tokens it has been served (prompt tokens count once, completion tokens
twice: the paper's default weights, a completion token costing the engine more), divided by the key's weight,
and lets the held request of the key with the smallest counter go first (first come first served among equals).

Two rules keep the counters honest:
- **Lift on join.** A key that comes back after a quiet spell would otherwise carry a small counter banked while
  it sent nothing, and then take every place until it caught up. When a key joins the queue with nothing held,
  its counter is lifted to the smallest counter among the keys that are held (or, with nobody held, to the
  highest counter a request was let go at): idle time earns nothing.
- **Charge at dispatch, settle at the end.** A request is charged an estimate of its prompt when it is sent to a
  replica (a key with many long requests in flight must not look cheap while they run) and settled with the
  engine's usage (or, for a stream that reports none, its events counted) when it ends.

A data plane keeps one `VirtualCounters` per business service: the hold queue is per service, and keys belong
to one service. Requests without a key share the key `""` (an open service: one class, so first come first
served). The counters of nginx's Lua copy live in each worker (exact with the default one worker; with more,
each worker is fair among the requests it holds).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

PROMPT_COST = 1.0  # per prompt token (the paper's w_p)
COMPLETION_COST = 2.0  # per completion token (the paper's w_q)
BYTES_PER_TOKEN = 4  # a request body's bytes per prompt token, for the estimate charged at dispatch
ANONYMOUS = ""  # the key of requests that present none (an open service)


def prompt_estimate(body_bytes: int) -> int:
    """The prompt tokens charged when a request is dispatched, before the engine says how many it had."""
    return max(1, body_bytes // BYTES_PER_TOKEN)


@dataclass(slots=True)
class Charge:
    """A dispatched request's charge, settled when it ends (`VirtualCounters.settle`)."""

    key: str
    weight: int
    estimate: int


class VirtualCounters:
    """One business service's virtual token counters: key → weighted tokens served."""

    __slots__ = ("_served", "_floor")

    def __init__(self) -> None:
        self._served: dict[str, float] = {}
        self._floor = 0.0  # the highest counter a request was let go at: where a key joining an empty queue starts

    def counter(self, key: str) -> float:
        return self._served.get(key, 0.0)

    def join(self, key: str, held: Collection[str]) -> None:
        """A request of `key` joins the hold queue, where `held` are the keys of the requests held before it:
        a key with none of its own there is lifted to the smallest of theirs (or, with nobody held, the floor: the
        highest counter a request was let go at),
        so the time it sent nothing earns it nothing."""
        if key in held:
            return  # its counter already competes
        lift = min((self._served.get(k, 0.0) for k in held), default=self._floor)
        if self._served.get(key, 0.0) < lift:
            self._served[key] = lift

    def first(self, keys: Iterable[str]) -> int | None:
        """Which held request goes next: the index (in arrival order) of the first request of the key with the
        smallest counter; None when there is none."""
        best, best_counter = None, 0.0
        for i, key in enumerate(keys):
            counter = self._served.get(key, 0.0)
            if best is None or counter < best_counter:
                best, best_counter = i, counter
        return best

    def dispatch(self, key: str, weight: int, body_bytes: int) -> Charge:
        """A request of `key` goes to a replica: charge its prompt's estimate now."""
        charge = Charge(key, max(1, weight), prompt_estimate(body_bytes))
        before = self._served.get(key, 0.0)
        self._floor = max(self._floor, before)
        self._served[key] = before + PROMPT_COST * charge.estimate / charge.weight
        return charge

    def settle(self, charge: Charge, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """The request ended: replace the estimate with the prompt the engine reported, add its completion."""
        cost = 0.0
        if prompt_tokens is not None:
            cost += PROMPT_COST * (prompt_tokens - charge.estimate)
        if completion_tokens:
            cost += COMPLETION_COST * completion_tokens
        if cost:
            self._served[charge.key] = self._served.get(charge.key, 0.0) + cost / charge.weight
