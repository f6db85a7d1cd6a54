"""Typed contracts (`corral.views`): the views are exactly the JSON the API answered before they were typed,
every API route documents its responses in /openapi.json, and the enums keep plain strings working."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from corral.backends.memory import MemoryBackend
from corral.config import Settings
from corral.controller import Controller, DeploySpec
from corral.domain import labels as L
from corral.domain.assignment import businesses_of_model
from corral.domain.history import Action, Outcome
from corral.domain.memory import QWEN25_CODER
from corral.domain.models import Deployment, Pod, Service
from corral.domain.status import assignment_summary, pod_distribution, pool_status
from corral.domain.tasks import ACTIVE, FINISHED, WAITING, TaskState
from corral.engines import get_engine
from corral.events import EventBus, EventType
from corral.finetune.manager import FinetuneManager
from corral.finetune.queue_round import queue_time
from corral.finetune.store import TaskRecord
from corral.gpus.inventory import GpuDevice, GpuInventory, GpuProcess
from corral.store.state import StateStore
from corral.views import (
    DeploymentView,
    DeployResult,
    DistributeDryRun,
    ErrorBody,
    FinetuneTask,
    HistoryEntry,
    PodView,
    PoolDeploymentView,
    ScaleRefusal,
    ScaleResult,
    StandardDeploymentView,
    gpu_info,
)

BASE_URL = "http://gateway/s/{}/v1"


# The dicts the controller and the finetune manager built before the views were typed: the contract. ----
def legacy_deployment_view(controller: Controller, deployment: Deployment, pods: list[Pod], services: list[Service]) -> dict:
    view: dict[str, Any] = {
        "name": deployment.name, "type": "pool" if deployment.is_pool else "standard", "isPool": deployment.is_pool,
        "engine": deployment.engine, "isSimulator": get_engine(deployment.engine).is_simulator, "modelId": deployment.model_id,
        "modelName": deployment.model_tag, "replicas": deployment.replicas, "currentReplicas": len(pods),
        "readyReplicas": sum(p.ready for p in pods), "gpusPerReplica": deployment.gpus_per_replica,
        "sharedGpus": deployment.shared_gpus,  # (issue 31: GPUs shared with other pools' sleeping replicas)
        "engineArgs": list(deployment.engine_args), "selector": deployment.selector,
        "createdAt": deployment.created_at.isoformat() if deployment.created_at else None,
    }
    if deployment.is_pool:
        distribution = pod_distribution(pods, businesses_of_model(services, deployment.model_tag))
        view |= {"podDistribution": distribution, "assignment": assignment_summary(distribution),
                 "availableForScaleDown": distribution[L.UNASSIGNED], "adapters": []}  # LoRA adapters: none here
    else:
        view["service"] = next((s.name for s in services if s.deployment == deployment.name), None)
        view["baseUrl"] = controller.base_url(view["service"]) if view["service"] else None
    return view


def legacy_pod_view(pod: Pod) -> dict:
    return {
        "name": pod.name, "deployment": pod.deployment, "labels": dict(pod.labels), "status": pod.phase.value, "ready": pod.ready,
        "isPoolPod": pod.is_pool_pod, "business": pod.business, "model": pod.model, "endpoint": pod.endpoint,
        "restarts": pod.restarts, "gpuIds": list(pod.gpu_ids), "createdAt": pod.created_at.isoformat() if pod.created_at else None,
        "ejection": None,  # (issue 25: set while the gateway keeps the replica out of rotation)
        "sleep": pod.sleep.value, "sleepLevel": int(pod.sleep_level) if pod.sleep_level else None,  # (issue 31)
    }


def legacy_service_view(controller: Controller, service: Service, pods: list[Pod]) -> dict:
    pods = [p for p in pods if service.selects(p)]
    return {
        "name": service.name, "displayName": service.display_name, "businessTag": service.business, "modelName": service.model,
        "modelPool": service.deployment, "baseUrl": controller.base_url(service.name), "isExternal": service.is_external,
        "llmRouting": service.llm_routing, "type": "LoadBalancer" if service.is_external else "ClusterIP",
        "selector": dict(service.selector), "labels": dict(service.labels), "replicas": len(pods),
        "readyReplicas": sum(p.ready for p in pods), "createdAt": service.created_at.isoformat() if service.created_at else None,
        # added with replica picking (issue 25): the default, least-load
        "routing": {"policy": "least-load", "weights": {"prefix": 5.0, "queue": 1.0, "kvCache": 1.0}},
    }


def legacy_task_view(task: TaskRecord) -> dict:
    return {
        "id": task.id, "status": task.status, "reason": task.reason, "baseModel": task.base_model,
        "datasetPath": task.dataset_path, "method": task.method, "priority": task.priority, "gpus": task.gpus,
        "memoryGb": task.memory_gb, "timeoutSeconds": task.timeout_s, "hyperparameters": task.hyperparameters,
        "examples": task.examples, "progress": task.progress, "units": task.units, "output": task.output,
        "reclaimed": task.reclaimed or {}, "preemptible": task.preemptible,  # added with preemption (issue 15)
        "datasets": task.datasets,  # added with dataset mixes (issue 27): a mix's sources, null for one datasetPath
        "businessTag": task.business_tag,  # added with finetune billing by business (issue 28): null when none
        # added with easy-backfill's slack (issue 15): the head's promised start, while it is queued
        "startBy": task.promised_start.isoformat() if task.promised_start and task.status == "queued" else None,
        "createdAt": task.created_at.isoformat() if task.created_at else None,
        "startedAt": task.started_at.isoformat() if task.started_at else None,
        "finishedAt": task.finished_at.isoformat() if task.finished_at else None,
    }


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    store, bus = StateStore(tmp_path / "corral.db"), EventBus()
    store.on_record = lambda entry: bus.publish(EventType.HISTORY, entry)
    controller = Controller(MemoryBackend(gpu_ids=[0, 1]), store, bus, base_url=BASE_URL.format,
                            traffic=lambda replicas: {r: {"requests": 3, "errors": 0, "inFlight": 1, "meanLatencyMs": 2.5}
                                                      for r in sorted(replicas)[:1]})
    try:
        yield controller
    finally:
        store.close()


async def test_views_are_exactly_the_json_of_before(controller: Controller) -> None:
    deployed = await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="qwen-06b", replicas=3,
                                                  deploy_as_pool=True, engine_args="--ttft-ms 5"))
    await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="llama-8b", replicas=1))
    pool = deployed.deployment.name
    await controller.deploy_service("production-chat", pool, "production", True)
    await controller.deploy_service("testing-chat", pool, "testing", False)
    await controller.assign_pod(controller.backend.list_pods(pool)[0].name, "production", None)
    backend = controller.backend
    pods, services = backend.list_pods(), backend.list_services()

    views = controller.list_deployments()
    assert {type(v) for v in views} == {PoolDeploymentView, StandardDeploymentView}
    for view, deployment in zip(views, backend.list_deployments(), strict=True):
        mine = [p for p in pods if p.deployment == deployment.name]
        assert view.wire() == view.model_dump(mode="json", by_alias=True) == legacy_deployment_view(controller, deployment, mine, services)
        assert controller.get_deployment(deployment.name).wire() == view.wire()
    assert [p.wire() for p in controller.list_pods()] == [legacy_pod_view(p) for p in pods]
    business = [s for s in services if s.is_business_service]
    assert [s.wire() for s in controller.list_business_services()] == [legacy_service_view(controller, s, pods) for s in business]
    status = controller.pool_status(pool)
    pool_pods = backend.list_pods(pool)
    expected = pool_status(pool, "qwen-06b", pool_pods, ["production", "testing"]) | {
        "traffic": {sorted(p.name for p in pool_pods)[0]: {"requests": 3, "errors": 0, "inFlight": 1, "meanLatencyMs": 2.5}}}
    assert status.wire() == expected
    assert all(type(t["requests"]) is int and type(t["meanLatencyMs"]) is float for t in status.wire()["traffic"].values())

    # A pool's JSON has its own fields and not a standard deployment's, and the other way round.
    view = controller.get_deployment(pool)
    wire = view.wire()
    assert wire["assignment"] == "production(1) | testing(0) | unassigned(2)" and view.assignment == wire["assignment"]
    assert "podDistribution" in wire and "baseUrl" not in wire and wire.get("baseUrl", "none") == "none"
    assert (wire | {"type": "x"})["type"] == "x" and dict(wire) == view.wire()
    with pytest.raises(KeyError):
        wire["service"]
    standard = controller.get_deployment("simulator-llama-8b")
    assert isinstance(standard, StandardDeploymentView) and standard.wire()["service"] == "simulator-llama-8b"
    assert standard.baseUrl == BASE_URL.format("simulator-llama-8b") and "podDistribution" not in standard.wire()

    # The results of changes are the API's response models, and their JSON round-trips exactly.
    assert isinstance(deployed, DeployResult)
    result = DeployResult.model_validate(deployed.wire())
    assert result.wire()["deployment"] == deployed.deployment.wire()
    preview = await controller.distribute(pool, {"production": 1, "testing": 1}, None, dry_run=True)
    assert DistributeDryRun.model_validate(preview.wire()).wire() == preview.wire()
    scaled = await controller.scale("simulator-llama-8b", 2, pool_endpoint=False)
    assert ScaleResult.model_validate(scaled.wire()).wire() == scaled.wire() and "unassignedPods" not in scaled.wire()


def test_a_queue_time_past_the_last_date_is_that_date() -> None:
    """A head reserved behind a task with a 1e300 s timeout (stored before timeoutSeconds had a bound) gets a promise
    the database and the reason can hold, instead of an OverflowError in every scheduling round."""
    assert queue_time(1e300) == datetime(9999, 12, 31, tzinfo=timezone.utc)
    assert queue_time(86400.5) == datetime(1970, 1, 2, 0, 0, 0, 500000, tzinfo=timezone.utc)


def test_task_view_and_states() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    record = TaskRecord(
        id="ft-1", status="training", base_model="Qwen/Qwen2.5-0.5B", dataset_path="/d.jsonl", method="lora", priority="high",
        hyperparameters={"epochs": 3, "learningRate": 2e-4, "loraDropout": 0.05}, reason="training", gpus=1, memory_gb=4.5,
        timeout_s=3600.0, examples=50, progress={"step": 4, "totalSteps": 10, "loss": 1.25, "epoch": 0, "eta": None},
        units=["0"], reclaimed={"pool": 1}, created_at=now, started_at=now,
    )
    view = FinetuneManager.view(None, record)  # type: ignore[arg-type]  (the view reads nothing of the manager)
    assert isinstance(view, FinetuneTask) and view.status is TaskState.TRAINING
    assert view.wire() == legacy_task_view(record)
    wire = view.wire()
    assert type(wire["hyperparameters"]["epochs"]) is int and type(wire["progress"]["epoch"]) is int  # integers stay integers
    assert FinetuneTask.model_validate(wire).wire() == wire
    assert {"pending", "queued"} == set(WAITING) and "training" in ACTIVE and "cancelled" in FINISHED
    assert all(isinstance(s, str) for s in (*ACTIVE, *WAITING, *FINISHED)) and set(TaskState) == {*ACTIVE, *WAITING, *FINISHED}


def test_history_entry_and_gpu_info_are_typed() -> None:
    row = {"id": 1, "timestamp": "2026-01-01T00:00:00+00:00", "action": "scale", "target": "p", "before": {"replicas": 3},
           "after": {"replicas": 0}, "outcome": "refused", "message": "Cannot scale down"}
    entry = HistoryEntry.model_validate(row)
    assert entry.action is Action.SCALE and entry.outcome is Outcome.REFUSED and entry.wire() == row
    with pytest.raises(ValueError):
        HistoryEntry.model_validate(row | {"action": "explode"})
    device = GpuDevice(0, "NVIDIA H100", 80 * 1024**3, 10 * 1024**3, uuid="GPU-1", utilization_percent=7,
                       processes=(GpuProcess(42, 10 * 1024**3),))
    info = gpu_info(GpuInventory(devices=(device,), driver_version="550"), list(QWEN25_CODER))
    assert info.wire()["devices"] == [{"id": 0, "name": "NVIDIA H100", "memory_gb": 80.0, "memory_used_gb": 10.0,
                                       "memory_free_gb": 70.0, "utilization": 7, "uuid": "GPU-1",
                                       "processes": [{"pid": 42, "memory_gb": 10.0}], "mig": False, "parent": None}]
    assert info.available and info.count == 1 and info.driverVersion == "550"


def test_errors_keep_their_details() -> None:
    refusal = {"error": "Cannot scale down: need 3 unassigned pods, but only 2 available", "success": False,
               "currentReplicas": 3, "targetReplicas": 0, "unassignedPods": 2}
    assert ScaleRefusal.model_validate(refusal).wire() == refusal
    assert ErrorBody.model_validate({"error": "x", "other": 1}).wire()["other"] == 1  # details pass through


def test_event_bus_takes_event_types_and_views() -> None:
    bus = EventBus()
    seen: list[tuple[str, Any]] = []
    bus.listen(lambda kind, data: seen.append((kind, data)))
    pod = Controller.pod_view(Pod("p-1", "pool", {L.MODEL: "m", L.BUSINESS: "unassigned", L.DEPLOYMENT_TYPE: L.MODEL_POOL}))
    with bus.subscribe() as queue:
        bus.publish(EventType.DEPLOYMENT, {"action": "created", "pods": [pod]})
        bus.publish("scale", {"success": True})  # plain strings still work while callers migrate
        message = queue.get_nowait()
    assert seen[0] == ("deployment", {"action": "created", "pods": [pod.wire()]}) and type(seen[0][1]["pods"][0]) is dict
    assert message["type"] == EventType.DEPLOYMENT and seen[1][0] == EventType.SCALE
    assert isinstance(PodView.model_validate(seen[0][1]["pods"][0]), PodView)


def test_openapi_documents_every_response(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import corral.api.app as app_module

    monkeypatch.setattr(app_module, "mount_ui", lambda app: None)  # the document is the API's; no NiceGUI state here
    document = app_module.create_app(Settings(data_dir=tmp_path)).openapi()
    schemas = document["components"]["schemas"]
    operations = [(m.upper(), p, op) for p, ops in document["paths"].items() for m, op in ops.items()]
    assert {p for _, p, _ in operations} >= {"/api/deploy", "/api/deployments", "/api/pods", "/api/history", "/api/health",
                                             "/api/finetune/tasks", "/api/system/gpu-info", "/api/pool-status/{deploymentName}"}
    for method, path, operation in operations:
        if not path.startswith("/api"):
            continue
        responses = operation["responses"]
        success = [code for code in responses if code.startswith("2")]
        assert len(success) == 1, (method, path, responses)
        content = responses[success[0]].get("content", {})
        assert content and all(body.get("schema") for body in content.values()), (method, path, content)
        assert "422" not in responses, (method, path)  # this app answers a malformed request with 400
        for code, response in responses.items():
            if code.startswith("4") or code.startswith("5"):
                assert "ErrorBody" in str(response["content"]["application/json"]["schema"]), (method, path, code)
        if method != "GET":
            assert {"400", "401"} <= set(responses) or (path.endswith("/cancel") and "401" in responses), (method, path)
    assert "HTTPValidationError" not in str(document)
    ok = {(m, p): op["responses"] for m, p, op in operations}
    assert ok[("POST", "/api/deploy")]["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/DeployResult"}
    assert "ScaleRefusal" in str(ok[("POST", "/api/scale-pool-deployment")]["409"])
    assert set(schemas["PoolDeploymentView"]["required"]) >= {"podDistribution", "assignment", "availableForScaleDown"}
    assert schemas["HistoryEntry"]["properties"]["action"] == {"$ref": "#/components/schemas/Action"}
    assert set(schemas["Action"]["enum"]) == {a.value for a in Action}
    assert set(schemas["TaskState"]["enum"]) == {s.value for s in TaskState}
    deployments = ok[("GET", "/api/deployments")]["200"]["content"]["application/json"]["schema"]
    assert "discriminator" in str(deployments) and "StandardDeploymentView" in str(deployments)


def test_deployment_union_picks_by_type() -> None:
    from pydantic import TypeAdapter

    adapter = TypeAdapter(DeploymentView)
    common = {"name": "d", "isPool": False, "engine": "simulator", "isSimulator": True, "modelId": "sim", "modelName": "m",
              "replicas": 1, "currentReplicas": 1, "readyReplicas": 1, "gpusPerReplica": 0, "engineArgs": [], "selector": {},
              "createdAt": None}
    standard = adapter.validate_python(common | {"type": "standard", "service": None, "baseUrl": None})
    assert isinstance(standard, StandardDeploymentView) and standard.wire()["service"] is None
    with pytest.raises(ValueError):  # a pool without its distribution is not a pool view
        adapter.validate_python(common | {"type": "pool", "isPool": True})
