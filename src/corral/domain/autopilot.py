"""The autopilot's decision: which warm replicas move to which business, and when the pool grows or shrinks.

A pool's replicas are already loaded and warm; moving one between businesses is a relabel and a
routing push (milliseconds), where a new replica is a cold start (a minute on a GPU). So the
autopilot first *moves* capacity to where requests queue, and only scales the pool when moving
cannot help. Everything here is pure: the loop (`corral.autopilot`) observes, calls `decide`, and
carries out the returned `Decision` through the controller (intent first, like any mutation).

The rules, in order (each action carries its reason, for the history row):
1. A business below its `minReplicas` gets replicas at once; one above its `maxReplicas` gives the
   surplus back to the spares at once.
2. A business is *pressured* when its waiting requests per ready replica exceed its target
   (`waitingPerReplica`, default 1), when its running + waiting requests per ready replica exceed
   `concurrencyPerReplica` (Knative KPA's target: capacity before requests queue, for a business whose
   latency target one queued request misses), when its TTFT p90 exceeds `ttftP90Ms` while it queues or
   fills its batches, or when it has traffic and no ready replica. Pressure must hold for
   `stabilizationSeconds` before anything moves (hysteresis), then the business wants enough replicas
   to hold its running + waiting sequences at `replicaConcurrency` and at `concurrencyPerReplica` each
   (a level: taken every tick while the load grows, since a level cannot overshoot), and one more than
   it has (capped by its max) once its last acquisition is a window old: what it got has to show in its
   queue before a stale signal (a latency histogram) takes another.
3. Pressured businesses are served highest `priority` first, taking (a) warm spares (unassigned,
   ready), then (b) replicas of unpressured businesses above what they need to keep (their min; their
   load at 80% of `replicaConcurrency` and at their concurrency target; half their waiting and TTFT
   targets; one replica while they have traffic), lowest
   priority first, then (c) under scarcity, replicas of *lower-priority* pressured businesses, down
   to their min. Equal priorities never take from each other, so two pressured businesses cannot
   trade a replica back and forth.
4. A moved replica stays where it was put for `cooldownSeconds`; a pinned replica (a person's
   manual assignment) never moves.
5. When no business wants more, a business with more than it needs for `releaseAfterSeconds` gives
   back to the spares what it did not need at any point of that window (the most it needed is kept,
   as HPA's scale-down stabilisation does; replicas with no running requests go first).
6. Demand that moves cannot meet, and spares below `warmSpares`, scale the pool out when
   `scaleOut` is on, the pool is below its `maxReplicas` and the GPU ledger has free units (starting
   replicas count as spares-to-be, so one shortage does not scale out twice). Spares above
   `warmSpares` with no pressure anywhere for `scaleInAfterSeconds` scale in when `scaleIn` is on;
   only those unassigned spares are removed, never an assigned replica.

On constant signals the decisions converge: a business only ever takes while pressured and only
gives while unpressured, so replicas flow one way until the wants are met or the replicas run out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from corral.domain import labels as L
from corral.domain.models import Service
from corral.domain.preemption import DEFAULT_BUSINESS_PRIORITY, business_priority
from corral.domain.scaling import MAX_REPLICAS

UTILISATION_TO_KEEP = 0.8  # a donor keeps enough replicas to run its sequences at <= 80% of their slots
HYSTERESIS_BAND = 0.5  # ... and to stay at <= half of its waiting and latency targets


@dataclass(frozen=True)
class BusinessPolicy:
    """What a business asks of the autopilot (`PUT /api/business-services/{name}/policy`)."""

    min_replicas: int = 0
    max_replicas: int | None = None
    priority: int = 0  # higher wins under scarcity
    ttft_p90_ms: float | None = None
    waiting_per_replica: float | None = 1.0
    # Running + waiting sequences per ready replica to stay under (Knative KPA's target concurrency): capacity
    # *before* requests queue, for a business whose latency target a single queued request already misses.
    concurrency_per_replica: float | None = None


@dataclass(frozen=True)
class PoolBusiness:
    """One business of a pool: the business services that serve it (by name), the stored policy that speaks
    for it (None: the defaults) and its priority on the shared scale of `domain.preemption`."""

    name: str
    services: tuple[Service, ...]
    policy: Mapping[str, Any] | None
    priority: int = DEFAULT_BUSINESS_PRIORITY


@dataclass(frozen=True)
class PoolBusinesses:
    """A pool's businesses (in the order of their first service's name) and the pool's priority: its
    businesses' highest, and whose (the lowest name among equals); 0 and None without businesses."""

    businesses: Mapping[str, PoolBusiness]
    priority: int = DEFAULT_BUSINESS_PRIORITY
    prioritized: str | None = None


