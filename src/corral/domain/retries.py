"""When the gateway may send a request on to another replica: only when none of it reached the first one,
and only within a retry budget. Both data planes apply these rules (the Lua code of the nginx plane keeps
the same counts in a shared dict).

Why so strict. A chat completion costs GPU time and may have side effects (tool calls): a replica that read
a request and then dropped the connection, or went silent, may have run it (or still be running it), so
sending it to a second replica can run it twice. Only a failure before any byte of the request was written
(the connection refused, reset or timed out while connecting) proves the replica never saw it; every other
failure (a reset after the request was written, a read timeout, no response headers, a cut mid-response) is
answered to the client (502 or 504) and never replayed.

Why a budget (Envoy's retry budget). Even safe retries add load: when replicas refuse connections under load,
retrying every request doubles the work of the survivors exactly when they have least room. So, per business
service, the retries of the last `window_s` seconds may be at most `percent` % of its requests in that window,
with `min_retries` allowed whatever the traffic (a quiet service still gets its few retries). Counted in
one-second slots: the window is the current second and the `window_s - 1` before it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

RETRY_WINDOW_S = 10


class AttemptFailure(enum.Enum):
    """How one attempt to forward a request to a replica failed."""

    CONNECT = "connect"  # no connection was established: nothing of the request was written
    DROPPED = "dropped"  # the replica closed or reset the connection after the request was (partly) written
    SILENT = "silent"  # the request was written and no response came in time (read timeout, or a hung replica)


def retryable(failure: AttemptFailure) -> bool:
    """Whether the request may go to another replica after this failure: only when the replica cannot have
    seen any of it."""
    return failure is AttemptFailure.CONNECT


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """At most `percent` % of a service's requests over the last `window_s` seconds are retries, and at
    least `min_retries` may be (`percent=0, min_retries=0`: never retry)."""

    percent: float = 20.0
    min_retries: int = 3
    window_s: int = RETRY_WINDOW_S

    def allows(self, requests: int, retries: int) -> bool:
        """Whether one more retry fits, with `requests` requests and `retries` retries already in the window."""
        return retries < max(self.min_retries, self.percent / 100 * requests)

    def describe(self) -> str:
        return f"at most {self.percent:g}% of requests retried over {self.window_s} s, or {self.min_retries}"


class RetryWindow:
    """One service's requests and retries over the last `budget.window_s` seconds, in one-second slots.
    `now` is any clock in seconds (monotonic on the Python plane); nothing here reads it."""

    __slots__ = ("budget", "_slots")

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget
        self._slots: deque[list[int]] = deque()  # [second, requests, retries], oldest first

    def _slot(self, now: float) -> list[int]:
        second = int(now)
        slots = self._slots
        if not slots or slots[-1][0] != second:
            slots.append([second, 0, 0])
            while slots[0][0] <= second - self.budget.window_s:
                slots.popleft()
        return slots[-1]

    def request(self, now: float) -> None:
        """A request arrived (counted once, whatever its attempts)."""
        self._slot(now)[1] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(requests, retries) in the window ending at `now`."""
        self._slot(now)
        return sum(s[1] for s in self._slots), sum(s[2] for s in self._slots)

    def try_retry(self, now: float) -> bool:
        """Spend one retry when the budget allows it; False (nothing spent) when it does not."""
        requests, retries = self.counts(now)
        if not self.budget.allows(requests, retries):
            return False
        self._slots[-1][2] += 1
        return True
