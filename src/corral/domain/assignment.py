"""Which assignments are allowed (spec 01, "Dynamic pod assignment")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from corral.domain import labels as L
from corral.domain.errors import Hint, InvalidInput, NotFound
from corral.domain.models import Pod, Service


def businesses_of_model(services: Iterable[Service], model: str) -> list[str]:
    """The businesses a replica of `model` may join: discovered from business services, never hard-coded."""
    return sorted({s.business for s in services if s.is_business_service and s.model == model and s.business})


def check_business_for_model(business: str, model: str, services: Iterable[Service], field: str) -> str:
    """`business` is `unassigned` or has a business service for `model`; else a message naming the choices."""
    L.check_name(business, field)
    if business == L.UNASSIGNED:
        return business
    known = businesses_of_model(services, model)
    if business not in known:
        raise InvalidInput(f"business '{business}' has no business service for model '{model}'", Hint.CREATE_SERVICE,
                           choices=[*known, L.UNASSIGNED])
    return business


def validate_assignment(
    pod_name: str, pod: Pod | None, business: str, model_name: str | None, services: Iterable[Service]
) -> Pod:
    """Return the pod to relabel, or raise saying exactly what is wrong with the request."""
    if pod is None:
        raise L.unknown_name(pod_name, "podName", NotFound(f"pod '{pod_name}' not found", Hint.LIST_PODS))
    if not pod.is_pool_pod:
        raise InvalidInput(
            f"pod '{pod.name}' belongs to the standard deployment '{pod.deployment}'; "
            "only model-pool pods can be assigned to a business"
        )
    assert pod.model is not None  # a pool pod always has a model label
    if model_name is not None and model_name != pod.model:
        raise InvalidInput(f"modelName '{L.shown(model_name)}' does not match pod '{pod.name}', which serves model '{pod.model}'")
    check_business_for_model(business, pod.model, services, "businessTag")
    return pod


def plan_restore(pods: Sequence[Pod], desired: Mapping[str, int]) -> dict[str, str]:
    """Pod → business for unassigned replicas that give each business back the count it should have.

    After replicas are replaced behind Corral's back (a crash on Kubernetes, a node lost, a rollout:
    new pods start `unassigned`), each business short of `desired` takes unassigned pods — ready ones
    first, then the oldest. Businesses are served in name order, so the plan is deterministic.
    Never takes a pod from another business.
    """
    counts: dict[str, int] = {}
    for pod in pods:
        counts[pod.business or L.UNASSIGNED] = counts.get(pod.business or L.UNASSIGNED, 0) + 1
    spare = sorted((p for p in pods if p.business == L.UNASSIGNED),
                   key=lambda p: (not p.ready, (p.created_at.timestamp() if p.created_at else 0.0), p.name))
    plan: dict[str, str] = {}
    for business in sorted(desired):
        if business == L.UNASSIGNED:
            continue
        for _ in range(max(0, desired[business] - counts.get(business, 0))):
            if not spare:
                return plan
            plan[spare.pop(0).name] = business
    return plan
