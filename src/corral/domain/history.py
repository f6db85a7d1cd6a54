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
from corral.domain.tasks import ACTIVE, TaskState


class Action(StrEnum):
    DEPLOY = "deploy"
    DELETE = "delete"
    DEPLOY_SERVICE = "deploy-service"
    DELETE_SERVICE = "delete-service"
    ASSIGN = "assign"
    DISTRIBUTE = "distribute"
    SCALE = "scale"
    CRASH = "crash"
    EJECT = "eject"  # the gateway took a replica out of rotation (outlier detection), put it back, or was capped
    STRAY = "stray"  # a replica process that the desired state does not list, found and stopped
    CUTOVER = "cutover"
    SCALE_VERIFY = "scale-verify"
    AUTOPILOT = "autopilot"  # one decision of a pool's autopilot (its moves are `assign` rows before it)
    POLICY = "policy"  # a business's autopilot policy or a pool's autopilot settings changed
    ROUTING = "routing"  # a business service's replica picking changed (domain/replica_picking.py)
    PIN = "pin"  # a replica pinned where a person put it, or unpinned
    FINETUNE = "finetune"  # a finetune task submitted, started, preempted, completed, failed or cancelled
    ADAPTER_ADD = "adapter-add"  # a LoRA adapter added to a running vLLM pool (corral.adapters)
    ADAPTER_REMOVE = "adapter-remove"
    API_KEY = "api-key"  # a business service's API key created, updated or revoked (its id and prefix, never the key)
    ACCESS = "access"  # a business service's auth mode or quotas changed
    SLEEP = "sleep"  # a replica put to sleep (its weights offloaded or discarded; domain/sleep.py)
    WAKE = "wake"  # a sleeping replica woken


class Outcome(StrEnum):
    PENDING = "pending"  # intent recorded; the change is being carried out
    SUCCESS = "success"  # applied: reality matches the intent
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REFUSED = "refused"
    RESTARTING = "restarting"
    CORRECTED = "corrected"
    TIMEOUT = "timeout"
    # What Corral can see is done, the rest cannot be read: an external service's load balancer targets (Kubernetes,
    # no readiness gate reporting their health), which register minutes after the endpoints change.
    UNCONFIRMED = "unconfirmed"


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
    # finetune task id → its state now (the finetune manager's); None: not observed
    tasks: Mapping[str, TaskSeen] | None = None
    # (pool, adapter) → what the adapter reconciler found on the replicas; None: not asked (the controller's judging,
    # which leaves adapter rows to the adapter reconciler: `judge_adapter`)
    adapters: Mapping[tuple[str, str], AdapterProbe] | None = None


@dataclass(frozen=True)
class AdapterProbe:
    """One adapter of an existing pool after a restart, as the adapter reconciler found it once it had tried to bring
    every ready replica to the pool's desired adapters (loading it where it is desired and missing)."""

    desired: bool  # still among the pool's desired adapters
    ready: int  # ready replicas
    answered: int  # of them, those that answered
    loaded_on: int  # of them, those that have it loaded
    refused: str | None = None  # a replica's refusal to load it (the first), if any


def judge_interrupted(row: Mapping[str, Any], now: Observed) -> tuple[Outcome, str]:
    """The outcome of a change left pending by a control plane that stopped half-way.

    Called after recovery has driven reality to the recorded desired state, so a change whose
    effect is visible is complete; one whose effect is not (a cluster write that never happened)
    failed, and the row says so rather than claiming success. Each action is judged by what it
    changes; an action nobody taught this function to judge is never assumed applied. `PENDING`:
    not over yet, its owner carries it on (a scale-out recorded with its preemption is done again:
    `ScaleRedo`; adapter rows are the adapter reconciler's: `judge_adapter`).
    """
    action, target, after = row["action"], row["target"], row.get("after") or {}
    if action in (Action.ADAPTER_ADD, Action.ADAPTER_REMOVE):
        return judge_adapter(row, now.adapters)
    if action in (Action.SLEEP, Action.WAKE):
        # The sleep reconciler's (backends/local/sleep.py): it drives the replica to its recorded desired state
        # once it is ready, and completes the row then (or fails it when the replica is gone).
        return Outcome.PENDING, "left to the sleep reconciler, which asks the replica's engine"
    if action == Action.FINETUNE:
        return _judge_preemption(row, now.tasks)
    if action == Action.SCALE and (redo := ScaleRedo.of(row)) is not None:
        return _judge_preempting_scale(redo, now)
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
    elif action in (Action.API_KEY, Action.ACCESS):
        # A key or an access setting is written with its pending row, in one transaction; what was left is the routing
        # push, which the reconciler makes on every start. (A created key whose answer was lost is unknown to anyone:
        # listed by id and prefix, it can be revoked.)
        done = True
    elif action == Action.AUTOPILOT:  # an autopilot decision's summary row: `after` is {replica: its new business}
        where = {p.name: p.business for p in now.pods if p.deployment == target}
        done = isinstance(after, Mapping) and bool(after) and all(where.get(pod) == business for pod, business in after.items())
    else:
        # Written pending by no change Corral makes today; whatever writes one must say here how it is judged. Until
        # then it is not claimed: a change whose effect nobody looked at is not "applied".
        return Outcome.FAILED, (f"interrupted by a control-plane restart; Corral cannot tell whether this {action} change "
                                "took effect, so it is not reported as applied")
    if done:
        return Outcome.SUCCESS, "completed by the reconciler after a control-plane restart"
    return Outcome.FAILED, "interrupted by a control-plane restart before it took effect; nothing of it is applied"


