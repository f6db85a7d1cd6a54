"""The autopilot's decision: which warm replicas move to which business, and when the pool grows or shrinks.

A pool's replicas are already loaded and warm; moving one between businesses is a relabel and a
routing push (milliseconds), where a new replica is a cold start (a minute on a GPU). So the
autopilot first *moves* capacity to where requests queue, and only scales the pool when moving
cannot help. Everything here is pure: the loop (`corral.autopilot`) observes, calls `decide`, and
carries out the returned `Decision` through the controller (intent first, like any mutation).

Signals come in two windows, as in Knative's KPA: a short *panic* window (is the business pressured
now?) and a long *stable* window (what does it need, and may it give?). A business's load is its
running + waiting + held requests; a replica whose load nobody knows (no fresh engine reading and no
gateway count) makes its business's demand *unknown*, and nothing is ever taken from such a business.

The rules, in order (each action carries its reason, for the history row):
1. A business below its floor gets replicas at once: its `minReplicas`, or, when the policy does not set
   one, one replica while it has had traffic in the stable window (an explicit `minReplicas: 0` lets it
   go to none; its requests are then held by the gateway). One above its `maxReplicas` gives the
   surplus back to the spares at once.
2. A business is *pressured* when, over the panic window, its waiting requests per ready replica exceed
   `waitingPerReplica` (default 1), its running + waiting requests per ready replica exceed its
   concurrency target (`concurrencyPerReplica`, capped by `targetUtilisation` of the engine's batch
   limit `replicaConcurrency`: a margin, so replicas arrive before requests queue), its TTFT p90 exceeds
   `ttftP90Ms` while it queues or fills its batches, or it has traffic and no ready replica. Pressure must
   hold for `stabilizationSeconds`, then the business wants enough replicas to hold its load at its
   concurrency target (a level), and one more than it has once its last acquisition is a window old.
3. Pressured businesses are served highest `priority` first, taking (a) warm spares, then (b) replicas of
   *calm* businesses — unpressured for a whole stable window, with a known demand — down to what keeps
   them `hysteresisBand` below every one of their targets (one band for all targets: giving a replica
   away never makes the donor pressured), lowest priority first, then (c) replicas of equal-priority
   pressured businesses while the donor is more than one replica further above its demand share than
   the receiver (weighted fair share: equal priorities split by demand, and a move never reverses),
   then (d) under scarcity, replicas of lower-priority businesses down to their floor.
4. A moved replica stays where it was put for `cooldownSeconds`; a pinned replica (a person's manual
   assignment) never moves; at most `movesPerWindow` moves per stable window per pool, except those
   that bring a business up to its floor.
5. When no business wants more, a business with more than it needs for `releaseAfterSeconds` gives
   back to the spares what it did not need at any point of that window (HPA's scale-down stabilisation).
6. Demand that moves cannot meet, and spares below `warmSpares`, scale the pool out when `scaleOut` is
   on, the pool is below its `maxReplicas` and the GPU ledger has free units (starting replicas count as
   spares-to-be). Spares above `warmSpares` with no pressure anywhere for `scaleInAfterSeconds` scale in
   when `scaleIn` is on; only those unassigned spares are removed, never an assigned replica.

On constant load the decisions converge: a business only takes while pressured, a calm donor keeps a
band below its own pressure, a fair-share move strictly lowers the spread of the shares, and priorities
only ever take downwards — so replicas flow one way until the wants are met or the replicas run out
(property-tested in `tests/unit/test_autopilot.py`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from corral.domain import labels as L
from corral.domain.models import Service
from corral.domain.preemption import DEFAULT_BUSINESS_PRIORITY, business_priority
from corral.domain.scaling import MAX_REPLICAS

DEFAULT_TARGET_UTILISATION = 0.8  # of the engine's batch limit: KPA's target-utilisation idea (its default is 0.7)
DEFAULT_HYSTERESIS_BAND = 0.2  # a donor keeps its load 20% below every target it has
# Corral ticks every 0.5 s and moves warm replicas (no cold start to cover, unlike KPA's 60 s / 6 s): a 30 s stable
# window averages 60 readings (a Poisson load's noise on a few-second request shrinks ~sqrt(10) times), a 3 s panic
# window 6 readings, the same 1:10 ratio as KPA. README, "The autopilot".
DEFAULT_STABLE_WINDOW_S = 30.0
DEFAULT_PANIC_WINDOW_S = 3.0
# Knative KPA's panic threshold: the short window alone decides only when its load is twice a target. Below that the
# stable window's average does: a Poisson load near its target crosses it for a second every few seconds, and acting
# on those crossings moved replicas back and forth between two steady businesses.
PANIC_THRESHOLD = 2.0
# Equal priorities: a donor gives while it is more than this many replicas further above its demand share than the
# receiver (one replica each side of the share). A move narrows that gap by 2, so a move back needs the demands
# themselves to shift by two replicas' worth: noise in the stable window does not trade a replica back and forth.
FAIR_SHARE_SLACK = 2.0
DEFAULT_REPLICA_CONCURRENCY = 8  # an engine whose batch limit is unknown (the simulator's default)
# The engines' TTFT percentiles cover the last 10 s (`corral.signals`): after a business receives a replica, its p90
# shows the queue that replica drained for up to that long. A "+1 while TTFT is over target" waits that long, or a
# p90 that lags takes a replica a second (three in three seconds, seen in bench/autopilot.py).
TTFT_WINDOW_S = 10.0


class PressureKind(str, Enum):
    """Why a business needs more capacity: what its targets see, in the order `pressure` checks them."""

    NO_REPLICA = "no-replica"
    WAITING = "waiting"
    CONCURRENCY = "concurrency"
    TTFT = "ttft"


@dataclass(frozen=True)
class Pressure:
    kind: PressureKind
    text: str  # for people: the figure and the target
    # Confirmed: its stable window's average is a hysteresis band over a target, or its load surges (the panic
    # window's concurrency past the panic threshold), or it has no replica. Only a confirmed need preempts a busy
    # lower-priority business: a queue that spikes for a few seconds (a queue near saturation does), a TTFT p90 that a
    # few long prompts lifted, or a mean that noise carries just over its target takes spares and surplus, not the
    # replicas another business is using (bench/autopilot.py: a priority-5 business 2% over its target took a
    # priority-0 business's second replica and left it drowning for minutes).
    sustained: bool = True

    def __str__(self) -> str:
        return self.text


class Source(str, Enum):
    """Where a replica's or a business's load figure came from."""

    ENGINE = "engine"  # the engine's own /metrics (running and waiting sequences)
    GATEWAY = "gateway"  # the gateway's in-flight count (no fresh engine reading, or an engine without /metrics)
    UNKNOWN = "unknown"  # neither: the load is not known, and is never read as idle


# The engine flag that bounds one replica's batch, and the engine's default where the flag is absent.
BATCH_LIMIT_FLAGS: Mapping[str, tuple[str, int | None]] = {
    "vllm": ("--max-num-seqs", 256),
    "simulator": ("--max-num-seqs", 8),
    "sglang": ("--max-running-requests", None),  # SGLang sizes it from the KV cache at start: unknown here
}


def configured_batch_limit(engine: str, engine_args: Iterable[str]) -> int | None:
    """The batch limit an engine was started with (`--flag N` or `--flag=N`, the last one wins, as argparse
    reads it); None when the engine has no such flag or it was not given. The gateway holds requests at it and
    the autopilot targets it: one reading, so the two never disagree."""
    flag = BATCH_LIMIT_FLAGS.get(engine, ("", None))[0]
    if not flag:
        return None
    found: int | None = None
    args = list(engine_args)
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.partition("=")[2]
        else:
            continue
        if value.strip().isdigit() and int(value) > 0:
            found = int(value)
    return found


def engine_batch_limit(engine: str, engine_args: Sequence[str]) -> int | None:
    """Sequences one replica runs at once: as configured (`configured_batch_limit`), else the engine's default;
    None when unknown."""
    limit = configured_batch_limit(engine, engine_args)
    return limit if limit is not None else BATCH_LIMIT_FLAGS.get(engine, ("", None))[1]


@dataclass(frozen=True)
class BusinessPolicy:
    """What a business asks of the autopilot (`PUT /api/business-services/{name}/policy`)."""

    # None: not set — the business keeps one replica while it has had traffic in the stable window; an explicit
    # 0 lets it go to none (its requests are held by the gateway until it gets one back).
    min_replicas: int | None = None
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
    replica_concurrency: int = DEFAULT_REPLICA_CONCURRENCY  # sequences one replica runs at once (--max-num-seqs)
    target_utilisation: float = DEFAULT_TARGET_UTILISATION
    hysteresis_band: float = DEFAULT_HYSTERESIS_BAND
    stable_window_seconds: float = DEFAULT_STABLE_WINDOW_S
    panic_window_seconds: float = DEFAULT_PANIC_WINDOW_S
    moves_per_window: int | None = None  # None: half the pool's replicas (at least 4) per stable window

    def move_budget(self, replicas: int) -> int:
        return self.moves_per_window if self.moves_per_window is not None else max(4, math.ceil(replicas / 2))


@dataclass(frozen=True)
class ReplicaState:
    name: str
    business: str  # L.UNASSIGNED for a spare
    ready: bool
    pinned: bool = False
    moved_at: float | None = None  # when the autopilot last moved it (monotonic seconds)
    running: float = 0.0  # the engine's running sequences (or the gateway's in-flight requests)
    waiting: float = 0.0  # the engine's queued requests
    kv_cache_usage: float | None = None  # the engine's KV-cache usage, 0–1 (None: not reported)
    source: Source = Source.ENGINE  # where running/waiting came from; UNKNOWN: they mean nothing


@dataclass(frozen=True)
class Load:
    """A business's requests averaged over a window: running in its engines, waiting in their queues (held by
    the gateway included)."""

    running: float = 0.0
    waiting: float = 0.0
    # The KV-cache usage of its replicas, summed (replicas' worth of KV cache; 0: not reported by every one): with
    # `running`, how many of this business's sequences one replica's cache holds (`concurrency_target`).
    kv: float = 0.0

    @property
    def total(self) -> float:
        return self.running + self.waiting


class LoadWindows:
    """A business's load tick by tick, kept over its stable window: the means over the stable and panic windows
    (Knative KPA's two windows), and whether every reading in them was known."""

    def __init__(self) -> None:
        self._readings: deque[tuple[float, Load, bool]] = deque()

    def add(self, now: float, load: Load, known: bool, keep_s: float) -> None:
        self._readings.append((now, load, known))
        while self._readings and now - self._readings[0][0] > keep_s:
            self._readings.popleft()

    def mean(self, now: float, seconds: float) -> Load | None:
        these = [load for at, load, _ in self._readings if now - at <= seconds]
        if not these:
            return None
        n = len(these)
        return Load(sum(x.running for x in these) / n, sum(x.waiting for x in these) / n, sum(x.kv for x in these) / n)

    def known(self, now: float, seconds: float) -> bool:
        return all(known for at, _, known in self._readings if now - at <= seconds)


@dataclass(frozen=True)
class BusinessDemand:
    """A business's policy and what the gateway sees of it (the engines' figures come per replica).

    `stable` and `panic`: its load averaged over the two windows (None: the replicas' readings of now stand for
    both — an offline model, a test); `known` False when a replica's load is unknown (the business is not a donor)."""

    policy: BusinessPolicy = BusinessPolicy()
    requests_per_second: float = 0.0
    rejected_per_second: float = 0.0  # answered by the gateway itself, e.g. 503 "no replica assigned"
    ttft_p90_ms: float | None = None
    held: float = 0.0  # requests the gateway holds for it, waiting for a replica
    stable: Load | None = None
    panic: Load | None = None
    known: bool = True


@dataclass(frozen=True)
class AutopilotMemory:
    """What must persist between decisions for hysteresis: since when each condition has held."""

    pressure_since: Mapping[str, float] = field(default_factory=dict)
    surplus_since: Mapping[str, float] = field(default_factory=dict)
    surplus_peak: Mapping[str, int] = field(default_factory=dict)  # the most it needed since its surplus began
    spares_surplus_since: float | None = None
    acquired_at: Mapping[str, float] = field(default_factory=dict)  # when it last received replicas
    calm_since: Mapping[str, float] = field(default_factory=dict)  # unpressured, with a known demand, since
    traffic_at: Mapping[str, float] = field(default_factory=dict)  # when it last had traffic
    moves_at: tuple[float, ...] = ()  # the pool's moves in the last stable window (the budget)
    # business → (when, replicas, stable load): the most replicas it was still pressured with in the release window,
    # and its load then. While its load stays within a band of that, a calm donor keeps one more than that count:
    # a business short at k replicas a minute ago is short at k again, and giving its (k+1)th away to a business
    # it outranks would be taken back by priority at its next pressure — the trade seen in bench/autopilot.py.
    short_at: Mapping[str, tuple[float, int, float]] = field(default_factory=dict)
    # business → ((when, replicas it needed), …) over the last two stable windows: a calm donor gives down to the
    # most it needed there, not to what one window's average says (a Poisson load's 30 s mean still wanders by a
    # replica's worth near a boundary; the scale-down stabilisation of Kubernetes' HPA, on a shorter window).
    needed_recently: Mapping[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)


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

    @property
    def scales(self) -> bool:
        return self.scale_to is not None or bool(self.remove)


@dataclass
class BusinessLoad:
    """One business of the pool as the decision sees it: its demand and its replicas."""

    name: str
    demand: BusinessDemand
    replicas: list[ReplicaState]
    recent_traffic: bool = False  # traffic in the stable window (decide sets it from its memory)

    @property
    def policy(self) -> BusinessPolicy:
        return self.demand.policy

    @property
    def ready(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.ready]

    def __post_init__(self) -> None:
        # The load is the business's, fixed for the decision: a replica moved during it does not take load along.
        ready = self.ready
        now = replicas_load(ready, self.demand.held)
        self._panic = self.demand.panic if self.demand.panic is not None else now
        self._stable_mean = self.demand.stable if self.demand.stable is not None else now
        stable = self._stable_mean
        self._stable = stable if stable.total >= self._panic.total else self._panic

    @property
    def panic(self) -> Load:
        """The load over the panic window: whether it is pressured now."""
        return self._panic

    @property
    def stable(self) -> Load:
        """The load over the stable window (never below the panic one: a donor keeps what it runs now too)."""
        return self._stable

    @property
    def stable_mean(self) -> Load:
        """The load averaged over the stable window, as it is: what pressure reads below the panic threshold."""
        return self._stable_mean

    # the figures of now, for the status (and the reasons)
    @property
    def running(self) -> float:
        return self.panic.running

    @property
    def waiting(self) -> float:
        return self.panic.waiting

    @property
    def known(self) -> bool:
        return self.demand.known and all(r.source != Source.UNKNOWN for r in self.ready)

    @property
    def has_traffic(self) -> bool:
        return (self.demand.requests_per_second > 0 or self.demand.rejected_per_second > 0 or self.demand.held > 0
                or self.panic.total > 0)

    @property
    def floor(self) -> int:
        """Replicas it never goes below (while the pool has them): its min, or one while it has had traffic."""
        if self.policy.min_replicas is not None:
            return self.policy.min_replicas
        floor = 1 if self.recent_traffic or self.has_traffic else 0
        return floor if self.policy.max_replicas is None else min(floor, self.policy.max_replicas)


def replicas_load(replicas: Sequence[ReplicaState], held: float = 0.0) -> Load:
    """What these replicas run and queue now (and `held`: requests the gateway holds for them), with their KV-cache
    usage when every one reports it."""
    kv = [r.kv_cache_usage for r in replicas]
    return Load(sum(r.running for r in replicas), sum(r.waiting for r in replicas) + held,
                0.0 if None in kv else sum(k for k in kv if k is not None))


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def replica_slots(settings: PoolAutopilot, mix: Load | None = None) -> float:
    """Sequences one replica runs at once: the engine's batch limit, or fewer where its KV cache fills first. vLLM
    admits a sequence only while its cache has blocks for it, so with long prompts a replica of 256 slots may run 20:
    `mix` (a business's load, with its KV-cache usage) tells how many of *its* sequences a cache holds."""
    slots = float(max(1, settings.replica_concurrency))
    if mix is not None and mix.running > 0 and mix.kv > 0:
        slots = min(slots, max(1.0, mix.running / mix.kv))  # kv: the usage summed over its replicas
    return slots


def concurrency_target(policy: BusinessPolicy, settings: PoolAutopilot, mix: Load | None = None) -> float:
    """Running + waiting requests per replica to stay under: `targetUtilisation` of what a replica runs at once
    (`replica_slots`: its batch limit, or what its KV cache holds of this business's sequences), and the business's
    own `concurrencyPerReplica` where it is lower."""
    slots = replica_slots(settings, mix) * settings.target_utilisation
    target = policy.concurrency_per_replica
    return slots if target is None else min(target, slots)


def pressure(business: BusinessLoad, settings: PoolAutopilot) -> Pressure | None:
    """Why the business needs more capacity now (its stable window's average over a target, or its panic
    window's over `PANIC_THRESHOLD` times it), or None.

    A TTFT over its target counts only while the business queues or fills its batches: the p90 comes
    from a histogram over the last seconds, and still shows a queue that is already gone; acting on it
    would take replicas for a demand that has passed."""
    policy, ready, load = business.policy, business.ready, business.panic
    if not ready:
        return Pressure(PressureKind.NO_REPLICA, "has traffic and no ready replica") if business.has_traffic else None

    def over(figure: Callable[[Load], float], target: float) -> tuple[float, bool] | None:
        """The figure that exceeds `target` and whether from the stable window: its average, or the panic window's
        past the panic threshold (a surge: reacting a stable window late would be too late)."""
        if (stable := figure(business.stable_mean)) > target:
            return stable, stable > (1 + settings.hysteresis_band) * target
        return (panic, False) if (panic := figure(load)) > PANIC_THRESHOLD * target else None

    waiting_target = policy.waiting_per_replica
    if waiting_target is not None and (seen := over(lambda x: x.waiting / len(ready), waiting_target)) is not None:
        return Pressure(PressureKind.WAITING, f"waiting per replica {_fmt(seen[0])} > {_fmt(waiting_target)}",
                        seen[1])
    target = concurrency_target(policy, settings, business.stable_mean)
    if (seen := over(lambda x: x.total / len(ready), target)) is not None:
        concurrency, surge = seen[0], seen[0] > PANIC_THRESHOLD * target
        slots = replica_slots(settings, business.stable_mean)
        held_by = f"{settings.replica_concurrency} slots" if slots >= settings.replica_concurrency else (
            f"{_fmt(slots)} sequences its KV cache holds")
        of = "" if policy.concurrency_per_replica is not None and policy.concurrency_per_replica <= target else (
            f" ({settings.target_utilisation:.0%} of {held_by})")
        return Pressure(PressureKind.CONCURRENCY, f"concurrency per replica {_fmt(concurrency)} > {_fmt(target)}{of}",
                        seen[1] or surge)
    ttft = business.demand.ttft_p90_ms
    busy = load.waiting > 0 or load.running >= len(ready) * target
    if policy.ttft_p90_ms is not None and ttft is not None and ttft > policy.ttft_p90_ms and busy:
        return Pressure(PressureKind.TTFT, f"TTFT p90 {ttft:.0f} ms > {policy.ttft_p90_ms:.0f} ms", sustained=False)
    return None


def for_load(load: float, target: float) -> int:
    """Replicas that hold `load` requests at `target` each: a level, what the load needs whatever it has now."""
    return math.ceil(load / max(target, 1e-9) - 1e-9)


def needed(business: BusinessLoad, settings: PoolAutopilot, *, pressured: bool, one_more: bool = True,
           averaged: bool = False) -> int:
    """Replicas the business should have for its load (before its max); pressured: what its panic-window load
    needs at its targets, and (`one_more`) at least one more than it has."""
    target = concurrency_target(business.policy, settings, business.stable_mean)
    if pressured:
        return max(business.floor, len(business.replicas) + (1 if one_more else 0),
                   for_load(business.panic.total, target))
    # What it keeps stays one band below each of its targets over the stable window, so that giving a
    # replica away never makes it pressured again: give → want → give would be an oscillation.
    keep_share = 1 - settings.hysteresis_band
    load = business.stable_mean if averaged else business.stable  # averaged: the stable window's mean alone
    keep = for_load(load.total, target * keep_share)
    have = len(business.replicas)
    policy = business.policy
    if policy.waiting_per_replica is not None and load.waiting > 0:
        limit = policy.waiting_per_replica * keep_share
        keep = max(keep, have if limit <= 0 else for_load(load.waiting, limit))
    ttft = business.demand.ttft_p90_ms
    if policy.ttft_p90_ms is not None and ttft is not None and ttft > policy.ttft_p90_ms * keep_share:
        keep = max(keep, have)  # latency near its target: cannot tell what one replica fewer would do
    return max(business.floor, keep)


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


def _fair_gap(donor: BusinessLoad, receiver: BusinessLoad, group: Sequence[BusinessLoad]) -> float:
    """How much further above its demand share (of the group's replicas) the donor is than the receiver."""
    demand = sum(b.stable.total for b in group)
    if demand <= 0:
        return 0.0
    replicas = sum(len(b.replicas) for b in group)

    def over(b: BusinessLoad) -> float:
        return len(b.replicas) - replicas * b.stable.total / demand

    return over(donor) - over(receiver)


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
    window = settings.stable_window_seconds
    traffic_at = {name: at for name, at in memory.traffic_at.items() if name in businesses and now - at < window}
    for name, business in businesses.items():
        if business.has_traffic:
            traffic_at[name] = now
        business.recent_traffic = name in traffic_at
    pressure_since = dict(memory.pressure_since)
    surplus_since = dict(memory.surplus_since)
    surplus_peak = dict(memory.surplus_peak)
    calm_since = dict(memory.calm_since)
    pressured: dict[str, Pressure] = {}  # business → why it needs more capacity now
    acquired_at = dict(memory.acquired_at)

    def settled(name: str, why: Pressure) -> bool:
        """Whether what the business last received has had time to show in the figure that pressures it."""
        shows_in = TTFT_WINDOW_S if why.kind == PressureKind.TTFT else settings.panic_window_seconds
        return now - acquired_at.get(name, -math.inf) >= max(settings.stabilization_seconds, shows_in)

    remember = settings.release_after_seconds
    short_at = {name: short for name, short in memory.short_at.items() if name in businesses and now - short[0] < remember}
    needed_recently = {}
    for name, business in businesses.items():
        why = pressure(business, settings)
        if why is None:
            pressure_since.pop(name, None)
        else:
            pressure_since.setdefault(name, now)
            pressured[name] = why
            have, before = len(business.replicas), short_at.get(name)
            if why.kind != PressureKind.NO_REPLICA and why.sustained and settled(name, why) and (
                    before is None or have >= before[1]):
                short_at[name] = (now, have, business.stable_mean.total)
        needed_recently[name] = (*(x for x in memory.needed_recently.get(name, ()) if now - x[0] < 2 * window),
                                 (now, needed(business, settings, pressured=False, averaged=True)))
        if why is None and business.known:
            calm_since.setdefault(name, now)
        else:
            calm_since.pop(name, None)
    moves_at = [at for at in memory.moves_at if now - at < window]
    budget = settings.move_budget(len(replicas)) - len(moves_at)

    # What each business wants now: its floor at once; more once its pressure has held: what its load needs
    # (a level: taken at once, tick after tick while the load grows), and one more than it has only if its
    # last acquisition is a window old (what it got has to show in its queue first: no +1 every tick).
    want: dict[str, int] = {}
    below_floor: dict[str, int] = {}  # what brings it up to its floor: outside the move budget
    reasons: dict[str, str] = {}
    for name, business in businesses.items():
        have = len(business.replicas)
        if have < business.floor:
            want[name] = below_floor[name] = business.floor - have
            reasons[name] = (f"{have} replica(s) < minReplicas {business.floor}" if business.policy.min_replicas is not None
                             else str(pressured.get(name) or "") or f"{have} replica(s) after traffic in the stable window")
        if name in pressured and now - pressure_since[name] >= settings.stabilization_seconds:
            # One more only once what it last received shows in the figure that pressures it.
            one_more = settled(name, pressured[name])
            target = _cap(business, needed(business, settings, pressured=True, one_more=one_more))
            if target > have:
                want[name] = max(want.get(name, 0), target - have)
                reasons[name] = f"{pressured[name]} for {now - pressure_since[name]:.0f} s"

    moved: set[str] = set()
    moves: list[PlannedMove] = []
    waiting_for: list[str] = []
    order = sorted(want, key=lambda b: (-businesses[b].policy.priority, -want[b], b))

    def take(receiver: str, donor: BusinessLoad | None, may_give: Callable[[], bool], note: str) -> None:
        """Move replicas to `receiver` from `donor` (None: the warm spares) while it wants more, the budget
        allows and the donor `may_give`."""
        nonlocal budget
        if donor is None:
            candidates, source = [s for s in spares if s.name not in moved], L.UNASSIGNED
        else:
            candidates = [r for r in donor.replicas if _movable(r, settings, now) and r.name not in moved]
            source = donor.name
        for replica in _idle_first(candidates):
            essential = below_floor.get(receiver, 0) > 0
            if want[receiver] <= 0 or (budget <= 0 and not essential) or (donor is not None and not may_give()):
                return
            moved.add(replica.name)
            want[receiver] -= 1
            if essential:
                below_floor[receiver] -= 1
            else:
                budget -= 1
            detail = note or (f"waiting {_fmt(donor.waiting)}, running {_fmt(donor.running)}" if donor else "warm spare")
            moves.append(PlannedMove(replica.name, source, receiver,
                                     f"{receiver} {reasons[receiver]}: moved {replica.name} from {source} ({detail})"))
            businesses[receiver].replicas.append(replace(replica, business=receiver))
            if donor is not None:
                donor.replicas = [r for r in donor.replicas if r.name != replica.name]

    def above(donor: BusinessLoad, floor: int) -> Callable[[], bool]:
        return lambda: len(donor.replicas) > floor

    def keeps(donor: BusinessLoad, receiver_priority: int) -> int:
        """What a calm donor keeps: a band below its targets, and one more than it was recently short with while
        its load is still that high — unless the receiver outranks it (priority would take it anyway)."""
        keep = max(needed(donor, settings, pressured=False), *(n for _, n in needed_recently[donor.name]))
        short = short_at.get(donor.name)
        if short is not None and receiver_priority <= donor.policy.priority and (
                donor.stable_mean.total >= (1 - settings.hysteresis_band) * short[2]):
            keep = max(keep, short[1] + 1)
        return keep

    def _fairly(donor: BusinessLoad, receiver: BusinessLoad, group: list[BusinessLoad]) -> Callable[[], bool]:
        return lambda: len(donor.replicas) > donor.floor and (
            below_floor.get(receiver.name, 0) > 0 or _fair_gap(donor, receiver, group) > FAIR_SHARE_SLACK)

    spares = [r for r in replicas if r.business == L.UNASSIGNED and r.ready and not r.pinned]
    for receiver in order:
        me = businesses[receiver]
        priority = me.policy.priority
        take(receiver, None, lambda: True, "")
        # A business above its max gives the replicas it is about to release anyway.
        for donor in [b for b in businesses.values() if b is not me and b.policy.max_replicas is not None]:
            take(receiver, donor, above(donor, donor.policy.max_replicas or 0), f"above maxReplicas {donor.policy.max_replicas}")
        # Calm businesses (a whole stable window without pressure), lowest priority first, down to what keeps them
        # a band below their own targets.
        calm = [b for b in businesses.values() if b.name != receiver and b.name not in want and b.name in calm_since
                and now - calm_since[b.name] >= window]
        for donor in sorted(calm, key=lambda b: (b.policy.priority, -len(b.replicas), b.name)):
            take(receiver, donor, above(donor, keeps(donor, priority)), "")
        # Equal priorities share by demand: a donor gives while it is more than FAIR_SHARE_SLACK replicas further
        # above its share than the receiver (each such move narrows the spread, so none is reversed on constant load).
        equals = [b for b in businesses.values() if b.policy.priority == priority and b.known
                  and (b.name in pressured or (b.name in calm_since and now - calm_since[b.name] >= window))]
        group = [*equals, me] if me not in equals else equals
        for donor in sorted((b for b in equals if b is not me), key=lambda b: -_fair_gap(b, me, group)):
            take(receiver, donor, _fairly(donor, me, group),
                 f"fair share at priority {priority}: {donor.name} {len(donor.replicas)} replica(s) for load "
                 f"{_fmt(donor.stable.total)}, {receiver} {len(me.replicas)} for {_fmt(me.stable.total)}")
        # Scarcity: a lower-priority business with a known demand gives down to its floor.
        # Scarcity: a lower-priority business with a known demand gives down to its floor, for the receiver's floor
        # or a confirmed need (`Pressure.sustained`).
        why = pressured.get(receiver)
        lower = [b for b in businesses.values() if b.policy.priority < priority and b.known
                 and (below_floor.get(receiver, 0) > 0 or (why is not None and why.sustained))]
        for donor in sorted(lower, key=lambda b: (b.policy.priority, b.name)):
            take(receiver, donor, above(donor, donor.floor), f"priority {donor.policy.priority} < {priority}")
        if want[receiver] > 0:
            why = "move budget spent" if budget <= 0 else "none movable"
            waiting_for.append(f"{receiver} wants {want[receiver]} more replica(s) ({reasons[receiver]}); {why}")
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
        surplus = name not in pressured and business.known and len(business.replicas) > keep
        if not surplus:
            surplus_since.pop(name, None)
            surplus_peak.pop(name, None)
        else:
            surplus_since.setdefault(name, now)
            surplus_peak[name] = max(surplus_peak.get(name, 0), keep)
        release_to = None
        if over_max:
            release_to, note = top, f"{len(business.replicas)} replica(s) > maxReplicas {top}"
        elif surplus and not unmet and budget > 0 and now - surplus_since[name] >= settings.release_after_seconds:
            release_to = surplus_peak[name]
            note = (f"needed at most {release_to} for {now - surplus_since[name]:.0f} s (now running "
                    f"{_fmt(business.running)}, waiting {_fmt(business.waiting)})")
            surplus_since.pop(name, None)  # a further release waits a whole window again
            surplus_peak.pop(name, None)
        if release_to is None or len(business.replicas) <= release_to:
            continue
        for replica in _idle_first([r for r in business.replicas if _movable(r, settings, now) and r.name not in moved]):
            if len(business.replicas) <= release_to or (not over_max and budget <= 0):
                break
            budget -= 0 if over_max else 1
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
    elif unmet > 0:  # say why nothing more happens: a newcomer saw a pressured business and no word of it
        waiting_for.append(f"cannot scale out: scaleOut is off ({unmet} replica(s) wanted beyond the pool)")
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
        memory=AutopilotMemory(
            pressure_since, surplus_since, surplus_peak, spares_surplus_since,
            {name: at for name, at in acquired_at.items()
             if now - at < max(settings.stabilization_seconds, settings.panic_window_seconds, TTFT_WINDOW_S)},
            calm_since, traffic_at, (*moves_at, *(now for _ in moves)), short_at, needed_recently),
        short_of_gpus=short_of_gpus, wanting={name: n for name, n in want.items() if n > 0},
    )
