"""Refusals carry a kind and typed hints; each front end words the hints: the API's `error` is the text it has
always answered, the CLI's names commands, the plain words (UI, logs, history) name no interface."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from corral.adapters import task_adapter
from corral.api.schemas import API_WORDING, STATUS, error_body
from corral.backends.memory import MemoryBackend
from corral.controller import Controller
from corral.domain.adapters import Adapter, check_can_add
from corral.domain.assignment import check_business_for_model, validate_assignment
from corral.domain.deploy_request import DeploySpec
from corral.domain.errors import PLAIN, Conflict, CorralError, ErrorKind, Hint, InvalidInput, NotFound
from corral.domain.models import Deployment, Service
from corral.events import EventBus
from corral.store.state import StateStore


def api_error(refusal: pytest.ExceptionInfo[CorralError]) -> str:
    return error_body(refusal.value).error


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    store = StateStore(tmp_path / "corral.db")
    try:
        yield Controller(MemoryBackend(gpu_ids=[0, 1]), store, EventBus())
    finally:
        store.close()


def test_every_hint_is_worded_by_every_front_end_and_every_kind_has_a_status() -> None:
    assert set(API_WORDING) == set(PLAIN) == set(Hint)
    assert set(STATUS) == set(ErrorKind)
    assert all("/api/" not in words and "corral " not in words for words in PLAIN.values())


def test_the_domains_refusals_read_as_the_api_always_worded_them() -> None:
    with pytest.raises(NotFound) as missing:
        validate_assignment("ghost", None, "production", None, [])
    assert api_error(missing) == "pod 'ghost' not found; list pods with GET /api/pods"
    assert missing.value.message == str(missing.value) == "pod 'ghost' not found"

    services = [Service(name="p-nlb", model="m", selector={"model": "m", "business": "production"},
                        labels={"business": "production", "service-type": "business-service"})]
    with pytest.raises(InvalidInput) as unknown:
        check_business_for_model("research", "m", services, "businessTag")
    assert api_error(unknown) == ("business 'research' has no business service for model 'm': create one first "
                                  "(POST /api/deploy-service) or choose one of: production, unassigned")
    assert error_body(unknown.value).wire() | {"error": ""} == {
        "error": "", "code": "invalid_input", "problem": "business 'research' has no business service for model 'm'",
        "hints": ["create-service"], "choices": ["production", "unassigned"]}

    pool = Deployment(name="vllm-chat-pool", engine="vllm", model_id="m", model_tag="chat", is_pool=True, replicas=1,
                      engine_args=("--enable-lora", "--max-lora-rank", "16"))
    with pytest.raises(Conflict) as taken:
        check_can_add(pool, "a", 8, [Adapter("vllm-chat-pool", "a", "/x")])
    assert api_error(taken) == ("pool 'vllm-chat-pool' already has an adapter named 'a'; remove it first "
                                "(DELETE /api/deployments/vllm-chat-pool/adapters/a) or choose another name")

    with pytest.raises(Conflict) as full:
        task_adapter(SimpleNamespace(id="t1", status="completed", output="/x", method="full"))  # type: ignore[arg-type]
    assert api_error(full) == ("task t1 is a full finetune and has no LoRA adapter; deploy it as its own pool "
                               "(POST /api/finetune/tasks/{id}/deploy with modelTag)")


async def test_the_controllers_refusals_read_as_the_api_always_worded_them(controller: Controller) -> None:
    pool = (await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="m", replicas=2,
                                                deploy_as_pool=True))).deployment.name
    await controller.deploy(DeploySpec(engine="simulator", model_id="sim", model_tag="s", replicas=1))
    await controller.deploy_service("prod", pool, "production", False)
    await controller.assign_pod(controller.backend.list_pods(pool)[0].name, "production", None)

    with pytest.raises(Conflict) as serving:
        await controller.delete_deployment(pool)
    assert api_error(serving) == (f"pool '{pool}' still serves businesses (production(1)); unassign its pods first "
                                  "or delete with force=true")
    with pytest.raises(Conflict) as stranded:
        await controller.delete_service("prod-nlb")
    assert api_error(stranded) == ("1 pod(s) are assigned to business 'production' of model 'm', which would be left "
                                   "without a service; unassign them first or delete with force=true (unassigns them)")
    with pytest.raises(NotFound) as no_service:
        await controller.delete_service("nope-nlb")
    assert api_error(no_service) == "service 'nope-nlb' not found; list them with GET /api/business-services"
    with pytest.raises(InvalidInput) as standard:
        await controller.scale("simulator-s", 2, pool_endpoint=True)
    assert api_error(standard) == "'simulator-s' is a standard deployment; scale it with POST /api/scale-deployment"
    with pytest.raises(NotFound) as no_deployment:
        await controller.scale("nope", 2, pool_endpoint=False)
    assert api_error(no_deployment) == "deploymentName 'nope' not found; list deployments with GET /api/deployments"
    assert STATUS[no_deployment.value.kind] == 404 and STATUS[serving.value.kind] == 409


def test_a_refusal_without_hints_answers_as_before() -> None:
    refusal = Conflict("Cannot scale down: need 2 unassigned pods, but only 1 available", success=False, currentReplicas=4)
    assert error_body(refusal).wire() == {"error": "Cannot scale down: need 2 unassigned pods, but only 1 available",
                                          "success": False, "currentReplicas": 4}
