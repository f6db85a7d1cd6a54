"""Autopilot benchmark: warm capacity moved by demand vs a static split vs per-business cold-start autoscaling.

    python bench/autopilot.py            # 10-minute trace, 60 s cold start (~35 min for the three runs)
    python bench/autopilot.py --quick    # 2-minute trace, 20 s cold start (~9 min)
    python bench/autopilot.py --quick --strategies autopilot --plot ''   # one strategy, no plot

Same seeded trace, same hardware (8 simulator replicas, each `--max-num-seqs 4` batch slots, 10 tokens/s
per sequence, 20 output tokens: ~2.1 s a request, about 1.9 requests/s per replica at full batch), three
businesses, side by side:

- **static**: one pool of 8, split once between the businesses and never changed. The split is the best
  in hindsight: every split of 8 over 3 businesses (each ≥ 1: 21 splits) is scored offline on the exact
  trace by a discrete-event model of the replicas (batch slots, FIFO queue, least-outstanding routing,
  the simulator's own timing formulas), and the split with the best priority-weighted SLO attainment
  (weights 3:2:1 by priority) is run live. The offline estimate of the chosen split is printed beside the
  live result, as a check of the model.
- **autopilot**: the same pool, starting from the same split, with Corral's autopilot enabled (business
  policies: min 1 each, priorities 10/5/0, TTFT p90 target = the business's SLO, waiting per replica 1,
  concurrency per replica 2.8 = 70% of the 4 slots, the target KPA uses below; no scale-out: the pool
  stays at 8, i.e. the same hardware; cooldown and release window 30 s, 10 s in `--quick`). Before the live
  run, the same decision (`decide`) runs on the offline model of the replicas over the same trace, and its
  attainment is printed: a check of the model, and a way to try a rule on the whole trace in a second.
- **autoscaler**: the per-business baseline: each business its own standard deployment (starting from the
  same split), scaled by this process through `POST /api/scale-deployment` with Knative KPA's rule
  (KServe's default autoscaler): every 2 s, desired = ceil(observed concurrency / (4 slots × 70%)),
  observed concurrency averaged over a 60 s stable window, or a 6 s panic window when that asks for
  ≥ 2× the ready replicas (no scale-down while panicking); scale-down at most halves per tick and waits
  for a full stable window of history; min 1 replica each; a new replica pays the cold start. The cluster has 8 GPUs: replicas (starting ones included) never exceed 8 in total; a
  scale-up beyond that waits for free GPUs (no preemption), highest priority served first.

The trace (seeded, open loop: Poisson arrivals, non-homogeneous by thinning) compresses a day into the run:
`chat` (priority 10, TTFT SLO 500 ms) has a daytime peak and a sudden 5× burst (a step to 5× its rate at
the burst's start, held for 17% of the run); `search` (priority 5, SLO 1 s) an evening peak and a quiet
night; `batch` (priority 0, SLO 5 s) a night load and a quiet day. Load is generated in this process by
async httpx streaming clients (one task per request, sent at its trace time) through Corral's gateway;
TTFT is measured client-side (request sent → first content chunk).

Per business: requests, SLO attainment (share of requests with TTFT ≤ SLO; failed requests count as
misses), TTFT p50/p99, failed requests (non-200, transport error, or a stream without `[DONE]`), reaction
time (burst start → the first burst request answered by a replica that was not serving `chat` when the
burst started; "pressure →" measures from the first SLO miss after the burst start instead), and
replica-hours (replicas held by the business, starting ones included, integrated over the trace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from harness import Corral, wait_until  # noqa: E402

from corral.autopilot import policy_of, settings_of  # noqa: E402
from corral.domain import labels as L  # noqa: E402
from corral.domain.autopilot import (  # noqa: E402
    AutopilotMemory,
    BusinessDemand,
    BusinessPolicy,
    PoolAutopilot,
    ReplicaState,
    decide,
)
from corral.views import AutopilotSpec, BusinessPolicySpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The replicas: 4 batch slots, 10 tokens/s per sequence, 20 tokens, 20 ms fixed TTFT part, 3% ITL growth
# per extra running sequence (the simulator's default): a request holds a slot ~2.1 s at a full batch.
SLOTS = 4
TOKENS = 20
TPS = 10.0
TTFT_BASE_S = 0.020
ITL_GROWTH = 0.03
POOL_SIZE = 8
PROMPT = "hello"


def engine_args(cold_start_s: float) -> str:
    return (f"--max-num-seqs {SLOTS} --tokens-per-second {TPS:g} --ttft-ms {TTFT_BASE_S * 1000:g} "
            f"--itl-growth-per-seq {ITL_GROWTH:g} --max-tokens {TOKENS} --startup-s {cold_start_s:g}")


def service_time_s(running: int, tokens: int = TOKENS) -> float:
    """The simulator's formulas (corral.engines.sim_model): fixed TTFT + prefill of a 1-2 token prompt +
    (tokens − 1) inter-token gaps at `running` sequences."""
    return TTFT_BASE_S + 2 / 10_000 + (tokens - 1) * (1 + ITL_GROWTH * (max(running, 1) - 1)) / TPS


# The trace ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Business:
    name: str
    priority: int
    slo_ms: float
    weight: float  # in the static split's objective


BUSINESSES = (Business("chat", 10, 500, 3), Business("search", 5, 1000, 2), Business("batch", 0, 5000, 1))
BURST = "chat"
BURST_FROM, BURST_TO, BURST_FACTOR = 0.55, 0.72, 5.0


def _bell(x: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((x - centre) / width) ** 2)


def base_rate(business: str, x: float) -> float:
    """Requests/s at fraction `x` of the run (a day compressed into the run)."""
    if business == "chat":  # daytime
        return 0.3 + 1.7 * _bell(x, 0.40, 0.13)
    if business == "search":  # evening peak, quiet night and morning
        return 0.1 + 2.9 * _bell(x, 0.85, 0.08)
    return 0.05 + 3.45 * (_bell(x, 0.0, 0.12) + _bell(x, 1.0, 0.12))  # batch: night


def rate(business: str, x: float) -> float:
    if business == BURST and BURST_FROM <= x < BURST_TO:
        return max(base_rate(business, x), BURST_FACTOR * base_rate(business, BURST_FROM))
    return base_rate(business, x)


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the trace's start
    business: str


def make_trace(duration: float, seed: int) -> list[Arrival]:
    """Non-homogeneous Poisson arrivals per business (thinning), merged in time order."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    for b in BUSINESSES:
        peak = max(rate(b.name, i / 2000) for i in range(2001)) * 1.05
        t = 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= duration:
                break
            if rng.random() < rate(b.name, t / duration) / peak:
                arrivals.append(Arrival(t, b.name))
    return sorted(arrivals, key=lambda a: a.at)


