"""The autopilot across models (issue 31, items 3 and 4): on GPUs that `sharedGpus` pools share, the replica of a
model with demand and nothing awake is woken, and a calm one put to sleep to make room (`domain.model_swap.decide`).

The loop reads what the gateway sees — requests held per business service (the demand signal: the gateway holds
a request for a model whose replicas all sleep), requests per second, in flight per replica — and the replicas'
sleep states on their GPU units; `decide` returns hand-overs, carried out through `SleepManager` (intent first:
each sleep and wake is a history row before the engine is called, reconciled after a crash), a SWAP as: the donor
leaves routing, its requests in flight finish (drained, bounded by the drain timeout), it sleeps, then the other
wakes. A hand-over in progress keeps its unit: the next decisions see the donor draining and the sleeper waking.

The Python gateway pokes the loop when it holds a request (`poke`), so a wake starts at once; the nginx plane's held
counters arrive with the counters' refresh (about a second). A model with requests held and no replica asleep
anywhere (its sharedGpus pool at 0, or every replica busy elsewhere) is cold-started: its pool scaled by one onto a
GPU where nothing is awake (the ledger places it); idle awake replicas sleep after `CORRAL_SLEEP_IDLE_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from corral.aio import stop, woken_or_every
from corral.backends.base import Backend
from corral.domain.model_swap import (
    Handover,
    HandoverKind,
    ModelDemand,
    Occupancy,
    Occupant,
    SwapPolicy,
    decide,
)
from corral.domain.models import Deployment, Pod
from corral.domain.sleep import SleepLevel, SleepState
from corral.gateway.monitor import BusinessTraffic
from corral.sleeping import SleepManager

log = logging.getLogger("corral.model_swaps")


def occupancy(pod: Pod) -> Occupancy:
    """A replica's place on its unit, from its recorded sleep state (domain/sleep.py)."""
    if pod.sleep_level is not None:
        return Occupancy.SLEEPING if pod.sleep is SleepState.SLEEPING else Occupancy.DRAINING
    if pod.sleep is SleepState.WAKING:
        return Occupancy.WAKING
    return Occupancy.AWAKE if pod.ready else Occupancy.STARTING


@dataclass
class _Seen:
    state: Occupancy
    since: float
    last_request_at: float | None = None


