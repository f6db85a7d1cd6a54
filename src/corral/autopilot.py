"""The autopilot loop: warm capacity follows demand across a pool's businesses.

Level-triggered, like the reconciler: every `interval_s` it observes each enabled pool (replicas,
pins, the engines' signals from `corral.signals`, the gateway's traffic per business service),
asks the pure `corral.domain.autopilot.decide` what to do, and carries the decision out through the
controller — which records the intent (a history row per moved replica, with its reason, and the
decision's summary row) before acting, under the pool's lock, exactly as a person's change. So a
crash mid-decision leaves the whole move or none of it, and the next tick decides again from what
is there. What must survive between ticks for hysteresis (since when a pressure has held, when a
replica was last moved) is kept in memory: after a restart the autopilot waits one stabilisation
window and one cooldown before it moves anything, which errs on the side of doing nothing.

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
    AutopilotMemory,
    BusinessDemand,
    BusinessLoad,
    BusinessPolicy,
    Decision,
    PoolAutopilot,
    ReplicaState,
    decide,
    pressure,
)
from corral.domain.errors import CorralError, Hint, NotFound
from corral.domain.history import Action, HistoryDraft
from corral.domain.models import Pod, Service
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


def policy_of(spec: BusinessPolicySpec) -> BusinessPolicy:
    return BusinessPolicy(min_replicas=spec.minReplicas, max_replicas=spec.maxReplicas, priority=spec.priority,
                          ttft_p90_ms=spec.target.ttftP90Ms, waiting_per_replica=spec.target.waitingPerReplica,
                          concurrency_per_replica=spec.target.concurrencyPerReplica)


def settings_of(spec: AutopilotSpec) -> PoolAutopilot:
    return PoolAutopilot(
        enabled=spec.enabled, warm_spares=spec.warmSpares, cooldown_seconds=spec.cooldownSeconds, scale_out=spec.scaleOut,
        scale_in=spec.scaleIn, max_replicas=spec.maxReplicas, stabilization_seconds=spec.stabilizationSeconds,
        release_after_seconds=spec.releaseAfterSeconds, scale_in_after_seconds=spec.scaleInAfterSeconds,
        replica_concurrency=spec.replicaConcurrency,
    )


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
    ) -> None:
        self.controller = controller
        self.store = store
        self.bus = bus
        self.traffic = traffic
        self.free_gpu_units = free_gpu_units
        self.interval_s = interval_s
        self.signals = signals or EngineSignals()
        self._memory: dict[str, AutopilotMemory] = {}
        self._moved_at: dict[str, float] = {}
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
            raise NotFound(f"business service '{name}' not found", Hint.LIST_SERVICES)
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

    def _observe(self, pool: str) -> tuple[list[ReplicaState], dict[str, BusinessDemand], dict[str, ReplicaSignal]]:
        pods, services, policies = self._pool_view(pool)
        pinned = self.store.pins()
        traffic = self.traffic()
        signals = {p.name: self.signals.of(p.name) for p in pods}
        replicas = [
            ReplicaState(p.name, p.business or L.UNASSIGNED, ready=p.ready, pinned=p.name in pinned,
                         moved_at=self._moved_at.get(p.name), running=signals[p.name].running or 0.0,
                         waiting=signals[p.name].waiting or 0.0)
            for p in pods
        ]
        demands = {}
        for business, these in services.items():
            seen = [traffic.get(s.name, ServiceTraffic()) for s in these]
            members = [p.name for p in pods if p.business == business and p.ready]
            _, engine_p90, count = self.signals.ttft_of(members)
            gateway_p90 = max((t.ttfb_p90_ms for t in seen if t.ttfb_p90_ms is not None), default=None)
            demands[business] = BusinessDemand(
                policy=policy_of(policies[business]),
                requests_per_second=sum(t.requests_per_second for t in seen),
                rejected_per_second=sum(t.rejected_per_second for t in seen),
                ttft_p90_ms=engine_p90 if count else gateway_p90,
            )
        return replicas, demands, signals

    # the loop -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="autopilot")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.signals.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad tick must not stop the autopilot; the next one decides again
                log.exception("autopilot tick failed")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        """Scrape the pools that have autopilot settings; decide and act for the enabled ones."""
        configured = {pool: AutopilotSpec.model_validate(raw) for pool, raw in self.store.autopilots().items()}
        pools = [pool for pool in configured if self.controller.deployment(pool) is not None]
        if not pools:
            return
        await self.signals.scrape([p for pool in pools for p in self.controller.pods(pool)])
        self.store.forget_pins(p.name for p in self.controller.pods())
        for pool in pools:
            if configured[pool].enabled:
                await self._drive(pool, settings_of(configured[pool]))

    async def _drive(self, pool: str, settings: PoolAutopilot) -> None:
        replicas, demands, _ = self._observe(pool)
        deployment = self.controller.deployment(pool)
        if deployment is None:
            return
        now = time.monotonic()
        free = self.free_gpu_units() if deployment.gpus_per_replica > 0 else None
        decision = decide(replicas, demands, settings, self._memory.get(pool, AutopilotMemory()), now,
                          free_gpu_units=free, gpus_per_replica=deployment.gpus_per_replica)
        self._memory[pool] = decision.memory
        self._waiting_for[pool] = list(decision.waiting_for)
        if decision.short_of_gpus and decision.wanting and self.controller.preemptor is not None:
            await self._preempt_and_scale(pool, decision, demands, deployment.gpus_per_replica, len(replicas), now)
        elif decision.acts:
            await self._carry_out(pool, decision, len(replicas), now)

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
            if carried.acts:
                await self._carry_out(pool, carried, replicas, now)

        await self.controller.scale_with_preemption(pool, extra * gpus_per_replica, onto_freed,
                                                    business=(business, demands[business].policy.priority))

    async def _carry_out(self, pool: str, decision: Decision, replicas: int, now: float) -> None:
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
                                            reason=f"autopilot: {decision.scale_reason}")
                scaled_to = decision.scale_to
                self.counters[(pool, "scale_out")] += 1
            if decision.remove:
                removed = await self.controller.remove_spares(pool, decision.remove, f"autopilot: {decision.scale_reason}")
                if removed:
                    self.counters[(pool, "scale_in")] += 1
        except CorralError as exc:  # recorded by the controller's intent rows; surfaced in the status too
            error = exc.message
            self.counters[(pool, "errors")] += 1
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
        settings = self.settings(pool)
        replicas, demands, signals = self._observe(pool)
        _, services, policies = self._pool_view(pool)
        businesses = []
        for business, demand in demands.items():
            members = [r for r in replicas if r.business == business]
            ready = [r for r in members if r.ready]
            scraped = [signals[r.name] for r in ready if signals[r.name].scraped]
            businesses.append(AutopilotBusiness(
                business=business, services=[s.name for s in services[business]], policy=policies[business],
                replicas=len(members), readyReplicas=len(ready), pinned=sum(1 for r in members if r.pinned),
                running=sum(s.running or 0.0 for s in scraped) if scraped else None,
                waiting=sum(s.waiting or 0.0 for s in scraped) if scraped else None,
                ttftP90Ms=demand.ttft_p90_ms, requestsPerSecond=round(demand.requests_per_second, 3),
                rejectedPerSecond=round(demand.rejected_per_second, 3),
                pressure=pressure(BusinessLoad(business, demand, members), settings.replicaConcurrency),
            ))
        return AutopilotStatus(
            pool=pool, settings=settings, businesses=businesses,
            replicas=[AutopilotReplica(pod=r.name, business=r.business, ready=r.ready, pinned=r.pinned,
                                       running=signals[r.name].running, waiting=signals[r.name].waiting,
                                       kvCacheUsage=signals[r.name].kv_cache_usage, ttftP90Ms=signals[r.name].ttft_p90_ms,
                                       movedAt=_iso(r.moved_at) if r.moved_at is not None else None) for r in replicas],
            decisions=list(self._decisions.get(pool, ())),
            waitingFor=self._waiting_for.get(pool, []) if settings.enabled else [],
        )

    def metrics(self) -> list[str]:
        lines = ["# HELP corral_autopilot_actions_total What the autopilot did, per pool: replicas moved, "
                 "scale-outs, scale-ins, refused actions.",
                 "# TYPE corral_autopilot_actions_total counter"]
        lines += [f'corral_autopilot_actions_total{{pool="{pool}",kind="{kind}"}} {n}'
                  for (pool, kind), n in sorted(self.counters.items())]
        return lines