# The offline model (choosing the static split) -----------------------------------------------------------------
def estimate_ttfts(times: list[float], replicas: int) -> list[float]:
    """TTFT of each request (seconds) on `replicas` replicas of SLOTS slots each, FIFO per replica,
    least-outstanding routing; inf for every request when there is no replica."""
    if replicas <= 0:
        return [math.inf] * len(times)
    running: list[list[float]] = [[] for _ in range(replicas)]  # end times (heaps)
    queued: list[list[float]] = [[] for _ in range(replicas)]  # arrival times waiting, FIFO
    ttfts = []

    def advance(r: int, now: float) -> None:
        """Complete what ends by `now`, admitting the queue in order."""
        while running[r] and running[r][0] <= now:
            end = heapq.heappop(running[r])
            if queued[r]:
                arrived = queued[r].pop(0)
                heapq.heappush(running[r], end + service_time_s(len(running[r]) + 1))
                ttfts.append((arrived, end - arrived + TTFT_BASE_S))

    for t in times:
        for r in range(replicas):
            advance(r, t)
        r = min(range(replicas), key=lambda i: (len(running[i]) + len(queued[i]), i))
        if len(running[r]) < SLOTS:
            heapq.heappush(running[r], t + service_time_s(len(running[r]) + 1))
            ttfts.append((t, TTFT_BASE_S))
        else:
            queued[r].append(t)
    for r in range(replicas):
        advance(r, math.inf)
    return [ttft for _, ttft in sorted(ttfts)]


def estimate_attainment(times: list[float], replicas: int, slo_ms: float) -> float:
    ttfts = estimate_ttfts(times, replicas)
    return sum(1 for x in ttfts if x * 1000 <= slo_ms) / len(ttfts) if ttfts else 1.0


def best_static_split(trace: list[Arrival]) -> tuple[dict[str, int], list[tuple[float, dict[str, int], dict[str, float]]]]:
    """Every split of POOL_SIZE over the businesses (each ≥ 1), scored by priority-weighted attainment."""
    times = {b.name: [a.at for a in trace if a.business == b.name] for b in BUSINESSES}
    table = {(b.name, k): estimate_attainment(times[b.name], k, b.slo_ms) for b in BUSINESSES for k in range(1, POOL_SIZE)}
    total_weight = sum(b.weight for b in BUSINESSES)
    scored = []
    for split in itertools.product(range(1, POOL_SIZE), repeat=len(BUSINESSES)):
        if sum(split) != POOL_SIZE:
            continue
        counts = {b.name: k for b, k in zip(BUSINESSES, split, strict=True)}
        att = {b.name: table[(b.name, counts[b.name])] for b in BUSINESSES}
        scored.append((sum(b.weight * att[b.name] for b in BUSINESSES) / total_weight, counts, att))
    scored.sort(key=lambda s: (-s[0], tuple(-s[1][b.name] for b in BUSINESSES)))
    return scored[0][1], scored


