"""Warm capacity across models: which replica sleeps and which wakes, on GPUs several models share. Pure.

On a shared GPU unit, replicas of several models are placed; at most one is awake (it holds the GPU's memory), the
others sleep (vLLM sleep mode level 1: weights in host memory, woken in about a second; level 2: weights dropped,
reloaded from disk). When a model has requests waiting at the gateway (held: the demand signal) and nothing awake
to serve them, a unit is handed over: its awake replica, if any, is put to sleep and the model's sleeping replica
there is woken. This module decides *which* hand-overs, as the autopilot decides moves between businesses
(`domain/autopilot.py`), with the same ideas:

- **Calm donors only, unless someone starves.** An awake replica gives its unit up when it is calm: nothing in
  flight, no request for `calm_s`, awake for at least `min_awake_s` (the hysteresis that keeps two models from
  trading one GPU back and forth on every request). A model whose requests have waited `starving_s` with nothing
  awake may take a busy unit, but only from a model with less demand: its recent request rate per awake replica
  below the starving model's rate (a model that keeps another awake replica so gives first), the least demanded
  first. Under scarcity the GPUs so serve the most requested models, and a model is never pushed out by one asked
  less; the others wait for a calm unit (or their hold deadline: what breaks first is the least requested model).
  An idle replica (nothing in flight) of a model asked less is taken at once, without waiting for it to be calm.
  And before its requests reach the gateway's hold deadline (`deadline_s`, below the hold timeout), a waiting model
  takes the least asked settled replica whatever its demand: models take turns rather than fail. The taken replica
  is drained first (no new requests; those in flight finish) and then slept, so no request is dropped — the
  waiting ones wait a little longer.
- **The oldest wait first.** Models are served in the order their oldest held request arrived, so a burst on a
  popular model cannot keep a quiet one asleep for ever.
- **Idle replicas sleep.** An awake replica calm for `idle_sleep_s` sleeps even if nobody wants its unit (host
  memory is cheap; an idle GPU is not, and waking it back costs a second).
- **Cold start only where nothing sleeps.** A model with demand and no replica anywhere is started cold on a unit
  with nothing awake (the ledger checks memory); a cold start costs minutes, a wake seconds.

Decisions are values (`Handover`), with typed reasons; the caller (the autopilot loop, the benchmark) carries
them out: record the intent, sleep/drain, wake, complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Occupancy(StrEnum):
    """A replica's state on its unit, as far as hand-overs care."""

    AWAKE = "awake"
    SLEEPING = "sleeping"
    WAKING = "waking"  # asked to wake, not ready yet: the unit is taken
    DRAINING = "draining"  # awake, taking no new requests, to be put to sleep once empty: the unit is taken
    STARTING = "starting"  # cold-starting: the unit is taken


TAKES_UNIT = frozenset({Occupancy.AWAKE, Occupancy.WAKING, Occupancy.DRAINING, Occupancy.STARTING})


@dataclass(frozen=True)
class Occupant:
    """A replica placed on a shared unit."""

    name: str
    model: str
    unit: str
    state: Occupancy
    in_flight: int = 0
    last_request_at: float | None = None  # None: never served a request since it woke
    since: float = 0.0  # when it entered `state`


@dataclass(frozen=True)
class ModelDemand:
    """What the gateway sees of one model's traffic now."""

    held: int = 0  # requests waiting at the gateway for a replica of this model
    oldest_held_at: float | None = None  # when the oldest of them arrived
    rate: float = 0.0  # requests per second arriving for it recently (held ones included)


@dataclass(frozen=True)
class SwapPolicy:
    # Set on bench/many_models.py's development seeds (201-203), never on its report seeds.
    calm_s: float = 5.0
    min_awake_s: float = 30.0
    starving_s: float = 5.0
    deadline_s: float = 26.0  # below the gateway's hold timeout (30 s by default), leaving time for a swap
    # An idle replica sleeps after this (0: never): a unit left free makes the next model's start a wake alone
    # (~1 s), not a swap (the donor's sleep, then the wake); an idle model woken again pays one wake.
    idle_sleep_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("calm_s", "min_awake_s", "starving_s", "deadline_s", "idle_sleep_s"):
            value = getattr(self, name)
            if not 0 <= value <= 86_400:
                raise ValueError(f"{name} must be within 0 and 86400 s, not {value}")


