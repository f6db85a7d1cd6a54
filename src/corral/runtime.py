"""The running control plane: one store, one event bus, one platform (backend, GPU inventory,
trainer runner), one gateway with its routing reconciler, one controller, one finetune manager.

The API server and the gateway share this object in one process. A change marks the routing table
dirty; the controller's mutation waits until the data plane acknowledges the rebuilt table's
version (one rebuild and one push per change, however many replicas it moved), so the next request
after an API call already follows it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import Any

from corral.adapters import AdapterManager
from corral.aio import within
from corral.autopilot import Autopilot, ServiceTraffic
from corral.backends.base import Backend
from corral.config import Settings
from corral.controller import Controller
from corral.domain.gpu_ledger import GpuLedger, units_from_devices
from corral.domain.history import Action, HistoryDraft, Outcome, TaskSeen
from corral.domain.load import WINDOW_MIN_S
from corral.domain.memory import find_model
from corral.domain.model_swap import SwapPolicy
from corral.domain.outliers import Change, OutlierEvent
from corral.domain.replica_picking import Routing
from corral.domain.tasks import TaskState
from corral.engines import get_engine, set_interpreter
from corral.events import EventBus, EventType
from corral.finetune.manager import FinetuneManager
from corral.gateway import nginx_plane
from corral.gateway.monitor import LoadMonitor
from corral.gateway.nginx_plane import NginxGateway, NginxStats
from corral.gateway.policies import make_policy
from corral.gateway.proxy import Gateway, GatewayLimits
from corral.gateway.routing import RoutingTable, build_routes
from corral.gateway.sync import DataPlaneLagging, RoutingSync
from corral.gpus.inventory import GpuInventory
from corral.metering import Metering
from corral.model_swaps import ModelSwaps
from corral.paths import make_private_dir
from corral.platform import build_platform
from corral.replica_inputs import ReplicaInputsFeed
from corral.sleeping import SleepManager
from corral.store.state import StateStore
from corral.tenancy import Tenancy
from corral.views import gpu_info

log = logging.getLogger("corral.runtime")


class Runtime:
    def __init__(self, settings: Settings, backend: Callable[[StateStore], Backend] | None = None) -> None:
        """`backend`: a factory of the backend (given the runtime's store) instead of the settings' choice."""
        make_private_dir(settings.data_dir)  # 0700, and umask 077 for what Corral writes (corral.paths)
        self.settings = settings
        self.store = StateStore(settings.database_path)
        self.bus = EventBus()
        self.store.on_record = lambda entry: self.bus.publish(EventType.HISTORY, entry)
        self.catalogue = [find_model(name) for name in settings.recommend_catalogue]
        self._gpu_task: asyncio.Task | None = None
        set_interpreter("vllm", str(settings.vllm_python) if settings.vllm_python else None)  # CORRAL_VLLM_PYTHON
        self.platform = build_platform(settings, self.store, self.gpu_ledger, backend)
        self.backend = self.platform.backend
        self.gateway = self._make_gateway(settings)
        # The data plane's reconciler: events mark the table dirty; mutations await `sync` (one push each).
        self.routing = RoutingSync(self._build_routes, self.gateway, timeout_s=settings.gateway_apply_timeout_s)
        # Businesses as tenants: keys and quotas, pushed to the data plane with the routing table (corral.tenancy).
        self.tenancy = Tenancy(self.store, self.backend.get_service, self.routing.mark_dirty, self.routing.sync,
                               last_used=self.gateway.keys_last_used, windows=self.gateway.quota_windows)
        self.backend.set_drain(self.gateway.drain)
        # LoRA adapters of running vLLM pools: desired state, loaded on every ready replica (corral.adapters).
        self.adapters = AdapterManager(self.backend, self.store, self.bus)
        # Sleeping replicas: sleep and wake, intent first, and the loop that keeps each in its recorded state.
        self.sleeping = SleepManager(self.backend, self.store, self.bus, gpu_ledger=self.gpu_ledger,
                                     routes_applied=self.routing.sync, interval_s=max(settings.health_interval_s, 0.5))
        self.controller = Controller(self.backend, self.store, self.bus, base_url=self.service_base_url,
                                     traffic=self.gateway.stats.replica_summary, routes_applied=self.routing.sync,
                                     adapters=self.adapters.views, ejections=self.gateway.ejection_views)
        self.gateway.on_outlier = self._record_outlier  # every ejection, readmission and cap refusal in the history
        self.bus.listen(self._on_event)
        # Live load per business service and replica: `self.load.snapshot(window)` / `.service(name, window)`
        # (views), `.watch()` for a `load` bus event once a second (corral.gateway.monitor).
        self.load = LoadMonitor(self.gateway.read_counters, lambda: self.gateway.table, self.controller.list_business_services,
                                self.bus, enabled=settings.load_sampling)
        # Usage per business and hour, flushed from the gateway's counters; GPU-seconds from the history (corral.metering).
        self.metering = Metering(self.store, lambda: self.gateway.stats, lambda: self.gateway.table,
                                 lambda: [p.name for p in self.backend.list_pods()], settings.usage_flush_s,
                                 settings.usage_retention_days)
        self.finetune = FinetuneManager(
            settings, self.store, self.bus, inventory=self.platform.fresh_inventory,
            ledger=self.gpu_ledger, controller=self.controller, runner=self.platform.runner,
        )
        self.controller.preemptor = self.finetune.preempting  # scale-outs for higher-priority businesses (domain.preemption)
        self.controller.observe_tasks = self._tasks_seen  # judging a preemption a restart interrupted (domain.history)
        # Warm capacity following demand (corral.autopilot): reads the load above and the engines' /metrics.
        self.autopilot = Autopilot(self.controller, self.store, self.bus, traffic=self._service_traffic,
                                   free_gpu_units=self._free_gpu_units,
                                   interval_s=settings.autopilot_interval_s, in_flight=self._in_flight_by_replica)
        # Warm capacity across models (corral.model_swaps): on GPUs sharedGpus pools share, a model with requests held
        # and nothing awake is woken, a calm one put to sleep for it; the Python gateway pokes it on every held request.
        self.model_swaps = ModelSwaps(self.backend, self.sleeping, traffic=lambda: self.load.traffic(WINDOW_MIN_S),
                                      held_now=self._held_now, in_flight=self._in_flight_by_replica,
                                      scale=self._scale_for_swap, cold_start_units=self._units_for_cold_starts,
                                      drain_timeout_s=settings.drain_timeout_s,
                                      policy=SwapPolicy(calm_s=settings.sleep_calm_s,
                                                        min_awake_s=settings.sleep_min_awake_s,
                                                        idle_sleep_s=settings.sleep_idle_s))
        if isinstance(self.gateway, Gateway):
            self.gateway.on_held = self.model_swaps.poke
        # Replica picking's engine inputs (waiting, KV cache, loaded adapters), pushed to the data plane every second.
        self.replica_inputs = ReplicaInputsFeed(lambda: self.gateway.table, self.backend.list_pods, self.adapters.loaded,
                                                self.gateway.push_inputs)

    def _tasks_seen(self) -> dict[str, TaskSeen]:
        """Every finetune task's state, GPUs and whether it was asked to give them (read once, on a start that found
        changes left pending)."""
        return {t.id: TaskSeen(TaskState(t.status), tuple(t.units), bool(t.preempted_by)) for t in self.finetune.tasks.list()}

    def _in_flight_by_replica(self) -> dict[str, int] | None:
        """The gateway's requests in flight per replica (the autopilot's load where an engine gives no reading).
        The Python gateway counts them in memory; nginx's counters are a socket round trip away, which the
        autopilot's tick must not wait for on the loop: the load monitor's newest sample of them instead."""
        stats = self.gateway.stats
        if isinstance(stats, NginxStats):
            return self.load.in_flight_by_replica()
        return dict(stats.in_flight_by_replica)

    async def _scale_for_swap(self, pool: str, target: int, reason: str, business: str) -> None:
        """A cold start across models: one more replica of `pool`, assigned at once to the business waiting for it."""
        result = await self.controller.scale(pool, target, pool_endpoint=True, reason=reason)
        for pod in result.added:
            await self.controller.assign_pod(pod, business, None, pin=False)

    def _held_now(self) -> dict[str, int]:
        """Requests the gateway holds per service now (the Python gateway's live count; nginx's last read copy)."""
        if isinstance(self.gateway, NginxGateway):
            return dict(self.gateway.traffic_now().held)
        return dict(self.gateway.stats.held)

    @property
    def gpu_inventory(self) -> GpuInventory:
        return self.platform.inventory

    def gpu_ledger(self) -> GpuLedger:
        """The one GPU ledger: the inventory's units (fresh free memory) held by the backend's replicas
        and the launched finetune tasks. Replica placement, the finetune queue and the reclaim planner
        all read this snapshot, so no GPU (or MIG slice of it) is given out twice."""
        units = units_from_devices(self.platform.fresh_inventory().schedulable_units())
        budget = self.settings.sleep_host_memory_gb
        return GpuLedger.build(units, [*self.backend.gpu_claims(), *self.finetune.gpu_claims()],
                               host_budget_bytes=None if budget is None else budget * 1024**3)

    def _free_gpu_units(self) -> int:
        """GPU units no replica or finetune task holds, for the autopilot's decision (could a scale-out be
        placed?), from the inventory the watcher last read in a thread (`_watch_gpus`, every `gpu_refresh_s`):
        not a synchronous NVML read (init, a query per device, shutdown) on the event loop for every GPU pool
        of every tick. A scale-out it decides reads NVML afresh when it places the replica (`gpu_ledger`)."""
        units = units_from_devices(self.platform.inventory.schedulable_units())
        claims = [*self.backend.gpu_claims(), *self.finetune.gpu_claims()]
        return len(GpuLedger.build(units, claims).free_units())

    def _units_for_cold_starts(self) -> list[str]:
        """GPU units where nothing is awake (free, or only sleepers of sharedGpus pools): where the model swaps may
        cold-start a model that sleeps nowhere. From the inventory last read, as `_free_gpu_units`."""
        units = units_from_devices(self.platform.inventory.schedulable_units())
        ledger = GpuLedger.build(units, [*self.backend.gpu_claims(), *self.finetune.gpu_claims()])
        free = {u.id for u in ledger.free_units(whole_only=True)}
        return [u.id for u in ledger.units if u.whole and (u.id in free or (ledger.awake_on(u.id) is None
                                                                            and ledger.sleepers_on(u.id)))]

    def _make_gateway(self, settings: Settings) -> Gateway | NginxGateway:
        choice = settings.gateway_data_plane
        limits = GatewayLimits.from_settings(settings)
        missing = nginx_plane.missing_parts()
        if choice == "nginx" and missing:
            raise RuntimeError("the nginx data plane needs: " + ", ".join(missing))
        if choice == "nginx" or (choice == "auto" and not missing):
            self.data_plane = "nginx"
            return NginxGateway(settings.data_dir / "gateway", settings.host, settings.gateway_port,
                                connect_timeout_s=settings.gateway_connect_timeout_s,
                                read_timeout_s=settings.gateway_read_timeout_s, drain_timeout_s=settings.drain_timeout_s,
                                workers=settings.gateway_workers, limits=limits, worker_user=settings.gateway_user,
                                replica_user=settings.replica_user)
        self.data_plane = "python"
        # An nginx that an earlier `corral serve` left serving (the data plane outlives its control plane) would keep
        # the gateway port and route with its last table: the Python gateway replaces it.
        nginx_plane.stop_generations(settings.data_dir / "gateway")
        return Gateway(make_policy(settings.gateway_policy), connect_timeout_s=settings.gateway_connect_timeout_s,
                       read_timeout_s=settings.gateway_read_timeout_s, health_path=self._health_path, limits=limits)

    async def start(self) -> None:
        await self.backend.start()  # recovery: re-adopt, restart, finish what a stopped control plane left
        if not self.platform.rereads_for_decisions:  # a remote inventory (a cluster's nodes): read once it is reachable
            self.platform.inventory = await self.platform.read_inventory()
        self.gateway.start()
        self.routing.start()
        try:
            await self.routing.sync()
        except DataPlaneLagging as exc:  # the reconciler keeps pushing
            log.warning("%s", exc.message)
        self.load.start(counters_from_zero=self.gateway.counters_from_zero)
        self.metering.start()
        await self.finetune.start()
        await self.controller.start()  # after recovery: closes the history rows a stopped control plane left pending
        await self.adapters.start()
        self.sleeping.start()
        self.model_swaps.start()
        await self.autopilot.start()
        self.replica_inputs.start()
        if self.platform.watches_inventory:
            self._gpu_task = asyncio.create_task(self._watch_gpus(), name="gpu-inventory")
        # What is alive after start-up (modules, settings, caches) is never garbage: frozen, it is no longer
        # walked by every full collection (70 ms pauses at 1,000 replicas otherwise; bench/control_plane.py).
        gc.freeze()

    async def close(self) -> None:
        """Stop every loop, each within a bound: a shutdown (SIGTERM) always ends, and says what was slow.
        The gateway may take the drain timeout, so that in-flight requests finish."""
        if self._gpu_task:
            self._gpu_task.cancel()
        steps = [("autopilot", self.autopilot.close, 5.0), ("replica inputs", self.replica_inputs.close, 5.0),
                 ("adapter reconciler", self.adapters.close, 5.0), ("model swaps", self.model_swaps.close, 5.0),
                 ("sleep reconciler", self.sleeping.close, 5.0),
                 ("load monitor", self.load.close, 5.0),
                 ("controller", self.controller.close, 10.0), ("finetune manager", self.finetune.close, 10.0),
                 ("routing reconciler", self.routing.close, 10.0),
                 ("gateway", self.gateway.close, self.settings.drain_timeout_s + 10),
                 ("metering", self.metering.close, 5.0),  # after the gateway: the drained requests are flushed too
                 ("backend", self.backend.close, 10.0)]
        for what, close, bound in steps:
            try:
                await within(bound, close())
            except TimeoutError:
                log.error("closing the %s took more than %.0f s; going on with the shutdown", what, bound)
        self.store.close()

    async def _watch_gpus(self) -> None:
        """Re-read the inventory periodically; publish `gpu_inventory` when something changed."""
        while True:
            await asyncio.sleep(self.settings.gpu_refresh_s)
            inventory = await self.platform.read_inventory()
            if inventory != self.platform.inventory:
                self.platform.inventory = inventory
                self.bus.publish(EventType.GPU_INVENTORY, gpu_info(inventory, self.catalogue, self.settings.finetune_memory_margin_gb))

    def _service_traffic(self) -> dict[str, ServiceTraffic]:
        """The gateway's view of each business service over the shortest window, for the autopilot: from the
        load monitor's samples and the routing table (`LoadMonitor.traffic`, computed once per sample), not
        from the service listing (every pod against every service, for each pool of each tick)."""
        return {service: ServiceTraffic(requests_per_second=seen.figures.requests_per_s,
                                        rejected_per_second=seen.unserved_per_s,
                                        ttfb_p90_ms=seen.figures.ttfb_ms[1],  # p95: the nearest figure
                                        held=seen.held)
                for service, seen in self.load.traffic(WINDOW_MIN_S).items()}

    def service_base_url(self, service: str) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        return f"http://{host}:{self.settings.gateway_port}/s/{service}/v1"

    def _build_routes(self) -> RoutingTable:
        routings = {name: Routing.from_wire(raw) for name, raw in self.store.routings().items()}  # replica picking
        services = self.backend.list_services()
        return build_routes(services, self.backend.list_pods(), self.backend.list_deployments(),
                            access=self.tenancy.route_access(services), routings=routings)

    def _on_event(self, type_: EventType, data: dict[str, Any]) -> None:
        # Every serving event may change which replicas a service selects (labels, readiness, services):
        # mark the table dirty (no rebuild here). The reconciler's loop pushes it; a mutation awaits
        # `routing.sync()` (the controller's `routes_applied`) so that it returns once traffic follows.
        if type_.may_change_routing:
            self.routing.mark_dirty()

    def _record_outlier(self, event: OutlierEvent) -> None:
        """A history row per ejection, readmission and cap refusal of the gateway (domain/outliers.py): `eject`."""
        state = event.state
        in_rotation = {"inRotation": True}
        after: dict[str, Any] = {"inRotation": event.change is not Change.EJECTED}
        if event.change is Change.EJECTED:
            after |= {"ejections": state.ejections, "seconds": round((state.until or 0.0) - (state.ejected_at or 0.0), 3)}
        self.controller.observe(None, history=HistoryDraft(
            Action.EJECT, event.replica, before={"inRotation": False} if event.change is Change.READMITTED else in_rotation,
            after=after, message=event.message), outcome=Outcome.REFUSED if event.change is Change.CAPPED else Outcome.SUCCESS)

    def _health_path(self, replica: str) -> str:
        pod = self.backend.get_pod(replica)
        deployment = self.backend.get_deployment(pod.deployment) if pod else None
        return get_engine(deployment.engine).health_path if deployment else "/health"


def memory_runtime(settings: Settings, **options: Any) -> Runtime:
    """A `Runtime` (controller, store, gateway, event bus: the real ones) over a `MemoryBackend` that records intents
    in the runtime's own store, for benchmarks and tests of the control plane at scale (never `corral serve`).
    Here and not in `backends.memory`: a backend never imports the runtime that wires it. `options` go to
    `MemoryBackend`."""
    from corral.backends.memory import MemoryBackend

    return Runtime(settings, backend=lambda _store: MemoryBackend(**options))
