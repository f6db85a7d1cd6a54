"""Spec 01 endpoints: deployments, business services, assignment, distribution, scaling, status."""

from __future__ import annotations

from typing import Any, Union

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.responses import PlainTextResponse

from corral.api.auth import require_token
from corral.api.schemas import (
    AssignPodRequest,
    DeployRequest,
    DeployServiceRequest,
    DistributePodsRequest,
    ScaleRequest,
    errors,
    plain_text,
)
from corral.controller import Controller
from corral.domain import labels as L
from corral.domain.deploy_request import DeploySpec
from corral.domain.errors import Hint, NotFound
from corral.domain.history import Action
from corral.domain.tenancy import AuthMode
from corral.views import (
    AdapterRemoveResult,
    AdapterView,
    AssignResult,
    BusinessServiceView,
    DeleteResult,
    DeleteServiceResult,
    DeploymentView,
    DeployResult,
    DeployServiceResult,
    DistributeDryRun,
    DistributeResult,
    ErrorBody,
    HistoryEntry,
    PodView,
    PoolStatus,
    RoutingSpec,
    ScaleRefusal,
    ScaleResult,
)

router = APIRouter(prefix="/api", tags=["serving"])
mutating = [Depends(require_token)]
# A refused scale-down answers its counts beside the message; other 409s (no free GPU) the message alone.
SCALE_ERRORS = errors(400, 401, 404, 409, 503, c409=Union[ScaleRefusal, ErrorBody])


def controller(request: Request) -> Controller:
    return request.app.state.controller


@router.post("/deploy", dependencies=mutating, status_code=status.HTTP_201_CREATED, response_model=DeployResult,
             responses=errors(400, 401, 409, 503))
async def deploy(body: DeployRequest, request: Request) -> Any:
    """Deploy a model pool (`deployAsPool: true`, no service) or a standard deployment with its own service."""
    spec = DeploySpec(
        engine=body.engine, model_id=body.modelId, model_tag=body.modelTag, replicas=body.replicas,
        deploy_as_pool=body.deployAsPool, gpus_per_replica=body.gpusPerReplica, engine_args=body.engineArgs,
        secret_env=body.secretEnv, shared_gpus=body.sharedGpus,
    )
    return await controller(request).deploy(spec)


@router.get("/deployments", response_model=list[DeploymentView])
async def deployments(request: Request) -> Any:
    """Every deployment, pools included, each marked `type: pool | standard`."""
    return controller(request).list_deployments()


@router.get("/deployments/{name}", response_model=DeploymentView, responses=errors(400, 404))
async def deployment(name: str, request: Request) -> Any:
    return controller(request).get_deployment(name)


@router.delete("/deployments/{name}", dependencies=mutating, response_model=DeleteResult,
               responses=errors(400, 401, 404, 409, 503))
async def delete_deployment(name: str, request: Request, force: bool = False) -> Any:
    """Stop every replica and remove the deployment; a pool still serving businesses needs `force=true`."""
    return await controller(request).delete_deployment(name, force=force)


@router.get("/deployments/{name}/adapters", response_model=list[AdapterView], responses=errors(404))
async def adapters(name: str, request: Request) -> Any:
    """A pool's LoRA adapters, with how many ready replicas have each loaded now."""
    return request.app.state.runtime.adapters.list(name)


@router.delete("/deployments/{name}/adapters/{adapter}", dependencies=mutating, response_model=AdapterRemoveResult,
               responses=errors(400, 401, 404))
async def remove_adapter(name: str, adapter: str, request: Request) -> Any:
    """Remove a LoRA adapter from a pool: unloaded from every replica (add one with POST /api/finetune/tasks/{id}/deploy
    and `{pool, adapterName}`)."""
    return await request.app.state.runtime.adapters.remove(name, adapter)


@router.get("/pods", response_model=list[PodView], responses=errors(400, 404))
async def pods(request: Request, deployment: str | None = None) -> Any:
    return controller(request).list_pods(deployment)


@router.get("/pods/{name}/logs", response_class=PlainTextResponse, response_model=str,
            responses=plain_text("the replica's last output lines") | errors(400, 404))
async def pod_logs(name: str, request: Request, tail: int = Query(default=200, ge=1, le=10000)) -> str:
    """The last lines of a replica's engine output (why is it not ready? why did it crash?)."""
    text = await request.app.state.backend.pod_logs(name, tail)
    if text is None:
        raise L.unknown_name(name, "pod", NotFound(f"pod '{name}' not found", Hint.LIST_PODS))
    return text


@router.post("/deploy-service", dependencies=mutating, status_code=status.HTTP_201_CREATED,
             response_model=DeployServiceResult, responses=errors(400, 401, 404, 409, 503))
