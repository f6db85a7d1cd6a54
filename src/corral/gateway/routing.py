"""The routing table: for each service, the ready replicas its selector matches.

Rebuilt from the backend's state on every change event, before the change's API call returns,
so an assignment takes effect for the next request. A table is immutable; a rebuild swaps it whole,
so a request never sees half of an update.

Every engine answers to the pool's tag (`Route.model`) through a business service: vLLM, SGLang and
the simulator serve it themselves (`--served-model-name`); a replica whose engine cannot
(`Engine.serves_tag` false: `transformers serve` pins its model path) is a target with
`rewrite_model`, and both data planes rewrite for it: a request's `"model": "<tag>"` becomes
`"model": null` (the engine then uses the model it is pinned to), and the response's `model` (the
JSON body's, or each server-sent event's) becomes the tag again. `GET /v1/models` on a route whose
replicas all need the rewrite is answered by the gateway with the tag.

A target may carry its engine's batch limit (`Target.concurrency`: `--max-num-seqs` of vLLM and the
simulator, `--max-running-requests` of SGLang, read from the deployment's engine arguments): a replica
with that many requests in flight at the gateway is full, and a request that finds every replica of
its service full (or none ready) is held by the gateway until one frees up (proxy.py). Without the flag
the limit is unknown and never holds a request: the engine's own default depends on its version and
hardware, and a wrong guess would hold requests a replica could have taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from corral.domain import labels as L
from corral.domain.autopilot import configured_batch_limit
from corral.domain.models import Deployment, Pod, Service, selected_pods
from corral.domain.replica_picking import Routing
from corral.domain.sleep import SleepState
from corral.domain.tenancy import RouteAccess
from corral.engines import get_engine


@dataclass(frozen=True)
class Target:
    name: str
    endpoint: str
    rewrite_model: bool = False  # the engine does not answer to the tag: the gateway maps it (see above)
    concurrency: int | None = None  # requests it runs at once (its engine's batch limit); None: no limit
    health_path: str = "/health"  # its engine's health endpoint (the nginx plane's outlier checks)


@dataclass(frozen=True)
class Route:
    service: str
    model: str
    business: str | None  # None for a standard deployment's own service
    deployment: str | None
    targets: tuple[Target, ...]
    # Keys and quotas (domain/tenancy.py): checked at the request's entry, before any replica is picked; None: open
    access: RouteAccess | None = None
    routing: Routing = field(default_factory=Routing)  # how a replica is picked per request (domain/replica_picking.py)

    def no_replica_message(self) -> str:
        if self.business is not None:
            return f"no replica assigned to business '{self.business}' of model '{self.model}'"
        return f"no ready replica of deployment '{self.deployment}'"

    def busy_message(self) -> str:
        """Why a request waited: every replica the service routes to is at its batch limit."""
        if self.business is not None:
            return (f"every replica of business '{self.business}' of model '{self.model}' "
                    "is at its batch limit")
        return f"every replica of deployment '{self.deployment}' is at its batch limit"

    def answers_models(self) -> bool:
        """Whether the gateway answers `GET /v1/models` itself (no replica would list the tag)."""
        return bool(self.targets) and all(t.rewrite_model for t in self.targets)

    def models_list(self) -> dict:
        """`GET /v1/models` in OpenAI's list shape: the tag."""
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "corral"}]}


RoutingTable = dict[str, Route]

def build_routes(services: Iterable[Service], pods: Iterable[Pod],
                 deployments: Iterable[Deployment] = (), access: Mapping[str, RouteAccess] | None = None,
                 routings: Mapping[str, Routing] | None = None) -> RoutingTable:
    """Each service's ready replicas (`domain.models.selected_pods`: an index by label pair, since this runs on
    every change, before its API call returns). `deployments`
    give each replica its batch limit (`Target.concurrency`); without them every limit is unknown. `access`: each
    business service's keys and quotas (`domain.tenancy.route_access`), by service name. `routings`: the business
    services' replica picking (domain/replica_picking.py; absent: least-load)."""
    listed_deployments = list(deployments)
    limits = {d.name: configured_batch_limit(d.engine, d.engine_args) for d in listed_deployments}
    health: dict[str, str] = {}
    for d in listed_deployments:
        try:
            health[d.name] = get_engine(d.engine).health_path
        except Exception:  # an engine this control plane does not know: the common path
            health[d.name] = "/health"
    # Only awake replicas are targets: one wanted asleep (or sleeping, or waking) serves nothing (corral.sleeping); the
    # gateway holds requests for a service that has none left (issue 31 item 4 wakes one for them).
    ready = [p for p in pods if p.ready and p.endpoint and p.sleep == SleepState.AWAKE and p.sleep_level is None]
    listed = list(services)
    selected = selected_pods(listed, ready)
    serves_tag: dict[str, bool] = {}

    def rewrite(pod: Pod) -> bool:
        engine = pod.labels.get(L.POOL_TYPE)
        if engine is None:
            return False
        if engine not in serves_tag:
            try:
                serves_tag[engine] = get_engine(engine).serves_tag
            except Exception:  # an engine this control plane does not know: assume it answers to the tag
                serves_tag[engine] = True
        return not serves_tag[engine]

    table: RoutingTable = {}
    for service in listed:
        targets = tuple(Target(pod.name, pod.endpoint, rewrite(pod), limits.get(pod.deployment),  # type: ignore[arg-type]
                               health.get(pod.deployment, "/health"))
                        for pod in selected[service.name])
        table[service.name] = Route(
            service=service.name,
            model=service.model,
            business=service.business if service.is_business_service else None,
            deployment=service.deployment,
            targets=targets,
            access=(access or {}).get(service.name) if service.is_business_service else None,
            routing=(routings or {}).get(service.name, Routing()),
        )
    return table
