"""The GPU ledger with sleepers (issue 31): replicas of sharedGpus pools share a unit, at most one awake; level-1
sleepers cost host memory within a budget; a holder that is not shared never shares a unit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.domain.errors import Conflict
from corral.domain.gpu_ledger import GIB, GpuClaim, GpuLedger, GpuUnit, Holder
from corral.domain.sleep import SleepLevel, SleepState, SleepStep, reconcile, shown_state

SHARED = [Holder.replica(f"s-{i}") for i in range(5)]
PLAIN = [Holder.replica("p-0"), Holder.task("ft-a")]
UNITS = (GpuUnit(0, None, 80 * GIB, 80 * GIB), GpuUnit(1, None, 80 * GIB, 80 * GIB), GpuUnit(2, 0, 20 * GIB, 20 * GIB),
         GpuUnit(2, 1, 20 * GIB, 20 * GIB))
UNIT_IDS = [u.id for u in UNITS] + ["2"]
LEVELS = st.sampled_from([None, SleepLevel.OFFLOAD, SleepLevel.DISCARD])


def check_invariants(ledger: GpuLedger) -> None:
    for unit in ledger.units:
        holders = ledger.holders_on(unit.id)
        awake = [h for h in holders if ledger.sleep_level(h) is None]
        assert len(awake) <= 1, f"two awake on {unit.id}: {awake}"
        if len(holders) > 1:
            assert all(h in ledger.shared for h in holders), f"a holder that does not share shares {unit.id}: {holders}"
    if ledger.host_budget_bytes is not None:
        assert ledger.host_bytes_used() <= ledger.host_budget_bytes
    assert ledger.conflicts() == []


op = st.one_of(
    st.tuples(st.just("hold_shared"), st.sampled_from(SHARED), st.sampled_from(UNIT_IDS), LEVELS, st.sampled_from([1, 10, 30])),
    st.tuples(st.just("hold"), st.sampled_from(PLAIN), st.sampled_from(UNIT_IDS)),
    st.tuples(st.just("set_sleep"), st.sampled_from(SHARED), LEVELS),
    st.tuples(st.just("place_shared"), st.sampled_from(SHARED), LEVELS, st.sampled_from([1, 10, 30])),
    st.tuples(st.just("release"), st.sampled_from(SHARED + PLAIN)),
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([None, 25.0, 60.0]), st.lists(op, max_size=30))
def test_never_two_awake_on_a_unit_and_the_host_budget_is_kept(budget_gb: float | None, ops: list[tuple]) -> None:
    """Whatever is tried, an operation either keeps every rule or is refused (Conflict) and changes nothing."""
    ledger = GpuLedger.build(UNITS, host_budget_bytes=None if budget_gb is None else budget_gb * GIB)
    for step in ops:
        kind, holder = step[0], step[1]
        before = ledger
        try:
            if kind == "hold_shared":
                if holder in ledger.holdings:
                    continue  # one placement per replica, as Corral makes them
                ledger = ledger.hold_shared(holder, [step[2]], sleeping=step[3], host_bytes=step[4] * GIB)
            elif kind == "hold":
                ledger = ledger.hold(holder, [step[2]])
            elif kind == "set_sleep":
                if holder in ledger.holdings:
                    ledger = ledger.set_sleep(holder, step[2])
            elif kind == "place_shared":
                if holder in ledger.holdings:
                    continue
                units = ledger.place_shared(holder, 1, sleeping=step[2], host_bytes=step[3] * GIB)
                ledger = ledger.hold_shared(holder, units, sleeping=step[2], host_bytes=step[3] * GIB)
            else:
                ledger = ledger.release(holder)
        except Conflict:
            assert ledger is before
        check_invariants(ledger)


def test_two_models_share_one_gpu_one_awake() -> None:
    a, b = SHARED[0], SHARED[1]
    ledger = GpuLedger.build(UNITS[:1], host_budget_bytes=10 * GIB).hold_shared(a, ["0"], host_bytes=4 * GIB)
    assert ledger.awake_on("0") == a and ledger.free_units() == ()
    with pytest.raises(Conflict, match=r"GPU 0 \(replica s-0 is awake there: put it to sleep first\)"):
        ledger.place_shared(b, 1, host_bytes=4 * GIB)
    assert ledger.place_shared(b, 1, sleeping=SleepLevel.DISCARD) == ("0",)  # a sleeper may join
    ledger = ledger.set_sleep(a, SleepLevel.OFFLOAD)
    assert ledger.host_bytes_used() == 4 * GIB and ledger.sleepers_on("0") == (a,)
    ledger = ledger.hold_shared(b, ledger.place_shared(b, 1, host_bytes=4 * GIB), host_bytes=4 * GIB)
    assert ledger.awake_on("0") == b and ledger.holders_on("0") == (a, b)
    with pytest.raises(Conflict, match="s-1 is awake there; put it to sleep first"):
        ledger.set_sleep(a, None)
    with pytest.raises(Conflict, match="beyond the budget CORRAL_SLEEP_HOST_MEMORY_GB=10"):
        ledger.hold_shared(SHARED[2], ["0"], sleeping=SleepLevel.OFFLOAD, host_bytes=8 * GIB)
    # Level 2 costs no host memory: it fits whatever the budget.
    ledger = ledger.hold_shared(SHARED[2], ["0"], sleeping=SleepLevel.DISCARD, host_bytes=8 * GIB)
    assert ledger.host_bytes_used() == 4 * GIB
    released = ledger.release(b)  # the unit stays held by the sleepers: its memory is not given back
    assert released.awake_on("0") is None and released.unit("0").memory_free_bytes == 80 * GIB


def test_a_holder_that_does_not_share_never_shares() -> None:
    ledger = GpuLedger.build(UNITS, [GpuClaim(PLAIN[0], ("0",)), GpuClaim(SHARED[0], ("1",), shared=True,
                                                                         sleeping=SleepLevel.DISCARD)])
    with pytest.raises(Conflict, match="does not share GPUs"):
        ledger.hold_shared(SHARED[1], ["0"], sleeping=SleepLevel.DISCARD)
    with pytest.raises(Conflict, match="is held by"):
        ledger.hold(PLAIN[1], ["1"])  # a plain holder cannot join a shared unit either
    both = GpuLedger.build((GpuUnit(3, None), GpuUnit(3, 0))).hold_shared(SHARED[1], ["3"], sleeping=SleepLevel.DISCARD)
    with pytest.raises(Conflict, match="overlaps"):  # a whole GPU is never shared with its slices
        both.hold_shared(SHARED[2], ["3/mig0"], sleeping=SleepLevel.DISCARD)


def test_reconciliation_drives_the_engine_to_the_recorded_state() -> None:
    """After a crash between intent and call, or a restarted (awake) process: the step that brings it back."""
    assert reconcile(SleepLevel.OFFLOAD, engine_sleeping=False) == SleepStep.SLEEP
    assert reconcile(None, engine_sleeping=True) == SleepStep.WAKE
    assert reconcile(SleepLevel.DISCARD, engine_sleeping=True) == reconcile(None, engine_sleeping=False) == SleepStep.NONE
    assert reconcile(SleepLevel.OFFLOAD, engine_sleeping=None) == SleepStep.NONE  # not asked: next round
    assert shown_state(None, True) == SleepState.WAKING and shown_state(SleepLevel.OFFLOAD, True) == SleepState.SLEEPING
    assert shown_state(SleepLevel.OFFLOAD, False) == SleepState.AWAKE  # serves until it sleeps (out of routing already)
    with pytest.raises(ValueError, match="1 .* or 2"):
        SleepLevel.parse("3")
