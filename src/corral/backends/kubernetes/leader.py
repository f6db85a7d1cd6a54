"""Lease-based leader election: one Corral acts on a cluster at a time.

Two control planes acting on one namespace would both restore replaced replicas (over-assigning a
business), both scale, both keep deletion costs. So the Kubernetes backend takes a
`coordination.k8s.io/v1` Lease before it acts, as kube-controller-manager does (client-go
tools/leaderelection): the holder renews `renewTime` every `retry_s`; a candidate takes the Lease
only when its record has not changed for `duration_s` *as observed by the candidate's own clock*
(no trust in another machine's timestamps), and every write carries the Lease's resourceVersion as
a precondition, so of two candidates exactly one wins (the other gets 409 Conflict). A holder that
cannot renew within `renew_deadline_s` has lost the lease and must stop acting at once: client-go's
OnStoppedLeading, after which kube-controller-manager exits — `on_lost` does the same by default.
On a clean stop the holder releases the Lease (holderIdentity emptied), so a successor starts at once.

Why two Corrals never both lead, even when the API server is slow: a renewal counts from the moment
its attempt *started* (the Lease cannot have been written before), and every attempt (a GET and a
PATCH) is abandoned when the renew deadline since the last successful start passes (client-go runs
each try under a context with the renew deadline), at which point the holder gives up. A standby
takes over only once the record it saw has stayed unchanged for `duration_s` by its own clock, and it
saw that record no earlier than the write, so no earlier than `duration_s` after that start; the
holder gave up `duration_s - renew_deadline_s` (5 s by default) before. Seeing another holder in the
Lease ends leadership at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from lightkube import AsyncClient
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

log = logging.getLogger("corral.kubernetes")
LEASE_NAME = "corral-leader"
# client-go's defaults for kube-controller-manager: a 15 s lease, a 10 s renew deadline, a 2 s retry period.
TIMING: dict[str, float] = {"duration_s": 15.0, "renew_deadline_s": 10.0, "retry_s": 2.0}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _exit() -> None:
    log.critical("lost the leader lease: stopping (another Corral acts on the cluster now)")
    os._exit(1)


class LeaderElection:
    def __init__(self, client: AsyncClient, namespace: str, identity: str | None = None, *, duration_s: float | None = None,
                 renew_deadline_s: float | None = None, retry_s: float | None = None, on_lost: Callable[[], None] | None = None) -> None:
        duration_s = TIMING["duration_s"] if duration_s is None else duration_s
        renew_deadline_s = TIMING["renew_deadline_s"] if renew_deadline_s is None else renew_deadline_s
        retry_s = TIMING["retry_s"] if retry_s is None else retry_s
        self.client, self.namespace = client, namespace
        self.identity = identity or f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.duration_s, self.renew_deadline_s, self.retry_s = duration_s, renew_deadline_s, retry_s
        # Looked up when the lease is lost, not bound here: a test suite replaces `_exit` (one process runs many
        # control planes there, and a lost lease must fail the test that lost it, not end the whole run).
        self.on_lost = on_lost if on_lost is not None else (lambda: _exit())
        self.leading = False
        self._observed: tuple[str | None, str | None] = (None, None)  # (holder, renewTime) last seen
        self._observed_at = 0.0  # monotonic time it was first seen
        self._renewed_at = 0.0
        self._task: asyncio.Task | None = None

    def _spec(self, acquire: bool, transitions: int) -> dict[str, Any]:
        now = _now()
        return {"holderIdentity": self.identity, "leaseDurationSeconds": max(1, int(self.duration_s)), "renewTime": now,
                **({"acquireTime": now, "leaseTransitions": transitions} if acquire else {})}

    async def _try(self) -> bool:
        """One attempt to acquire or renew. True when we hold the Lease afterwards."""
        try:
            lease = (await self.client.get(Lease, LEASE_NAME, namespace=self.namespace)).to_dict()
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE_NAME, "namespace": self.namespace}, "spec": self._spec(True, 0)}
            try:
                await self.client.create(from_dict(body))
            except ApiError as race:
                if race.status.code == 409:
                    return False  # another candidate created it first
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        record = (holder, spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        if holder not in (None, self.identity) and time.monotonic() - self._observed_at < float(spec.get("leaseDurationSeconds") or self.duration_s):
            return False  # held, and renewed recently (by our own clock)
        mine = holder == self.identity
        patch = {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                 "spec": self._spec(not mine, int(spec.get("leaseTransitions") or 0) + (0 if mine or holder is None else 1))}
        try:
            await self.client.patch(Lease, LEASE_NAME, patch, namespace=self.namespace, patch_type=PatchType.MERGE)
        except ApiError as exc:
            if exc.status.code == 409:
                return False  # someone else wrote it first
            raise
        return True

    async def _attempt(self, deadline: float) -> bool:
        """One `_try`, abandoned at `deadline` (monotonic): a slow API server must not stretch a renewal past it."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            async with asyncio.timeout(remaining):
                return await self._try()
        except TimeoutError:
            log.warning("leader election: the API server did not answer within the renew deadline (%.1f s)", self.renew_deadline_s)
            return False

    def _lose(self, why: str) -> None:
        self.leading = False
        log.warning("leader election: %s", why)
        self.on_lost()

    async def acquire(self) -> None:
        """Wait until this Corral holds the Lease, then keep renewing it in the background."""
        waiting_logged = False
        first = True
        while True:
            started = time.monotonic()
            try:
                if await self._attempt(started + self.renew_deadline_s):
                    break
            except Exception as exc:
                if first:
                    raise  # an unreachable API server or missing RBAC at start: fail fast, with the reason
                log.warning("leader election: %s", exc)  # a blip while waiting: keep trying
            first = False
            if not waiting_logged:
                log.info("another Corral holds the leader lease %s/%s (%s); waiting to take over", self.namespace, LEASE_NAME,
                         self._observed[0])
                waiting_logged = True
            await asyncio.sleep(self.retry_s)
        self.leading = True
        self._renewed_at = started  # the Lease was written after this, never before
        log.info("leading as %s", self.identity)
        self._task = asyncio.create_task(self._renew(), name="leader-lease")

    async def _renew(self) -> None:
        while True:
            deadline = self._renewed_at + self.renew_deadline_s
            await asyncio.sleep(max(0.0, min(self.retry_s, deadline - time.monotonic())))
            started = time.monotonic()
            try:
                if await self._attempt(deadline):
                    self._renewed_at = started
                    continue
            except Exception as exc:
                log.warning("leader election: renewing failed: %s", exc)
            if self._observed[0] not in (None, self.identity):
                self._lose(f"the Lease is held by {self._observed[0]} now")
                return
            if time.monotonic() >= deadline:
                self._lose(f"could not renew the Lease within the renew deadline ({self.renew_deadline_s:.1f} s)")
                return

    async def release(self) -> None:
        """Stop renewing and give the Lease up (client-go's ReleaseOnCancel), so that a successor starts at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.leading:
            return
        self.leading = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.renew_deadline_s):
                await self._release()

    async def _release(self) -> None:
        lease = (await self.client.get(Lease, LEASE_NAME, namespace=self.namespace)).to_dict()
        if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
            await self.client.patch(Lease, LEASE_NAME, {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                                                        "spec": {"holderIdentity": None, "leaseDurationSeconds": 1}},
                                    namespace=self.namespace, patch_type=PatchType.MERGE)
