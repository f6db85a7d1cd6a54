from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.domain.assignment import businesses_of_model, validate_assignment
from corral.domain.errors import Conflict, InvalidInput, NotFound
from corral.domain.models import Pod, Service
from corral.domain.scaling import plan_pool_scale, plan_standard_scale
from corral.domain.status import assignment_summary, pool_status

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def pod(i: int, business: str, ready: bool = True) -> Pod:
    labels = {"model": "m", "pool": "p", "pool-type": "vllm", "deployment-type": "model-pool", "business": business}
    return Pod(name=f"p-{i}", deployment="p", labels=labels, ready=ready, created_at=T0 + timedelta(minutes=i))


def service(business: str, model: str = "m") -> Service:
    return Service(name=f"{business}-nlb", model=model, selector={"model": model, "business": business},
                   labels={"business": business, "model": model, "service-type": "business-service"})


def test_pool_scale_up_adds_and_down_removes_only_unassigned() -> None:
    pods = [pod(0, "production"), pod(1, "unassigned"), pod(2, "unassigned", ready=False), pod(3, "unassigned")]
    assert plan_pool_scale(pods, 6).add == 2
    plan = plan_pool_scale(pods, 2)
    # Not-ready first, then newest.
    assert plan.remove == ("p-2", "p-3") and plan.current == 4 and plan.target == 2


def test_pool_scale_down_refusal_is_exact() -> None:
    pods = [pod(0, "production"), pod(1, "testing"), pod(2, "unassigned")]
    with pytest.raises(Conflict) as refusal:
        plan_pool_scale(pods, 0)
    assert refusal.value.message == "Cannot scale down: need 3 unassigned pods, but only 1 available"


@given(st.lists(st.sampled_from(["production", "testing", "unassigned"]), max_size=20), st.integers(0, 25))
def test_pool_scale_never_removes_an_assigned_pod(assignment: list[str], target: int) -> None:
    pods = [pod(i, b) for i, b in enumerate(assignment)]
    try:
        plan = plan_pool_scale(pods, target)
    except Conflict:
        assert sum(b == "unassigned" for b in assignment) < len(pods) - target
        return
    removed = {p.business for p in pods if p.name in plan.remove}
    assert removed <= {"unassigned"} and len(pods) + plan.add - len(plan.remove) == target


def test_standard_scale_applies_any_target() -> None:
    pods = [pod(0, "x"), pod(1, "x"), pod(2, "x")]
    assert plan_standard_scale(pods, 1).remove == ("p-2", "p-1")
    with pytest.raises(InvalidInput, match="targetReplicas must be an integer from 0 to 256"):
        plan_standard_scale(pods, -1)


def test_pool_status_and_summary() -> None:
    pods = [pod(0, "production"), pod(1, "production"), pod(2, "testing"), pod(3, "unassigned", ready=False)]
    status = pool_status("p", "m", pods, ["production", "testing", "staging"])
    assert status == {"deploymentName": "p", "modelName": "m", "totalPods": 4, "readyPods": 3,
                      "podDistribution": {"unassigned": 1, "production": 2, "staging": 0, "testing": 1},
                      "availableForScaleDown": 1}
    assert assignment_summary(status["podDistribution"]) == "production(2) | staging(0) | testing(1) | unassigned(1)"


def test_assignment_validation() -> None:
    services = [service("production"), service("testing"), service("research", model="other")]
    assert businesses_of_model(services, "m") == ["production", "testing"]
    target = pod(0, "unassigned")
    assert validate_assignment("p-0", target, "production", "m", services) is target
    assert validate_assignment("p-0", target, "unassigned", None, services) is target
    with pytest.raises(NotFound, match="pod 'ghost' not found"):
        validate_assignment("ghost", None, "production", "m", services)
    with pytest.raises(InvalidInput, match="modelName 'llama' does not match pod 'p-0', which serves model 'm'"):
        validate_assignment("p-0", target, "production", "llama", services)
    with pytest.raises(InvalidInput, match="business 'research' has no business service for model 'm'.*production, testing, unassigned"):
        validate_assignment("p-0", target, "research", "m", services)
    standard = Pod(name="s-0", deployment="s", labels={"model": "m", "app": "s", "deployment-type": "standard"})
    with pytest.raises(InvalidInput, match="standard deployment 's'"):
        validate_assignment("s-0", standard, "production", "m", services)