def offline_autopilot(trace: list[Arrival], split: dict[str, int], policies: dict[str, BusinessPolicy],
                      settings: PoolAutopilot, interval_s: float = 0.5, act_s: float = 0.1,
                      seed: int = 0) -> tuple[dict[str, list[float]], int]:
    """The autopilot on the offline model: the same replicas (SLOTS slots, FIFO queue, least-outstanding routing
    within a business) with Corral's real decision (`corral.domain.autopilot.decide`) called every `interval_s` on
    what the engines would report (running and waiting per replica; TTFT p90 over the last 10 s per business);
    a move routes new requests `act_s` after the tick (the scrape, the intent and the routing push live); a
    moved replica finishes what it holds. Returns each business's TTFTs (seconds, inf: no replica to take it)
    and the number of moves. It lets a decision rule be tried on the whole trace in a second before a live run."""
    rng = random.Random(seed)
    names = [f"r{i}" for i in range(POOL_SIZE)]
    owner = {n: b for n, b in zip(names, (b for b in BUSINESSES for _ in range(split[b.name])), strict=False)}
    owner = {n: owner[n].name if n in owner else L.UNASSIGNED for n in names}
    running: dict[str, list[float]] = {n: [] for n in names}  # end times (heaps)
    queued: dict[str, list[tuple[float, str]]] = {n: [] for n in names}  # (arrival, business), FIFO
    ttfts: dict[str, list[float]] = {b.name: [] for b in BUSINESSES}
    seen: list[tuple[float, str, float]] = []  # (first token at, business, ttft) for the engines' TTFT histogram
    arrivals_seen: list[tuple[float, str]] = []
    completions: list[tuple[float, str]] = []  # (end, replica)
    memory, moved_at, moves = AutopilotMemory(), {}, 0
    pending: list[tuple[float, str, str]] = []  # (routes at, replica, business): moves decided, not yet routed

    def start(replica: str, arrived: float, business: str, now: float) -> None:
        end = now + service_time_s(len(running[replica]) + 1)
        heapq.heappush(running[replica], end)
        heapq.heappush(completions, (end, replica))
        ttft = now - arrived + TTFT_BASE_S
        ttfts[business].append(ttft)
        seen.append((now + TTFT_BASE_S, business, ttft))

    def advance(until: float) -> None:
        for move in [m for m in pending if m[0] <= until]:
            owner[move[1]] = move[2]
            pending.remove(move)
        while completions and completions[0][0] <= until:
            end, replica = heapq.heappop(completions)
            heapq.heappop(running[replica])
            if queued[replica]:
                arrived, business = queued[replica].pop(0)
                start(replica, arrived, business, end)

    def tick(now: float) -> None:
        nonlocal memory, moves
        replicas = [ReplicaState(n, owner[n], ready=True, moved_at=moved_at.get(n), running=float(len(running[n])),
                                 waiting=float(len(queued[n]))) for n in names]
        demands = {}
        for b in BUSINESSES:
            recent = sorted(t for at, who, t in seen if who == b.name and now - 10 <= at <= now)
            p90 = recent[min(len(recent) - 1, math.ceil(0.9 * len(recent)) - 1)] * 1000 if recent else None
            rps = sum(1 for at, who in arrivals_seen if who == b.name and now - 5 <= at <= now) / 5
            demands[b.name] = BusinessDemand(policy=policies[b.name], requests_per_second=rps, ttft_p90_ms=p90)
        decision = decide(replicas, demands, settings, memory, now, free_gpu_units=None, gpus_per_replica=0)
        memory = decision.memory
        for move in decision.moves:
            pending.append((now + act_s, move.pod, move.target))
            moved_at[move.pod] = now
            moves += 1
        cutoff = now - 10
        seen[:] = [s for s in seen if s[0] >= cutoff]
        arrivals_seen[:] = [a for a in arrivals_seen if a[0] >= cutoff]

    next_tick = interval_s
    for arrival in trace:
        while next_tick <= arrival.at:
            advance(next_tick)
            tick(next_tick)
            next_tick += interval_s
        advance(arrival.at)
        arrivals_seen.append((arrival.at, arrival.business))
        mine = [n for n in names if owner[n] == arrival.business]
        if not mine:
            ttfts[arrival.business].append(math.inf)
            continue
        fewest = min(len(running[n]) + len(queued[n]) for n in mine)
        replica = rng.choice([n for n in mine if len(running[n]) + len(queued[n]) == fewest])
        if len(running[replica]) < SLOTS:
            start(replica, arrival.at, arrival.business, arrival.at)
        else:
            queued[replica].append((arrival.at, arrival.business))
    advance(math.inf)
    return ttfts, moves


def demand_replicas(business: str, x: float) -> float:
    """The offered load in replicas' worth of work at a full batch (λ × service time / slots)."""
    return rate(business, x) * service_time_s(SLOTS) / SLOTS


# Live runs -----------------------------------------------------------------------------------------------------
@dataclass
class Result:
    business: str
    scheduled: float
    sent: float = 0.0
    ttft: float | None = None  # seconds, client-side
    ok: bool = False
    error: str = ""
    replica: str = ""
    first_token_at: float | None = None  # trace seconds


