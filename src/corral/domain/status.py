"""Pool status: the numbers spec 01's pool-status API and deployment manager show."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from corral.domain import labels as L
from corral.domain.models import Pod


def pod_distribution(pods: Sequence[Pod], businesses: Iterable[str] = ()) -> dict[str, int]:
    """Pods per business; `unassigned` and every known business appear even at 0."""
    counts = Counter(p.business or L.UNASSIGNED for p in pods)
    keys = [L.UNASSIGNED, *sorted(set(businesses) | set(counts) - {L.UNASSIGNED})]
    return {key: counts.get(key, 0) for key in keys}


def pool_status(deployment: str, model: str, pods: Sequence[Pod], businesses: Iterable[str]) -> dict[str, object]:
    distribution = pod_distribution(pods, businesses)
    return {
        "deploymentName": deployment,
        "modelName": model,
        "totalPods": len(pods),
        "readyPods": sum(p.ready for p in pods),
        "podDistribution": distribution,
        "availableForScaleDown": distribution[L.UNASSIGNED],
    }


def assignment_summary(distribution: dict[str, int]) -> str:
    """`production(2) | testing(1) | unassigned(1)`: businesses first, unassigned last, as in spec 01."""
    ordered = [b for b in distribution if b != L.UNASSIGNED] + [L.UNASSIGNED]
    return " | ".join(f"{b}({distribution[b]})" for b in ordered if b in distribution)
