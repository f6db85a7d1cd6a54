"""A discrete-event SIMULATOR of LLM replicas behind Corral's gateway, for `bench/autopilot.py`.

No model runs and no process starts: every figure this module produces is simulated, and the bench says so.
It exists so that a decision rule (Corral's autopilot, Knative's KPA, a static split) can be tried on the same
trace, the same hardware and many seeds in seconds — what a live run over real replicas (hours per seed) cannot.
The integration tests (`tests/integration/test_autopilot.py`) check the autopilot over real processes.

The engine model (one GPU replica of an 8B-class model; the figures are assumptions, stated in `EngineSpec`):

- **Admission by batch slots and KV cache.** A request is admitted when the engine runs fewer than
  `max_num_seqs` sequences and its prompt + output tokens fit in the free KV-cache token budget (reserved at
  admission, as a scheduler that never preempts would); otherwise it waits in the engine's FIFO queue (head of
  line blocks, as vLLM's FCFS scheduler).
- **Prefill ∝ prompt tokens, first.** Admitted prompts are prefilled one after another (fixed cost + a cost per
  prompt token), and decoding pauses meanwhile (a prefill-first scheduler without chunking); the first token
  comes at the end of its prefill.
- **Decode slows with the batch.** Every running sequence gets one token per inter-token latency, which grows
  linearly with the number of sequences decoding.
- **Long-tailed lengths.** Prompt and output lengths are log-normal, capped (`Lengths`).

The gateway model is Corral's (both data planes): a request goes to the least-outstanding replica of its business
that is below its batch limit; when there is none (no replica, or every one full) it is held in the business's
FIFO queue until a replica frees a slot or is assigned, for at most `hold_timeout_s` (then it fails, 503).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineSpec:
    max_num_seqs: int = 16  # vLLM --max-num-seqs: the batch limit
    kv_tokens: int = 16_384  # KV-cache budget in tokens (prompt + output of every admitted sequence)
    prefill_fixed_s: float = 0.010
    prefill_s_per_token: float = 1 / 16_000  # 16k prompt tokens/s
    itl_s: float = 0.020  # inter-token latency with one sequence
    itl_growth_per_seq: float = 0.04  # +4% per extra decoding sequence: 32 ms at 16

    def itl(self, decoding: int) -> float:
        return self.itl_s * (1 + self.itl_growth_per_seq * (max(decoding, 1) - 1))


@dataclass(frozen=True)
class Lengths:
    """Log-normal token counts, capped so that one request always fits the KV budget."""

    prompt_median: float = 400
    prompt_sigma: float = 1.0
    prompt_max: int = 6_000
    output_median: float = 120
    output_sigma: float = 0.9
    output_max: int = 1_024

    def draw(self, rng: random.Random) -> tuple[int, int]:
        prompt = min(self.prompt_max, max(1, round(self.prompt_median * math.exp(rng.gauss(0, self.prompt_sigma)))))
        output = min(self.output_max, max(1, round(self.output_median * math.exp(rng.gauss(0, self.output_sigma)))))
        return prompt, output


@dataclass
class Request:
    id: int
    business: str
    arrival: float
    prompt: int
    output: int
    first_token: float | None = None
    end: float | None = None
    failed: bool = False
    turned_away: bool = False  # failed before its hold deadline: the hold queue was full
    held_until: float | None = None  # when it left the gateway's hold queue (None: never held)

    @property
    def kv(self) -> int:
        return self.prompt + self.output

    @property
    def ttft(self) -> float:
        return math.inf if self.failed or self.first_token is None else self.first_token - self.arrival


class Replica:
    """One engine: the FIFO queue, the prefill line and the decoding batch, advanced by events.

    Decoding sequences all progress at the same rate, so progress is kept as one counter `v` (tokens decoded per
    sequence since the start) and each sequence as the `v` at which it finishes: the next completion is the heap's
    minimum, with no per-token events."""

    def __init__(self, name: str, engine: EngineSpec, business: str, ready_at: float = 0.0) -> None:
        self.name = name
        self.engine = engine
        self.business = business  # who it serves (the gateway routes by it); "" for nobody
        self.ready_at = ready_at
        self.draining = False  # takes no new requests; gone once empty
        self.gone = False
        self.moved_at: float | None = None
        self.queue: deque[Request] = deque()  # waiting in the engine (KV or slots)
        self.prefills: deque[Request] = deque()  # admitted, not prefilled yet (the first: in progress)
        self.prefill_end: float | None = None
        self.decoding: list[tuple[float, int, Request]] = []  # (v at which it finishes, id, request)
        self.v = 0.0
        self.v_at = 0.0
        self.kv_used = 0
        self.version = 0  # the event scheduled for it; older ones are stale

    # what the gateway and the engine's /metrics see
    @property
    def outstanding(self) -> int:
        return len(self.queue) + len(self.prefills) + len(self.decoding)

    @property
    def running(self) -> int:
        return len(self.prefills) + len(self.decoding)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def ready(self, now: float) -> bool:
        return now >= self.ready_at and not self.gone

    def routable(self, now: float) -> bool:
        return self.ready(now) and not self.draining and self.outstanding < self.engine.max_num_seqs

    # the engine
    def _advance(self, now: float) -> None:
        if self.prefill_end is None and self.decoding:
            self.v += (now - self.v_at) / self.engine.itl(len(self.decoding))
        self.v_at = now

    def _admit(self, now: float) -> None:
        engine = self.engine
        while self.queue and self.running < engine.max_num_seqs and self.kv_used + self.queue[0].kv <= engine.kv_tokens:
            request = self.queue.popleft()
            self.kv_used += request.kv
            self.prefills.append(request)
        if self.prefill_end is None and self.prefills:
            self.prefill_end = now + engine.prefill_fixed_s + self.prefills[0].prompt * engine.prefill_s_per_token

    def next_event(self) -> float | None:
        if self.prefill_end is not None:
            return self.prefill_end
        if self.decoding:
            return self.v_at + (self.decoding[0][0] - self.v) * self.engine.itl(len(self.decoding))
        return None

    def submit(self, request: Request, now: float) -> None:
        self._advance(now)
        self.queue.append(request)
        self._admit(now)

    def step(self, now: float) -> tuple[Request | None, list[Request]]:
        """Carry out what is due at `now`: the request whose first token came, and those that completed."""
        self._advance(now)
        done: list[Request] = []
        first = None
        if self.prefill_end is not None and now >= self.prefill_end - 1e-12:
            request = first = self.prefills.popleft()
            request.first_token = now
            self.prefill_end = None
            if request.output <= 1:
                done.append(request)
            else:
                heapq.heappush(self.decoding, (self.v + request.output - 1, request.id, request))
        elif self.prefill_end is None:
            while self.decoding and self.decoding[0][0] <= self.v + 1e-9:
                done.append(heapq.heappop(self.decoding)[2])
        for request in done:
            request.end = now
            self.kv_used -= request.kv
        self._admit(now)
        return first, done


@dataclass
class Outcome:
    """One run: every request, the replicas each business held over time, the moves or scale actions."""

    requests: list[Request]
    held_by: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # business → (t, replicas) samples
    actions: list[tuple[float, str]] = field(default_factory=list)  # (t, what): a move, a replica added or removed
    zero_with_traffic_s: dict[str, float] = field(default_factory=dict)  # seconds at 0 replicas while held > 0


class Cluster:
    """The replicas, the gateway's hold queues and the event clock. A strategy owns the replicas' `business`
    labels (and creates or drains replicas); `shared` routes every business to every replica with one queue."""

    def __init__(self, engine: EngineSpec, businesses: Iterable[str], *, hold_timeout_s: float = 30.0,
                 hold_queue: int = 1_000, shared: bool = False) -> None:
        self.engine = engine
        self.businesses = list(businesses)
        self.hold_timeout_s = hold_timeout_s
        self.hold_queue = hold_queue
        self.shared = shared
        self.replicas: list[Replica] = []
        self.held: dict[str, deque[Request]] = {b: deque() for b in (["*"] if shared else self.businesses)}
        self.now = 0.0
        self.horizon = math.inf  # the trace's end: periodic work (ticks, samples) is not scheduled past it
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._rr = 0
        self.completed_hooks: list[Callable[[Request], None]] = []
        self.first_token_hooks: list[Callable[[Request, Replica], None]] = []

    # the clock
    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, -1, action))

    def _schedule(self, replica: Replica) -> None:
        replica.version += 1
        when = replica.next_event()
        if when is not None:
            self._seq += 1
            heapq.heappush(self._events, (when, self._seq, replica.version, replica))

    def run_until(self, until: float) -> None:
        events = self._events
        while events and events[0][0] <= until:
            when, _, version, what = heapq.heappop(events)
            self.now = when
            if isinstance(what, Replica):
                if version != what.version:
                    continue
                first, done = what.step(when)
                if first is not None:
                    for hook in self.first_token_hooks:
                        hook(first, what)
                for request in done:
                    for hook in self.completed_hooks:
                        hook(request)
                if done:
                    self.freed(what)
                self._schedule(what)
            else:
                what()  # type: ignore[operator]
        self.now = max(self.now, until)

    # the gateway
    def queue_of(self, business: str) -> deque[Request]:
        return self.held["*" if self.shared else business]

    def serves(self, replica: Replica, business: str) -> bool:
        return self.shared or replica.business == business

    def arrive(self, request: Request) -> None:
        self.run_until(request.arrival)
        queue = self.queue_of(request.business)
        if queue:  # FIFO: nobody overtakes a held request
            self._hold(request, queue)
            return
        replica = self._pick(request.business)
        if replica is None:
            self._hold(request, queue)
        else:
            self._send(replica, request)

    def _hold(self, request: Request, queue: deque[Request]) -> None:
        if len(queue) >= self.hold_queue:
            request.failed = request.turned_away = True
        else:
            queue.append(request)

    def _pick(self, business: str) -> Replica | None:
        best, fewest = None, None
        n = len(self.replicas)
        self._rr = (self._rr + 1) % max(n, 1)
        for i in range(n):  # least outstanding; ties broken round robin
            replica = self.replicas[(self._rr + i) % n]
            if self.serves(replica, business) and replica.routable(self.now):
                if fewest is None or replica.outstanding < fewest:
                    best, fewest = replica, replica.outstanding
        return best

    def _send(self, replica: Replica, request: Request) -> None:
        replica.submit(request, self.now)
        self._schedule(replica)

    def expire(self) -> None:
        """Fail held requests past their deadline (503 with Retry-After)."""
        for queue in self.held.values():
            while queue and self.now - queue[0].arrival >= self.hold_timeout_s:
                queue.popleft().failed = True

    def freed(self, replica: Replica) -> None:
        """A replica has room (a request completed, it became ready or was assigned): send it held requests."""
        if replica.draining and replica.outstanding == 0:
            replica.gone = True
            return
        for business, queue in self.held.items():
            if not queue or not (self.shared or replica.business == business):
                continue
            self.expire()
            while queue and replica.routable(self.now):
                request = queue.popleft()
                request.held_until = self.now
                self._send(replica, request)

    def held_count(self, business: str) -> int:
        return len(self.queue_of(business))

    def finish(self, horizon: float) -> None:
        """Run until every request is answered or failed."""
        self.run_until(horizon)
        while self._events:
            self.run_until(self._events[0][0])
            self.expire()
        for queue in self.held.values():
            while queue:
                queue.popleft().failed = True


def capacity_per_replica(engine: EngineSpec, lengths: Lengths, seconds: float = 1_800, seed: int = 7) -> float:
    """Requests/s one replica completes when it always has work (its queue never empty): the unit in which the
    scenarios state their load."""
    rng = random.Random(seed)
    cluster = Cluster(engine, ["x"])
    replica = Replica("r0", engine, "x")
    cluster.replicas.append(replica)
    count = 0
    backlog = 4 * engine.max_num_seqs
    for i in range(backlog):
        prompt, output = lengths.draw(rng)
        replica.submit(Request(i, "x", 0.0, prompt, output), 0.0)
    cluster._schedule(replica)

    def refill(_: Request) -> None:
        nonlocal count
        count += 1
        prompt, output = lengths.draw(rng)
        replica.submit(Request(backlog + count, "x", cluster.now, prompt, output), cluster.now)

    cluster.completed_hooks.append(refill)
    cluster.run_until(seconds)
    return count / seconds