def pool_businesses(model_tag: str, services: Iterable[Service],
                    policies: Mapping[str, Mapping[str, Any]]) -> PoolBusinesses:
    """The businesses of a pool serving `model_tag`, from its business services and the stored policies
    (service name → policy). The one answer to "who is on this pool, under which policy, how important":
    the autopilot decides with it, preemption and reclaim rank the pool by it.

    A business served by several services has one policy: that of its first service (by name) that has
    one, its priority included — so a business ranks the same whether the autopilot scales it out or a
    finetune task asks for its pool's replicas, under the policy the autopilot's status shows for it."""
    grouped: dict[str, list[Service]] = {}
    for service in sorted(services, key=lambda s: s.name):
        if service.is_business_service and service.model == model_tag and service.business:
            grouped.setdefault(service.business, []).append(service)
    businesses = {}
    for business, these in grouped.items():
        policy = next((policies[s.name] for s in these if s.name in policies), None)
        priority = DEFAULT_BUSINESS_PRIORITY
        if policy:
            priority = int(policy.get("priority", DEFAULT_BUSINESS_PRIORITY))
        businesses[business] = PoolBusiness(business, tuple(these), policy, priority)
    priority, prioritized = business_priority({b.name: b.priority for b in businesses.values()})
    return PoolBusinesses(businesses, priority, prioritized)


@dataclass(frozen=True)
class PoolAutopilot:
    """A pool's autopilot settings (`PUT /api/autopilot/{pool}`)."""

    enabled: bool = False
    warm_spares: int = 1
    cooldown_seconds: float = 30.0
    scale_out: bool = False
    scale_in: bool = False
    max_replicas: int | None = None
    stabilization_seconds: float = 1.0
    release_after_seconds: float = 300.0  # as HPA's scale-down stabilisation: a surplus costs nothing while warm
    scale_in_after_seconds: float = 300.0
    replica_concurrency: int = 8  # sequences one replica runs at once (the engine's --max-num-seqs)


@dataclass(frozen=True)
class ReplicaState:
    name: str
    business: str  # L.UNASSIGNED for a spare
    ready: bool
    pinned: bool = False
    moved_at: float | None = None  # when the autopilot last moved it (monotonic seconds)
    running: float = 0.0  # the engine's running sequences
    waiting: float = 0.0  # the engine's queued requests


@dataclass(frozen=True)
class BusinessDemand:
    """A business's policy and what the gateway sees of it (the engines' figures come per replica)."""

    policy: BusinessPolicy = BusinessPolicy()
    requests_per_second: float = 0.0
    rejected_per_second: float = 0.0  # answered by the gateway itself, e.g. 503 "no replica assigned"
    ttft_p90_ms: float | None = None


@dataclass(frozen=True)
class AutopilotMemory:
    """What must persist between decisions for hysteresis: since when each condition has held."""

    pressure_since: Mapping[str, float] = field(default_factory=dict)
    surplus_since: Mapping[str, float] = field(default_factory=dict)
    surplus_peak: Mapping[str, int] = field(default_factory=dict)  # the most it needed since its surplus began
    spares_surplus_since: float | None = None
    acquired_at: Mapping[str, float] = field(default_factory=dict)  # when it last received replicas


@dataclass(frozen=True)
class PlannedMove:
    pod: str
    source: str
    target: str
    reason: str


@dataclass(frozen=True)
class Decision:
    moves: tuple[PlannedMove, ...] = ()
    scale_to: int | None = None  # a new replica count (scale out), or None
    remove: tuple[str, ...] = ()  # spares to remove (scale in), by name
    scale_reason: str = ""
    waiting_for: tuple[str, ...] = ()  # why nothing (more) was done where a business still wants replicas
    memory: AutopilotMemory = AutopilotMemory()
    # Replicas a scale-out wanted but found no free GPU for, and the businesses still wanting replicas after the moves
    # (business → count): the loop may preempt lower-priority finetune tasks for them (`domain.preemption`).
    short_of_gpus: int = 0
    wanting: Mapping[str, int] = field(default_factory=dict)

    @property
    def acts(self) -> bool:
        return bool(self.moves or self.scale_to is not None or self.remove)


