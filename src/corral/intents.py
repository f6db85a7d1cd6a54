"""Intents: the history bookkeeping of every change, in one place.

Corral's rule is intent first: a change writes what it means to do — its desired state and its history
rows, outcome `pending` — before it acts, and the rows are completed once reality matches (`success`) or
the change is given up (`rolled_back`, `failed`). A control plane killed in between leaves pending rows
that recovery judges (`complete_interrupted`). So that every change follows the same rule the same way,
this module is the only writer of history besides the store's own transactions (a desired state written
together with its pending rows: the `intent=` of the store's methods, and settings applied at once):

- the controller, the LoRA adapters and the autopilot begin, complete, roll back and fail their intents here;
- backends whose desired state is not in Corral's database (a cluster, memory) write an intent's rows
  through the writer the controller gives them (`Backend.set_intent_writer`, i.e. `Intents.begin`): they
  never import this module, nor write history themselves;
- observations and refusals, over as they are written, are `applied` records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from corral.domain.errors import CorralError, Unavailable
from corral.domain.history import Action, HistoryDraft, Intent, Observed, Outcome, judge_interrupted
from corral.store.state import StateStore


class Intents:
    """Begins and completes the history rows of changes (see the module's docstring)."""

    def __init__(self, store: StateStore, confirmed: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.store = store
        # Waits until the data plane serves the current state (raises `Unavailable` while it does not): a
        # change that `confirm`s is complete only then. None: nothing to wait for (no data plane routes them).
        self.confirmed = confirmed
        self._after: dict[int, Any] = {}  # id(intent) → the `after` of its summary row on success (`confirm`)
        self._message: dict[int, str] = {}  # id(intent) → the message of its summary row on success (`confirm`)
        self._background: set[asyncio.Task] = set()  # completions waiting for the data plane

    # writing -----------------------------------------------------------------------------------
    def begin(self, intent: Intent) -> None:
        """Write an intent's rows alone, pending: for a change whose desired state lives elsewhere (a
        cluster), or that has none to write (a scale to the count there is). Once: an intent written
        already (an earlier step of the same change) keeps its rows."""
        if not intent.ids:
            self.store.begin(intent)

    def applied(self, draft: HistoryDraft, outcome: Outcome = Outcome.SUCCESS) -> dict[str, Any]:
        """Record what is over as it is written — an observation (a crash, a cut-over), a refusal — and
        return its entry: there is nothing to carry out, so no pending row."""
        return self.store.record_applied(draft, outcome)

    # completing --------------------------------------------------------------------------------
    def complete(self, intent: Intent, outcome: Outcome, message: str | None = None,
                 after: Any = None) -> None:
        """Close an intent's pending rows; `message`/`after` replace those of its last row (the change's
        summary, completed last so that it is the newest row of the change, as listings show it)."""
        self.store.complete_rows(intent.ids, outcome, message, after)

    def roll_back(self, intent: Intent, message: str) -> None:
        """The change was undone, all of it: its rows say so. Rows never written — a desired state and its
        rows refused in one transaction (the local backend) — leave the refusal unrecorded otherwise: its
        summary row is written then, rolled back, so a rollback is on record whichever backend ran."""
        if intent.ids:
            self.complete(intent, Outcome.ROLLED_BACK, message=message)
        else:
            self.applied(dataclasses.replace(intent.rows[-1], message=message), Outcome.ROLLED_BACK)

    def fail(self, intent: Intent, exc: BaseException) -> None:
        """Close the rows of a change that raised: `rolled_back` for a refusal (a CorralError: whoever refused
        undid its part), `failed` with the error for anything else. A change refused before its rows were
        written has nothing to close: the refusal is its answer."""
        if isinstance(exc, CorralError):
            self.complete(intent, Outcome.ROLLED_BACK, message=exc.message)
        else:
            self.complete(intent, Outcome.FAILED, message=f"{type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def carrying_out(self, intent: Intent) -> AsyncIterator[None]:
        """Complete the intent's rows when the block ends: `success` (with the `after` given to `confirm`),
        or, when it raised, as `fail` says. An `Unavailable` (the data plane has not confirmed the change in
        time) leaves them pending: `confirm` has handed their completion to a task that waits for it."""
        try:
            yield
        except Unavailable:
            raise
        except BaseException as exc:
            self._after.pop(id(intent), None)
            self._message.pop(id(intent), None)
            self.fail(intent, exc)
            raise
        else:
            self.complete(intent, Outcome.SUCCESS, message=self._message.pop(id(intent), None),
                          after=self._after.pop(id(intent), None))

    async def confirm(self, intent: Intent, after: Any = None, message: str | None = None) -> None:
        """Wait until the data plane serves the change (`confirmed`); `after` (and `message`) are the summary
        row's on success (written when `carrying_out` ends; a row written before the change knew its outcome).
        If it does not in time, the `Unavailable` goes to the caller (a 503) and a background task completes the
        rows once it does, since whoever pushes routes keeps pushing: the change is made, only its confirmation
        is late."""
        if after is not None:
            self._after[id(intent)] = after
        if message is not None:
            self._message[id(intent)] = message
        if self.confirmed is None:
            return
        try:
            await self.confirmed()
        except Unavailable:
            done = self._after.pop(id(intent), None)
            said = self._message.pop(id(intent), None)
            task = asyncio.create_task(self._complete_when_confirmed(intent, done, said),
                                       name="complete-when-routed")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise

    async def _complete_when_confirmed(self, intent: Intent, after: Any, message: str | None = None) -> None:
        assert self.confirmed is not None
        while True:
            try:
                await self.confirmed()
            except Unavailable:
                continue
            self.complete(intent, Outcome.SUCCESS, message=message, after=after)
            return

    def complete_interrupted(self, observe: Callable[[], Observed], actions: Collection[Action] | None = None) -> int:
        """After recovery: judge every change a stopped control plane left pending against what is observed
        now (`domain.history.judge_interrupted`), so each one ends with a record. Returns how many. `observe`
        lists what the backend has: called only when something is pending (a clean start lists nothing). `actions`:
        only the rows of these actions. A row judged `pending` is left for its owner (the adapter reconciler's rows)."""
        pending = [row for row in self.store.pending_history() if actions is None or row["action"] in actions]
        if not pending:
            return 0
        observed = observe()
        for row in pending:
            outcome, message = judge_interrupted(row, observed)
            if outcome is Outcome.PENDING:
                continue
            self.store.complete_rows([row["id"]], outcome,
                                     message=f"{row['message']}; {message}" if row["message"] else message)
        return len(pending)

    async def close(self) -> None:
        """Stop waiting for confirmations (their rows stay pending: the next start judges them)."""
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
