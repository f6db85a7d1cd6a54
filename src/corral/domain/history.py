"""History rows as intents: what a change means to do, written before it is done.

Every mutation writes its rows with outcome `pending` in the same transaction as the desired state
it records, then acts; the controller completes them (`success`, `rolled_back`, `failed`) when
reality matches or the change is given up. A row still pending after a restart belongs to a change
that a crash interrupted: `judge_interrupted` decides, from what is observed now, whether the
reconciler finished it or it has to be reported as failed — so every change ends with a record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from corral.domain.models import Deployment, Pod, Service
from corral.domain.status import pod_distribution


class Action(StrEnum):
    DEPLOY = "deploy"
    DELETE = "delete"
    DEPLOY_SERVICE = "deploy-service"
    DELETE_SERVICE = "delete-service"
    ASSIGN = "assign"
    DISTRIBUTE = "distribute"
    SCALE = "scale"
    CRASH = "crash"
    STRAY = "stray"  # a replica process that the desired state does not list, found and stopped
    CUTOVER = "cutover"
    SCALE_VERIFY = "scale-verify"
    AUTOPILOT = "autopilot"  # one decision of a pool's autopilot (its moves are `assign` rows before it)
    POLICY = "policy"  # a business's autopilot policy or a pool's autopilot settings changed
    PIN = "pin"  # a replica pinned where a person put it, or unpinned
    FINETUNE = "finetune"  # a finetune task submitted, started, preempted, completed, failed or cancelled
    ADAPTER_ADD = "adapter-add"  # a LoRA adapter added to a running vLLM pool (corral.adapters)
    ADAPTER_REMOVE = "adapter-remove"


class Outcome(StrEnum):
    PENDING = "pending"  # intent recorded; the change is being carried out
    SUCCESS = "success"  # applied: reality matches the intent
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REFUSED = "refused"
    RESTARTING = "restarting"
    CORRECTED = "corrected"
    TIMEOUT = "timeout"


@dataclass
class Intent:
    """The history rows of one change, written (pending) with its desired state; `ids` once written.
    The last row is the change's summary (a distribution after its per-pod assignments)."""

    rows: Sequence[HistoryDraft]
    ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class HistoryDraft:
    action: Action
    target: str
    before: Any = None
    after: Any = None
    message: str = ""


@dataclass(frozen=True)
class Observed:
    """What the backend shows now, for judging interrupted changes."""

    deployments: Mapping[str, Deployment]
    pods: Sequence[Pod]
    services: Mapping[str, Service]


def judge_interrupted(row: Mapping[str, Any], now: Observed) -> tuple[Outcome, str]:
    """The outcome of a change left pending by a control plane that stopped half-way.

    Called after recovery has driven reality to the recorded desired state, so a change whose
    effect is visible is complete; one whose effect is not (a cluster write that never happened)
    failed, and the row says so rather than claiming success.
    """
    action, target, after = row["action"], row["target"], row.get("after") or {}
    done: bool
    if action == Action.DEPLOY:
        done = target in now.deployments
    elif action == Action.DELETE:
        done = target not in now.deployments
    elif action == Action.DEPLOY_SERVICE:
        done = target in now.services
    elif action == Action.DELETE_SERVICE:
        done = target not in now.services
    elif action == Action.ASSIGN:
        pod = next((p for p in now.pods if p.name == target), None)
        done = pod is not None and pod.business == after.get("business")
    elif action == Action.SCALE:
        done = sum(1 for p in now.pods if p.deployment == target) == after.get("replicas")
    elif action == Action.DISTRIBUTE:
        wanted = {b: n for b, n in after.items() if n}
        have = {b: n for b, n in pod_distribution([p for p in now.pods if p.deployment == target]).items() if n}
        done = wanted == have
    else:
        done = True
    if done:
        return Outcome.SUCCESS, "completed by the reconciler after a control-plane restart"
    return Outcome.FAILED, "interrupted by a control-plane restart before it took effect; nothing of it is applied"