@dataclass
class BusinessLoad:
    """One business of the pool as the decision sees it: its demand and its replicas."""

    name: str
    demand: BusinessDemand
    replicas: list[ReplicaState]

    @property
    def policy(self) -> BusinessPolicy:
        return self.demand.policy

    @property
    def ready(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.ready]

    @property
    def running(self) -> float:
        return sum(r.running for r in self.ready)

    @property
    def waiting(self) -> float:
        return sum(r.waiting for r in self.ready)

    @property
    def has_traffic(self) -> bool:
        return self.demand.requests_per_second > 0 or self.demand.rejected_per_second > 0 or self.running + self.waiting > 0


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def pressure(business: BusinessLoad, replica_concurrency: int) -> str | None:
    """Why the business needs more capacity now, or None.

    A TTFT over its target counts only while the business queues or fills its batches: the p90 comes
    from a histogram over the last seconds, and still shows a queue that is already gone; acting on it
    would take replicas for a demand that has passed."""
    policy, ready = business.policy, business.ready
    if not ready:
        return "has traffic and no ready replica" if business.has_traffic else None
    per_replica = business.waiting / len(ready)
    if policy.waiting_per_replica is not None and per_replica > policy.waiting_per_replica:
        return f"waiting per replica {_fmt(per_replica)} > {_fmt(policy.waiting_per_replica)}"
    concurrency = (business.running + business.waiting) / len(ready)
    if policy.concurrency_per_replica is not None and concurrency > policy.concurrency_per_replica:
        return f"concurrency per replica {_fmt(concurrency)} > {_fmt(policy.concurrency_per_replica)}"
    ttft = business.demand.ttft_p90_ms
    busy = business.waiting > 0 or business.running >= len(ready) * max(1, replica_concurrency) * UTILISATION_TO_KEEP
    if policy.ttft_p90_ms is not None and ttft is not None and ttft > policy.ttft_p90_ms and busy:
        return f"TTFT p90 {ttft:.0f} ms > {policy.ttft_p90_ms:.0f} ms"
    return None


def for_load(business: BusinessLoad, slots: int, utilisation: float = 1.0) -> int:
    """Replicas that run the business's running + waiting sequences at `utilisation` of their slots, and
    under its `concurrencyPerReplica` target: a level, what the load needs whatever it has now."""
    load = business.running + business.waiting
    count = math.ceil(load / (max(1, slots) * utilisation))
    target = business.policy.concurrency_per_replica
    return count if target is None else max(count, math.ceil(load / target))


def needed(business: BusinessLoad, settings: PoolAutopilot, *, pressured: bool, one_more: bool = True) -> int:
    """Replicas the business should have for its load (before its max); pressured: what its load needs at its
    targets, and (`one_more`) at least one more than it has."""
    if pressured:
        return max(business.policy.min_replicas, len(business.replicas) + (1 if one_more else 0),
                   for_load(business, settings.replica_concurrency))
    # What it keeps stays clear of its own pressure by a margin (HYSTERESIS_BAND), so that giving a
    # replica away never makes it pressured again: give → want → give would be an oscillation.
    keep = for_load(business, settings.replica_concurrency, UTILISATION_TO_KEEP)
    have = len(business.replicas)
    policy = business.policy
    if policy.waiting_per_replica is not None and business.waiting > 0:
        limit = policy.waiting_per_replica * HYSTERESIS_BAND
        keep = max(keep, have if limit <= 0 else math.ceil(business.waiting / limit))
    ttft = business.demand.ttft_p90_ms
    if policy.ttft_p90_ms is not None and ttft is not None and ttft > policy.ttft_p90_ms * HYSTERESIS_BAND:
        keep = max(keep, have)  # latency near its target: cannot tell what one replica fewer would do
    return max(policy.min_replicas, keep, 1 if business.has_traffic else 0)


def _cap(business: BusinessLoad, count: int) -> int:
    top = business.policy.max_replicas
    return count if top is None else min(count, top)


def _movable(replica: ReplicaState, settings: PoolAutopilot, now: float) -> bool:
    if replica.pinned:
        return False
    return replica.moved_at is None or now - replica.moved_at >= settings.cooldown_seconds