class ModelSwaps:
    def __init__(self, backend: Backend, sleeping: SleepManager, *,
                 traffic: Callable[[], Mapping[str, BusinessTraffic]],
                 held_now: Callable[[], Mapping[str, int]],
                 in_flight: Callable[[], Mapping[str, int] | None],
                 scale: Callable[[str, int, str, str], Awaitable[None]] | None = None,
                 cold_start_units: Callable[[], list[str]] = list,
                 drain_timeout_s: float, policy: SwapPolicy = SwapPolicy(), interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.sleeping = sleeping
        self.traffic = traffic
        self.held_now = held_now
        self.in_flight = in_flight
        self.scale = scale  # pool, target replicas, why, business: a cold start of a model that sleeps nowhere
        self.cold_start_units = cold_start_units
        self.drain_timeout_s = drain_timeout_s
        self.policy = policy
        self.interval_s = interval_s
        self.clock = clock
        self.handovers = 0
        self._seen: dict[str, _Seen] = {}  # replica → its state and since when, as this loop saw it
        self._held_since: dict[str, float] = {}  # model → when held requests were first seen (their oldest, about)
        self._busy: set[str] = set()  # units with a hand-over being carried out
        self._pools: dict[str, Deployment] = {}  # model → its sharedGpus pool, as last seen
        self._waiting_business: dict[str, str] = {}  # model → the business with the most requests held for it
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.sleeping.supported:
            self._task = asyncio.create_task(self._run(), name="model-swaps")

    async def close(self) -> None:
        for task in (self._task, *self._tasks):
            await stop(task)

    def poke(self, service: str) -> None:
        """The gateway held a request of `service`: decide now, not at the next tick."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await woken_or_every(self._wake, self.interval_s)
            try:
                self.tick()
            except Exception:  # one bad tick must not end the loop
                log.exception("model swap tick failed")

    # deciding ----------------------------------------------------------------------------------
    def tick(self) -> list[Handover]:
        """Observe, decide, and start the hand-overs decided (each in its own task)."""
        now = self.clock()
        shared = {d.name: d for d in self.backend.list_deployments() if d.shared_gpus}
        if not shared:
            return []
        in_flight = self.in_flight() or {}
        occupants = []
        seen_before, self._seen = self._seen, {}  # kept for the replicas that still exist only
        for pod in self.backend.list_pods():
            if pod.deployment not in shared or not pod.gpu_ids or pod.model is None:
                continue
            state = occupancy(pod)
            seen = seen_before.get(pod.name)
            if seen is None or seen.state is not state:
                seen = _Seen(state, now, seen.last_request_at if seen else None)
            self._seen[pod.name] = seen
            if in_flight.get(pod.name, 0) > 0:
                seen.last_request_at = now
            occupants.append(Occupant(pod.name, pod.model, str(pod.gpu_ids[0]), state, in_flight.get(pod.name, 0),
                                      seen.last_request_at, seen.since))
        demand = self._demand(now, {d.model_tag for d in shared.values()})  # a pool at 0 replicas too
        # Where a cold start could go: read only when some model has requests held (decide cold-starts for no other).
        waiting = any(d.held for d in demand.values())
        units = self.cold_start_units() if self.scale is not None and waiting else []
        decisions = [d for d in decide(occupants, demand, now, self.policy, cold_start_units=units)
                     if d.unit not in self._busy]
        self._pools = {d.model_tag: d for d in sorted(shared.values(), key=lambda d: d.name)}
        for handover in decisions:
            self._busy.add(handover.unit)
            task = asyncio.get_running_loop().create_task(self._carry_out(handover), name=f"handover-{handover.unit}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return decisions

    def _demand(self, now: float, models: set[str]) -> dict[str, ModelDemand]:
        held_now = self.held_now()
        held: dict[str, int] = {}
        rate: dict[str, float] = {}
        most: dict[str, int] = {}
        for service in self.backend.list_services():
            if service.model in models and service.is_business_service:
                count = held_now.get(service.name, 0)
                held[service.model] = held.get(service.model, 0) + count
                if count > most.get(service.model, 0) and service.business:
                    most[service.model] = count
                    self._waiting_business[service.model] = service.business
        for name, seen in self.traffic().items():
            service = self.backend.get_service(name)
            if service is not None and service.model in models:
                rate[service.model] = rate.get(service.model, 0.0) + seen.figures.requests_per_s + seen.unserved_per_s
        demand = {}
        for model in models:
            count = held.get(model, 0)
            if count:
                self._held_since.setdefault(model, now)
            else:
                self._held_since.pop(model, None)
            if count or rate.get(model):
                # A model whose requests wait is asked at least that much (a burst on a sleeping model has no rate yet).
                demand[model] = ModelDemand(count, self._held_since.get(model), max(rate.get(model, 0.0), float(count)))
        return demand

    # acting ------------------------------------------------------------------------------------
    async def _carry_out(self, handover: Handover) -> None:
        log.info("model hand-over: %s", handover.describe())
        self.handovers += 1
        try:
            if handover.kind is HandoverKind.COLD_START and self.scale is not None:
                pool = self._pools[handover.model]  # the model's sharedGpus pool: one more replica, placed by the ledger
                await self.scale(pool.name, pool.replicas + 1, handover.describe(),
                                 self._waiting_business[handover.model])
                return
            if handover.sleep is not None:
                await self.sleeping.sleep(handover.sleep, SleepLevel.OFFLOAD, reason=handover.describe(),
                                          before_call=self._drained)
            if handover.wake is not None:
                await self.sleeping.wake(handover.wake, reason=handover.describe())
        except Exception as exc:  # recorded in its history row; the next tick decides again
            log.warning("model hand-over on GPU %s failed: %s", handover.unit, exc)
        finally:
            self._busy.discard(handover.unit)
            self._wake.set()

    async def _drained(self, name: str) -> None:
        """Wait until `name`, out of routing now, has no request in flight (at most the drain timeout)."""
        deadline = self.clock() + self.drain_timeout_s
        while (self.in_flight() or {}).get(name, 0) > 0 and self.clock() < deadline:
            await asyncio.sleep(0.05)

