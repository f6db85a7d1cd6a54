"""The autopilot loop: warm capacity follows demand across a pool's businesses.

Level-triggered, like the reconciler: every `interval_s` it observes each enabled pool (replicas,
pins, the engines' signals from `corral.signals`, the gateway's traffic per business service),
asks the pure `corral.domain.autopilot.decide` what to do, and carries the decision out through the
controller — which records the intent (a history row per moved replica, with its reason, and the
decision's summary row) before acting, under the pool's lock, exactly as a person's change. So a
crash mid-decision leaves the whole move or none of it, and the next tick decides again from what
is there. What must survive between ticks for hysteresis (since when a pressure has held, each
business's load over its windows) is kept in memory: after a restart the autopilot waits one stable
window before a business donates, which errs on the side of doing nothing. When each replica was last
moved is read back from the history rows at start, so a restart never cuts a cooldown short.

Signals: each replica's load is its engine's fresh `/metrics` reading (`corral.signals`), else the
gateway's in-flight count for it (the gateway sees every request: engines without `/metrics` work on it
alone), else *unknown* — never idle, and nothing is taken from a business whose demand is unknown.
Per business, the load of each tick goes into its stable and panic windows. Traffic and in-flight
counts are read once per tick for every pool. Scale-outs (and the preemptions they may wait for: a
trainer checkpointing for minutes) run in a background task per pool, after the warm moves, so they
never hold back a move of this pool or any other.

Policies, settings and pins are desired state in the store (`PUT /api/business-services/{name}/policy`,
`PUT /api/autopilot/{pool}`, a manual assignment while the autopilot is on); nothing here is only
logged: every decision carried out is a history row, an `autopilot` event on the bus (and `/ws`),
a counter on `/api/metrics`, and an entry in `GET /api/autopilot/{pool}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from corral.controller import Controller
from corral.domain import labels as L
from corral.domain.autopilot import (
    DEFAULT_REPLICA_CONCURRENCY,
    AutopilotMemory,
    BusinessDemand,
    BusinessLoad,
    BusinessPolicy,
    Decision,
    Load,
    LoadWindows,
    PoolAutopilot,
    ReplicaState,
    Source,
    decide,
    engine_batch_limit,
    pressure,
    replicas_load,
)
from corral.domain.errors import CorralError, Hint, NotFound
from corral.domain.history import Action, HistoryDraft, Intent
from corral.domain.models import Deployment, Pod, Service
from corral.domain.preemption import PreemptionOutcome, PreemptionRequest
from corral.events import EventBus, EventType
from corral.signals import EngineSignals, ReplicaSignal
from corral.store.state import StateStore
from corral.views import (
    AutopilotBusiness,
    AutopilotDecisionView,
    AutopilotMoveView,
    AutopilotReplica,
    AutopilotSpec,
    AutopilotStatus,
    BusinessPolicySpec,
)

log = logging.getLogger("corral.autopilot")
DECISIONS_KEPT = 50


@dataclass(frozen=True)
class ServiceTraffic:
    """What the gateway saw of one business service over the last seconds."""

    requests_per_second: float = 0.0
    rejected_per_second: float = 0.0
    ttfb_p90_ms: float | None = None
    held: float = 0.0  # requests the gateway holds for it (no replica free): demand too


InFlight = Callable[[], Mapping[str, int] | None]  # the gateway's in-flight requests per replica; None: not known


def policy_of(spec: BusinessPolicySpec) -> BusinessPolicy:
    return BusinessPolicy(min_replicas=spec.minReplicas, max_replicas=spec.maxReplicas, priority=spec.priority,
                          ttft_p90_ms=spec.target.ttftP90Ms, waiting_per_replica=spec.target.waitingPerReplica,
                          concurrency_per_replica=spec.target.concurrencyPerReplica)


def replica_concurrency(spec: AutopilotSpec, deployment: Deployment | None) -> tuple[int, str]:
    """Sequences one replica runs at once and where that figure came from: the settings, else the engine's
    own batch limit in the pool's engine args (`--max-num-seqs`, `--max-running-requests`) or its default."""
    if spec.replicaConcurrency is not None:
        return spec.replicaConcurrency, "settings"
    limit = engine_batch_limit(deployment.engine, deployment.engine_args) if deployment is not None else None
    return (limit, "engine") if limit is not None else (DEFAULT_REPLICA_CONCURRENCY, "default")


