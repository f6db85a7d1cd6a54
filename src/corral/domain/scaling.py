"""Scale plans. A pool only ever loses unassigned replicas (spec 01, "Scaling rules")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from corral.domain import labels as L
from corral.domain.errors import Conflict, InvalidInput
from corral.domain.models import Pod

MAX_REPLICAS = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class ScalePlan:
    current: int
    target: int
    add: int = 0
    remove: tuple[str, ...] = ()


def check_target(target: object) -> int:
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target <= MAX_REPLICAS:
        raise InvalidInput(f"targetReplicas must be an integer from 0 to {MAX_REPLICAS}, got {target!r}")
    return target


def removal_order(pods: Sequence[Pod]) -> list[Pod]:
    """Not-ready before ready, then newest first: lose the least capacity, as a ReplicaSet would."""
    return sorted(pods, key=lambda p: (p.ready, -(p.created_at or _EPOCH).timestamp(), p.name))


def plan_standard_scale(pods: Sequence[Pod], target: int) -> ScalePlan:
    check_target(target)
    current = len(pods)
    if target >= current:
        return ScalePlan(current, target, add=target - current)
    victims = removal_order(pods)[: current - target]
    return ScalePlan(current, target, remove=tuple(p.name for p in victims))


def scale_down_refusal(needed: int, available: int) -> str:
    return f"Cannot scale down: need {needed} unassigned pods, but only {available} available"


def plan_pool_scale(pods: Sequence[Pod], target: int) -> ScalePlan:
    """Scale-up adds unassigned replicas; scale-down removes only unassigned ones, or refuses."""
    check_target(target)
    current = len(pods)
    if target >= current:
        return ScalePlan(current, target, add=target - current)
    needed = current - target
    unassigned = [p for p in pods if p.business == L.UNASSIGNED]
    if len(unassigned) < needed:
        raise Conflict(scale_down_refusal(needed, len(unassigned)), unassignedPods=len(unassigned))
    victims = removal_order(unassigned)[:needed]
    return ScalePlan(current, target, remove=tuple(p.name for p in victims))