@dataclass(frozen=True)
class TaskSeen:
    """A finetune task as it is after a restart (the manager has re-adopted or followed its trainer)."""

    status: TaskState
    units: tuple[str, ...]  # the GPU units it holds now
    preempted: bool  # asked to give its GPUs (`preempted_by` set), not restarted since


def _judge_preemption(row: Mapping[str, Any], tasks: Mapping[str, TaskSeen] | None) -> tuple[Outcome, str]:
    """A preemption's row (`corral.finetune.preemption`): the task was to be asked to save a checkpoint and give its
    GPUs. Done once it is asked — `preempted_by` recorded, the signal sent — or has left those GPUs; not done when
    it still trains on them unasked (the restart came first: nothing of the preemption happened)."""
    if tasks is None:
        return Outcome.FAILED, ("interrupted by a control-plane restart; the finetune tasks were not observed, so the "
                                "preemption is not reported as applied")
    task = tasks.get(row["target"])
    if task is None:
        return Outcome.FAILED, "interrupted by a control-plane restart; the task no longer exists"
    held = tuple((row.get("before") or {}).get("units") or ())
    if task.status not in ACTIVE:
        return Outcome.SUCCESS, f"the trainer had stopped and the task was {task.status} after a control-plane restart"
    if task.preempted:
        return Outcome.SUCCESS, ("asked before a control-plane restart; the trainer saves its checkpoint and stops by "
                                 "itself (a 'preempted:' row follows)")
    if task.units != held:
        return Outcome.SUCCESS, "the task had left those GPUs (and started again since) after a control-plane restart"
    return Outcome.FAILED, ("interrupted by a control-plane restart before the trainer was asked; it kept its GPUs "
                            "(nothing of the preemption is applied)")


PREEMPTING = "preempting"  # key of a scale row's `after`: the scale-out a preemption frees GPUs for (`ScaleRedo`)


@dataclass(frozen=True)
class ScaleRedo:
    """A scale-out recorded with the preemption that frees its GPUs, as one intent (before the trainers are asked):
    if a restart interrupts it, the trainers may have checkpointed and stopped already, and only carrying the scale
    out again gives the business the replicas they stopped for (else the tasks would simply start again)."""

    pool: str
    replicas: int  # the pool's size once scaled out
    business: str | None  # who the replicas are for, at `priority` (`domain.preemption.PreemptionRequest`)
    priority: int

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> ScaleRedo | None:
        """The redo a scale row calls for, if it was recorded with a preemption; None for any other row."""
        after = row.get("after")
        if row.get("action") != Action.SCALE or not isinstance(after, Mapping) or not isinstance(after.get(PREEMPTING), Mapping):
            return None
        replicas, why = after.get("replicas"), after[PREEMPTING]
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            return None
        priority = why.get("priority")
        return cls(row["target"], replicas, why.get("business"), priority if isinstance(priority, int) else 0)


def _judge_preempting_scale(redo: ScaleRedo, now: Observed) -> tuple[Outcome, str]:
    """`PENDING` (the controller carries it out again: `ScaleRedo`) while the pool exists with fewer replicas."""
    if redo.pool not in now.deployments:
        return Outcome.FAILED, "interrupted by a control-plane restart; the pool was deleted, so it was not scaled out"
    have = sum(1 for p in now.pods if p.deployment == redo.pool)
    if have >= redo.replicas:
        return Outcome.SUCCESS, f"completed after a control-plane restart ({have} replicas)"
    return Outcome.PENDING, "carried out again after a control-plane restart (the preemption may have freed its GPUs)"


def judge_adapter(row: Mapping[str, Any], probes: Mapping[tuple[str, str], AdapterProbe] | None) -> tuple[Outcome, str]:
    """An interrupted adapter add or remove, judged by what the replicas have loaded, as the live path would have:
    an add a replica refuses is rolled back (the caller removes it from the desired state and unloads it), never
    recorded as applied and retried forever. `PENDING`: not judged yet — `probes` is None (not this caller's) or no
    ready replica has answered; judged again once one does."""
    adding = row["action"] == Action.ADAPTER_ADD
    name = (row.get("after") if adding else row.get("before")) or {}
    name = name.get("adapter") if isinstance(name, Mapping) else None
    if probes is None:
        return Outcome.PENDING, "left to the adapter reconciler, which asks the replicas"
    probe = probes.get((row["target"], name))  # type: ignore[arg-type]
    if not adding:
        if probe is not None and probe.desired:
            return Outcome.FAILED, "interrupted by a control-plane restart before it took effect; the adapter is still desired"
        return Outcome.SUCCESS, ("removed; replicas that still have it unload it as they answer (the adapter reconciler)"
                                 if probe is not None and probe.loaded_on else "removed: no replica has it loaded")
    if probe is None:
        return Outcome.FAILED, "interrupted by a control-plane restart; the pool is gone, and its adapters with it"
    if not probe.desired:
        return Outcome.ROLLED_BACK, "interrupted by a control-plane restart; the adapter is not desired (rolled back before it)"
    if probe.refused is not None:
        return Outcome.ROLLED_BACK, (f"a replica refused to load it after a control-plane restart ({probe.refused}); rolled back "
                                     "as a refused add is: removed from the pool and unloaded where it had loaded")
    if probe.loaded_on or not probe.ready:
        return Outcome.SUCCESS, (f"completed after a control-plane restart: loaded on {probe.loaded_on} of {probe.ready} ready "
                                 "replica(s); the others get it as they answer")
    return Outcome.PENDING, "no ready replica has answered since the control-plane restart; judged once one does"
