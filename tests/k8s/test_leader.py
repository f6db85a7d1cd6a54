"""Lease-based leader election: of two Corrals on one namespace, one acts; the other waits, serving
nothing, and takes over when the leader releases the Lease or stops renewing it; a leader that cannot
renew stops acting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from corral.backends.kubernetes import client_from, leader
from corral.backends.kubernetes.leader import LEASE_NAME, LeaderElection
from tests.conftest import wait_for_async
from tests.k8s.cluster import NAMESPACE, kubeconfig
from tests.k8s.conftest import FAST_LEASE
from tests.k8s.test_reflector import open_backend

LEASES = "coordination.k8s.io/v1/leases"


@pytest.fixture(autouse=True)
def fast_lease(cluster, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """These tests wait for leases to be renewed and to expire: a short lease keeps them short (set after the
    `cluster` fixture's longer one)."""
    monkeypatch.setattr(leader, "TIMING", FAST_LEASE)


async def test_one_corral_leads_the_other_waits(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, _, config = cluster
    async with open_backend(config, tmp_path / "a") as (first, _):
        assert first.leader is not None and first.leader.leading
        second_started = asyncio.Event()

        async def second() -> None:
            async with open_backend(config, tmp_path / "b") as (backend, _):
                second_started.set()
                await wait_for_async(lambda: api.get(LEASES, LEASE_NAME)["spec"]["holderIdentity"] == backend.leader.identity,  # type: ignore[union-attr]
                                     what="the second Corral's lease")

        standby = asyncio.create_task(second())
        await asyncio.sleep(2.0)  # longer than the lease: the leader renews it, the standby keeps waiting
        assert not second_started.is_set() and api.get(LEASES, LEASE_NAME)["spec"]["holderIdentity"] == first.leader.identity
    await asyncio.wait_for(standby, 5)  # the leader released the Lease on close: the standby took over at once


async def test_a_leader_that_cannot_renew_stops(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    api, _, config = cluster
    async with open_backend(config, tmp_path) as (backend, _):
        lost: list[bool] = []
        assert backend.leader is not None
        backend.leader.on_lost = lambda: lost.append(True)
        api.patch(LEASES, LEASE_NAME, {"spec": {"holderIdentity": "intruder"}})  # another candidate holds it now
        await wait_for_async(lambda: lost, timeout=5, what="the leader giving up")
        assert not backend.leader.leading


async def test_two_candidates_with_a_slow_api_never_both_lead(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """The leader's API calls slow down (each way) until one renewal attempt outlasts the renew deadline: it must
    give up leading before the standby, which sees the Lease unrenewed, takes it over."""
    api, _, config = cluster
    url = yaml.safe_load(config.read_text())["clusters"][0]["cluster"]["server"]
    timing = {"duration_s": 1.5, "renew_deadline_s": 1.0, "retry_s": 0.2}
    lost: list[str] = []
    slow, fast = client_from(kubeconfig(url, tmp_path / "slow", token="slow"), NAMESPACE), client_from(config, NAMESPACE)
    first = LeaderElection(slow, NAMESPACE, "first", on_lost=lambda: lost.append("first"), **timing)
    second = LeaderElection(fast, NAMESPACE, "second", on_lost=lambda: lost.append("second"), **timing)
    both: list[float] = []

    async def monitor() -> None:  # an observer, not a synchronisation: records any moment with two leaders
        while True:
            if first.leading and second.leading:
                both.append(time.monotonic())
            await asyncio.sleep(0.005)

    watching = asyncio.create_task(monitor())
    try:
        await first.acquire()
        api.delays["slow"] = 0.6  # a GET or a PATCH of the leader's takes 1.2 s now: longer than its renew deadline
        await asyncio.wait_for(second.acquire(), 10)
        assert not first.leading and lost == ["first"]  # it had given up before the standby could take over
        assert api.get(LEASES, LEASE_NAME)["spec"]["holderIdentity"] == "second"
        assert not both
    finally:
        watching.cancel()
        api.delays.clear()
        for candidate in (second, first):
            await candidate.release()
        await slow.close()
        await fast.close()