@dataclass
class Sample:
    at: float  # trace seconds
    replicas: dict[str, str]  # ready pod → business (or "unassigned")
    starting: dict[str, str]  # not-ready pod → business (its deployment's, for standard deployments)


@dataclass
class Run:
    strategy: str
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (trace s, what) scale/move actions
    lag_max: float = 0.0
    messages: list[tuple[float, str]] = field(default_factory=list)  # the autopilot's reasons


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.duration = args.duration
        self.cold = args.cold_start
        self.trace = make_trace(self.duration, args.seed)

    # plumbing ---------------------------------------------------------------------------------------------------
    def start_corral(self) -> Corral:
        os.environ["CORRAL_AUTOPILOT_INTERVAL_S"] = str(self.args.autopilot_interval)
        return Corral()

    def stop_corral(self, corral: Corral) -> None:
        """Delete the deployments (replicas drain and stop), stop `corral serve`, then kill anything left."""
        from corral.backends.local.process import find_replicas

        with contextlib.suppress(Exception):
            corral.close()
        if corral.process.poll() is None:
            corral.process.kill()
            corral.process.wait(10)
        found = [f.pid for copies in find_replicas(corral.dir.resolve()).values() for f in copies]
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def deploy(self, corral: Corral, tag: str, replicas: int, pool: bool) -> str:
        return corral.api("POST", "/api/deploy", json={"engine": "simulator", "modelId": "sim", "modelTag": tag,
                                                       "replicas": replicas, "deployAsPool": pool,
                                                       "engineArgs": engine_args(self.cold)})["deployment"]["name"]

    def wait_ready(self, corral: Corral, names: dict[str, int]) -> None:
        def ready() -> bool:
            pods = corral.api("GET", "/api/pods")
            return all(sum(1 for p in pods if p["deployment"] == d and p["ready"]) >= n for d, n in names.items())
        wait_until(ready, self.cold + 120, "the replicas' cold start")

    # the load ---------------------------------------------------------------------------------------------------
    async def load(self, run: Run, urls: dict[str, str], models: dict[str, str], t0: float,
                   in_flight: dict[str, int]) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
        timeout = httpx.Timeout(connect=5, read=120, write=10, pool=10)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            async def one(arrival: Arrival) -> None:
                loop = asyncio.get_running_loop()
                result = Result(arrival.business, arrival.at)
                run.results.append(result)
                delay = t0 + arrival.at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                result.sent = loop.time() - t0
                run.lag_max = max(run.lag_max, result.sent - arrival.at)
                body = {"model": models[arrival.business], "messages": [{"role": "user", "content": PROMPT}],
                        "max_tokens": TOKENS, "stream": True}
                in_flight[arrival.business] += 1
                try:
                    async with client.stream("POST", urls[arrival.business], json=body) as answer:
                        result.replica = answer.headers.get("x-corral-replica", "")
                        done = False
                        async for line in answer.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            if line.strip() == "data: [DONE]":
                                done = True
                            elif result.ttft is None and answer.status_code == 200:
                                now = loop.time()
                                result.ttft = now - t0 - result.sent
                                result.first_token_at = now - t0
                        if answer.status_code != 200:
                            result.error = f"HTTP {answer.status_code}"
                        elif not done:
                            result.error = "stream ended without [DONE]"
                        else:
                            result.ok = True
                except httpx.HTTPError as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                finally:
                    in_flight[arrival.business] -= 1

            await asyncio.gather(*(one(a) for a in self.trace))

    async def sample(self, run: Run, corral_url: str, t0: float, stop: asyncio.Event,
                     business_of: dict[str, str] | None) -> None:
        """Every 0.5 s: which replicas serve which business (ready) and which are starting."""
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(base_url=corral_url, timeout=10, trust_env=False) as api:
            while not stop.is_set():
                try:
                    pods = (await api.get("/api/pods")).json()
                except (httpx.HTTPError, ValueError):
                    pods = None
                if pods is not None:
                    at = loop.time() - t0
                    owner = (lambda p: business_of[p["deployment"]]) if business_of else (lambda p: p["business"] or "unassigned")
                    run.samples.append(Sample(at, {p["name"]: owner(p) for p in pods if p["ready"]},
                                              {p["name"]: owner(p) for p in pods if not p["ready"]}))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

    async def drive(self, run: Run, corral_url: str, urls: dict[str, str], models: dict[str, str],
                    business_of: dict[str, str] | None = None, controller=None) -> None:  # noqa: ANN001
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 1.0
        self.wall_t0 = time.time() + 1.0
        in_flight = {b.name: 0 for b in BUSINESSES}
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample(run, corral_url, t0, stop, business_of))
        ctl = asyncio.create_task(controller(in_flight, t0, stop)) if controller else None
        await self.load(run, urls, models, t0, in_flight)
        stop.set()
        await sampler
        if ctl:
            await ctl

    # strategies -------------------------------------------------------------------------------------------------
    def policy_body(self, business: Business) -> dict:
        """`PUT /api/business-services/{name}/policy` for the autopilot run."""
        return {"minReplicas": 1, "priority": business.priority,
                "target": {"ttftP90Ms": business.slo_ms if self.args.ttft_target else None,
                           "waitingPerReplica": self.args.waiting_per_replica,
                           "concurrencyPerReplica": self.args.concurrency_per_replica or None}}

    def settings_body(self) -> dict:
        """`PUT /api/autopilot/{pool}` for the autopilot run."""
        return {"enabled": True, "warmSpares": 0, "scaleOut": False, "scaleIn": False,
                "cooldownSeconds": self.args.cooldown, "releaseAfterSeconds": self.args.release_after,
                "stabilizationSeconds": self.args.stabilization, "replicaConcurrency": SLOTS}

    def policies(self) -> dict[str, BusinessPolicy]:
        """What the autopilot makes of those policies (Corral's own translation), for the offline model."""
        return {b.name: policy_of(BusinessPolicySpec.model_validate(self.policy_body(b))) for b in BUSINESSES}

    def settings(self) -> PoolAutopilot:
        return settings_of(AutopilotSpec.model_validate(self.settings_body()))

    def run_pool(self, split: dict[str, int], autopilot: bool) -> Run:
        run = Run("autopilot" if autopilot else "static")
        corral = self.start_corral()
        try:
            pool = self.deploy(corral, "m", POOL_SIZE, pool=True)
            self.wait_ready(corral, {pool: POOL_SIZE})
            for b in BUSINESSES:
                corral.api("POST", "/api/deploy-service", json={"serviceName": b.name, "modelPool": pool, "businessTag": b.name})
            corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": split})
            if autopilot:
                for b in BUSINESSES:
                    corral.api("PUT", f"/api/business-services/{b.name}-nlb/policy", json=self.policy_body(b))
                corral.api("PUT", f"/api/autopilot/{pool}", json=self.settings_body())
            urls = {b.name: f"{corral.gateway}/s/{b.name}-nlb/v1/chat/completions" for b in BUSINESSES}
            asyncio.run(self.drive(run, corral.url, urls, {b.name: "m" for b in BUSINESSES}))
            if autopilot:
                for row in corral.api("GET", "/api/history", params={"limit": 5000}):
                    if row["message"].startswith("autopilot:") and row.get("action") == "assign":
                        at = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00")).timestamp() - self.wall_t0
                        run.events.append((at, f"{row['before'].get('business')}→{row['after'].get('business')}"))
                        run.messages.append((at, row["message"]))
                run.events.sort()
        finally:
            self.stop_corral(corral)
        return run

    def run_autoscaler(self, split: dict[str, int]) -> Run:
        run = Run("autoscaler")
        corral = self.start_corral()
        try:
            deployments = {b.name: self.deploy(corral, b.name, split[b.name], pool=False) for b in BUSINESSES}
            self.wait_ready(corral, {deployments[b]: n for b, n in split.items()})
            urls = {b: f"{corral.gateway}/s/{d}/v1/chat/completions" for b, d in deployments.items()}
            business_of = {d: b for b, d in deployments.items()}
            kpa = Kpa(self, run, corral.url, deployments, dict(split))
            asyncio.run(self.drive(run, corral.url, urls, {b.name: b.name for b in BUSINESSES}, business_of, kpa.loop))
        finally:
            self.stop_corral(corral)
        return run


