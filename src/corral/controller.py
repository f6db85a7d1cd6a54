"""The controller: the one place where a request is validated, planned, applied, recorded, announced.

Every mutation follows the same five steps, under one lock so that a plan is never computed from
state another mutation is changing:
  1. read the current state from the backend,
  2. decide with a pure function from `corral.domain` (refusals raise with a message to show),
  3. apply through the backend (a multi-step change is rolled back if a step fails),
  4. write one history row (before → after, outcome),
  5. publish an event for the WebSocket.
The controller never knows which backend runs it.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.backends.base import Backend
from corral.domain import labels as L
from corral.domain.assignment import businesses_of_model, check_business_for_model, validate_assignment
from corral.domain.distribution import plan_moves, targets_from_counts, targets_from_ratios
from corral.domain.errors import Conflict, CorralError, InvalidInput, NotFound
from corral.domain.manifests import service_manifest
from corral.domain.models import Deployment, Pod, Service
from corral.domain.scaling import MAX_REPLICAS, plan_pool_scale, plan_standard_scale
from corral.domain.status import assignment_summary, pod_distribution, pool_status
from corral.engines import get_engine
from corral.events import EventBus
from corral.store.state import StateStore


@dataclass(frozen=True)
class DeploySpec:
    engine: str
    model_id: str
    model_tag: str
    replicas: int = 1
    deploy_as_pool: bool = False
    gpus_per_replica: int | None = None
    engine_args: list[str] | str = ()  # type: ignore[assignment]


class Controller:
    def __init__(
        self,
        backend: Backend,
        store: StateStore,
        bus: EventBus,
        base_url: Callable[[str], str | None] = lambda service: None,
        traffic: Callable[[set[str]], dict[str, Any]] = lambda replicas: {},
    ) -> None:
        self.backend = backend
        self.store = store
        self.bus = bus
        self.base_url = base_url  # where a service's traffic goes (the gateway's URL for it)
        self.traffic = traffic  # per-replica request counters from the data plane
        self._lock = asyncio.Lock()
        backend.set_mutation_lock(self._lock)

    # views -----------------------------------------------------------------------------------
    def deployment_view(
        self, deployment: Deployment, pods: list[Pod] | None = None, services: list[Service] | None = None
    ) -> dict[str, Any]:
        pods = self.backend.list_pods(deployment.name) if pods is None else pods
        services = self.backend.list_services() if services is None else services
        engine = get_engine(deployment.engine)
        view: dict[str, Any] = {
            "name": deployment.name,
            "type": "pool" if deployment.is_pool else "standard",
            "isPool": deployment.is_pool,
            "engine": deployment.engine,
            "isSimulator": engine.is_simulator,
            "modelId": deployment.model_id,
            "modelName": deployment.model_tag,
            "replicas": deployment.replicas,
            "currentReplicas": len(pods),
            "readyReplicas": sum(p.ready for p in pods),
            "gpusPerReplica": deployment.gpus_per_replica,
            "engineArgs": list(deployment.engine_args),
            "selector": deployment.selector,
            "createdAt": deployment.created_at.isoformat() if deployment.created_at else None,
        }
        if deployment.is_pool:
            distribution = pod_distribution(pods, businesses_of_model(services, deployment.model_tag))
            view |= {
                "podDistribution": distribution,
                "assignment": assignment_summary(distribution),
                "availableForScaleDown": distribution[L.UNASSIGNED],
            }
        else:
            view["service"] = next((s.name for s in services if s.deployment == deployment.name), None)
            view["baseUrl"] = self.base_url(view["service"]) if view["service"] else None
        return view

    @staticmethod
    def pod_view(pod: Pod) -> dict[str, Any]:
        return {
            "name": pod.name,
            "deployment": pod.deployment,
            "labels": dict(pod.labels),
            "status": pod.phase.value,
            "ready": pod.ready,
            "isPoolPod": pod.is_pool_pod,
            "business": pod.business,
            "model": pod.model,
            "endpoint": pod.endpoint,
            "restarts": pod.restarts,
            "gpuIds": list(pod.gpu_ids),
            "createdAt": pod.created_at.isoformat() if pod.created_at else None,
        }

    def service_view(self, service: Service, pods: list[Pod] | None = None) -> dict[str, Any]:
        pods = [p for p in (self.backend.list_pods() if pods is None else pods) if service.selects(p)]
        return {
            "name": service.name,
            "displayName": service.display_name,
            "businessTag": service.business,
            "modelName": service.model,
            "modelPool": service.deployment,
            "baseUrl": self.base_url(service.name),
            "isExternal": service.is_external,
            "llmRouting": service.llm_routing,
            "type": "LoadBalancer" if service.is_external else "ClusterIP",
            "selector": dict(service.selector),
            "labels": dict(service.labels),
            "replicas": len(pods),
            "readyReplicas": sum(p.ready for p in pods),
            "createdAt": service.created_at.isoformat() if service.created_at else None,
        }

    def list_deployments(self) -> list[dict[str, Any]]:
        pods_by_deployment: dict[str, list[Pod]] = {}
        for pod in self.backend.list_pods():
            pods_by_deployment.setdefault(pod.deployment, []).append(pod)
        services = self.backend.list_services()
        return [self.deployment_view(d, pods_by_deployment.get(d.name, []), services) for d in self.backend.list_deployments()]

    def get_deployment(self, name: str) -> dict[str, Any]:
        return self.deployment_view(self._deployment(name))

    def list_pods(self, deployment: str | None = None) -> list[dict[str, Any]]:
        if deployment is not None:
            self._deployment(deployment)
        return [self.pod_view(p) for p in self.backend.list_pods(deployment)]

    def list_business_services(self) -> list[dict[str, Any]]:
        pods = self.backend.list_pods()
        return [self.service_view(s, pods) for s in self.backend.list_services() if s.is_business_service]

    def pool_status(self, name: str) -> dict[str, Any]:
        deployment = self._pool(name)
        pods = self.backend.list_pods(name)
        status = pool_status(name, deployment.model_tag, pods, businesses_of_model(self.backend.list_services(), deployment.model_tag))
        return status | {"traffic": self.traffic({p.name for p in pods})}

    # deployments -----------------------------------------------------------------------------
    async def deploy(self, spec: DeploySpec) -> dict[str, Any]:
        engine = get_engine(spec.engine)
        model_tag = L.check_name(spec.model_tag, "modelTag")
        if not spec.model_id or not spec.model_id.strip():
            raise InvalidInput("modelId is required: a local model directory or a hub id such as 'Qwen/Qwen3-0.6B'")
        if not 0 <= spec.replicas <= MAX_REPLICAS:
            raise InvalidInput(f"replicas must be from 0 to {MAX_REPLICAS}, got {spec.replicas}")
        gpus = spec.gpus_per_replica if spec.gpus_per_replica is not None else (1 if engine.needs_gpu else 0)
        if not 0 <= gpus <= 16:
            raise InvalidInput(f"gpusPerReplica must be from 0 to 16, got {gpus}")
        engine_args = _engine_args(spec.engine_args)
        name = L.pool_name(engine.name, model_tag) if spec.deploy_as_pool else L.standard_deployment_name(engine.name, model_tag)
        deployment = Deployment(
            name=name, engine=engine.name, model_id=spec.model_id.strip(), model_tag=model_tag, is_pool=spec.deploy_as_pool,
            replicas=spec.replicas, gpus_per_replica=gpus, engine_args=tuple(engine_args),
        )
        service = None
        if not deployment.is_pool:  # a standard deployment gets its own service (spec 01, /api/deploy)
            service = Service(
                name=name, model=model_tag, selector=deployment.selector,
                labels={L.MODEL: model_tag, L.APP: name, L.SERVICE_TYPE: L.STANDARD}, deployment=name,
            )
        async with self._lock:
            if self.backend.get_deployment(name) is not None:
                raise Conflict(f"deployment '{name}' already exists; scale it or delete it first")
            if service is not None and self.backend.get_service(service.name) is not None:
                raise Conflict(f"a service named '{service.name}' already exists")
            documents = self.backend.manifests(deployment, service)
            pods = await self.backend.create_deployment(deployment, service)
            manifest_path = self.backend.write_manifests(name, documents)
            view = self.deployment_view(deployment, pods)
            self.store.record("deploy", name, after=_brief(view), message=f"{view['type']} of {spec.replicas} {engine.name} replica(s)")
            self.bus.publish("deployment", {"action": "created", "deployment": view})
        return {"success": True, "deployment": view, "pods": [self.pod_view(p) for p in pods], "manifestPath": manifest_path}

    async def delete_deployment(self, name: str, force: bool = False) -> dict[str, Any]:
        async with self._lock:
            deployment = self._deployment(name)
            view = self.deployment_view(deployment)
            assigned = {b: n for b, n in view.get("podDistribution", {}).items() if b != L.UNASSIGNED and n}
            if assigned and not force:
                raise Conflict(
                    f"pool '{name}' still serves businesses ({assignment_summary(assigned)}); "
                    "unassign its pods first or delete with force=true"
                )
            await self.backend.delete_deployment(name)  # out of service now; replicas drain in the background
            self.store.record("delete", name, before=_brief(view), message="deployment deleted")
            self.bus.publish("deployment", {"action": "deleted", "name": name})
        return {"success": True, "deleted": name}

    # business services -----------------------------------------------------------------------
    async def deploy_service(self, service_name: str, model_pool: str, business_tag: str, is_external: bool,
                             llm_routing: bool = False) -> dict[str, Any]:
        name = L.service_name(service_name)
        business = L.check_business_tag(business_tag)
        async with self._lock:
            pool = self._pool(model_pool, field="modelPool")
            if self.backend.get_service(name) is not None:
                raise Conflict(f"service '{name}' already exists; choose another serviceName or delete it first")
            service = Service(
                name=name, model=pool.model_tag, selector=L.business_selector(pool.model_tag, business),
                labels={L.BUSINESS: business, L.MODEL: pool.model_tag, L.SERVICE_TYPE: L.BUSINESS_SERVICE},
                is_external=is_external, deployment=pool.name, llm_routing=llm_routing,
            )
            await self.backend.create_service(service)
            manifest_path = self.backend.write_manifests(name, [service_manifest(service, self.backend.cluster_options)])
            view = self.service_view(self.backend.get_service(name) or service)
            self.store.record("deploy-service", name, after=view["selector"], message=f"business '{business}' of model '{pool.model_tag}'")
            self.bus.publish("service_deployment", {"action": "created", "service": view})
        return {"success": True, "service": view, "manifestPath": manifest_path}

    async def delete_service(self, name: str, force: bool = False) -> dict[str, Any]:
        async with self._lock:
            service = self.backend.get_service(name)
            if service is None:
                raise NotFound(f"service '{name}' not found; list them with GET /api/business-services")
            if not service.is_business_service:
                raise InvalidInput(f"service '{name}' belongs to deployment '{service.deployment}'; delete the deployment instead")
            others = [s for s in self.backend.list_services() if s.name != name and s.is_business_service
                      and s.model == service.model and s.business == service.business]
            stranded = [] if others else [p for p in self.backend.list_pods() if service.selects(p)]
            if stranded and not force:
                raise Conflict(
                    f"{len(stranded)} pod(s) are assigned to business '{service.business}' of model '{service.model}', "
                    "which would be left without a service; unassign them first or delete with force=true (unassigns them)"
                )
            if stranded:
                await self.backend.set_businesses({p.name: L.UNASSIGNED for p in stranded})
                for pod in stranded:
                    self._announce_assignment(pod, L.UNASSIGNED, reason=f"service {name} deleted")
                for pool in sorted({p.deployment for p in stranded}):
                    await self._remember_assignment(pool)
            await self.backend.delete_service(name)
            self.store.record("delete-service", name, before=dict(service.selector),
                              message=f"unassigned {len(stranded)} pod(s)" if stranded else "service deleted")
            self.bus.publish("service_deployment", {"action": "deleted", "name": name})
        return {"success": True, "deleted": name, "unassignedPods": [p.name for p in stranded]}

    # assignment ------------------------------------------------------------------------------
    async def assign_pod(self, pod_name: str, business_tag: str, model_name: str | None) -> dict[str, Any]:
        async with self._lock:
            pod = validate_assignment(pod_name, self.backend.get_pod(pod_name), business_tag, model_name, self.backend.list_services())
            previous = pod.business or L.UNASSIGNED
            changed = previous != business_tag
            if changed:
                await self.backend.set_businesses({pod.name: business_tag})
                self._announce_assignment(pod, business_tag)
                await self._remember_assignment(pod.deployment)
        return {"success": True, "podName": pod.name, "modelName": pod.model, "previousBusiness": previous,
                "businessTag": business_tag, "changed": changed}

    async def _remember_assignment(self, pool: str) -> None:
        """Tell the backend what each business should keep, so replaced replicas get reassigned."""
        counts = {b: n for b, n in pod_distribution(self.backend.list_pods(pool)).items() if b != L.UNASSIGNED}
        await self.backend.remember_assignment(pool, counts)

    def _announce_assignment(self, pod: Pod, business: str, reason: str = "") -> None:
        before = pod.business or L.UNASSIGNED
        self.store.record("assign", pod.name, before={"business": before}, after={"business": business}, message=reason)
        self.bus.publish("pod_assignment", {"podName": pod.name, "deployment": pod.deployment, "modelName": pod.model,
                                            "from": before, "to": business})

    async def distribute(self, deployment_name: str, ratios: Mapping[str, float] | None, counts: Mapping[str, int] | None,
                         dry_run: bool = False) -> dict[str, Any]:
        """Move the fewest pods so the pool matches the targets; `dry_run` returns the plan and changes nothing."""
        if (ratios is None) == (counts is None):
            raise InvalidInput("give either ratios (e.g. {\"production\": 3, \"testing\": 1}) or counts, not both")
        async with self._lock:
            pool = self._pool(deployment_name)
            pods = self.backend.list_pods(pool.name)
            targets = targets_from_ratios(ratios, len(pods)) if ratios is not None else targets_from_counts(counts or {}, len(pods))
            services = self.backend.list_services()
            for business in targets:
                check_business_for_model(business, pool.model_tag, services, f"business '{business}'")
            before = pod_distribution(pods)
            moves = plan_moves(pods, targets)
            if dry_run:
                return {"success": True, "dryRun": True, "deploymentName": pool.name, "targets": targets,
                        "moves": [{"podName": m.pod, "from": m.source, "to": m.target} for m in moves], "podDistribution": before}
            by_name = {p.name: p for p in pods}
            applied = []
            try:
                for move in moves:
                    await self.backend.set_businesses({move.pod: move.target})
                    applied.append(move)
            except Exception as exc:
                # Roll back so that the pool is never left half-distributed.
                await self.backend.set_businesses({m.pod: m.source for m in reversed(applied)})
                self.store.record("distribute", pool.name, before=before, after={k: v for k, v in targets.items()},
                                  outcome="rolled_back", message=f"move failed after {len(applied)} of {len(moves)}: {exc}")
                raise Conflict(f"distribution failed and was rolled back ({len(applied)} move(s) undone): {exc}") from exc
            for move in moves:
                self._announce_assignment(by_name[move.pod], move.target, reason=f"distribution of {pool.name}")
            after = pod_distribution(self.backend.list_pods(pool.name))
            await self._remember_assignment(pool.name)
            self.store.record("distribute", pool.name, before=before, after=after, message=f"{len(moves)} move(s)")
            result = {"success": True, "deploymentName": pool.name, "targets": targets,
                      "moves": [{"podName": m.pod, "from": m.source, "to": m.target} for m in moves],
                      "podDistribution": after}
            self.bus.publish("distribution", result)
        return result

    # scaling ---------------------------------------------------------------------------------
    async def scale(self, name: str, target: int, *, pool_endpoint: bool, reason: str = "") -> dict[str, Any]:
        """Scale any deployment; a pool always goes through the pool-safe plan, whichever endpoint asked."""
        async with self._lock:
            return await self._scale(name, target, pool_endpoint=pool_endpoint, reason=reason)

    async def scale_by(self, name: str, delta: int, *, reason: str) -> dict[str, Any]:
        """Scale relative to the replicas there are now (read under the lock): for the finetune reclaim."""
        async with self._lock:
            target = max(0, len(self.backend.list_pods(self._deployment(name, field="deploymentName").name)) + delta)
            return await self._scale(name, target, pool_endpoint=False, reason=reason)

    async def _scale(self, name: str, target: int, *, pool_endpoint: bool, reason: str) -> dict[str, Any]:
        deployment = self._deployment(name, field="deploymentName")
        if pool_endpoint and not deployment.is_pool:
            raise InvalidInput(f"'{name}' is a standard deployment; scale it with POST /api/scale-deployment")
        pods = self.backend.list_pods(name)
        unassigned = sum(1 for p in pods if p.business == L.UNASSIGNED)
        try:
            plan = plan_pool_scale(pods, target) if deployment.is_pool else plan_standard_scale(pods, target)
        except Conflict as refusal:
            self.store.record("scale", name, before={"replicas": len(pods)}, after={"replicas": target},
                              outcome="refused", message=refusal.message)
            refusal.details.update(success=False, currentReplicas=len(pods), targetReplicas=target, unassignedPods=unassigned)
            raise
        added = await self.backend.add_replicas(name, plan.add) if plan.add else []
        if plan.remove:  # out of service now; they drain and stop in the background
            await self.backend.remove_replicas(name, list(plan.remove))
        self.store.record("scale", name, before={"replicas": plan.current}, after={"replicas": plan.target},
                          message=f"added {plan.add}, removed {len(plan.remove)}" + (f": {', '.join(plan.remove)}" if plan.remove else "")
                          + (f" ({reason})" if reason else ""))
        result: dict[str, Any] = {
            "success": True, "deploymentName": name, "currentReplicas": plan.current, "targetReplicas": plan.target,
            "added": [p.name for p in added], "removed": list(plan.remove),
        }
        if deployment.is_pool:
            result["unassignedPods"] = sum(1 for p in self.backend.list_pods(name) if p.business == L.UNASSIGNED)
        self.bus.publish("scale", result)
        return result

    # lookups ---------------------------------------------------------------------------------
    def _deployment(self, name: str, field: str = "deployment") -> Deployment:
        deployment = self.backend.get_deployment(name)
        if deployment is None:
            raise NotFound(f"{field} '{name}' not found; list deployments with GET /api/deployments")
        return deployment

    def _pool(self, name: str, field: str = "deploymentName") -> Deployment:
        deployment = self._deployment(name, field)
        if not deployment.is_pool:
            raise InvalidInput(f"{field} '{name}' is a standard deployment, not a model pool")
        return deployment


def _engine_args(value: list[str] | str | tuple) -> list[str]:
    """Engine arguments as an argv list; a string is split like a shell would split it, never run by one."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise InvalidInput(f"engineArgs could not be parsed: {exc}") from None
    if not all(isinstance(a, str) for a in value):
        raise InvalidInput("engineArgs must be a list of strings or one string")
    return list(value)


def _brief(view: dict[str, Any]) -> dict[str, Any]:
    keys = ("type", "engine", "modelName", "modelId", "replicas", "podDistribution")
    return {k: view[k] for k in keys if k in view}


__all__ = ["Controller", "DeploySpec", "CorralError"]