class HandoverKind(StrEnum):
    WAKE = "wake"  # the unit has nothing awake: wake the model's sleeper there
    SWAP = "swap"  # sleep (after draining) the awake replica, then wake the model's sleeper
    SLEEP = "sleep"  # an idle replica sleeps; nobody is woken
    COLD_START = "cold-start"  # no replica of the model sleeps anywhere: start one on the unit


class Reason(StrEnum):
    """Why a hand-over was chosen (history rows and the bench read these)."""

    UNIT_FREE = "unit-free"  # nothing awake on the unit
    DONOR_CALM = "donor-calm"  # its awake replica was calm
    DONOR_LESS_DEMAND = "donor-less-demand"  # the donor's model is asked less (per awake replica)
    TAKING_TURNS = "taking-turns"  # the waiting model's requests near their hold deadline: the least asked gives
    IDLE = "idle"  # calm for idle_sleep_s
    NO_SLEEPER = "no-sleeper"  # the model sleeps nowhere: cold start


@dataclass(frozen=True)
class Handover:
    kind: HandoverKind
    unit: str
    model: str  # the model that gains the unit (SLEEP: the one that sleeps)
    reason: Reason
    wake: str | None = None  # the replica woken (WAKE, SWAP)
    sleep: str | None = None  # the replica put to sleep (SWAP after draining, SLEEP)
    drain: bool = False  # the sleeping one has requests in flight: drained first

    def describe(self) -> str:
        if self.kind is HandoverKind.SLEEP:
            return f"{self.sleep} ({self.model}) sleeps: idle ({self.reason})"
        if self.kind is HandoverKind.COLD_START:
            return f"cold start of {self.model} on GPU {self.unit}: no replica of it sleeps anywhere"
        gives = f"; {self.sleep} sleeps{' after draining' if self.drain else ''}" if self.sleep else ""
        return f"{self.wake} ({self.model}) wakes on GPU {self.unit}{gives} ({self.reason})"


def calm(occupant: Occupant, now: float, policy: SwapPolicy) -> bool:
    """Awake long enough, nothing in flight, no request for `calm_s`."""
    if occupant.state is not Occupancy.AWAKE or occupant.in_flight > 0:
        return False
    if now - occupant.since < policy.min_awake_s:
        return False
    last = occupant.last_request_at if occupant.last_request_at is not None else occupant.since
    return now - last >= policy.calm_s


