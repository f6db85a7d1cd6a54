"""The controller: the one place where intent is recorded, decisions are taken, changes applied,
history completed and events published.

Every mutation follows the same steps, under the lock of the pool(s) it touches, so a plan is never
computed from state another change of that pool is altering (other pools never wait):
  1. read the current state from the backend,
  2. decide with a pure function from `corral.domain` (refusals raise with a message to show, and a
     refused scale is recorded as such),
  3. record the intent — the desired state and its history rows, outcome `pending` — in one
     transaction (the backend writes both together; a cluster backend writes the rows first),
  4. act through the backend, and wait until the data plane serves the new routing table,
  5. complete the rows (`success`, `rolled_back`, `failed`) and publish the events.
Steps 3 and 5 are `corral.intents` (the one owner of that bookkeeping): the controller says when a change
begins and ends, and gives backends the intent writer they record with.
A control plane killed anywhere in between leaves either the whole intent or none of it; on start,
recovery drives reality to the recorded intent and `Intents.complete_interrupted` closes the rows.
The reconcile loop (`_reconcile_loop`) keeps pools' assignments as intended when replicas are
replaced behind Corral's back. Backends report what they observe through `observe`.
The controller never knows which backend runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from corral import failpoints
from corral.backends.base import Backend
from corral.domain import labels as L
from corral.domain.assignment import (
    businesses_of_model,
    check_business_for_model,
    plan_restore,
    validate_assignment,
)
from corral.domain.autopilot import PlannedMove, PoolBusinesses, pool_businesses
from corral.domain.deploy_request import DeploySpec, check_deploy
from corral.domain.distribution import plan_moves, targets_from_counts, targets_from_ratios
from corral.domain.errors import Conflict, CorralError, Hint, InvalidInput, NotFound, Unavailable
from corral.domain.history import (
    PREEMPTING,
    Action,
    HistoryDraft,
    Intent,
    Observed,
    Outcome,
    ScaleRedo,
    TaskSeen,
)
from corral.domain.manifests import service_manifest
from corral.domain.models import Deployment, Pod, Service, selected_pods
from corral.domain.preemption import PreemptionOutcome, PreemptionRequest
from corral.domain.scaling import ScalePlan, plan_pool_scale, plan_standard_scale
from corral.domain.status import assignment_summary, pod_distribution, pool_status
from corral.domain.tenancy import AuthMode, ServiceAccess, default_auth
from corral.engines import get_engine, redact_args
from corral.events import EventBus, EventType
from corral.intents import Intents
from corral.store.state import StateStore
from corral.views import (
    AssignResult,
    BusinessServiceView,
    DeleteResult,
    DeleteServiceResult,
    DeployResult,
    DeployServiceResult,
    DistributeDryRun,
    DistributeResult,
    EjectionView,
    Move,
    PodView,
    PoolDeploymentView,
    PoolStatus,
    RoutingSpec,
    ScaleResult,
    StandardDeploymentView,
    UnpinResult,
)

log = logging.getLogger("corral.controller")
T = TypeVar("T")


class Controller:
    def __init__(
        self,
        backend: Backend,
        store: StateStore,
        bus: EventBus,
        base_url: Callable[[str], str | None] = lambda service: None,
        traffic: Callable[[set[str]], dict[str, Any]] = lambda replicas: {},
        routes_applied: Callable[[], Awaitable[Any]] | None = None,  # waits until the data plane serves all
        adapters: Callable[[str, list[Pod]], list[Any]] = lambda pool, pods: [],
        ejections: Callable[[], Mapping[str, EjectionView]] = dict,  # replicas out of rotation (the gateway)
    ) -> None:
        self.backend = backend
        self.store = store
        # Every change's history rows: begun, completed (once the data plane serves it), rolled back, failed.
        self.intents = Intents(store, confirmed=routes_applied)
        self.bus = bus
        self.base_url = base_url  # where a service's traffic goes (the gateway's URL for it)
        self.traffic = traffic  # per-replica request counters from the data plane
        self.adapters = adapters  # a pool's LoRA adapters with their loaded counts (corral.adapters)
        self.ejections = ejections
        self._locks: dict[str, asyncio.Lock] = {}
        self.reconcile_interval_s = 1.0
        self._wake = asyncio.Event()
        self._reconciler: asyncio.Task | None = None
        self._pod_view_cache: dict[str, tuple[Pod, PodView]] = {}  # name → (the pod, its view): `_pod_views`
        self._restore_after: dict[str, float] = {}  # pool → monotonic time of its next restore attempt after a failure
        # Frees GPUs held by lower-priority finetune tasks for a scale-out (the finetune manager's `preempting`, set by
        # the runtime): a scale with `preempt` and the autopilot go through it. None: nothing to preempt.
        self.preemptor: Callable[[PreemptionRequest], AbstractAsyncContextManager[PreemptionOutcome]] | None = None
        # The finetune tasks as they are now (the runtime sets it), for judging a preemption a restart interrupted.
        self.observe_tasks: Callable[[], Mapping[str, TaskSeen]] | None = None
        self._taken: set[int] = set()  # ids of scale intents begun with a preemption that a scale has taken on
        self._redoing: set[asyncio.Task] = set()  # scale-outs carried out again after a restart (`_redo_scale`)
        backend.set_report(self.observe)
        backend.set_intent_writer(self.intents.begin)

    # views (typed: corral.views; the API answers their wire form, the UI reads them) --------------
    def deployment_view(
        self, deployment: Deployment, pods: list[Pod] | None = None, services: list[Service] | None = None
    ) -> PoolDeploymentView | StandardDeploymentView:
        pods = self.backend.list_pods(deployment.name) if pods is None else pods
        services = self.backend.list_services() if services is None else services
        engine = get_engine(deployment.engine)
        common: dict[str, Any] = {
            "name": deployment.name,
            "isPool": deployment.is_pool,
            "engine": deployment.engine,
            "isSimulator": engine.is_simulator,
            "modelId": deployment.model_id,
            "modelName": deployment.model_tag,
            "replicas": deployment.replicas,
            "currentReplicas": len(pods),
            "readyReplicas": sum(p.ready for p in pods),
            "gpusPerReplica": deployment.gpus_per_replica,
            "sharedGpus": deployment.shared_gpus,
            "engineArgs": list(deployment.engine_args),  # the view shows secret values as *** (views._DeploymentFields)
            "secretEnv": self.store.secret_env_names().get(deployment.name),  # names only, never values; absent: none
            "selector": deployment.selector,
            "createdAt": deployment.created_at.isoformat() if deployment.created_at else None,
        }
        if deployment.is_pool:
            distribution = pod_distribution(pods, businesses_of_model(services, deployment.model_tag))
            return PoolDeploymentView(**common, podDistribution=distribution, assignment=assignment_summary(distribution),
                                      availableForScaleDown=distribution[L.UNASSIGNED],
                                      adapters=self.adapters(deployment.name, pods))
        service = next((s.name for s in services if s.deployment == deployment.name), None)
        return StandardDeploymentView(**common, service=service, baseUrl=self.base_url(service) if service else None)

    @staticmethod
    def pod_view(pod: Pod) -> PodView:
        """A pod's view, built without validation (`model_construct`): every value comes from a typed `Pod`
        (its phase a `PodPhase`, labels and GPU ids copied), so validating them again only cost time, ~8 µs
        a pod, 8 ms for a 1,000-pod listing."""
        return PodView.model_construct(
            name=pod.name,
            deployment=pod.deployment,
            labels=dict(pod.labels),
            status=pod.phase,
            ready=pod.ready,
            isPoolPod=pod.is_pool_pod,
            business=pod.business,
            model=pod.model,
            endpoint=pod.endpoint,
            restarts=pod.restarts,
            gpuIds=list(pod.gpu_ids),
            createdAt=pod.created_at.isoformat() if pod.created_at else None,
            sleep=pod.sleep,
            sleepLevel=int(pod.sleep_level) if pod.sleep_level else None,
        )

    def _pod_views(self, pods: Sequence[Pod], everyone: bool) -> list[PodView]:
        """Views of `pods`, each reused while its pod is unchanged: a listing of 1,000 pods rebuilds only the
        views of pods that changed since the last one (backends replace a `Pod` on every change; one that
        builds new equal objects is caught by `==`). Views are frozen, so sharing one is safe. `everyone`:
        this is the whole listing, so views of pods that are gone are dropped with it."""
        cache = self._pod_view_cache
        views, kept = [], {}
        for pod in pods:
            cached = cache.get(pod.name)
            if cached is None or (cached[0] is not pod and cached[0] != pod):
                cached = (pod, self.pod_view(pod))
            kept[pod.name] = cached
            views.append(cached[1])
        if everyone:
            self._pod_view_cache = kept
        else:
            cache.update(kept)
        return views

    def service_view(self, service: Service, pods: list[Pod] | None = None, *,
                     selected: list[Pod] | None = None) -> BusinessServiceView:
        """`selected`: the pods its selector matches, when the caller has them (`list_business_services`
        matches every service at once through a label index); else they are picked out of `pods`."""
        if selected is None:
            selected = [p for p in (self.backend.list_pods() if pods is None else pods) if service.selects(p)]
        pods = selected
        return BusinessServiceView(
            name=service.name,
            displayName=service.display_name,
            businessTag=service.business,
            modelName=service.model,
            modelPool=service.deployment,
            baseUrl=self.base_url(service.name),
            isExternal=service.is_external,
            llmRouting=service.llm_routing,
            type="LoadBalancer" if service.is_external else "ClusterIP",
            selector=dict(service.selector),
            labels=dict(service.labels),
            replicas=len(pods),
            readyReplicas=sum(p.ready for p in pods),
            createdAt=service.created_at.isoformat() if service.created_at else None,
            routing=RoutingSpec.model_validate(self.store.routings().get(service.name) or {}),
        )

    def list_deployments(self) -> list[PoolDeploymentView | StandardDeploymentView]:
        pods_by_deployment: dict[str, list[Pod]] = {}
        for pod in self.backend.list_pods():
            pods_by_deployment.setdefault(pod.deployment, []).append(pod)
        services = self.backend.list_services()
        return [self.deployment_view(d, pods_by_deployment.get(d.name, []), services) for d in self.backend.list_deployments()]

    def get_deployment(self, name: str) -> PoolDeploymentView | StandardDeploymentView:
        return self.deployment_view(self._deployment(name))

    def list_pods(self, deployment: str | None = None) -> list[PodView]:
        if deployment is not None:
            self._deployment(deployment)
        views = self._pod_views(self.backend.list_pods(deployment), everyone=deployment is None)
        if ejected := self.ejections():  # a few at most: the cached views of the others stay as they are
            views = [v.model_copy(update={"ejection": ejected[v.name]}) if v.name in ejected else v for v in views]
        return views

    def list_business_services(self) -> list[BusinessServiceView]:
        services = [s for s in self.backend.list_services() if s.is_business_service]
        selected = selected_pods(services, self.backend.list_pods())
        return [self.service_view(s, selected=selected[s.name]) for s in services]

    def pool_status(self, name: str) -> PoolStatus:
        deployment = self._pool(name)
        pods = self.backend.list_pods(name)
        status = pool_status(name, deployment.model_tag, pods, businesses_of_model(self.backend.list_services(), deployment.model_tag))
        return PoolStatus(**status, traffic=self.traffic({p.name for p in pods}))  # type: ignore[arg-type]

    # queries for other services (domain objects, not views) ------------------------------------
    def deployments(self) -> list[Deployment]:
        """Every deployment as the backend sees it (pools and standard ones)."""
        return self.backend.list_deployments()

    def deployment(self, name: str) -> Deployment | None:
        """The deployment `name`, or None when there is none."""
        return self.backend.get_deployment(name)

    def pods(self, deployment: str | None = None) -> list[Pod]:
        """The replicas of `deployment`, or of every deployment."""
        return self.backend.list_pods(deployment)

    def services(self) -> list[Service]:
        """Every service: business services and standard deployments' own."""
        return self.backend.list_services()

    def service(self, name: str) -> Service | None:
        """The service `name`, or None when there is none."""
        return self.backend.get_service(name)

    # deployments -----------------------------------------------------------------------------
    async def deploy(self, spec: DeploySpec) -> DeployResult:
        engine = get_engine(spec.engine)
        request = check_deploy(spec, needs_gpu=engine.needs_gpu, check_args=engine.check_args)
        model_tag, gpus, engine_args, secret_env = (request.model_tag, request.gpus_per_replica, request.engine_args,
                                                    request.secret_env)
        if secret_env and not self.backend.supports_secret_env:
            # Only the local backend's supervisor launches replicas with it; a cluster would need a Secret object.
            raise InvalidInput("secretEnv is supported by the local backend only; on Kubernetes, add a Secret to the "
                               "engine's pod template (an env entry with valueFrom.secretKeyRef)")
        name = L.pool_name(engine.name, model_tag) if spec.deploy_as_pool else L.standard_deployment_name(engine.name, model_tag)
        deployment = Deployment(
            name=name, engine=engine.name, model_id=spec.model_id.strip(), model_tag=model_tag, is_pool=spec.deploy_as_pool,
            replicas=spec.replicas, gpus_per_replica=gpus, engine_args=tuple(engine_args), shared_gpus=spec.shared_gpus,
        )
        if spec.shared_gpus:
            if not getattr(self.backend, "supports_sleep", False):
                raise InvalidInput("sharedGpus needs the local backend for now (sleeping replicas are kept in its rows)")
            if engine.sleep_support(list(engine_args)) is None:
                raise InvalidInput(f"sharedGpus needs replicas that can sleep: {engine.sleep_refusal(list(engine_args))}")
        service = None
        if not deployment.is_pool:  # a standard deployment gets its own service (spec 01, /api/deploy)
            service = Service(
                name=name, model=model_tag, selector=deployment.selector,
                labels={L.MODEL: model_tag, L.APP: name, L.SERVICE_TYPE: L.STANDARD}, deployment=name,
            )
        async with self._locked(name):
            if self.backend.get_deployment(name) is not None:
                raise Conflict(f"deployment '{name}' already exists; scale it or delete it first")
            if service is not None and self.backend.get_service(service.name) is not None:
                raise Conflict(f"a service named '{service.name}' already exists")
            documents = self.backend.manifests(deployment, service)
            kind = "pool" if deployment.is_pool else "standard"
            planned = {"type": kind, "engine": engine.name, "modelName": model_tag, "modelId": deployment.model_id,
                       "replicas": spec.replicas}
            intent = Intent([HistoryDraft(Action.DEPLOY, name, after=planned, message=f"{kind} of {spec.replicas} {engine.name} replica(s)")])
            async with self.intents.carrying_out(intent):
                self.store.set_secret_env(name, secret_env)  # before its replicas start: they read it at launch
                try:
                    pods = await self.backend.create_deployment(deployment, service, intent)
                except BaseException:
                    self.store.set_secret_env(name, {})
                    raise
                failpoints.reached("deploy.launched")
                manifest_path = self.backend.write_manifests(name, _redacted_manifests(documents, secret_env))
                view = self.deployment_view(deployment, pods)
                self.bus.publish(EventType.DEPLOYMENT, {"action": "created", "deployment": view})
                await self.intents.confirm(intent, after=_brief(view))
        return DeployResult(success=True, deployment=view, pods=[self.pod_view(p) for p in pods], manifestPath=manifest_path)

    async def delete_deployment(self, name: str, force: bool = False) -> DeleteResult:
        async with self._locked(name):
            deployment = self._deployment(name)
            view = self.deployment_view(deployment)
            distribution = view.podDistribution if isinstance(view, PoolDeploymentView) else {}
            assigned = {b: n for b, n in distribution.items() if b != L.UNASSIGNED and n}
            if assigned and not force:
                raise Conflict(
                    f"pool '{name}' still serves businesses ({assignment_summary(assigned)}); unassign its pods first",
                    Hint.FORCE,
                )
            intent = Intent([HistoryDraft(Action.DELETE, name, before=_brief(view), message="deployment deleted")])
            async with self.intents.carrying_out(intent):
                await self.backend.delete_deployment(name, intent)  # out of service now; replicas drain in the background
                self.store.forget_autopilot(pool=name)  # its autopilot settings and pins go with it
                failpoints.reached("delete.intent-recorded")
                self.bus.publish(EventType.DEPLOYMENT, {"action": "deleted", "name": name})
                await self.intents.confirm(intent)
        return DeleteResult(success=True, deleted=name)

    # business services -----------------------------------------------------------------------
    async def deploy_service(self, service_name: str, model_pool: str, business_tag: str, is_external: bool,
                             llm_routing: bool = False, auth: AuthMode | None = None) -> DeployServiceResult:
        """`auth`: who may call it (domain.tenancy; default: keys when external, else open), written before the
        service exists, so a key-protected one is never open, not even for a moment."""
        name = L.service_name(service_name)
        business = L.check_business_tag(business_tag)
        async with self._locked(model_pool):
            pool = self._pool(model_pool, field="modelPool")
            if self.backend.get_service(name) is not None:
                raise Conflict(f"service '{name}' already exists; choose another serviceName or delete it first")
            service = Service(
                name=name, model=pool.model_tag, selector=L.business_selector(pool.model_tag, business),
                labels={L.BUSINESS: business, L.MODEL: pool.model_tag, L.SERVICE_TYPE: L.BUSINESS_SERVICE},
                is_external=is_external, deployment=pool.name, llm_routing=llm_routing,
            )
            intent = Intent([HistoryDraft(Action.DEPLOY_SERVICE, name, after=dict(service.selector),
                                          message=f"business '{business}' of model '{pool.model_tag}'")])
            # (written whatever the mode: it replaces what a failed creation under this name may have left)
            self.store.set_access(ServiceAccess(name, auth or default_auth(is_external)))
            async with self.intents.carrying_out(intent):
                await self.backend.create_service(service, intent)
                manifest_path = self.backend.write_manifests(name, [service_manifest(service, self.backend.cluster_options)])
                view = self.service_view(self.backend.get_service(name) or service)
                self.bus.publish(EventType.SERVICE_DEPLOYMENT, {"action": "created", "service": view})
                await self.intents.confirm(intent)
        return DeployServiceResult(success=True, service=view, manifestPath=manifest_path)

    def routing(self, name: str) -> RoutingSpec:
        """A business service's replica picking (least-load unless set)."""
        self._business_service(name)
        return RoutingSpec.model_validate(self.store.routings().get(name) or {})

    async def set_routing(self, name: str, spec: RoutingSpec) -> RoutingSpec:
        """Record the new picking (and its history row), then wait until the data plane picks by it."""
        before = self.routing(name)
        self.store.set_routing(name, spec.wire(), HistoryDraft(Action.ROUTING, name, before=before.wire(), after=spec.wire(),
                                                               message=f"replica picking: {spec.policy.value}"))
        service = self._business_service(name)
        self.bus.publish(EventType.SERVICE_DEPLOYMENT, {"action": "updated", "service": self.service_view(service)})
        if self.intents.confirmed is not None:  # the routing table carries the policy: the gateway applies it
            await self.intents.confirmed()
        return spec

    def _business_service(self, name: str) -> Service:
        service = self.backend.get_service(name)
        if service is None or not service.is_business_service:
            raise L.unknown_name(name, "business service", NotFound(f"business service '{name}' not found",
                                                                      Hint.LIST_SERVICES))
        return service

    async def delete_service(self, name: str, force: bool = False) -> DeleteServiceResult:
        service = self.backend.get_service(name)
        if service is None:
            raise L.unknown_name(name, "service", NotFound(f"service '{name}' not found", Hint.LIST_SERVICES))
        pools = [d.name for d in self.backend.list_deployments() if d.is_pool and d.model_tag == service.model]
        async with self._locked(*pools):
            service = self.backend.get_service(name)
            if service is None:
                raise NotFound(f"service '{name}' not found", Hint.LIST_SERVICES)
            if not service.is_business_service:
                raise InvalidInput(f"service '{name}' belongs to deployment '{service.deployment}'; delete the deployment instead")
            others = [s for s in self.backend.list_services() if s.name != name and s.is_business_service
                      and s.model == service.model and s.business == service.business]
            stranded = [] if others else [p for p in self.backend.list_pods() if service.selects(p)]
            if stranded and not force:
                raise Conflict(
                    f"{len(stranded)} pod(s) are assigned to business '{service.business}' of model '{service.model}', "
                    "which would be left without a service; unassign them first", Hint.FORCE_UNASSIGN,
                )
            reason = f"service {name} deleted"
            intent = Intent([_assign_draft(p, L.UNASSIGNED, reason) for p in stranded]
                            + [HistoryDraft(Action.DELETE_SERVICE, name, before=dict(service.selector),
                                            message=f"unassigned {len(stranded)} pod(s)" if stranded else "service deleted")])
            async with self.intents.carrying_out(intent):
                await self.backend.delete_service(name, {p.name: L.UNASSIGNED for p in stranded}, intent)
                self.store.forget_autopilot(service=name)
                self.store.forget_tenancy(name)  # its access and keys (a service re-created under its name has none)
                for pod in stranded:
                    self._announce_assignment(pod, L.UNASSIGNED, reason=reason)
                for pool in sorted({p.deployment for p in stranded}):
                    await self._remember_assignment(pool)
                self.bus.publish(EventType.SERVICE_DEPLOYMENT, {"action": "deleted", "name": name})
                await self.intents.confirm(intent)
        return DeleteServiceResult(success=True, deleted=name, unassignedPods=[p.name for p in stranded])

    # assignment ------------------------------------------------------------------------------
    async def assign_pod(self, pod_name: str, business_tag: str, model_name: str | None,
                         pin: bool | None = None) -> AssignResult:
        """Assign by hand. While the pool's autopilot is on, the replica is pinned there first (the
        autopilot never moves a pinned replica) unless `pin` is False, which unpins it instead."""
        found = self.backend.get_pod(pod_name)
        async with self._locked(*([found.deployment] if found else [])):
            pod = validate_assignment(pod_name, self.backend.get_pod(pod_name), business_tag, model_name, self.backend.list_services())
            previous = pod.business or L.UNASSIGNED
            changed = previous != business_tag
            pinned = self._pin_by_hand(pod.deployment, [pod.name], pin)
            if changed:
                intent = Intent([_assign_draft(pod, business_tag)])
                async with self.intents.carrying_out(intent):
                    await self.backend.set_businesses({pod.name: business_tag}, intent)
                    self._announce_assignment(pod, business_tag)
                    await self._remember_assignment(pod.deployment)
                    await self.intents.confirm(intent)
        return AssignResult(success=True, podName=pod.name, modelName=pod.model, previousBusiness=previous,
                            businessTag=business_tag, changed=changed, pinned=pinned)

    def autopilot_enabled(self, pool: str) -> bool:
        return bool(self.store.autopilots().get(pool, {}).get("enabled"))

    def _pin_by_hand(self, pool: str, pods: Sequence[str], pin: bool | None) -> bool:
        """Pin replicas a person placed while the autopilot runs (recorded before the move is carried
        out, so the autopilot cannot take them back in between); `pin=False` unpins. Whether pinned."""
        if pin is False:
            if self.store.pins() & set(pods):
                self.store.set_pins(pool, pods, False, HistoryDraft(Action.PIN, pool, after={"unpinned": list(pods)},
                                                                    message="unpinned by a manual assignment (pin: false)"))
            return False
        if not (pin or self.autopilot_enabled(pool)):
            return False
        self.store.set_pins(pool, pods, True, HistoryDraft(Action.PIN, pool, after={"pinned": list(pods)},
                                                           message="placed by hand while the autopilot is on: "
                                                                   "the autopilot leaves it there until unpinned"))
        return True

    async def unpin(self, pod_name: str) -> UnpinResult:
        pod = self.backend.get_pod(pod_name)
        if pod is None:
            raise L.unknown_name(pod_name, "pod", NotFound(f"pod '{pod_name}' not found", Hint.LIST_PODS))
        was = pod_name in self.store.pins()
        if was:
            self.store.set_pins(pod.deployment, [pod_name], False,
                                HistoryDraft(Action.PIN, pod.deployment, after={"unpinned": [pod_name]}, message="unpinned"))
        return UnpinResult(success=True, podName=pod_name, pinned=False, changed=was)

    async def _remember_assignment(self, pool: str) -> None:
        """Tell the backend what each business should keep, so replaced replicas get reassigned."""
        counts = {b: n for b, n in pod_distribution(self.backend.list_pods(pool)).items() if b != L.UNASSIGNED}
        await self.backend.remember_assignment(pool, counts)

    def _announce_assignment(self, pod: Pod, business: str, reason: str = "") -> None:
        self.bus.publish(EventType.POD_ASSIGNMENT, {
            "podName": pod.name, "deployment": pod.deployment, "modelName": pod.model,
            "from": pod.business or L.UNASSIGNED, "to": business} | ({"reason": reason} if reason else {}))

    async def distribute(self, deployment_name: str, ratios: Mapping[str, float] | None, counts: Mapping[str, int] | None,
                         dry_run: bool = False) -> DistributeResult | DistributeDryRun:
        """Move the fewest pods so the pool matches the targets; `dry_run` returns the plan and changes nothing.

        All moves are one intent: the labels and the history rows are written in one transaction
        (local) or recorded before the first write and rolled back on a failure (cluster), so the
        pool is never left half-distributed, and the routing table is rebuilt and pushed once."""
        if (ratios is None) == (counts is None):
            raise InvalidInput("give either ratios (e.g. {\"production\": 3, \"testing\": 1}) or counts, not both")
        async with self._locked(deployment_name):
            pool = self._pool(deployment_name)
            pods = self.backend.list_pods(pool.name)
            targets = targets_from_ratios(ratios, len(pods)) if ratios is not None else targets_from_counts(counts or {}, len(pods))
            services = self.backend.list_services()
            for business in targets:
                check_business_for_model(business, pool.model_tag, services, f"business '{business}'")
            before = pod_distribution(pods)
            moves = plan_moves(pods, targets)
            move_views = [Move(podName=m.pod, from_=m.source, to=m.target) for m in moves]
            if dry_run:
                return DistributeDryRun(success=True, dryRun=True, deploymentName=pool.name, targets=targets,
                                        moves=move_views, podDistribution=before)
            by_name = {p.name: p for p in pods}
            reason = f"distribution of {pool.name}"
            intent = Intent([_assign_draft(by_name[m.pod], m.target, reason) for m in moves]
                            + [HistoryDraft(Action.DISTRIBUTE, pool.name, before=before, after=dict(targets),
                                            message=f"{len(moves)} move(s)")])
            try:
                if moves:
                    await self.backend.set_businesses({m.pod: m.target for m in moves}, intent)
                else:
                    self.intents.begin(intent)
            except Exception as exc:  # all or nothing: no label changed
                message = f"distribution failed and was rolled back (none of its {len(moves)} move(s) applied): {exc}"
                self.intents.roll_back(intent, message)
                raise Conflict(message) from exc
            failpoints.reached("distribute.intent-recorded")
            async with self.intents.carrying_out(intent):
                for move in moves:
                    self._announce_assignment(by_name[move.pod], move.target, reason=reason)
                after = pod_distribution(self.backend.list_pods(pool.name))
                await self._remember_assignment(pool.name)
                result = DistributeResult(success=True, deploymentName=pool.name, targets=targets, moves=move_views,
                                          podDistribution=after)
                self.bus.publish(EventType.DISTRIBUTION, result)
                await self.intents.confirm(intent, after=after)
        return result

    # scaling ---------------------------------------------------------------------------------
    async def scale(self, name: str, target: int, *, pool_endpoint: bool, reason: str = "",
                    preempt: bool = False, intent: Intent | None = None) -> ScaleResult:
        """Scale any deployment; a pool always goes through the pool-safe plan, whichever endpoint asked.

        `preempt`: when the new replicas need more GPUs than are free, preemptible finetune tasks below the
        pool's priority (`pool_priority`) checkpoint and give theirs first (`scale_with_preemption`). `intent`:
        the scale's row, written already with the preemption that freed its GPUs (`PreemptionOutcome.scale`)."""
        if preempt and self.preemptor is not None:
            deployment = self._deployment(name, field="deploymentName")
            gpus = max(0, target - len(self.backend.list_pods(name))) * deployment.gpus_per_replica
            if gpus:
                async def onto_freed(request: PreemptionRequest, outcome: PreemptionOutcome) -> ScaleResult:
                    note = (f"; GPUs of {', '.join(outcome.tasks)} preempted for {request.describe()}"
                            if outcome.tasks else "")
                    async with self._locked(name):
                        result = await self._scale(name, target, pool_endpoint=pool_endpoint,
                                                   reason=reason + note, intent=outcome.scale)
                    return result.model_copy(update={"preempted": list(outcome.tasks)})

                return await self.scale_with_preemption(name, gpus, onto_freed, target=target)
        async with self._locked(name):
            return await self._scale(name, target, pool_endpoint=pool_endpoint, reason=reason, intent=intent)

    async def scale_with_preemption(
        self, pool: str, gpus: int, scale: Callable[[PreemptionRequest, PreemptionOutcome], Awaitable[T]],
        business: tuple[str, int] | None = None, *, target: int | None = None,
    ) -> T:
        """Free `gpus` whole GPUs for new replicas of `pool`, then scale: the one way a scale-out preempts (a
        scale with `preempt`, the autopilot). Preemptible finetune tasks below the priority of `business`
        (name, priority: whoever needs the replicas, when the caller knows — the autopilot), else of the pool
        (`pool_priority`), checkpoint and give their GPUs (`preemptor`, `domain.preemption`). `scale` runs
        inside, while the freed GPUs are kept from the finetune queue (by the time it returns, the new replicas
        hold them), and is told what was preempted — the tasks, or why none — because what to scale to can
        depend on it (the autopilot adds the replicas it was short of only once GPUs were freed). A refusal it
        raises says why preempting did not help.

        `target`: the pool's size once scaled out. When trainers must be asked, the scale's row is written with
        their preemption's rows, as one intent, before any is asked (`outcome.scale`; `scale` passes it on to
        `Controller.scale`): a control plane killed after the trainers stopped and before the replicas were
        recorded carries the scale out again on restart (`start`), rather than leaving the business without the
        replicas the tasks stopped for and the tasks to start again on their GPUs."""
        if self.preemptor is None:
            raise RuntimeError("no preemptor: nothing can be preempted (check `Controller.preemptor` first)")
        who, priority = business if business is not None else self.pool_priority(pool)[::-1]
        draft = None
        if target is not None:
            draft = HistoryDraft(Action.SCALE, pool, before={"replicas": len(self.backend.list_pods(pool))},
                                 after={"replicas": target, PREEMPTING: {"business": who, "priority": priority}},
                                 message=f"scale out to {target} once preempted finetune tasks give their GPUs")
        request = PreemptionRequest(pool=pool, business=who, priority=priority, gpus=gpus, scale=draft)
        async with self.preemptor(request) as outcome:
            failpoints.reached("preempt.before-scale")
            error: BaseException | None = None
            try:
                return await scale(request, outcome)
            except Unavailable:
                raise  # the scale is made (its row taken): the row completes once the data plane serves it
            except Conflict as refusal:
                if outcome.why_not:
                    refusal.message += f" (preempt: {outcome.why_not})"
                    refusal.args = (refusal.message,)
                error = refusal
                raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._close_untaken(outcome.scale, error)

    def _close_untaken(self, intent: Intent | None, exc: BaseException | None) -> None:
        """The row of a scale begun with its preemption, when no scale took it on (the caller raised before, or
        chose not to scale): closed, so that only a restart leaves it pending (and has it carried out again). A
        scale that took it on completes it itself (`carrying_out`)."""
        if intent is None:
            return
        if id(intent) in self._taken:
            self._taken.discard(id(intent))
            return
        if exc is not None:
            self.intents.fail(intent, exc)
        else:
            self.intents.complete(intent, Outcome.ROLLED_BACK, message="the scale-out was not carried out after its "
                                                                        "preemption (no longer wanted once GPUs were freed)")

    def pool_businesses(self, pool: str) -> PoolBusinesses:
        """The pool's businesses with their services, policies and priorities, and the pool's priority
        (`domain.autopilot.pool_businesses`): one answer for the autopilot, preemption and reclaim.
        A name that is not a pool has no businesses."""
        deployment = self.backend.get_deployment(pool)
        if deployment is None or not deployment.is_pool:
            return PoolBusinesses({})
        return pool_businesses(deployment.model_tag, self.backend.list_services(), self.store.policies())

    def pool_priority(self, pool: str) -> tuple[int, str | None]:
        """The pool's place on the one priority scale of businesses and finetune tasks (`domain.preemption`):
        its businesses' highest policy priority (0 for one without a policy), and whose."""
        businesses = self.pool_businesses(pool)
        return businesses.priority, businesses.prioritized

    async def scale_by(self, name: str, delta: int, *, reason: str) -> ScaleResult:
        """Scale relative to the replicas there are now (read under the lock): for the finetune reclaim."""
        async with self._locked(name):
            target = max(0, len(self.backend.list_pods(self._deployment(name, field="deploymentName").name)) + delta)
            return await self._scale(name, target, pool_endpoint=False, reason=reason)

    async def _scale(self, name: str, target: int, *, pool_endpoint: bool, reason: str,
                     intent: Intent | None = None) -> ScaleResult:
        """`intent`: the scale's row, begun already (with a preemption); completed here once the scale is planned
        (until then, an error leaves it to `_close_untaken`)."""
        deployment = self._deployment(name, field="deploymentName")
        if pool_endpoint and not deployment.is_pool:
            raise InvalidInput(f"'{name}' is a standard deployment", Hint.SCALE_STANDARD)
        pods = self.backend.list_pods(name)
        unassigned = sum(1 for p in pods if p.business == L.UNASSIGNED)
        try:
            plan = plan_pool_scale(pods, target) if deployment.is_pool else plan_standard_scale(pods, target)
        except Conflict as refusal:
            refused = HistoryDraft(Action.SCALE, name, before={"replicas": len(pods)}, after={"replicas": target},
                                   message=refusal.message)
            if intent is not None:
                self._taken.add(id(intent))
                self.intents.complete(intent, Outcome.REFUSED, message=refusal.message)
            else:
                self.intents.applied(refused, Outcome.REFUSED)
            refusal.details.update(success=False, currentReplicas=len(pods), targetReplicas=target, unassignedPods=unassigned)
            raise
        if intent is not None:
            self._taken.add(id(intent))  # `_carry_out_scale` completes it, whatever happens
        return await self._carry_out_scale(deployment, plan, reason, intent)

    async def _carry_out_scale(self, deployment: Deployment, plan: ScalePlan, reason: str,
                               begun: Intent | None = None) -> ScaleResult:
        """`begun`: the scale's row, written already (with the preemption that freed its GPUs): the backend records
        the replicas alone, and the row's message becomes this scale's when it completes."""
        name = deployment.name
        message = (f"added {plan.add}, removed {len(plan.remove)}" + (f": {', '.join(plan.remove)}" if plan.remove else "")
                   + (f" ({reason})" if reason else ""))
        intent = begun or Intent([HistoryDraft(Action.SCALE, name, before={"replicas": plan.current},
                                               after={"replicas": plan.target}, message=message)])
        written = None if begun is not None else intent  # what the backend writes with the desired state
        async with self.intents.carrying_out(intent):
            added = await self.backend.add_replicas(name, plan.add, written) if plan.add else []
            if plan.remove:  # out of service now; they drain and stop in the background
                await self.backend.remove_replicas(name, list(plan.remove), written if not plan.add else None)
                failpoints.reached("scale-down.intent-recorded")
            if not plan.add and not plan.remove:
                self.intents.begin(intent)
            unassigned = (sum(1 for p in self.backend.list_pods(name) if p.business == L.UNASSIGNED)
                          if deployment.is_pool else None)  # pools only
            result = ScaleResult(success=True, deploymentName=name, currentReplicas=plan.current, targetReplicas=plan.target,
                                 added=[p.name for p in added], removed=list(plan.remove), unassignedPods=unassigned)
            self.bus.publish(EventType.SCALE, result)
            await self.intents.confirm(intent, message=message if begun is not None else None)
        return result

    # observations and the reconcile loop ----------------------------------------------------
    def observe(self, event: EventType | None, data: dict[str, Any] | None = None, *,
                history: HistoryDraft | None = None, outcome: Outcome = Outcome.SUCCESS) -> None:
        """What a backend saw happen by itself: recorded (when it matters) and announced, like a change
        made through the API, so listeners see one event shape whoever caused it."""
        if history is not None:
            self.intents.applied(history, outcome)
        if event is not None:
            self.bus.publish(event, data or {})
            if event == EventType.REPLICA_STATUS:
                self._wake.set()

    async def start(self) -> None:
        """Judge what a stopped control plane left pending (after recovery: against what is there now),
        carry out again the scale-outs recorded with a preemption (`_redo_scale`), then keep reconciling."""
        self.intents.complete_interrupted(lambda: Observed(
            deployments={d.name: d for d in self.backend.list_deployments()}, pods=self.backend.list_pods(),
            services={s.name: s for s in self.backend.list_services()},
            tasks=self.observe_tasks() if self.observe_tasks is not None else None))
        for row in self.store.pending_history():  # those left pending by the judging: `judge_interrupted`
            if (redo := ScaleRedo.of(row)) is not None:
                self._redo_scale(row, redo)
        self._reconciler = asyncio.create_task(self._reconcile_loop(), name="reconciler")

    def _redo_scale(self, row: Mapping[str, Any], redo: ScaleRedo) -> None:
        """Carry out again a scale-out a restart interrupted after the preemption it was recorded with: the trainers
        may have checkpointed and stopped for it. The same preemption is asked for now, synchronously, so that its
        GPUs are kept from the finetune queue (`Preemption.preempting`) before the queue's first round could start
        the stopped tasks again on them; the scale runs in the background (a trainer may still be saving), and
        completes the original row."""
        intent = Intent([HistoryDraft(Action.SCALE, redo.pool, after=row.get("after"), message=row.get("message") or "")],
                        ids=[row["id"]])
        deployment = self.backend.get_deployment(redo.pool)
        gpus = (max(0, redo.replicas - len(self.backend.list_pods(redo.pool))) * deployment.gpus_per_replica
                if deployment is not None else 0)
        held = None
        if gpus and self.preemptor is not None:
            held = self.preemptor(PreemptionRequest(pool=redo.pool, business=redo.business, priority=redo.priority,
                                                    gpus=gpus))
        task = asyncio.create_task(self._carry_out_redo(redo, intent, held), name=f"redo-scale-{redo.pool}")
        self._redoing.add(task)
        task.add_done_callback(self._redoing.discard)

    async def _carry_out_redo(self, redo: ScaleRedo, intent: Intent,
                              held: AbstractAsyncContextManager[PreemptionOutcome] | None) -> None:
        reason = "carried out again after a control-plane restart"
        error: BaseException | None = None
        try:
            async with AsyncExitStack() as stack:
                if held is not None:
                    outcome = await stack.enter_async_context(held)
                    if outcome.tasks:
                        reason += f"; GPUs of {', '.join(outcome.tasks)} preempted for it"
                async with self._locked(redo.pool):
                    have = len(self.backend.list_pods(redo.pool))
                    if have >= redo.replicas:  # scaled meanwhile (a person, the autopilot): never scaled back down
                        self._taken.add(id(intent))
                        self.intents.complete(intent, Outcome.SUCCESS,
                                              message=f"{intent.rows[0].message}; the pool had {have} replicas after a "
                                                      "control-plane restart")
                        return
                    await self._scale(redo.pool, redo.replicas, pool_endpoint=False, reason=reason, intent=intent)
        except Unavailable:
            pass  # scaled: the row completes once the data plane serves it
        except Exception as exc:
            error = exc
            log.warning("carrying out the scale-out of %s again after a restart failed: %s", redo.pool, exc)
        finally:
            self._close_untaken(intent, error)

    async def close(self) -> None:
        for task in [*self._redoing, *([self._reconciler] if self._reconciler is not None else [])]:
            task.cancel()  # a redo cut short leaves its row pending: the next start carries it out again
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.intents.close()

    async def _reconcile_loop(self) -> None:
        """Level-triggered: on every replica change (and once a second), each pool's assignment is
        compared with what it should be, and replacements are assigned (see `restore_assignment`)."""
        while True:
            with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow a cancel that races the event
                async with asyncio.timeout(self.reconcile_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            for deployment in self.backend.list_deployments():
                if deployment.is_pool and self._restore_after.get(deployment.name, 0.0) <= time.monotonic():
                    try:
                        await self.restore_assignment(deployment.name)
                        self._restore_after.pop(deployment.name, None)
                    except Exception:  # recorded by the intent's row (rolled back / failed); retried later
                        log.exception("restoring the assignment of %s failed", deployment.name)
                        self._restore_after[deployment.name] = time.monotonic() + 10

    async def restore_assignment(self, pool: str) -> dict[str, str]:
        """Give each business back the replicas it should have, from unassigned ones, after replicas
        were replaced behind Corral's back (a crash, a node lost, a rollout on Kubernetes)."""
        if not self.backend.desired_assignment(pool):
            return {}
        async with self._locked(pool):
            # Read again under the lock: a change that held it has just rewritten what each business keeps.
            desired = self.backend.desired_assignment(pool)
            pods = self.backend.list_pods(pool)
            plan = plan_restore(pods, desired)
            if not plan:
                return {}
            by_name = {p.name: p for p in pods}
            intent = Intent([_assign_draft(by_name[name], business, f"restored: replacement for a lost replica of business "
                                           f"'{business}' in {pool}") for name, business in plan.items()])
            async with self.intents.carrying_out(intent):
                await self.backend.set_businesses(plan, intent)
                for name, business in plan.items():
                    self.bus.publish(EventType.POD_ASSIGNMENT, {
                        "podName": name, "deployment": pool, "modelName": by_name[name].model,
                        "from": L.UNASSIGNED, "to": business, "reason": "restore"})
                await self.intents.confirm(intent)
        return plan

    # the autopilot ---------------------------------------------------------------------------
    async def autopilot_moves(self, pool: str, moves: Sequence[PlannedMove], summary: str) -> list[PlannedMove]:
        """Carry out an autopilot decision's moves, re-checked under the pool's lock against what is there
        now (a person may have moved, pinned or deleted something since the decision was taken): the
        moves that still hold are one intent — a row per replica with its reason, then the decision's
        summary row — and one routing push."""
        async with self._locked(pool):
            pods = {p.name: p for p in self.backend.list_pods(pool)}
            deployment = self._pool(pool)
            served = set(businesses_of_model(self.backend.list_services(), deployment.model_tag)) | {L.UNASSIGNED}
            pinned = self.store.pins()
            valid = [m for m in moves if m.pod in pods and (pods[m.pod].business or L.UNASSIGNED) == m.source
                     and m.target in served and m.pod not in pinned]
            if not valid:
                return []
            intent = Intent([_assign_draft(pods[m.pod], m.target, f"autopilot: {m.reason}") for m in valid]
                            + [HistoryDraft(Action.AUTOPILOT, pool, before=pod_distribution(list(pods.values())),
                                            after={m.pod: m.target for m in valid}, message=summary)])
            async with self.intents.carrying_out(intent):
                await self.backend.set_businesses({m.pod: m.target for m in valid}, intent)
                for move in valid:
                    self._announce_assignment(pods[move.pod], move.target, reason=f"autopilot: {move.reason}")
                await self._remember_assignment(pool)
                await self.intents.confirm(intent, after=pod_distribution(self.backend.list_pods(pool)))
        return valid

    async def remove_spares(self, pool: str, names: Sequence[str], reason: str) -> list[str]:
        """Scale a pool in by exactly these replicas, if they are still unassigned and unpinned (the
        autopilot's scale-in: it chose idle spares, and an assigned replica is never removed)."""
        async with self._locked(pool):
            deployment = self._pool(pool)
            pods = self.backend.list_pods(pool)
            pinned = self.store.pins()
            victims = tuple(p.name for p in pods if p.name in set(names) and p.business == L.UNASSIGNED
                            and p.name not in pinned)
            if not victims:
                return []
            await self._carry_out_scale(deployment, ScalePlan(len(pods), len(pods) - len(victims), remove=victims), reason)
        return list(victims)

    # locks -------------------------------------------------------------------------------------
    def _locked(self, *pools: str) -> AbstractAsyncContextManager[None]:
        """The locks of these deployments, taken in name order (no deadlock between two multi-pool changes):
        one pool's change never waits for another's."""
        stack = AsyncExitStack()

        @asynccontextmanager
        async def hold() -> AsyncIterator[None]:
            async with stack:
                for pool in sorted(set(pools)):
                    await stack.enter_async_context(self.lock_of(pool))
                yield

        return hold()

    def lock_of(self, deployment: str) -> asyncio.Lock:
        return self._locks.setdefault(deployment, asyncio.Lock())

    # lookups ---------------------------------------------------------------------------------
    def _deployment(self, name: str, field: str = "deployment") -> Deployment:
        deployment = self.backend.get_deployment(name)
        if deployment is None:
            raise L.unknown_name(name, field, NotFound(f"{field} '{name}' not found", Hint.LIST_DEPLOYMENTS))
        return deployment

    def _pool(self, name: str, field: str = "deploymentName") -> Deployment:
        deployment = self._deployment(name, field)
        if not deployment.is_pool:
            raise InvalidInput(f"{field} '{name}' is a standard deployment, not a model pool")
        return deployment


def _redacted_manifests(documents: list[dict], secret_env: Mapping[str, str]) -> list[dict]:
    """The manifests as Corral writes them to disk: secret engine arguments as `***` (in the container's args
    and the engine-args annotation), secretEnv as env entries that reference a Secret (`<name>-secret-env`)."""
    import copy
    import json

    from corral.domain.manifests import ANNOTATION_ENGINE_ARGS

    written = copy.deepcopy(documents)
    for document in written:
        if document.get("kind") != "Deployment":
            continue
        annotations = document.get("metadata", {}).get("annotations", {})
        if ANNOTATION_ENGINE_ARGS in annotations:
            annotations[ANNOTATION_ENGINE_ARGS] = json.dumps(redact_args(json.loads(annotations[ANNOTATION_ENGINE_ARGS])))
        secret = f"{document['metadata']['name']}-secret-env"
        for container in document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            container["args"] = redact_args(container.get("args", []))
            if secret_env:
                container["env"] = list(container.get("env", [])) + [
                    {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in sorted(secret_env)]
    return written


def _assign_draft(pod: Pod, business: str, reason: str = "") -> HistoryDraft:
    # The replica's `pool` and `gpus` too (in both: they do not change, so summaries leave them out): metering bills
    # a business the GPUs of the replicas it held from these rows (corral.domain.usage); without GPU ids seen (a
    # cluster's pod), the pool's GPUs per replica are used.
    held: dict[str, Any] = {"pool": pod.deployment} | ({"gpus": len(pod.gpu_ids)} if pod.gpu_ids else {})
    return HistoryDraft(Action.ASSIGN, pod.name, before={"business": pod.business or L.UNASSIGNED, **held},
                        after={"business": business, **held}, message=reason)


def _brief(view: PoolDeploymentView | StandardDeploymentView) -> dict[str, Any]:
    keys = ("type", "engine", "modelName", "modelId", "replicas", "podDistribution")
    wire = view.wire()
    return {k: wire[k] for k in keys if k in wire}


__all__ = ["Controller", "DeploySpec", "CorralError"]
