"""Lease-based leader election: of two Corrals on one namespace, one acts; the other waits, serving
nothing, and takes over when the leader releases the Lease or stops renewing it; a leader that cannot
renew stops acting."""

from __future__ import annotations

import asyncio
from pathlib import Path

from corral.backends.kubernetes.leader import LEASE_NAME
from tests.conftest import wait_for_async
from tests.k8s.test_reflector import open_backend

LEASES = "coordination.k8s.io/v1/leases"


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
