"""The GPU ledger: one set of books for replicas and finetune tasks, whole GPUs and MIG slices alike."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.errors import Conflict
from corral.domain.gpu_ledger import (
    GpuClaim,
    GpuLedger,
    GpuUnit,
    Holder,
    parse_unit_id,
    units_from_devices,
    units_overlap,
    whole_units,
)
from corral.domain.queue import Capacity, Demand, Priority, Strategy, Unit, WaitingTask, schedule
from corral.gpus.cluster import inventory_from_nodes
from corral.gpus.inventory import GIB, read_inventory
from tests.fake_nvml.pynvml import FakeNVML

HOLDERS = [Holder.replica("r-0"), Holder.replica("r-1"), Holder.task("ft-a"), Holder.task("ft-b"), Holder.task("ft-c")]


# invariants ------------------------------------------------------------------------------------
def held_pairs(ledger: GpuLedger) -> list[tuple[Holder, str]]:
    return [(h, u) for h, ids in ledger.holdings.items() for u in ids]


def check_invariants(ledger: GpuLedger) -> None:
    pairs = held_pairs(ledger)
    ids = [u for _, u in pairs]
    assert len(ids) == len(set(ids)), f"a unit is held twice: {pairs}"
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            assert not units_overlap(a, b), f"{a} and {b} are both held"
    free = ledger.free_units()
    assert not any(units_overlap(f.id, h) for f in free for h in ids), "a free unit overlaps a held one"
    for unit in ledger.units:  # free ⇔ nothing overlapping is held
        assert (unit in free) == (ledger.holder_of(unit.id) is None)


# strategies ------------------------------------------------------------------------------------
@st.composite
def gpu_units(draw: st.DrawFn) -> tuple[GpuUnit, ...]:
    """Up to 4 devices, each a whole GPU, only MIG slices, or both (the ledger must keep them apart)."""
    units: list[GpuUnit] = []
    for device in range(draw(st.integers(0, 4))):
        shape = draw(st.sampled_from(["whole", "slices", "both"]))
        if shape in ("whole", "both"):
            units.append(GpuUnit(device, None, 80 * GIB, draw(st.sampled_from([0, 40, 80])) * GIB))
        if shape in ("slices", "both"):
            units += [GpuUnit(device, m, 20 * GIB, 20 * GIB) for m in range(draw(st.integers(1, 3)))]
    return tuple(units)


op = st.one_of(
    st.tuples(st.just("place"), st.sampled_from(HOLDERS), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("release"), st.sampled_from(HOLDERS)),
    st.tuples(st.just("hold"), st.sampled_from(HOLDERS), st.lists(st.sampled_from(["0", "1", "0/mig0", "0/mig1", "1/mig0",
                                                                                     "2", "2/mig2", "3/mig0", "9"]), max_size=3)),
)


@settings(max_examples=300, deadline=None)
@given(gpu_units(), st.lists(op, max_size=25))
def test_no_unit_is_held_twice_and_no_gpu_with_its_slice_whatever_the_sequence(units: tuple[GpuUnit, ...], ops: list) -> None:
    ledger = GpuLedger.build(units)
    for step in ops:
        if step[0] == "place":
            _, holder, count, whole_only = step
            free_before = ledger.free_units(whole_only=whole_only)
            try:
                chosen = ledger.place(holder, count, whole_only=whole_only)
            except Conflict as refusal:
                assert "needs" in refusal.message and "are free" in refusal.message
                assert count > 0
                continue
            assert len(chosen) == count and len(set(chosen)) == count
            assert all(ledger.holder_of(u) is None for u in chosen), "placement returned a held unit"
            assert all(u in {f.id for f in free_before} for u in chosen)
            assert all(ledger.unit(u).whole for u in chosen) or not whole_only  # type: ignore[union-attr]
            assert list(chosen) == sorted(chosen, key=lambda u: ledger.unit(u).sort_key)  # type: ignore[union-attr]
            assert ledger.place(holder, count, whole_only=whole_only) == chosen  # deterministic
            ledger = ledger.hold(holder, chosen)
        elif step[0] == "release":
            ledger = ledger.release(step[1])
            assert ledger.units_of(step[1]) == ()
        else:
            _, holder, wanted = step
            try:
                ledger = ledger.hold(holder, wanted)
            except Conflict:
                pass
        check_invariants(ledger)


@given(gpu_units(), st.lists(st.tuples(st.sampled_from(HOLDERS), st.integers(1, 3)), max_size=6))
def test_claims_never_exceed_what_is_free(units: tuple[GpuUnit, ...], asks: list[tuple[Holder, int]]) -> None:
    ledger = GpuLedger.build(units)
    for holder, count in asks:
        if holder in ledger.holdings:
            continue
        try:
            ledger, chosen = ledger.claim(holder, count)
        except Conflict:
            continue
        assert ledger.units_of(holder) == chosen
        check_invariants(ledger)


@given(gpu_units(), st.lists(st.integers(0, 3), max_size=5))
def test_counted_claims_are_booked_on_free_whole_gpus_only(units: tuple[GpuUnit, ...], counts: list[int]) -> None:
    claims = [GpuClaim(Holder.replica(f"pod-{i}"), count=c) for i, c in enumerate(counts)]
    ledger = GpuLedger.build(units, claims)
    check_invariants(ledger)
    whole = sum(1 for u in units if u.whole)
    assert sum(len(ids) for ids in ledger.holdings.values()) == min(whole, sum(counts))
    assert all(ledger.unit(u).whole for _, u in held_pairs(ledger))  # type: ignore[union-attr]


@given(gpu_units(), st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 10, 30])), min_size=1, max_size=6))
def test_the_queue_reading_the_ledger_never_gives_a_gpu_and_its_slice(units: tuple[GpuUnit, ...],
                                                                      asks: list[tuple[int, int]]) -> None:
    ledger = GpuLedger.build(units)
    tasks = [WaitingTask(f"t{i}", Priority.NORMAL, i, Demand(n, gb * GIB)) for i, (n, gb) in enumerate(asks)]
    free = tuple(Unit(u.id, u.memory_free_bytes) for u in ledger.free_units())
    decision = schedule(tasks, Capacity(free, cpu_slots=len(tasks)), Strategy.BEST_EFFORT_FIFO)
    for task_id, chosen in decision.starts:
        ledger = ledger.hold(Holder.task(task_id), chosen)  # raises if the queue broke the ledger's rule
    check_invariants(ledger)


# examples --------------------------------------------------------------------------------------
def test_replica_placement_picks_the_lowest_free_devices_or_says_how_many_are_free() -> None:
    """`pick_gpus`'s contract, kept: the lowest free whole devices, and the API's exact refusal."""
    ledger = GpuLedger.build(whole_units([0, 1, 2, 3]), [GpuClaim(Holder.replica("a"), ("0", "2"))])
    assert ledger.place(Holder.replica("r"), 2, whole_only=True) == ("1", "3")
    assert GpuLedger.build(()).place(Holder.replica("r"), 0, whole_only=True) == ()
    one_held = GpuLedger.build(whole_units([0, 1]), [GpuClaim(Holder.replica("a"), ("0",))])
    with pytest.raises(Conflict, match="needs 2 GPU\\(s\\) but only 1 of 2"):
        one_held.place(Holder.replica("x"), 2, whole_only=True, who="r")
    with pytest.raises(Conflict) as refusal:
        one_held.place(Holder.replica("x"), 2, whole_only=True, who="replica p-abcde of p")
    assert refusal.value.message == (
        "replica p-abcde of p needs 2 GPU(s) but only 1 of 2 detected GPU(s) are free; "
        "set gpusPerReplica to 0 for a CPU engine (simulator, transformers) or free GPUs first")


def test_a_replica_never_gets_the_gpu_a_task_holds_a_mig_slice_of() -> None:
    """The bug the ledger exists for: GPU 0 whole for a replica while a task trains on 0/mig1."""
    units = (GpuUnit(0), GpuUnit(0, 0, 40 * GIB, 40 * GIB), GpuUnit(0, 1, 40 * GIB, 40 * GIB), GpuUnit(1))
    ledger = GpuLedger.build(units, [GpuClaim(Holder.task("ft-1"), ("0/mig1",))])
    assert [u.id for u in ledger.free_units()] == ["0/mig0", "1"]
    assert ledger.holder_of("0") == Holder.task("ft-1") and ledger.holder_of("0/mig0") is None
    assert ledger.place(Holder.replica("r"), 1, whole_only=True) == ("1",)
    with pytest.raises(Conflict, match="GPU 0 cannot go to replica r: it is held by task ft-1"):
        ledger.hold(Holder.replica("r"), ["0"])
    whole = GpuLedger.build(units, [GpuClaim(Holder.replica("r"), ("0",))])
    assert [u.id for u in whole.free_units()] == ["1"] and whole.holder_of("0/mig1") == Holder.replica("r")
    assert whole.release(Holder.replica("r")).free_units() == whole.release(Holder.replica("r")).units


def test_task_placement_refusal_says_how_many_units_are_free() -> None:
    ledger = GpuLedger.build((GpuUnit(0, None, 80 * GIB, 80 * GIB), GpuUnit(1, None, 80 * GIB, 10 * GIB)))
    assert ledger.place(Holder.task("t"), 1, min_free_bytes=20 * GIB) == ("0",)
    with pytest.raises(Conflict, match=r"task t needs 2 GPU unit\(s\) with 20.0GB free but only 1 of 2"):
        ledger.place(Holder.task("t"), 2, min_free_bytes=20 * GIB)


def test_release_gives_the_memory_back_and_build_is_lenient_about_observed_conflicts() -> None:
    units = (GpuUnit(0, None, 80 * GIB, 1 * GIB), GpuUnit(0, 1, 20 * GIB, 20 * GIB))
    ledger = GpuLedger.build(units, [GpuClaim(Holder.replica("r"), ("0",)), GpuClaim(Holder.task("t"), ("0/mig1", "7"))])
    assert ledger.conflicts() == [("0", "0/mig1")] and ledger.free_units() == ()  # observed state: nothing is free
    released = ledger.release(Holder.replica("r"))
    assert released.unit("0").memory_free_bytes == 80 * GIB  # type: ignore[union-attr]
    assert released.free_units() == () and released.conflicts() == []  # GPU 0 still has a held slice
    assert ledger.holder_of("7") == Holder.task("t") and ledger.unit("7") is None


def test_units_come_from_the_inventory_mig_gpus_only_as_slices() -> None:
    migs = [{"name": "NVIDIA H100 MIG 3g.40gb", "total": 40 * GIB, "uuid": "MIG-a"},
            {"name": "NVIDIA H100 MIG 3g.40gb", "total": 40 * GIB, "uuid": "MIG-b"}]
    inventory = read_inventory(FakeNVML([{"name": "NVIDIA H100", "total": 80 * GIB, "migs": migs},
                                         {"name": "NVIDIA H100", "total": 80 * GIB, "used": 30 * GIB}]))
    ledger = GpuLedger.build(units_from_devices(inventory.schedulable_units()))
    assert [u.id for u in ledger.units] == ["0/mig0", "0/mig1", "1"]
    assert ledger.unit("1").memory_free_bytes == 50 * GIB  # type: ignore[union-attr]
    assert ledger.place(Holder.replica("r"), 1, whole_only=True) == ("1",)  # a MIG-enabled GPU is not handed out whole
    assert ledger.place(Holder.task("t"), 3) == ("0/mig0", "0/mig1", "1")


def test_cluster_units_never_look_like_slices_of_a_whole_gpu() -> None:
    """MIG units of a cluster have no known parent: each gets a slot after every whole GPU, so a pod's
    whole GPU and another's MIG unit are not booked against each other."""
    def node(name: str, gpus: int, **extra: str) -> dict:
        return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": "81559"}},
                "status": {"allocatable": {"nvidia.com/gpu": str(gpus), **extra}}}

    inventory = inventory_from_nodes([node("a", 1, **{"nvidia.com/mig-1g.10gb": "2"}), node("b", 2)])
    ledger = GpuLedger.build(units_from_devices(inventory.schedulable_units()),
                             [GpuClaim(Holder.replica("pod-1"), count=3)])
    assert [u.id for u in ledger.units] == ["0", "1", "2", "3/mig0", "4/mig0"]
    assert ledger.units_of(Holder.replica("pod-1")) == ("0", "1", "2")
    assert [u.id for u in ledger.free_units()] == ["3/mig0", "4/mig0"]