def decide(occupants: Iterable[Occupant], demand: Mapping[str, ModelDemand], now: float,
           policy: SwapPolicy = SwapPolicy(), cold_start_units: Sequence[str] = ()) -> list[Handover]:
    """The hand-overs to start now. `occupants`: every replica on a shared unit; `demand`: per model;
    `cold_start_units`: units where a new replica could be started cold (the ledger's choice: memory, host budget),
    used only for a model that sleeps nowhere. At most one hand-over per unit per call; a model gains at most one
    unit per call (the next call sees whether that was enough)."""
    by_unit: dict[str, list[Occupant]] = {}
    for occupant in occupants:
        by_unit.setdefault(occupant.unit, []).append(occupant)
    awake_of: dict[str, int] = {}
    for members in by_unit.values():
        for o in members:
            if o.state in TAKES_UNIT:
                awake_of[o.model] = awake_of.get(o.model, 0) + 1
    busy_units: set[str] = set()  # given a hand-over in this call
    decisions: list[Handover] = []

    def holder(unit: str) -> Occupant | None:
        return next((o for o in by_unit[unit] if o.state in TAKES_UNIT), None)

    waiting = sorted((m for m, d in demand.items() if d.held > 0 and awake_of.get(m, 0) == 0),
                     key=lambda m: (demand[m].oldest_held_at if demand[m].oldest_held_at is not None else now, m))
    for model in waiting:
        sleeps_on = {u for u, members in by_unit.items()
                     if any(o.model == model and o.state is Occupancy.SLEEPING for o in members)}
        homes = sorted(sleeps_on - busy_units)
        if not sleeps_on:
            free = [u for u in cold_start_units if u not in busy_units and (u not in by_unit or holder(u) is None)]
            if free:
                decisions.append(Handover(HandoverKind.COLD_START, free[0], model, Reason.NO_SLEEPER))
                busy_units.add(free[0])
            continue
        if not homes:
            continue  # its units were handed over in this call: the next one sees them
        choice = _choose_home(model, homes, by_unit, holder, awake_of, demand, now, policy)
        if choice is None:
            continue
        unit, donor, reason = choice
        sleeper = next(o for o in by_unit[unit] if o.model == model and o.state is Occupancy.SLEEPING)
        if donor is None:
            decisions.append(Handover(HandoverKind.WAKE, unit, model, reason, wake=sleeper.name))
        else:
            decisions.append(Handover(HandoverKind.SWAP, unit, model, reason, wake=sleeper.name, sleep=donor.name,
                                      drain=donor.in_flight > 0))
            awake_of[donor.model] -= 1
        awake_of[model] = awake_of.get(model, 0) + 1
        busy_units.add(unit)

    if policy.idle_sleep_s > 0:
        for unit in sorted(by_unit):
            current = holder(unit)
            if unit in busy_units or current is None or current.state is not Occupancy.AWAKE:
                continue
            last = current.last_request_at if current.last_request_at is not None else current.since
            if (current.in_flight == 0 and now - last >= policy.idle_sleep_s and now - current.since >= policy.min_awake_s
                    and demand.get(current.model, ModelDemand()).held == 0):
                decisions.append(Handover(HandoverKind.SLEEP, unit, current.model, Reason.IDLE, sleep=current.name))
    return decisions


def _choose_home(model: str, homes: list[str], by_unit: Mapping[str, list[Occupant]], holder,  # noqa: ANN001
                 awake_of: Mapping[str, int], demand: Mapping[str, ModelDemand], now: float,
                 policy: SwapPolicy) -> tuple[str, Occupant | None, Reason] | None:
    """Where `model`'s sleeper wakes: a unit with nothing awake; else one whose awake replica is calm (the longest
    calm first); else, if the model starves, one taken from a donor (see the module's docstring); else nowhere yet."""
    for unit in homes:
        if holder(unit) is None:
            return unit, None, Reason.UNIT_FREE
    held = {u: holder(u) for u in homes}
    awake = {u: o for u, o in held.items() if o is not None and o.state is Occupancy.AWAKE}
    calm_donors = [(u, o) for u, o in awake.items() if calm(o, now, policy)
                   and demand.get(o.model, ModelDemand()).held == 0]
    if calm_donors:
        unit, donor = min(calm_donors, key=lambda uo: (uo[1].last_request_at or uo[1].since, uo[0]))
        return unit, donor, Reason.DONOR_CALM
    wanted = demand[model]
    waited = now - wanted.oldest_held_at if wanted.oldest_held_at is not None else 0.0

    def asked(o: Occupant) -> float:  # the donor model's recent rate per awake replica
        return demand.get(o.model, ModelDemand()).rate / max(1, awake_of.get(o.model, 1))

    def least_asked(candidates: list[tuple[str, Occupant]]) -> tuple[str, Occupant]:
        return min(candidates, key=lambda uo: (asked(uo[1]), uo[1].last_request_at or uo[1].since, uo[0]))

    settled = [(u, o) for u, o in awake.items() if now - o.since >= policy.min_awake_s]
    less_asked = [(u, o) for u, o in settled if asked(o) < wanted.rate]
    idle = [(u, o) for u, o in less_asked if o.in_flight == 0]
    if idle:
        return *least_asked(idle), Reason.DONOR_LESS_DEMAND
    if less_asked and waited >= policy.starving_s:
        return *least_asked(less_asked), Reason.DONOR_LESS_DEMAND
    if settled and waited >= policy.deadline_s:
        return *least_asked(settled), Reason.TAKING_TURNS
    return None
