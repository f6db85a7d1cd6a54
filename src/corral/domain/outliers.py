"""Outlier detection: when a replica leaves rotation, for how long, and when it comes back. Pure decisions, the
same on both data planes (the Lua code of the nginx plane applies these rules with the same numbers) and, for
readiness, in the replica supervisor.

Why not a trigger. One failed health check or one connection error said nothing about a replica under load (a
busy engine answers `/health` slowly, a connection resets once), yet it took the replica out; and nothing kept
a business from losing every replica that way at once. So, as Envoy's outlier detection does:

- **Thresholds, not single events.** A replica is ejected after `consecutive_failures` gateway failures in a row
  (the connection refused, reset or timed out, no answer in time, a 502/503/504 answer; any other answer resets
  the count), or after `failed_probes` failed health checks in a row (a failure makes the gateway check it, every
  probe interval, until a check passes: a replica that refuses connections is out within a second, whatever
  the traffic). Readiness uses the same numbers: `failed_probes` failed checks in a row make a ready replica not
  ready, and `passed_probes` passed ones make it ready again (a starting replica is ready at its first pass).
- **Ejection time grows with repeats.** The n-th ejection lasts `base_ejection_s × n`, at most `max_ejection_s`;
  every `decay_s` a replica stays in rotation forgives one earlier ejection. After its time a replica is checked
  again, and comes back after `passed_probes` passed checks in a row.
- **A cap per business.** At most `max_ejection_percent` % of a business's replicas are out at once, rounded
  down (Envoy's `max_ejection_percent`): the last replicas of a business are never ejected beyond it (a business
  of one replica never loses it to ejection; readiness still removes a replica that fails its checks). A replica
  held in rotation by the cap keeps its count and is ejected at its next failure once the cap allows it.
- **Busy is not hung.** A replica silent past the first-byte timeout whose health check fails is hung only after
  `failed_probes` failed checks in a row *and* no sign of progress meanwhile: no response byte from it on any
  request, and its engine's token counters (`/metrics`) not moving.

Times are any clock in seconds (the data planes use wall-clock time, so that the API can show them); nothing
here reads a clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Container, Iterable
from dataclasses import dataclass, replace


class Reason(enum.StrEnum):
    """Why a replica was ejected."""

    FAILURES = "failures"  # `consecutive_failures` gateway failures in a row
    PROBES = "probes"  # `failed_probes` failed health checks in a row, after a failure
    HUNG = "hung"  # silent past the first-byte timeout, failed checks and no progress


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5  # gateway failures in a row that eject (0: traffic never ejects)
    failed_probes: int = 3  # failed health checks in a row: ejected (suspected) or not ready (readiness)
    passed_probes: int = 2  # passed health checks in a row: back in rotation, ready again
    base_ejection_s: float = 5.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 50.0
    decay_s: float = 60.0  # each `decay_s` in rotation forgives one earlier ejection

    def ejection_seconds(self, ejections: int) -> float:
        """How long the `ejections`-th ejection in a row lasts: the base time times the count, capped."""
        return min(self.base_ejection_s * max(ejections, 1), max(self.max_ejection_s, self.base_ejection_s))

    def ejectable(self, replicas: int) -> int:
        """How many of a business's `replicas` may be out at once."""
        return math.floor(self.max_ejection_percent * replicas / 100 + 1e-9)

    def may_eject(self, ejected: int, replicas: int) -> bool:
        """Whether one more of `replicas` may be ejected while `ejected` of them are."""
        return ejected + 1 <= self.ejectable(replicas)

    def describe(self, reason: Reason) -> str:
        if reason is Reason.FAILURES:
            return f"{self.consecutive_failures} gateway failures in a row"
        if reason is Reason.PROBES:
            return f"a failure, then {self.failed_probes} failed health checks in a row"
        return f"no response in time, {self.failed_probes} failed health checks in a row and no progress"


@dataclass(frozen=True, slots=True)
class Outlier:
    """One replica's record at the gateway."""

    failures: int = 0  # gateway failures in a row
    probe_failures: int = 0  # failed health checks in a row (suspected, not ejected)
    probe_passes: int = 0  # passed health checks in a row (ejected, past its time)
    suspect: bool = False  # failed since its last passed check: checked every probe interval
    ejections: int = 0  # ejections not forgiven yet: the multiplier of the next ejection time
    ejected_at: float | None = None  # while ejected
    until: float | None = None  # while ejected: checked again from then on
    readmitted_at: float | None = None  # the end of its last ejection
    reason: Reason | None = None  # while ejected
    capped: bool = False  # due for ejection, held in rotation by the cap (reported once a streak)

    @property
    def ejected(self) -> bool:
        return self.until is not None


def failed(state: Outlier) -> Outlier:
    """A gateway failure on the replica (ejected or not: a request it already had)."""
    return replace(state, failures=state.failures + 1, suspect=not state.ejected)


def succeeded(state: Outlier) -> Outlier:
    """An answer that was not a gateway failure: the failures in a row start again."""
    if state.failures == 0 and not state.capped:
        return state
    return replace(state, failures=0, capped=False)


def due(state: Outlier, policy: OutlierPolicy) -> Reason | None:
    """Why the replica should be ejected now, or None."""
    if state.ejected:
        return None
    if policy.consecutive_failures > 0 and state.failures >= policy.consecutive_failures:
        return Reason.FAILURES
    if state.probe_failures >= policy.failed_probes:
        return Reason.PROBES
    return None