def test_unit_ids() -> None:
    assert parse_unit_id("3") == (3, None) and parse_unit_id("0/mig12") == (0, 12)
    assert GpuUnit.parse("0/mig1").id == "0/mig1" and GpuUnit.parse("2").whole
    with pytest.raises(ValueError):
        parse_unit_id("node-a/0")
    assert units_overlap("0", "0/mig3") and not units_overlap("0/mig1", "0/mig2") and not units_overlap("x", "0")


def test_kubernetes_replica_pods_claim_counts_and_job_pods_are_left_to_their_task() -> None:
    from types import SimpleNamespace

    from corral.backends.kubernetes.backend import KubernetesBackend
    from corral.domain.manifests import ClusterOptions

    def pod(name: str, labels: dict, gpus: int) -> dict:
        return {"metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}

    cached = SimpleNamespace(cluster_options=ClusterOptions(), objects={"pods": {
        "p-a": pod("p-a", {"pool": "p"}, 2), "p-b": pod("p-b", {"pool": "p"}, 0),
        "ft-1-x": pod("ft-1-x", {"corral.dev/finetune-task": "ft-1"}, 1)}})
    claims = KubernetesBackend.gpu_claims(cached)  # type: ignore[arg-type]
    assert claims == [GpuClaim(Holder.replica("p-a"), count=2)]
    ledger = GpuLedger.build(whole_units(range(4)), [*claims, GpuClaim(Holder.task("ft-1"), ("0",))])
    assert ledger.units_of(Holder.replica("p-a")) == ("1", "2") and [u.id for u in ledger.free_units()] == ["3"]


def test_a_stopping_replica_still_holds_its_devices(tmp_path) -> None:
    """A local replica being drained is no longer listed, but its GPU memory is not free until it exits."""
    from corral.backends.local import LocalBackend
    from corral.config import Settings
    from corral.domain.models import Deployment, PodPhase
    from corral.store.state import ReplicaRecord, StateStore

    settings = Settings(data_dir=tmp_path)
    store = StateStore(settings.database_path)
    deployment = Deployment(name="p", engine="simulator", model_id="sim", model_tag="m", is_pool=True, replicas=2)
    rows = [ReplicaRecord(name=n, deployment="p", labels={}, port=port, log_path="x", gpu_ids=(g,))
            for n, port, g in (("p-a", 1, 0), ("p-b", 2, 2))]
    store.add_deployment(deployment, rows, None)
    store.retire_replicas("p", ["p-b"])
    backend = LocalBackend(settings, store, lambda *a, **k: None, gpu_ids=[0, 1, 2])
    assert [p.name for p in backend.list_pods()] == ["p-a"] and store.get_replica("p-b").phase == PodPhase.TERMINATING
    assert backend.gpu_claims() == [GpuClaim(Holder.replica("p-a"), ("0",)), GpuClaim(Holder.replica("p-b"), ("2",))]
    assert [u.id for u in backend.gpu_ledger().free_units()] == ["1"]
    store.close()