async def deploy_service(body: DeployServiceRequest, request: Request) -> Any:
    """Create the business service `<serviceName>-nlb` selecting `{model, business}`; `auth` (default: `keys` when
    `isExternal`, else `none`) says whether its callers need one of its API keys (POST .../keys)."""
    return await controller(request).deploy_service(body.serviceName, body.modelPool, body.businessTag, body.isExternal,
                                                    llm_routing=body.llmRouting,
                                                    auth=AuthMode(body.auth) if body.auth else None)


@router.get("/business-services", response_model=list[BusinessServiceView])
async def business_services(request: Request) -> Any:
    """`[{name, businessTag, displayName, modelName, ...}]`, discovered by `service-type=business-service`."""
    return controller(request).list_business_services()


@router.delete("/business-services/{name}", dependencies=mutating, response_model=DeleteServiceResult,
               responses=errors(400, 401, 404, 409, 503))
async def delete_business_service(name: str, request: Request, force: bool = False) -> Any:
    """Delete a business service; if its pods would be stranded, `force=true` unassigns them. Its API keys go too."""
    return await controller(request).delete_service(name, force=force)


@router.get("/business-services/{name}/routing", response_model=RoutingSpec, responses=errors(400, 404))
async def get_routing(request: Request, name: str = Path(max_length=L.MAX_NAME_LENGTH)) -> Any:
    """How the gateway picks the replica of each request of the service (default: least-load)."""
    return controller(request).routing(name)


@router.put("/business-services/{name}/routing", dependencies=mutating, response_model=RoutingSpec,
            responses=errors(400, 401, 404, 503))
async def put_routing(body: RoutingSpec, request: Request, name: str = Path(max_length=L.MAX_NAME_LENGTH)) -> Any:
    """`{"policy": "least-load" | "prefix-aware", "weights": {"prefix": 3, "queue": 2, "kvCache": 2}}` (weights
    0-100). Recorded with a `routing` history row; answers once the gateway picks by it."""
    return await controller(request).set_routing(name, body)


@router.post("/assign-pod", dependencies=mutating, response_model=AssignResult, responses=errors(400, 401, 404, 409, 503))
async def assign_pod(body: AssignPodRequest, request: Request) -> Any:
    return await controller(request).assign_pod(body.podName, body.businessTag, body.modelName, pin=body.pin)


@router.post("/distribute-pods", dependencies=mutating, response_model=Union[DistributeResult, DistributeDryRun],
             responses=errors(400, 401, 404, 409, 503))
async def distribute_pods(body: DistributePodsRequest, request: Request) -> Any:
    """Batch assignment by `ratios` (largest remainder) or explicit `counts`; fewest moves; rolled back on failure;
    `dryRun` previews the moves."""
    return await controller(request).distribute(body.deploymentName, body.ratios, body.counts, dry_run=body.dryRun)


@router.post("/scale-deployment", dependencies=mutating, response_model=ScaleResult, responses=SCALE_ERRORS)
async def scale_deployment(body: ScaleRequest, request: Request) -> Any:
    """Scale any deployment. A pool is scaled pool-safely here too: only unassigned replicas are removed."""
    return await controller(request).scale(body.deploymentName, body.targetReplicas, pool_endpoint=False,
                                              preempt=body.preempt)


@router.post("/scale-pool-deployment", dependencies=mutating, response_model=ScaleResult, responses=SCALE_ERRORS)
async def scale_pool_deployment(body: ScaleRequest, request: Request) -> Any:
    """Pool-safe scaling: `{success, currentReplicas, targetReplicas, unassignedPods, error?}`."""
    return await controller(request).scale(body.deploymentName, body.targetReplicas, pool_endpoint=True,
                                              preempt=body.preempt)


@router.get("/pool-status/{deploymentName}", response_model=PoolStatus, responses=errors(400, 404))
async def pool_status(deploymentName: str, request: Request) -> Any:  # noqa: N803 (spec's name)
    """`{totalPods, podDistribution, availableForScaleDown}`."""
    await request.app.state.runtime.gateway.stats.refresh()  # the traffic counters as they are now, read off the loop
    return controller(request).pool_status(deploymentName)


@router.get("/history", response_model=list[HistoryEntry], responses=errors(400))
async def history(
    request: Request,
    action: Action | None = Query(default=None, description="only this action"),
    target: str | None = None,
    limit: int = Query(default=200, ge=1, le=5000),
) -> Any:
    """Every scheduling action, newest first: when, what, before → after, outcome."""
    return request.app.state.store.history(action=action, target=target, limit=limit)