def forgiven(state: Outlier, policy: OutlierPolicy, now: float) -> int:
    """Its ejections not forgiven at `now` (one per `decay_s` in rotation since its last readmission)."""
    if state.readmitted_at is None or state.ejected or policy.decay_s <= 0:
        return state.ejections
    return max(0, state.ejections - int(max(0.0, now - state.readmitted_at) // policy.decay_s))


def eject(state: Outlier, policy: OutlierPolicy, now: float, reason: Reason) -> Outlier:
    """Out of rotation from `now`, for longer the more often it happened lately."""
    ejections = forgiven(state, policy, now) + 1
    return Outlier(ejections=ejections, ejected_at=now, until=now + policy.ejection_seconds(ejections),
                   readmitted_at=state.readmitted_at, reason=reason)


def capped(state: Outlier) -> Outlier:
    """Due for ejection, but the cap keeps it in rotation."""
    return replace(state, capped=True)


def wants_probe(state: Outlier, now: float) -> bool:
    """Whether the replica is health-checked now: ejected and past its time, or suspected."""
    if state.ejected:
        return now >= state.until  # type: ignore[operator]
    return state.suspect


def probed(state: Outlier, policy: OutlierPolicy, now: float, ok: bool) -> Outlier:
    """A health check's result. Ejected and past its time: back after `passed_probes` passes in a row. In rotation
    and suspected: a pass clears the suspicion; failures count towards `failed_probes` (see `due`)."""
    if state.ejected:
        if now < state.until:  # type: ignore[operator]
            return state
        if not ok:
            return replace(state, probe_passes=0)
        if state.probe_passes + 1 < policy.passed_probes:
            return replace(state, probe_passes=state.probe_passes + 1)
        return Outlier(ejections=state.ejections, readmitted_at=now)
    if ok:
        return replace(state, probe_failures=0, suspect=False)
    return replace(state, probe_failures=state.probe_failures + 1)


def may_eject(replica: str, groups: Iterable[Collection[str]], ejected: Container[str], policy: OutlierPolicy) -> bool:
    """Whether ejecting `replica` keeps every business it serves within the cap. `groups`: the replicas of each
    business (service) that routes to it (others are skipped); `ejected`: the replicas out now."""
    for members in groups:
        if replica in members:
            out = sum(1 for name in members if name in ejected and name != replica)
            if not policy.may_eject(out, len(members)):
                return False
    return True


def hung(failed_checks: int, progressed: bool, policy: OutlierPolicy) -> bool:
    """A replica silent past the first-byte timeout: hung after `failed_probes` failed checks in a row with no
    progress seen meanwhile (a byte streamed from it, its engine's counters moving)."""
    return failed_checks >= policy.failed_probes and not progressed


class Change(enum.StrEnum):
    """What an outlier event reports (the history row of each)."""

    EJECTED = "ejected"
    READMITTED = "readmitted"
    CAPPED = "capped"  # due for ejection, kept in rotation by the cap


@dataclass(frozen=True, slots=True)
class OutlierEvent:
    replica: str
    change: Change
    state: Outlier  # after the change (for CAPPED: the replica's, still in rotation)
    message: str


def ejected_event(replica: str, state: Outlier, policy: OutlierPolicy) -> OutlierEvent:
    seconds = (state.until or 0.0) - (state.ejected_at or 0.0)
    return OutlierEvent(replica, Change.EJECTED, state, (
        f"ejected from rotation by the gateway: {policy.describe(state.reason or Reason.FAILURES)}; out for "
        f"{seconds:g} s (ejection {state.ejections} in a row), then back after {policy.passed_probes} passed "
        "health checks in a row"))


def readmitted_event(replica: str, state: Outlier, out_s: float, policy: OutlierPolicy) -> OutlierEvent:
    return OutlierEvent(replica, Change.READMITTED, state, (
        f"back in rotation: {policy.passed_probes} health checks in a row passed after {out_s:.1f} s out"))


def capped_event(replica: str, state: Outlier, reason: Reason, policy: OutlierPolicy) -> OutlierEvent:
    return OutlierEvent(replica, Change.CAPPED, state, (
        f"not ejected after {policy.describe(reason)}: {policy.max_ejection_percent:g}% of its business's replicas "
        "(rounded down) are out already (CORRAL_GATEWAY_MAX_EJECTION_PERCENT); it stays in rotation"))


@dataclass(frozen=True, slots=True)
class Readiness:
    """A replica's readiness from its health checks (the supervisor's probes)."""

    ready: bool = False
    failures: int = 0  # failed checks in a row while ready
    passes: int = 0  # passed checks in a row while not ready
    was_ready: bool = False  # ready once: coming back takes `passed_probes` passes, starting takes one


def readiness(state: Readiness, ok: bool, policy: OutlierPolicy) -> Readiness:
    """The next readiness after a health check."""
    if state.ready:
        if ok:
            return state if state.failures == 0 else replace(state, failures=0)
        if state.failures + 1 >= policy.failed_probes:
            return Readiness(ready=False, was_ready=True)
        return replace(state, failures=state.failures + 1)
    if not ok:
        return state if state.passes == 0 else replace(state, passes=0)
    needed = policy.passed_probes if state.was_ready else 1
    if state.passes + 1 >= needed:
        return Readiness(ready=True, was_ready=True)
    return replace(state, passes=state.passes + 1)


# The engines' token counters (vLLM, SGLang and the simulator): a replica whose counters move is working.
PROGRESS_COUNTERS = ("generation_tokens_total", "prompt_tokens_total")


def progress_counter(metrics_text: str) -> float | None:
    """The sum of an engine's token counters in its `/metrics` text; None when it has none."""
    total, found = 0.0, False
    for line in metrics_text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.partition(" ")
        base = name.partition("{")[0]
        if base.endswith(PROGRESS_COUNTERS):
            if "{" in name and "}" not in name:  # a label value with a space: the value is after the brace
                rest = line[line.rfind("}") + 1:]
            try:
                total += float(rest.split()[0])
                found = True
            except (ValueError, IndexError):
                continue
    return total if found else None