def settings_of(spec: AutopilotSpec, deployment: Deployment | None = None) -> PoolAutopilot:
    return PoolAutopilot(
        enabled=spec.enabled, warm_spares=spec.warmSpares, cooldown_seconds=spec.cooldownSeconds, scale_out=spec.scaleOut,
        scale_in=spec.scaleIn, max_replicas=spec.maxReplicas, stabilization_seconds=spec.stabilizationSeconds,
        release_after_seconds=spec.releaseAfterSeconds, scale_in_after_seconds=spec.scaleInAfterSeconds,
        replica_concurrency=replica_concurrency(spec, deployment)[0], target_utilisation=spec.targetUtilisation,
        hysteresis_band=spec.hysteresisBand, stable_window_seconds=spec.stableWindowSeconds,
        panic_window_seconds=spec.panicWindowSeconds, moves_per_window=spec.movesPerWindow,
    )


def replica_state(pod: Pod, signal: ReplicaSignal, in_flight: Mapping[str, int] | None, *, pinned: bool,
                  moved_at: float | None) -> ReplicaState:
    """A replica's load for the decision: its engine's fresh reading, else the gateway's in-flight requests
    to it, else unknown (never idle: a failed scrape under load would give a busy business's replicas away)."""
    base = ReplicaState(pod.name, pod.business or L.UNASSIGNED, ready=pod.ready, pinned=pinned, moved_at=moved_at)
    if signal.scraped and signal.running is not None:
        return replace(base, running=signal.running, waiting=signal.waiting or 0.0,
                       kv_cache_usage=signal.kv_cache_usage, source=Source.ENGINE)
    if in_flight is not None:
        return replace(base, running=float(in_flight.get(pod.name, 0)), source=Source.GATEWAY)
    return replace(base, source=Source.UNKNOWN)


def _iso(at: float) -> str:
    """A monotonic time as wall-clock ISO 8601 (for people and the API)."""
    return (datetime.now(timezone.utc) - timedelta(seconds=time.monotonic() - at)).isoformat(timespec="seconds")


