"""Preemption and preflight decisions (pure): who gives GPUs to a higher-priority business, and whether a task's
memory fits a unit now, with the numbers in the reason."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from corral.domain.autopilot import (
    AutopilotMemory,
    BusinessDemand,
    BusinessPolicy,
    PoolAutopilot,
    ReplicaState,
    decide,
)
from corral.domain.gpu_ledger import GpuClaim, GpuLedger, GpuUnit, Holder
from corral.domain.preemption import (
    PreemptionRequest,
    TaskOnGpu,
    business_priority,
    may_reclaim,
    plan_preemption,
    steps_since,
    victim_order,
)
from corral.domain.preflight import (
    ASSUMED_REPLICA_SHARE,
    StartingReplica,
    UnitRoom,
    admissible,
    expected_replica_bytes,
    rooms,
    shortfall,
)
from corral.domain.queue import PRIORITY_LEVELS, Demand, Priority

GIB = 1024**3


def task(name: str, units: Sequence[str], level: int = -10, lost: int = 0, started: float = 0.0,
         preemptible: bool = True) -> TaskOnGpu:
    return TaskOnGpu(name, level, preemptible, tuple(units), lost, started)


def machine(gpus: int, tasks: Sequence[TaskOnGpu], replicas: dict[str, Sequence[str]] | None = None) -> GpuLedger:
    units = [GpuUnit.parse(str(i), 80 * GIB, 80 * GIB) for i in range(gpus)]
    claims = [GpuClaim(Holder.task(t.id), t.units) for t in tasks]
    claims += [GpuClaim(Holder.replica(r), tuple(u)) for r, u in (replicas or {}).items()]
    return GpuLedger.build(units, claims)


def test_the_priority_scale_is_documented_and_ordered() -> None:
    assert PRIORITY_LEVELS == {"high": 10, "normal": 0, "low": -10}
    assert [Priority.parse(p).level for p in ("low", "normal", "high")] == [-10, 0, 10]
    assert business_priority({}) == (0, None)  # a pool without businesses is at normal
    assert business_priority({"chat": 5, "batch": -3, "api": 5}) == (5, "api")
    assert may_reclaim(10, 0) and not may_reclaim(0, 0) and not may_reclaim(10, 20)
    assert steps_since(7, 6) == 1 and steps_since(7, None) == 7 and steps_since(None, None) == 0
    assert PreemptionRequest("p", "chat", 10, 1).describe() == "business 'chat' (priority 10)"
    assert PreemptionRequest("p", None, 0, 1).describe() == "pool 'p' (priority 0)"


def test_nothing_is_preempted_while_enough_gpus_are_free() -> None:
    running = [task("ft-a", ["0"])]
    plan = plan_preemption(1, 10, running, machine(2, running))
    assert not plan.needed and plan.freed == ("1",) and plan.why_not == ""


def test_only_preemptible_tasks_strictly_below_the_business() -> None:
    running = [task("ft-high", ["0"], level=10), task("ft-pinned", ["1"], preemptible=False), task("ft-normal", ["2"], level=0)]
    ledger = machine(3, running)
    plan = plan_preemption(1, 0, running, ledger)  # a business at 0 ranks with normal tasks: it does not take from them
    assert not plan.needed and "no preemptible finetune task below priority 0" in plan.why_not
    plan = plan_preemption(1, 5, running, ledger)
    assert plan.victims == ("ft-normal",) and plan.freed == ("2",)
    plan = plan_preemption(2, 5, running, ledger)  # two GPUs wanted, only one can be freed: stop nobody
    assert not plan.needed and "would free 1 of the 2 GPU(s) needed" in plan.why_not


def test_lowest_priority_first_then_fewest_steps_lost_then_newest() -> None:
    running = [task("ft-normal", ["0"], level=0, lost=0), task("ft-low-old", ["1"], lost=3, started=10.0),
               task("ft-low-new", ["2"], lost=3, started=20.0), task("ft-low-saved", ["3"], lost=1, started=5.0)]
    assert [t.id for t in victim_order(running)] == ["ft-low-saved", "ft-low-new", "ft-low-old", "ft-normal"]
    assert plan_preemption(1, 10, running, machine(4, running)).victims == ("ft-low-saved",)
    assert plan_preemption(2, 10, running, machine(4, running)).victims == ("ft-low-saved", "ft-low-new")


def test_a_victim_made_unnecessary_by_a_bigger_one_is_spared() -> None:
    # The first pick frees 1 GPU, the second frees 2: the second alone is enough, so the first keeps training.
    running = [task("ft-small", ["0"], lost=0), task("ft-big", ["1", "2"], lost=5)]
    plan = plan_preemption(2, 10, running, machine(3, running))
    assert plan.victims == ("ft-big",) and set(plan.freed) == {"1", "2"}


@given(st.lists(st.tuples(st.integers(1, 2), st.sampled_from([-10, 0, 10]), st.booleans(), st.integers(0, 5)), max_size=4),
       st.integers(1, 4), st.sampled_from([-10, 0, 10, 20]))
def test_a_plan_frees_enough_or_stops_nobody(shapes: list, gpus: int, level: int) -> None:
    running, next_unit = [], 0
    for i, (size, task_level, preemptible, lost) in enumerate(shapes):
        running.append(task(f"ft-{i}", [str(next_unit + j) for j in range(size)], task_level, lost, float(i), preemptible))
        next_unit += size
    ledger = machine(next_unit + 1, running)  # one GPU spare
    plan = plan_preemption(gpus, level, running, ledger)
    by_id = {t.id: t for t in running}
    assert all(by_id[v].preemptible and by_id[v].level < level for v in plan.victims)
    if plan.needed:
        assert len(plan.freed) == gpus and not plan.why_not
        for victim in plan.victims:  # minimal: without any one victim it would not be enough
            rest = [by_id[v] for v in plan.victims if v != victim]
            after = ledger
            for t in rest:
                after = after.release(Holder.task(t.id))
            assert len(after.free_units(whole_only=True)) < gpus
    else:
        assert plan.why_not or len(plan.freed) == gpus


def test_preflight_reason_has_the_unit_and_the_numbers() -> None:
    units = rooms([("0", 3.2 * GIB)], [])
    assert shortfall(Demand(1, 6.5 * GIB), units, 1 * GIB) == (
        "waiting for GPU 0: 3.2 GiB free now, 0.0 GiB reserved by starting replicas, needs 6.5 GiB + 1.0 GiB margin")
    assert admissible(units, 1 * GIB)[0].free_bytes == 2.2 * GIB
    assert shortfall(Demand(1, 2.2 * GIB), units, 1 * GIB) is None  # estimate + margin = room: it fits
    assert shortfall(Demand(2, 1 * GIB), units, 1 * GIB) is None  # too few units at all: the queue's reason says so
    assert shortfall(Demand(0), units, 1 * GIB) is None  # a CPU task


def test_starting_replicas_reserve_their_expected_memory_on_overlapping_units() -> None:
    starting = [StartingReplica("r-0", ("0",), 8 * GIB), StartingReplica("r-1", ("1/mig0",), 2 * GIB)]
    units = rooms([("0", 20 * GIB), ("1", 10 * GIB), ("2", 10 * GIB)], starting)
    assert [(u.id, u.reserved / GIB) for u in units] == [("0", 8.0), ("1", 2.0), ("2", 0.0)]
    assert units[0].room == 12 * GIB and UnitRoom("3", 1 * GIB, 4 * GIB).room == 0
    assert shortfall(Demand(1, 12 * GIB), units[:1], 1 * GIB) == (
        "waiting for GPU 0: 20.0 GiB free now, 8.0 GiB reserved by starting replicas, needs 12.0 GiB + 1.0 GiB margin")


def test_what_a_starting_replica_is_expected_to_take() -> None:
    total = 80 * GIB
    assert expected_replica_bytes("simulator", [], total) == 0
    assert expected_replica_bytes("vllm", [], total) == ASSUMED_REPLICA_SHARE * total
    assert expected_replica_bytes("vllm", ["--gpu-memory-utilization", "0.5"], total) == 0.5 * total
    assert expected_replica_bytes("sglang", ["--mem-fraction-static=0.25"], total) == 0.25 * total
    assert expected_replica_bytes("vllm", ["--gpu-memory-utilization", "junk"], total) == ASSUMED_REPLICA_SHARE * total


def test_the_autopilot_reports_replicas_it_found_no_gpu_for() -> None:
    """A business over its minimum-replica want with no GPU free: the decision says how many replicas lack GPUs
    and who wants them (the loop preempts lower-priority tasks for it)."""
    policy = BusinessPolicy(min_replicas=2, priority=10)
    decision = decide([ReplicaState("r-0", "chat", ready=True)], {"chat": BusinessDemand(policy)},
                      PoolAutopilot(enabled=True, scale_out=True, warm_spares=0), AutopilotMemory(), 100.0,
                      free_gpu_units=0, gpus_per_replica=1)
    assert decision.scale_to is None and decision.short_of_gpus == 1 and dict(decision.wanting) == {"chat": 1}
    assert "cannot scale out: no free GPU" in decision.waiting_for


async def test_the_autopilot_preempts_for_its_highest_priority_business_then_scales_out(tmp_path) -> None:
    """The loop's hook (corral.autopilot): short of GPUs while a business wants replicas, it asks the preemptor for
    that business's priority and scales out inside the block (while the freed GPUs are kept from the queue). The
    scale's row goes with the request, to be written with the preemption as one intent (issue 26), and the scale
    completes it."""
    import contextlib
    import functools
    from types import SimpleNamespace

    from corral.autopilot import Autopilot
    from corral.controller import Controller
    from corral.domain.autopilot import Decision
    from corral.domain.history import PREEMPTING, Action, HistoryDraft, Intent
    from corral.domain.preemption import PreemptionOutcome
    from corral.events import EventBus
    from corral.store.state import StateStore

    calls: list = []
    begun = Intent([], ids=[7])  # the scale's row, written with the preemption's

    @contextlib.asynccontextmanager
    async def preemptor(request):  # noqa: ANN001, ANN202
        calls.append(("preempt", request))
        yield PreemptionOutcome(tasks=("ft-low",), freed=("0",), scale=begun)
        calls.append(("kept until here",))

    async def scale(pool, target, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(("scale", pool, target, kwargs.get("intent") is begun))
        controller._taken.add(id(kwargs["intent"]))  # as `Controller._scale` does when it takes the row on
        return {}

    controller = SimpleNamespace(backend=SimpleNamespace(list_pods=lambda pool: ["replica"]), preemptor=preemptor,
                                 scale=scale, _taken=set())
    controller.scale_with_preemption = functools.partial(Controller.scale_with_preemption, controller)
    controller._close_untaken = functools.partial(Controller._close_untaken, controller)
    autopilot = Autopilot(controller, StateStore(tmp_path / "c.db"), EventBus(), traffic=dict,  # type: ignore[arg-type]
                          free_gpu_units=lambda: 0)
    autopilot._waiting_for["p"] = []
    demands = {"chat": BusinessDemand(BusinessPolicy(priority=10)), "batch": BusinessDemand(BusinessPolicy(priority=-5))}
    decision = Decision(short_of_gpus=1, wanting={"chat": 1, "batch": 2})
    await autopilot._preempt_and_scale("p", decision, demands, 1, 1, 0.0)
    row = HistoryDraft(Action.SCALE, "p", before={"replicas": 1}, after={"replicas": 2, PREEMPTING: {"business": "chat",
                                                                                                   "priority": 10}},
                       message="scale out to 2 once preempted finetune tasks give their GPUs")
    assert calls[0] == ("preempt", PreemptionRequest("p", "chat", 10, 1, scale=row))
    assert calls[1:] == [("scale", "p", 2, True), ("kept until here",)]
    assert controller._taken == set()
    assert autopilot.counters[("p", "scale_out")] == 1


class _OneGpuMachine:
    """What `corral.finetune.preemption.Preemption` reads and drives, faked: one GPU ("0"), one task, its trainer."""

    def __init__(self, tmp_path, status, units: list[str], preempted_by: dict | None, alive: bool) -> None:  # noqa: ANN001
        from types import SimpleNamespace

        from corral.finetune.store import TaskRecord
        from corral.intents import Intents
        from corral.store.state import StateStore

        self.task = TaskRecord("t1", status, "m", "d.jsonl", "lora", "low", {}, gpus=1, units=units, pid=1,
                               preempted_by=preempted_by)
        self.alive, self.signals, self.notes = alive, [], []
        self.settings = SimpleNamespace(preempt_timeout_s=30.0)
        self.intents = Intents(StateStore(tmp_path / "c.db"))

    # lifecycle
    def launched(self) -> list:
        from corral.domain.tasks import ACTIVE
        return [self.task] if self.task.status in ACTIVE else []

    def get(self, task_id: str):  # noqa: ANN201
        return self.task

    def follow(self, task) -> None:  # noqa: ANN001 (the trainer exited: back to the queue, as `Lifecycle.follow` does)
        import dataclasses

        from corral.domain.tasks import TaskState
        self.task = dataclasses.replace(self.task, status=TaskState.QUEUED, units=[])

    # runner
    def can_preempt(self, task) -> bool:  # noqa: ANN001
        return self.alive

    def preempt(self, task) -> bool:  # noqa: ANN001 (the trainer saves and exits on the signal)
        self.signals.append(task.id)
        self.alive = False
        return True

    async def stop(self, task) -> None:  # noqa: ANN001
        self.alive = False

    # files, tasks
    def note(self, task_id: str, message: str) -> None:
        self.notes.append(message)

    def checkpoint(self, task_id: str) -> None:
        return None

    def update(self, task_id: str, **columns):  # noqa: ANN003, ANN201
        import dataclasses
        self.task = dataclasses.replace(self.task, **columns)
        return self.task

    def ledger(self) -> GpuLedger:
        claims = [GpuClaim(Holder.task("t1"), tuple(self.task.units))] if self.task.units else []
        return GpuLedger.build([GpuUnit.parse("0", 80 * GIB, 80 * GIB)], claims)

    def preemption(self):  # noqa: ANN201
        from types import SimpleNamespace

        from corral.finetune.preemption import Preemption
        lifecycle = SimpleNamespace(launched=self.launched, get=self.get, follow=self.follow, intents=self.intents)
        runner = SimpleNamespace(alive=lambda task: self.alive, can_preempt=self.can_preempt, preempt=self.preempt,
                                 stop=self.stop)
        return Preemption(self.settings, SimpleNamespace(update=self.update), lifecycle,  # type: ignore[arg-type]
                          SimpleNamespace(note=self.note, checkpoint=self.checkpoint), runner, self.ledger)  # type: ignore[arg-type]


async def test_the_gpus_of_a_preemption_are_kept_from_the_moment_it_is_asked_for(tmp_path) -> None:
    """Issue 26 item 6: a scale-out carried out again after a restart asks for its preemption while the task it
    stopped waits in the queue on a free GPU; from that call on — before the block is entered, which the queue's first
    round after the restart may precede — the GPU is kept from the queue, until the block ends."""
    from corral.domain.tasks import TaskState

    machine = _OneGpuMachine(tmp_path, TaskState.QUEUED, [], {"business": "chat", "priority": 10, "pool": "p"}, False)
    preemption = machine.preemption()
    assert preemption.keep_for_replicas(machine.ledger()).is_free("0")
    held = preemption.preempting(PreemptionRequest("p", "chat", 10, 1))
    assert not preemption.keep_for_replicas(machine.ledger()).is_free("0")  # not entered yet: kept already
    async with held as outcome:
        assert outcome.freed == ("0",) and outcome.tasks == () and outcome.scale is None
        assert not preemption.keep_for_replicas(machine.ledger()).is_free("0")
    assert preemption.keep_for_replicas(machine.ledger()).is_free("0")
    assert machine.signals == []


async def test_a_trainer_asked_before_a_restart_is_asked_again_and_waited_for(tmp_path) -> None:
    """Issue 26 item 6: the restart came between the signal and the trainer's exit (or before the signal): the task
    still trains on GPU 0 with `preempted_by` for this pool. The same preemption asked again counts its GPU as coming
    free, signals it again (harmless: the trainer only sets a flag), waits until it is back in the queue, and keeps
    the GPU for the replica."""
    from corral.domain.tasks import TaskState

    machine = _OneGpuMachine(tmp_path, TaskState.TRAINING, ["0"], {"business": "chat", "priority": 10, "pool": "p"}, True)
    preemption = machine.preemption()
    async with preemption.preempting(PreemptionRequest("p", "chat", 10, 1)) as outcome:
        assert machine.signals == ["t1"] and any("asked again" in note for note in machine.notes)
        assert outcome.tasks == ("t1",) and outcome.freed == ("0",)
        assert machine.task.status == TaskState.QUEUED and machine.task.units == []
        assert not preemption.keep_for_replicas(machine.ledger()).is_free("0")
    assert preemption.keep_for_replicas(machine.ledger()).is_free("0")
    # Asked for another pool, the same task is no candidate (it is leaving already) and is not waited for.
    other = _OneGpuMachine(tmp_path, TaskState.TRAINING, ["0"], {"business": "chat", "priority": 10, "pool": "q"}, True)
    async with other.preemption().preempting(PreemptionRequest("p", "chat", 10, 1)) as outcome:
        assert outcome.tasks == () and outcome.why_not and other.signals == []


async def test_a_preemption_and_the_scale_it_is_for_are_one_intent(tmp_path) -> None:
    """Issue 26 item 6: the preemption's row and the scale's are written together, before the trainer is asked."""
    from corral.domain.history import Action, HistoryDraft
    from corral.domain.tasks import TaskState

    machine = _OneGpuMachine(tmp_path, TaskState.TRAINING, ["0"], None, True)
    scale = HistoryDraft(Action.SCALE, "p", before={"replicas": 0}, after={"replicas": 1}, message="scale out")
    async with machine.preemption().preempting(PreemptionRequest("p", "chat", 10, 1, scale=scale)) as outcome:
        rows = machine.intents.store.history(limit=10)[::-1]
        assert [(r["action"], r["target"]) for r in rows] == [("finetune", "t1"), ("scale", "p")]
        assert rows[0]["id"] + 1 == rows[1]["id"]
        assert outcome.scale is not None and outcome.scale.ids == [rows[1]["id"]] and rows[1]["outcome"] == "pending"
        assert rows[0]["outcome"] == "success"  # the task is back in the queue
    assert machine.signals == ["t1"]