class Kpa:
    """Knative KPA's scaling rule, per business, capped at POOL_SIZE replicas in all (the cluster's GPUs)."""

    TICK_S = 2.0
    SAMPLE_S = 0.5
    TARGET = SLOTS * 0.7  # KPA's target utilisation (70%) of the container concurrency (the batch slots)
    PANIC_THRESHOLD = 2.0
    MAX_SCALE_DOWN_RATE = 2.0  # Knative's default: at most halve the replicas per tick

    def __init__(self, bench: Bench, run: Run, corral_url: str, deployments: dict[str, str], replicas: dict[str, int]) -> None:
        self.bench, self.run, self.url, self.deployments = bench, run, corral_url, deployments
        self.replicas = replicas  # what was last asked for, per business
        self.stable_s = bench.args.kpa_stable_window
        self.panic_s = self.stable_s / 10
        self.history: dict[str, list[tuple[float, int]]] = {b: [] for b in deployments}
        self.panic_until: dict[str, float] = {b: -math.inf for b in deployments}
        self.started: float | None = None

    def average(self, business: str, now: float, window: float) -> float:
        seen = [c for at, c in self.history[business] if at > now - window]
        return sum(seen) / len(seen) if seen else 0.0

    async def loop(self, in_flight: dict[str, int], t0: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_tick = t0 + self.TICK_S
        async with httpx.AsyncClient(base_url=self.url, timeout=30, trust_env=False) as api:
            while not stop.is_set():
                now = loop.time()
                for b, n in in_flight.items():
                    self.history[b].append((now, n))
                    if len(self.history[b]) > 4 * self.stable_s / self.SAMPLE_S:
                        del self.history[b][: len(self.history[b]) // 2]
                if now >= next_tick and now >= t0:
                    next_tick += self.TICK_S
                    await self.tick(api, now, now - t0)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.SAMPLE_S)

    async def tick(self, api: httpx.AsyncClient, now: float, at: float) -> None:
        self.started = self.started if self.started is not None else now - at
        warm = now - self.started >= self.stable_s  # an autoscaler in service has a full window of history
        pods = (await api.get("/api/pods")).json()
        ready = {b: sum(1 for p in pods if p["deployment"] == d and p["ready"]) for b, d in self.deployments.items()}
        desired: dict[str, int] = {}
        for b in self.deployments:
            stable = math.ceil(self.average(b, now, self.stable_s) / self.TARGET)
            panic = math.ceil(self.average(b, now, self.panic_s) / self.TARGET)
            if ready[b] and panic / ready[b] >= self.PANIC_THRESHOLD:
                self.panic_until[b] = now + self.stable_s  # KPA leaves panic mode after a stable window without it
            if now < self.panic_until[b]:
                want = max(panic, self.replicas[b])  # panic mode: never scale down
            elif not warm:
                want = max(stable, self.replicas[b])  # not a full window of history yet: scale up only
            else:
                want = max(stable, math.ceil(self.replicas[b] / self.MAX_SCALE_DOWN_RATE))
            desired[b] = max(1, want)
        # Scale-downs first (they free GPUs), then scale-ups by priority within what is free.
        order = sorted(self.deployments, key=lambda b: -next(x.priority for x in BUSINESSES if x.name == b))
        for b in order:
            if desired[b] < self.replicas[b]:
                await self.scale(api, b, desired[b], at)
        for b in order:
            if desired[b] > self.replicas[b]:
                free = POOL_SIZE - sum(self.replicas.values())
                target = min(desired[b], self.replicas[b] + free)
                if target > self.replicas[b]:
                    await self.scale(api, b, target, at)

    async def scale(self, api: httpx.AsyncClient, business: str, target: int, at: float) -> None:
        answer = await api.post("/api/scale-deployment", json={"deploymentName": self.deployments[business],
                                                                "targetReplicas": target})
        if answer.status_code < 300:
            self.run.events.append((at, f"{business} {self.replicas[business]}→{target}"))
            self.replicas[business] = target
        else:
            self.run.events.append((at, f"{business} scale to {target} refused: {answer.status_code}"))


# Reporting -----------------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def replica_hours(run: Run, business: str, duration: float) -> float:
    """∫ replicas held by the business (ready or starting) dt over the trace, in hours (step-wise samples)."""
    samples = [s for s in run.samples if 0 <= s.at <= duration]
    total = 0.0
    for s, nxt in zip(samples, samples[1:] + [None], strict=False):
        end = nxt.at if nxt else duration
        held = sum(1 for b in s.replicas.values() if b == business) + sum(1 for b in s.starting.values() if b == business)
        total += held * max(0.0, end - s.at)
    return total / 3600


def joined_after(run: Run, business: str, since: float) -> dict[str, list[float]]:
    """Replica → the times (trace s, the last sample before the change) after which it newly served
    `business`: it was not a ready replica of it in one sample and is in the next, at or after `since`
    (moved there, or a new replica created at or after `since` and now ready)."""
    joins: dict[str, list[float]] = {}
    first_seen: dict[str, float] = {}
    for s in run.samples:
        for name in [*s.replicas, *s.starting]:
            first_seen.setdefault(name, s.at)
    for before, after in zip(run.samples, run.samples[1:], strict=False):
        if after.at < since:
            continue
        for name, b in after.replicas.items():
            if b == business and before.replicas.get(name) != business:
                if name in before.starting and first_seen[name] < since:
                    continue  # a replica started before the burst, ready now: not a reaction to it
                joins.setdefault(name, []).append(before.at)
    return joins


def reaction(run: Run, duration: float) -> tuple[float | None, float | None]:
    """(burst start → first token of the first request of the burst business answered by a replica that
    newly joined it after the burst started (moved there, or a new replica created after the burst
    started), first SLO miss of the burst → the same), seconds; None: no such replica before the end."""
    start = BURST_FROM * duration
    end = BURST_TO * duration
    slo = next(b.slo_ms for b in BUSINESSES if b.name == BURST) / 1000
    joins = joined_after(run, BURST, start)
    burst = [r for r in run.results if r.business == BURST and start <= r.scheduled < end]
    after = [r for r in run.results if r.business == BURST and start <= r.scheduled]  # a late reaction counts too
    served = [r.first_token_at for r in after if r.ok and r.first_token_at is not None
              and any(r.sent >= t for t in joins.get(r.replica, ()))]
    if not served:
        return None, None
    first_new = min(served)
    misses = [r.sent for r in burst if not r.ok or r.ttft is None or r.ttft > slo]
    first_miss = min(misses) if misses else None
    return first_new - start, (first_new - first_miss if first_miss is not None and first_miss < first_new else None)


def summarise(run: Run, duration: float) -> list[dict]:
    rows = []
    for b in BUSINESSES:
        mine = [r for r in run.results if r.business == b.name]
        ttfts = [r.ttft * 1000 for r in mine if r.ok and r.ttft is not None]
        met = sum(1 for r in mine if r.ok and r.ttft is not None and r.ttft * 1000 <= b.slo_ms)
        row = {"strategy": run.strategy, "business": b.name, "priority": b.priority, "slo_ms": b.slo_ms,
               "requests": len(mine), "slo_attainment": met / len(mine) if mine else None,
               "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p99_ms": pct(ttfts, 0.99),
               "failed": sum(1 for r in mine if not r.ok), "replica_hours": replica_hours(run, b.name, duration),
               "reaction_s": None, "reaction_from_pressure_s": None}
        if b.name == BURST:
            row["reaction_s"], row["reaction_from_pressure_s"] = reaction(run, duration)
        rows.append(row)
    return rows


def print_table(rows: list[dict], runs: dict[str, Run], title: str, duration: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ["strategy", "business (prio, SLO)", "requests", "SLO attainment", "TTFT p50 ms", "p99 ms", "failed",
                   "reaction s", "pressure → s", "replica-hours"]:
        table.add_column(column, justify="right")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        table.add_row(r["strategy"], f"{r['business']} ({r['priority']}, {r['slo_ms'] / 1000:g} s)", str(r["requests"]),
                      fmt(None if r["slo_attainment"] is None else 100 * r["slo_attainment"], ".1f") + "%",
                      fmt(r["ttft_p50_ms"], ".0f"), fmt(r["ttft_p99_ms"], ".0f"), str(r["failed"]),
                      fmt(r["reaction_s"], ".2f"), fmt(r["reaction_from_pressure_s"], ".2f"), fmt(r["replica_hours"], ".3f"))
    console = Console(width=150)
    console.print(table)
    for name, run in runs.items():
        total = sum(1 for s in run.samples for _ in s.replicas) and replica_hours_total(run, duration)
        console.print(f"{name}: replica-hours held in all (spares and starting included) {total:.3f}; actions {len(run.events)}; "
                      f"load generator lag max {run.lag_max * 1000:.0f} ms")


def replica_hours_total(run: Run, duration: float) -> float:
    samples = [s for s in run.samples if 0 <= s.at <= duration]
    total = 0.0
    for s, nxt in zip(samples, samples[1:] + [None], strict=False):
        total += (len(s.replicas) + len(s.starting)) * max(0.0, (nxt.at if nxt else duration) - s.at)
    return total / 3600


def plot(runs: dict[str, Run], duration: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"chat": "tab:red", "search": "tab:blue", "batch": "tab:green", "unassigned": "tab:gray"}
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.0 * len(runs)), sharex=True, squeeze=False)
    xs = [duration * i / 600 for i in range(601)]
    for ax, (name, run) in zip(axes[:, 0], runs.items(), strict=True):
        ax.axvspan(BURST_FROM * duration, BURST_TO * duration, color="tab:red", alpha=0.07, lw=0)
        for b in BUSINESSES:
            ax.plot(xs, [demand_replicas(b.name, x / duration) for x in xs], ls="--", lw=1, color=colours[b.name])
            at = [s.at for s in run.samples]
            ax.step(at, [sum(1 for v in s.replicas.values() if v == b.name) for s in run.samples], where="post", lw=1.8,
                    color=colours[b.name], label=f"{b.name} ready replicas")
            starting = [sum(1 for v in list(s.replicas.values()) + list(s.starting.values()) if v == b.name) for s in run.samples]
            if any(s.starting for s in run.samples):
                ax.step(at, starting, where="post", lw=1, ls=":", color=colours[b.name])
            misses = [r.sent for r in run.results if r.business == b.name and (not r.ok or r.ttft is None or r.ttft * 1000 > b.slo_ms)]
            ax.plot(misses, [-0.35 - 0.2 * BUSINESSES.index(b)] * len(misses), "|", color=colours[b.name], ms=6)
        spares = [sum(1 for v in s.replicas.values() if v == "unassigned") for s in run.samples]
        if any(spares):
            ax.step([s.at for s in run.samples], spares, where="post", lw=1, color=colours["unassigned"], label="warm spares")
        ax.set_ylabel(name)
        ax.legend(loc="upper left", fontsize=7, ncol=4)
        ax.set_ylim(-1.0, POOL_SIZE + 0.5)
        ax.set_xlim(0, duration)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("trace time (s)")
    fig.suptitle(title + "\nsolid: ready replicas per business; dashed: demand (busy replicas at a full batch); "
                 "dotted: incl. starting; ticks below 0: SLO misses; shaded: 5× burst on chat", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-minute trace and 20 s cold start (development)")
    parser.add_argument("--duration", type=float, help="trace seconds (default 600, quick 120)")
    parser.add_argument("--cold-start", type=float, help="replica start-up seconds (default 60, quick 20)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--strategies", nargs="+", default=["static", "autopilot", "autoscaler"],
                        choices=["static", "autopilot", "autoscaler"])
    parser.add_argument("--split", help="force the starting split, e.g. chat=3,search=3,batch=2 (default: best static)")
    parser.add_argument("--autopilot-interval", type=float, default=0.5, help="CORRAL_AUTOPILOT_INTERVAL_S")
    parser.add_argument("--stabilization", type=float, default=1.0, help="autopilot stabilizationSeconds")
    parser.add_argument("--cooldown", type=float, help="autopilot cooldownSeconds (default 30, quick 10)")
    parser.add_argument("--release-after", type=float, help="autopilot releaseAfterSeconds (default 30, quick 10)")
    parser.add_argument("--waiting-per-replica", type=float, default=1.0, help="policy target waitingPerReplica")
    parser.add_argument("--concurrency-per-replica", type=float, default=SLOTS * 0.7,
                        help="policy target concurrencyPerReplica (default 70%% of the slots, KPA's target; 0: none)")
    parser.add_argument("--ttft-target", action=argparse.BooleanOptionalAction, default=True,
                        help="policy target ttftP90Ms = the business's SLO (--no-ttft-target: waiting per replica only)")
    parser.add_argument("--kpa-stable-window", type=float, help="KPA stable window s (default 60, Knative's; panic: 10%%)")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "autopilot.png"), help="PNG path ('' for none)")
    parser.add_argument("--json", help="write the rows and time series here")
    args = parser.parse_args()
    quick = args.quick
    args.duration = args.duration or (120.0 if quick else 600.0)
    args.cold_start = args.cold_start if args.cold_start is not None else (20.0 if quick else 60.0)
    args.cooldown = args.cooldown if args.cooldown is not None else (10.0 if quick else 30.0)
    args.release_after = args.release_after if args.release_after is not None else (10.0 if quick else 30.0)
    args.kpa_stable_window = args.kpa_stable_window or 60.0

    bench = Bench(args)
    split, scored = best_static_split(bench.trace)
    if args.split:
        split = {k: int(v) for k, v in (p.split("=") for p in args.split.split(","))}
    counts = {b.name: sum(1 for a in bench.trace if a.business == b.name) for b in BUSINESSES}
    print(f"trace: {args.duration:.0f} s, seed {args.seed}, {len(bench.trace)} requests {counts}; cold start {args.cold_start:g} s")
    print("best static splits in hindsight (offline estimate, weighted attainment 3:2:1):")
    for score, c, att in scored[:5]:
        print(f"  {c}  weighted {100 * score:.1f}%  " + ", ".join(f"{b} {100 * a:.1f}%" for b, a in att.items()))
    print(f"starting split (all strategies): {split}")
    offline = {}
    for seed in range(3):
        ttfts, moves = offline_autopilot(bench.trace, split, bench.policies(), bench.settings(), args.autopilot_interval,
                                         seed=seed)
        offline[seed] = moves, {b.name: sum(1 for x in ttfts[b.name] if x * 1000 <= b.slo_ms) / len(ttfts[b.name])
                                for b in BUSINESSES}
    print("autopilot, offline model (routing seeds 0-2): " + "; ".join(
        ", ".join(f"{b} {100 * a:.1f}%" for b, a in att.items()) + f" ({moves} moves)" for moves, att in offline.values()))

    runs: dict[str, Run] = {}
    for strategy in args.strategies:
        started = time.monotonic()
        print(f"running {strategy} ...", flush=True)
        runs[strategy] = (bench.run_autoscaler(split) if strategy == "autoscaler"
                          else bench.run_pool(split, autopilot=strategy == "autopilot"))
        print(f"  {strategy} done in {time.monotonic() - started:.0f} s; actions: "
              + ", ".join(f"{at:.1f}s {what}" for at, what in runs[strategy].events[:40]), flush=True)

    rows = [row for run in runs.values() for row in summarise(run, args.duration)]
    title = (f"Autopilot bench: {args.duration:.0f} s trace (seed {args.seed}), pool of {POOL_SIZE} simulator replicas, "
             f"cold start {args.cold_start:g} s")
    print_table(rows, runs, title, args.duration)
    if "static" in runs:
        est = {b: a for s, c, a in scored if c == split for b, a in a.items()} if split in [c for _, c, _ in scored] else {}
        if est:
            print("static split, offline estimate: " + ", ".join(f"{b} {100 * a:.1f}%" for b, a in est.items()))
    if args.plot:
        plot(runs, args.duration, Path(args.plot), title)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "split": split, "rows": rows,
            "runs": {n: {"events": r.events, "samples": [(s.at, s.replicas, s.starting) for s in r.samples],
                         "results": [r.__dict__ for r in r.results], "messages": r.messages} for n, r in runs.items()}}, default=str))


if __name__ == "__main__":
    main()