class Autopilot:
    def __init__(
        self,
        controller: Controller,
        store: StateStore,
        bus: EventBus,
        *,
        traffic: Callable[[], Mapping[str, ServiceTraffic]],
        free_gpu_units: Callable[[], int],
        interval_s: float = 0.5,
        signals: EngineSignals | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self.controller = controller
        self.store = store
        self.bus = bus
        self.traffic = traffic
        self.free_gpu_units = free_gpu_units
        self.interval_s = interval_s
        self.signals = signals or EngineSignals()
        self.in_flight = in_flight or (lambda: None)
        self._memory: dict[str, AutopilotMemory] = {}
        self._moved_at: dict[str, float] = {}
        self._loads: dict[tuple[str, str], LoadWindows] = {}  # (pool, business) → its stable and panic windows
        self._scaling: dict[str, asyncio.Task] = {}  # pool → its scale-out / preemption / scale-in in progress
        self._decisions: dict[str, deque[AutopilotDecisionView]] = {}
        self._waiting_for: dict[str, list[str]] = {}
        self.counters: Counter[tuple[str, str]] = Counter()  # (pool, kind) → count, for /api/metrics
        self._task: asyncio.Task | None = None

    # desired state: policies and settings --------------------------------------------------------
    def policy(self, service: str) -> BusinessPolicySpec:
        self._business_service(service)
        stored = self.store.policies().get(service)
        return BusinessPolicySpec.model_validate(stored) if stored else BusinessPolicySpec()

    def set_policy(self, service: str, spec: BusinessPolicySpec) -> BusinessPolicySpec:
        before = self.policy(service)
        self.store.set_policy(service, spec.wire(), HistoryDraft(Action.POLICY, service, before=before.wire(), after=spec.wire(),
                                                                 message="business policy set"))
        return spec

    def settings(self, pool: str) -> AutopilotSpec:
        self.controller.pool_status(pool)  # 404 for a pool that does not exist
        stored = self.store.autopilots().get(pool)
        return AutopilotSpec.model_validate(stored) if stored else AutopilotSpec()

    def set_settings(self, pool: str, spec: AutopilotSpec) -> AutopilotStatus:
        before = self.settings(pool)
        switched = "" if before.enabled == spec.enabled else (" (enabled)" if spec.enabled else " (disabled)")
        self.store.set_autopilot(pool, spec.wire(), HistoryDraft(Action.POLICY, pool, before=before.wire(), after=spec.wire(),
                                                                 message=f"autopilot settings{switched}"))
        if not spec.enabled:
            self._memory.pop(pool, None)
        return self.status(pool)

    def _business_service(self, name: str) -> Service:
        service = self.controller.service(name)
        if service is None or not service.is_business_service:
            raise L.unknown_name(name, "business service", NotFound(f"business service '{name}' not found",
                                                                      Hint.LIST_SERVICES))
        return service

    # observing -------------------------------------------------------------------------------------
    def _pool_view(self, pool: str) -> tuple[list[Pod], dict[str, list[Service]], dict[str, BusinessPolicySpec]]:
        """The pool's replicas and, per business, its services and policy: `Controller.pool_businesses`, the
        query preemption and reclaim rank the pool by, so a business has one policy and one priority."""
        businesses = self.controller.pool_businesses(pool).businesses
        services = {name: list(business.services) for name, business in businesses.items()}
        policies = {name: BusinessPolicySpec.model_validate(business.policy) if business.policy
                    else BusinessPolicySpec() for name, business in businesses.items()}
        return self.controller.pods(pool), services, policies

    def _observe(self, pool: str, settings: PoolAutopilot, traffic: Mapping[str, ServiceTraffic],
                 in_flight: Mapping[str, int] | None, *, record: bool = False,
                 ) -> tuple[list[ReplicaState], dict[str, BusinessDemand], dict[str, ReplicaSignal]]:
        """The pool's replicas and demands now; `record`: this tick's load goes into each business's windows
        (the status reads the windows without adding to them)."""
        pods, services, policies = self._pool_view(pool)
        pinned = self.store.pins()
        signals = {p.name: self.signals.of(p.name) for p in pods}
        replicas = [replica_state(p, signals[p.name], in_flight, pinned=p.name in pinned,
                                  moved_at=self._moved_at.get(p.name)) for p in pods]
        now = time.monotonic()
        demands = {}
        for business, these in services.items():
            seen = [traffic.get(s.name, ServiceTraffic()) for s in these]
            members = [r for r in replicas if r.business == business and r.ready]
            _, engine_p90, count = self.signals.ttft_of(r.name for r in members)
            gateway_p90 = max((t.ttfb_p90_ms for t in seen if t.ttfb_p90_ms is not None), default=None)
            held = sum(t.held for t in seen)
            known = all(r.source != Source.UNKNOWN for r in members)
            load = replicas_load(members, held)
            windows = self._loads.setdefault((pool, business), LoadWindows())
            if record:
                windows.add(now, load, known, settings.stable_window_seconds)
            demands[business] = BusinessDemand(
                policy=policy_of(policies[business]),
                requests_per_second=sum(t.requests_per_second for t in seen),
                rejected_per_second=sum(t.rejected_per_second for t in seen),
                ttft_p90_ms=engine_p90 if count else gateway_p90, held=held,
                stable=windows.mean(now, settings.stable_window_seconds) or load,
                panic=windows.mean(now, settings.panic_window_seconds) or load,
                known=known and windows.known(now, settings.stable_window_seconds),
            )
        return replicas, demands, signals

    # the loop -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.restore_cooldowns()
        self._task = asyncio.create_task(self._loop(), name="autopilot")

    def restore_cooldowns(self, now: float | None = None) -> None:
        """When each replica was last moved by the autopilot, from its history rows (any outcome: a row whose
        routing push lagged still moved the replica), so that a restart does not cut a cooldown short."""
        now = time.monotonic() if now is None else now
        wall = datetime.now(timezone.utc)
        longest = max([AutopilotSpec.model_validate(raw).cooldownSeconds for raw in self.store.autopilots().values()],
                      default=0.0)
        for row in self.store.history(action=Action.ASSIGN.value, limit=1000):
            if not str(row.get("message", "")).startswith("autopilot:"):
                continue
            age = (wall - datetime.fromisoformat(row["timestamp"])).total_seconds()
            if age > longest:
                break  # newest first: the rest are older
            pod = row["target"]
            self._moved_at[pod] = max(self._moved_at.get(pod, -float("inf")), now - max(0.0, age))

    async def close(self) -> None:
        tasks = [t for t in [self._task, *self._scaling.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.signals.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad tick must not stop the autopilot; the next one decides again
                log.exception("autopilot tick failed")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        """Scrape the pools that have autopilot settings; decide and act for the enabled ones. The gateway's
        traffic and in-flight counts are read once for all pools."""
        configured = {pool: AutopilotSpec.model_validate(raw) for pool, raw in self.store.autopilots().items()}
        deployments = {pool: self.controller.deployment(pool) for pool in configured}
        pools = [pool for pool in configured if deployments[pool] is not None]
        if not pools:
            return
        await self.signals.scrape([p for pool in pools for p in self.controller.pods(pool)])
        self.store.forget_pins(p.name for p in self.controller.pods())
        traffic, in_flight = self.traffic(), self.in_flight()
        for pool in pools:
            if configured[pool].enabled:
                await self._drive(pool, settings_of(configured[pool], deployments[pool]), traffic, in_flight)
                # A pool with nothing to do decides without awaiting anything: hand the loop back between pools
                # so that the API and the gateway wait one pool's decision at most, not every pool's in a row.
                await asyncio.sleep(0)

    async def _drive(self, pool: str, settings: PoolAutopilot, traffic: Mapping[str, ServiceTraffic],
                     in_flight: Mapping[str, int] | None) -> None:
        replicas, demands, _ = self._observe(pool, settings, traffic, in_flight, record=True)
        deployment = self.controller.deployment(pool)
        if deployment is None:
            return
        now = time.monotonic()
        free = self.free_gpu_units() if deployment.gpus_per_replica > 0 else None
        decision = decide(replicas, demands, settings, self._memory.get(pool, AutopilotMemory()), now,
                          free_gpu_units=free, gpus_per_replica=deployment.gpus_per_replica)
        self._memory[pool] = decision.memory
        self._waiting_for[pool] = list(decision.waiting_for)
        # The warm moves first, now; then what waits on GPUs (a scale-out, a preemption) or removes replicas, in
        # the pool's background task: a trainer checkpointing for minutes holds back no move.
        if decision.moves:
            await self._carry_out(pool, replace(decision, scale_to=None, remove=()), len(replicas), now)
        preempt = decision.short_of_gpus and decision.wanting and self.controller.preemptor is not None
        if not (preempt or decision.scales):
            return
        running = self._scaling.get(pool)
        if running is not None and not running.done():
            self._waiting_for[pool].append("a scale change of this pool is still being carried out")
            return
        scaling = replace(decision, moves=())
        if preempt:
            work = self._preempt_and_scale(pool, scaling, demands, deployment.gpus_per_replica, len(replicas), now)
        else:
            work = self._carry_out(pool, scaling, len(replicas), now)
        self._scaling[pool] = asyncio.create_task(self._guarded(work), name=f"autopilot-scale-{pool}")

    @staticmethod
    async def _guarded(work) -> None:
        try:
            await work
        except Exception:  # a failed scale is recorded by the controller's intent rows; the next tick decides again
            log.exception("autopilot scale change failed")

    async def _preempt_and_scale(self, pool: str, decision: Decision, demands: Mapping[str, BusinessDemand],
                                 gpus_per_replica: int, replicas: int, now: float) -> None:
        """A business wants replicas and no GPU is free: preemptible finetune tasks below its priority (the one
        scale, `domain.preemption`) checkpoint and give their GPUs, and the scale-out proceeds onto them while
        they are kept from the finetune queue (`Controller.scale_with_preemption`). The business speaking is
        the highest-priority one still wanting replicas; the decision scales out by the replicas it was short
        of only once GPUs were freed, and is carried out (its moves too) inside the preemption either way."""
        business = min(decision.wanting, key=lambda b: (-demands[b].policy.priority, b))
        extra = min(decision.short_of_gpus, sum(decision.wanting.values()))
        target = (decision.scale_to if decision.scale_to is not None else replicas) + extra

        async def onto_freed(request: PreemptionRequest, outcome: PreemptionOutcome) -> None:
            carried = decision
            if outcome.tasks:
                reason = (f"{decision.scale_reason + '; ' if decision.scale_reason else ''}{business} wants "
                          f"{decision.wanting[business]} more replica(s): preempted finetune task(s) "
                          f"{', '.join(outcome.tasks)} for {request.describe()}, "
                          f"scale out {replicas} → {target}")
                carried = replace(decision, scale_to=target, scale_reason=reason)
            elif outcome.why_not:
                self._waiting_for[pool].append(f"cannot preempt for {business}: {outcome.why_not}")
            if carried.acts:  # the scale completes the row recorded with the preemption (`outcome.scale`)
                await self._carry_out(pool, carried, replicas, now, scale_intent=outcome.scale)

        await self.controller.scale_with_preemption(pool, extra * gpus_per_replica, onto_freed,
                                                    business=(business, demands[business].policy.priority),
                                                    target=target)

    async def _carry_out(self, pool: str, decision: Decision, replicas: int, now: float,
                         scale_intent: Intent | None = None) -> None:
        summary = "; ".join(m.reason for m in decision.moves[:3]) + (f" (+{len(decision.moves) - 3} more)"
                                                                    if len(decision.moves) > 3 else "")
        error = None
        moved: list = []
        scaled_to, removed = None, []
        try:
            if decision.moves:
                moved = await self.controller.autopilot_moves(pool, decision.moves, summary or "autopilot")
                for move in moved:
                    self._moved_at[move.pod] = now
                self.counters[(pool, "moves")] += len(moved)
            if decision.scale_to is not None:
                await self.controller.scale(pool, decision.scale_to, pool_endpoint=True,
                                            reason=f"autopilot: {decision.scale_reason}", intent=scale_intent)
                scaled_to = decision.scale_to
                self.counters[(pool, "scale_out")] += 1
            if decision.remove:
                removed = await self.controller.remove_spares(pool, decision.remove, f"autopilot: {decision.scale_reason}")
                if removed:
                    self.counters[(pool, "scale_in")] += 1
        except CorralError as exc:  # recorded by the controller's intent rows; surfaced in the status too
            error = exc.message
            self.counters[(pool, "errors")] += 1
            # A routing push that lagged (`Unavailable`) after the labels were committed still moved the replicas:
            # their cooldown starts now, or the next tick could move them straight back.
            where = {p.name: p.business or L.UNASSIGNED for p in self.controller.pods(pool)}
            for move in decision.moves:
                if where.get(move.pod) == move.target and move not in moved:
                    self._moved_at[move.pod] = now
                    moved.append(move)
        if not (moved or scaled_to is not None or removed or error):
            return  # everything it meant to do no longer held under the lock: nothing happened
        view = AutopilotDecisionView(
            at=_iso(now), moves=[AutopilotMoveView(podName=m.pod, source=m.source, target=m.target, reason=m.reason) for m in moved],
            scaledTo=scaled_to, removed=removed, reason=decision.scale_reason or summary, error=error,
        )
        self._decisions.setdefault(pool, deque(maxlen=DECISIONS_KEPT)).appendleft(view)
        self.bus.publish(EventType.AUTOPILOT, {"pool": pool, **view.wire()})

    # reading --------------------------------------------------------------------------------------
    def status(self, pool: str) -> AutopilotStatus:
        spec = self.settings(pool)
        deployment = self.controller.deployment(pool)
        settings = settings_of(spec, deployment)
        replicas, demands, signals = self._observe(pool, settings, self.traffic(), self.in_flight())
        _, services, policies = self._pool_view(pool)
        businesses = []
        for business, demand in demands.items():
            members = [r for r in replicas if r.business == business]
            ready = [r for r in members if r.ready]
            scraped = [signals[r.name] for r in ready if signals[r.name].scraped]
            sources = {r.source for r in ready}
            source = (Source.UNKNOWN if Source.UNKNOWN in sources or not demand.known
                      else Source.GATEWAY if Source.GATEWAY in sources else Source.ENGINE)
            stable, panic = demand.stable or Load(), demand.panic or Load()
            businesses.append(AutopilotBusiness(
                business=business, services=[s.name for s in services[business]], policy=policies[business],
                replicas=len(members), readyReplicas=len(ready), pinned=sum(1 for r in members if r.pinned),
                running=sum(s.running or 0.0 for s in scraped) if scraped else None,
                waiting=sum(s.waiting or 0.0 for s in scraped) if scraped else None,
                ttftP90Ms=demand.ttft_p90_ms, requestsPerSecond=round(demand.requests_per_second, 3),
                rejectedPerSecond=round(demand.rejected_per_second, 3),
                pressure=str(why) if (why := pressure(BusinessLoad(business, demand, members), settings)) else None,
                source=source.value, held=demand.held,
                stableLoad=None if source == Source.UNKNOWN else round(stable.total, 3),
                panicLoad=None if source == Source.UNKNOWN else round(panic.total, 3),
            ))
        concurrency, concurrency_source = replica_concurrency(spec, deployment)
        return AutopilotStatus(
            pool=pool, settings=spec, businesses=businesses,
            replicas=[AutopilotReplica(pod=r.name, business=r.business, ready=r.ready, pinned=r.pinned,
                                       running=signals[r.name].running, waiting=signals[r.name].waiting,
                                       kvCacheUsage=signals[r.name].kv_cache_usage, ttftP90Ms=signals[r.name].ttft_p90_ms,
                                       movedAt=_iso(r.moved_at) if r.moved_at is not None else None,
                                       source=r.source.value, load=None if r.source == Source.UNKNOWN else r.running + r.waiting,
                                       ageSeconds=None if signals[r.name].age_s is None else round(signals[r.name].age_s, 3))
                      for r in replicas],
            decisions=list(self._decisions.get(pool, ())),
            waitingFor=self._waiting_for.get(pool, []) if spec.enabled else [],
            replicaConcurrency=concurrency, replicaConcurrencySource=concurrency_source,
        )

    def metrics(self) -> list[str]:
        lines = ["# HELP corral_autopilot_actions_total What the autopilot did, per pool: replicas moved, "
                 "scale-outs, scale-ins, refused actions.",
                 "# TYPE corral_autopilot_actions_total counter"]
        lines += [f'corral_autopilot_actions_total{{pool="{pool}",kind="{kind}"}} {n}'
                  for (pool, kind), n in sorted(self.counters.items())]
        return lines