def _idle_first(replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    """Replicas with the least work first (a moved replica finishes its in-flight requests), ready
    ones before starting ones for a receiver, then by name for a stable order."""
    return sorted(replicas, key=lambda r: (not r.ready, r.running + r.waiting, r.name))


def decide(
    replicas: Sequence[ReplicaState],
    demands: Mapping[str, BusinessDemand],
    settings: PoolAutopilot,
    memory: AutopilotMemory,
    now: float,
    *,
    free_gpu_units: int | None,
    gpus_per_replica: int,
) -> Decision:
    """The moves and scale changes for one pool now. `demands` names the businesses the pool
    serves (one per business service); replicas of any other business are left alone.
    `free_gpu_units`: what the GPU ledger has free (None: not limited, e.g. a CPU engine)."""
    businesses = {
        name: BusinessLoad(name, demand, [r for r in replicas if r.business == name]) for name, demand in demands.items()
    }
    pressure_since = dict(memory.pressure_since)
    surplus_since = dict(memory.surplus_since)
    surplus_peak = dict(memory.surplus_peak)
    pressured: dict[str, str] = {}  # business → why it needs more capacity now
    for name, business in businesses.items():
        why = pressure(business, settings.replica_concurrency)
        if why is None:
            pressure_since.pop(name, None)
        else:
            pressure_since.setdefault(name, now)
            pressured[name] = why

    # What each business wants now: its min at once; more once its pressure has held: what its load needs
    # (a level: taken at once, tick after tick while the load grows), and one more than it has only if its
    # last acquisition is a window old (what it got has to show in its queue first: no +1 every tick).
    want: dict[str, int] = {}
    reasons: dict[str, str] = {}
    acquired_at = dict(memory.acquired_at)
    for name, business in businesses.items():
        have = len(business.replicas)
        if have < business.policy.min_replicas:
            want[name] = business.policy.min_replicas - have
            reasons[name] = f"{have} replica(s) < minReplicas {business.policy.min_replicas}"
        if name in pressured and now - pressure_since[name] >= settings.stabilization_seconds:
            settled = now - acquired_at.get(name, -math.inf) >= settings.stabilization_seconds
            target = _cap(business, needed(business, settings, pressured=True, one_more=settled))
            if target > have:
                want[name] = max(want.get(name, 0), target - have)
                reasons[name] = f"{pressured[name]} for {now - pressure_since[name]:.0f} s"

    moved: set[str] = set()
    moves: list[PlannedMove] = []
    waiting_for: list[str] = []
    order = sorted(want, key=lambda b: (-businesses[b].policy.priority, -want[b], b))

    def take(receiver: str, donor: BusinessLoad | None, floor: int, note: str) -> None:
        """Move replicas to `receiver` from `donor` (None: the warm spares) while it wants more and
        the donor keeps `floor`."""
        if donor is None:
            candidates, source = [s for s in spares if s.name not in moved], L.UNASSIGNED
        else:
            candidates = [r for r in donor.replicas if _movable(r, settings, now) and r.name not in moved]
            source = donor.name
        for replica in _idle_first(candidates):
            if want[receiver] <= 0 or (donor is not None and len(donor.replicas) <= floor):
                return
            moved.add(replica.name)
            want[receiver] -= 1
            detail = note or (f"waiting {_fmt(donor.waiting)}, running {_fmt(donor.running)}" if donor else "warm spare")
            moves.append(PlannedMove(replica.name, source, receiver,
                                     f"{receiver} {reasons[receiver]}: moved {replica.name} from {source} ({detail})"))
            businesses[receiver].replicas.append(replace(replica, business=receiver))
            if donor is not None:
                donor.replicas = [r for r in donor.replicas if r.name != replica.name]

    spares = [r for r in replicas if r.business == L.UNASSIGNED and r.ready and not r.pinned]
    for receiver in order:
        priority = businesses[receiver].policy.priority
        take(receiver, None, 0, "")
        # Businesses without pressure, lowest priority first, down to what their own load needs.
        calm = [b for b in businesses.values() if b.name != receiver and b.name not in pressured and b.name not in want]
        for donor in sorted(calm, key=lambda b: (b.policy.priority, -len(b.replicas), b.name)):
            take(receiver, donor, needed(donor, settings, pressured=False), "")
        # Scarcity: any lower-priority business gives down to its min.
        lower = [b for b in businesses.values() if b.policy.priority < priority]
        for donor in sorted(lower, key=lambda b: (b.policy.priority, b.name)):
            take(receiver, donor, donor.policy.min_replicas, f"priority {donor.policy.priority} < {priority}")
        if want[receiver] > 0:
            waiting_for.append(f"{receiver} wants {want[receiver]} more replica(s) ({reasons[receiver]}); none movable")
        if any(m.target == receiver for m in moves):
            acquired_at[receiver] = now

    unmet = sum(max(0, n) for n in want.values())

    # Release: over max at once; a surplus once it has held the release window, only when nobody wants
    # more, and only down to the most the business needed during that window (the scale-down
    # stabilisation of Kubernetes' HPA): a load that dips between peaks keeps its replicas.
    for name, business in businesses.items():
        top = business.policy.max_replicas
        keep = needed(business, settings, pressured=False)
        over_max = top is not None and len(business.replicas) > top
        surplus = name not in pressured and len(business.replicas) > keep
        if not surplus:
            surplus_since.pop(name, None)
            surplus_peak.pop(name, None)
        else:
            surplus_since.setdefault(name, now)
            surplus_peak[name] = max(surplus_peak.get(name, 0), keep)
        release_to = None
        if over_max:
            release_to, note = top, f"{len(business.replicas)} replica(s) > maxReplicas {top}"
        elif surplus and not unmet and now - surplus_since[name] >= settings.release_after_seconds:
            release_to = surplus_peak[name]
            note = (f"needed at most {release_to} for {now - surplus_since[name]:.0f} s (now running "
                    f"{_fmt(business.running)}, waiting {_fmt(business.waiting)})")
            surplus_since.pop(name, None)  # a further release waits a whole window again
            surplus_peak.pop(name, None)
        if release_to is None or len(business.replicas) <= release_to:
            continue
        for replica in _idle_first([r for r in business.replicas if _movable(r, settings, now) and r.name not in moved]):
            if len(business.replicas) <= release_to:
                break
            moved.add(replica.name)
            business.replicas = [r for r in business.replicas if r.name != replica.name]
            moves.append(PlannedMove(replica.name, name, L.UNASSIGNED, f"{name} {note}: released {replica.name} to the spares"))

    # Scale: out for unmet demand and missing spares; in for idle spares.
    released = sum(1 for m in moves if m.target == L.UNASSIGNED)
    spares_left = len([s for s in spares if s.name not in moved]) + released
    starting = [r for r in replicas if r.business == L.UNASSIGNED and not r.ready]
    shortfall = unmet + max(0, settings.warm_spares - spares_left) - len(starting)
    scale_to: int | None = None
    remove: tuple[str, ...] = ()
    scale_reason = ""
    short_of_gpus = 0
    spares_surplus_since = memory.spares_surplus_since
    total = len(replicas)
    if shortfall > 0 and settings.scale_out:
        ceiling = MAX_REPLICAS if settings.max_replicas is None else min(settings.max_replicas, MAX_REPLICAS)
        room = min(shortfall, ceiling - total)
        if free_gpu_units is not None and gpus_per_replica > 0:
            short_of_gpus = max(0, room - free_gpu_units // gpus_per_replica)
            room = min(room, free_gpu_units // gpus_per_replica)
        if room > 0:
            scale_to = total + room
            scale_reason = (f"{unmet} replica(s) wanted beyond the pool, {max(0, settings.warm_spares - spares_left)} "
                            f"spare(s) missing, {len(starting)} starting: scale out {total} → {scale_to}")
        else:
            why = "maxReplicas reached" if total >= ceiling else "no free GPU"
            waiting_for.append(f"cannot scale out: {why}")
    idle_spares = [s for s in replicas if s.business == L.UNASSIGNED and s.ready and not s.pinned and s.name not in moved]
    extra = len(idle_spares) - settings.warm_spares
    if extra > 0 and not pressured and not unmet and not moves:
        spares_surplus_since = spares_surplus_since if spares_surplus_since is not None else now
        if settings.scale_in and now - spares_surplus_since >= settings.scale_in_after_seconds:
            remove = tuple(r.name for r in sorted(idle_spares, key=lambda r: r.name)[:extra])
            scale_reason = (f"{len(idle_spares)} idle spare(s) > warmSpares {settings.warm_spares} for "
                            f"{now - spares_surplus_since:.0f} s: scale in {total} → {total - len(remove)}")
            spares_surplus_since = None
    else:
        spares_surplus_since = None

    return Decision(
        moves=tuple(moves), scale_to=scale_to, remove=remove, scale_reason=scale_reason, waiting_for=tuple(waiting_for),
        memory=AutopilotMemory(pressure_since, surplus_since, surplus_peak, spares_surplus_since,
                               {name: at for name, at in acquired_at.items() if now - at < settings.stabilization_seconds}),
        short_of_gpus=short_of_gpus, wanting={name: n for name, n in want.items() if n > 0},
    )
