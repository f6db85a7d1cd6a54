"""Fair inside a business (a SIMULATOR): the order of the gateway's hold queue when a business's replicas are full,
Corral's virtual token counter (VTC, `corral.domain.fairness`) against first come first served and per-key token
rate limits.

    python bench/fairness.py             # 5 seeds, 5 scenarios (~20 s on 2 cores)
    python bench/fairness.py --seeds 10
    python bench/fairness.py --quick     # 2 seeds, a third of the duration (a smoke run)

Nothing here runs a process: the business's replicas are a discrete-event model with `PLACES` places (their batch
limits summed), a request holding one place for its time to first token (100 ms + its prompt at 10,000 tokens/s)
and then its completion at 50 tokens/s. What is not simulated is the rule: the VTC strategy calls Corral's own
`VirtualCounters` (join, first, dispatch, settle) exactly as both data planes do. Over the real gateways (both
planes, simulator replicas), tests/integration/test_fairness.py checks the same effect.

Rules on the same trace (arrival times, prompt and completion lengths, keys):

- **fifo**: first come first served (a gateway without fairness; vLLM's own waiting queue).
- **vtc (Corral)**: the held request of the key with the least weighted tokens served goes next.
- **rate limits**: first come first served, plus a per-key requests-per-minute limit (LiteLLM's virtual keys'
  `rpm_limit`, Corral's own quotas): the peer a platform team would reach for. Its fair best setting, by formula
  and never tuned on a trace: each key may send its weight's share of what the places serve in a minute (at the
  mean request size). Over it the request is refused (429) and counted as refused. (A tokens-per-minute limit does
  worse here: checked with the tokens already used, it lets a minute's budget through in the minute's first
  seconds while those requests are still running.)

Clients wait up to 30 s held (Corral's hold deadline), then the request fails (503). Per key: TTFT p50 and p99 of
the requests served, the share of tokens served against the key's share of demand, refused or failed requests;
per rule: tokens served per second (the places' use) and the worst key's tokens served over its fair share (the
weighted max-min fair share, capped at what the key asked for, of what the best rule served on that seed: 1.00 =
every key got at least its share; a rule that leaves places idle falls short). Mean ± sd over the seeds [min–max].

Scenarios (10 simulated minutes each; capacity ≈ 2.6 requests/s):
- **noisy + quiet, closed loop**: one key with 20 clients, another with 2, each client sending its next request
  when its last one ends (the integration test's shape): the business is always full, and nobody times out.
- **noisy + quiet, open loop (overload)**: one key asks 1.5× the capacity (Poisson), another a tenth of that: the
  queue grows to the hold deadline, and who gets the capacity is the question.
- **steady, below capacity**: two keys at 35 % each: nothing is held, every rule is the same (VTC buys nothing).
- **scarcity, equal keys**: two keys at 75 % each: FIFO is already fair between equals.
- **bursts of a quiet key**: one key at 1.2× capacity, another sends 20 requests at once every minute.
- **weights 3:1**: two keys each asking the whole capacity, weights 3 and 1.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from corral.domain.fairness import BYTES_PER_TOKEN, VirtualCounters  # noqa: E402

PLACES = 8
TTFT_BASE_S = 0.1
PREFILL_TOKENS_PER_S = 10_000
DECODE_TOKENS_PER_S = 50
HOLD_TIMEOUT_S = 30.0
PROMPT_RANGE = (200, 2000)
COMPLETION_RANGE = (32, 256)
MEAN_SERVICE_S = (TTFT_BASE_S + sum(PROMPT_RANGE) / 2 / PREFILL_TOKENS_PER_S
                  + sum(COMPLETION_RANGE) / 2 / DECODE_TOKENS_PER_S)
CAPACITY_RPS = PLACES / MEAN_SERVICE_S


@dataclass(frozen=True)
class Request:
    at: float
    key: str
    prompt: int
    completion: int

    @property
    def service_s(self) -> float:
        return self.ttft_s + self.completion / DECODE_TOKENS_PER_S

    @property
    def ttft_s(self) -> float:
        return TTFT_BASE_S + self.prompt / PREFILL_TOKENS_PER_S

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion


@dataclass(frozen=True)
class KeyLoad:
    key: str
    rps: float = 0.0  # mean arrivals per second (Poisson)
    weight: int = 1
    burst: int = 0  # >0: this many requests at once every `burst_every_s` instead of Poisson arrivals
    burst_every_s: float = 60.0
    clients: int = 0  # >0: a closed loop instead: this many clients, each sending its next request when one ends


@dataclass(frozen=True)
class Scenario:
    name: str
    keys: tuple[KeyLoad, ...]


def scenarios() -> list[Scenario]:
    c = CAPACITY_RPS
    return [
        Scenario("noisy + quiet, closed loop", (KeyLoad("noisy", clients=20), KeyLoad("quiet", clients=2))),
        Scenario("noisy + quiet, open loop (overload)", (KeyLoad("noisy", 1.5 * c), KeyLoad("quiet", 0.15 * c))),
        Scenario("steady, below capacity", (KeyLoad("a", 0.35 * c), KeyLoad("b", 0.35 * c))),
        Scenario("scarcity, equal keys", (KeyLoad("a", 0.75 * c), KeyLoad("b", 0.75 * c))),
        Scenario("bursts of a quiet key", (KeyLoad("steady", 1.2 * c), KeyLoad("bursty", 0.0, burst=20))),
        Scenario("weights 3:1", (KeyLoad("heavy", 1.0 * c, weight=3), KeyLoad("light", 1.0 * c, weight=1))),
    ]


def lengths(rng: random.Random) -> tuple[int, int]:
    return rng.randint(*PROMPT_RANGE), rng.randint(*COMPLETION_RANGE)


def trace(scenario: Scenario, duration_s: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    requests = []
    for load in scenario.keys:
        if load.clients:  # the first request of each client; the next ones come as answers do (`simulate`)
            requests += [Request(rng.uniform(0, 1), f"{load.key}#{i}", *lengths(rng)) for i in range(load.clients)]
            continue
        if load.burst:
            t = rng.uniform(0, load.burst_every_s)
            while t < duration_s:
                requests += [Request(t, load.key, rng.randint(*PROMPT_RANGE), rng.randint(*COMPLETION_RANGE))
                             for _ in range(load.burst)]
                t += load.burst_every_s
            continue
        t = rng.expovariate(load.rps)
        while t < duration_s:
            requests.append(Request(t, load.key, rng.randint(*PROMPT_RANGE), rng.randint(*COMPLETION_RANGE)))
            t += rng.expovariate(load.rps)
    requests.sort(key=lambda r: r.at)
    return requests


@dataclass
class KeyResult:
    ttft: list[float] = field(default_factory=list)
    served_tokens: int = 0
    asked_tokens: int = 0
    refused: int = 0
    failed: int = 0
    requests: int = 0


class Rule:
    """How held requests are ordered and whether a request is admitted at all."""

    name = ""

    def admit(self, request: Request, now: float) -> bool:
        return True

    def join(self, request: Request, held: Sequence[Request]) -> None:
        pass

    def first(self, held: Sequence[Request]) -> int:
        return 0

    def dispatch(self, request: Request) -> object:
        return None

    def settle(self, request: Request, charge: object) -> None:
        pass


class Fifo(Rule):
    name = "fifo"


class Vtc(Rule):
    """Corral's rule: the data planes' calls, in the same places."""

    name = "vtc (Corral)"

    def __init__(self, weights: dict[str, int]) -> None:
        self.counters = VirtualCounters()
        self.weights = weights

    def join(self, request: Request, held: Sequence[Request]) -> None:
        self.counters.join(owner(request), {owner(r) for r in held})

    def first(self, held: Sequence[Request]) -> int:
        return self.counters.first(owner(r) for r in held) or 0

    def dispatch(self, request: Request) -> object:
        return self.counters.dispatch(owner(request), self.weights[owner(request)], request.prompt * BYTES_PER_TOKEN)

    def settle(self, request: Request, charge: object) -> None:
        self.counters.settle(charge, request.prompt, request.completion)  # type: ignore[arg-type]


class RateLimits(Rule):
    """FIFO plus a fixed-window requests-per-minute limit per key, counted when a request is admitted (LiteLLM's
    `rpm_limit` on a virtual key; Corral's own quotas). Requests rather than tokens: a token limit is checked with
    the tokens already used, which lag by the requests in flight (a minute's budget goes in its first seconds)."""

    name = "rate limits"

    def __init__(self, limits: dict[str, float]) -> None:
        self.limits = limits
        self.used: dict[tuple[str, int], int] = {}

    def admit(self, request: Request, now: float) -> bool:
        window = (owner(request), int(now // 60))
        if self.used.get(window, 0) >= self.limits[window[0]]:
            return False
        self.used[window] = self.used.get(window, 0) + 1
        return True


def simulate(scenario: Scenario, requests: list[Request], rule: Rule, duration_s: float,
             seed: int = 0) -> tuple[dict[str, KeyResult], float]:
    """Run the trace; per key its results, and the tokens served per second. A closed-loop client's request
    (`key#i`) is followed by its next one when it ends or fails, lengths from that client's own generator (the
    same sequence under every rule)."""
    results = {k.key: KeyResult() for k in scenario.keys}
    events: list[tuple[float, int, str, Request, object]] = []
    order = itertools.count()
    client_rng: dict[str, random.Random] = {}
    for r in requests:
        heapq.heappush(events, (r.at, next(order), "arrive", r, None))
        if "#" in r.key:
            client_rng[r.key] = random.Random(f"{seed}-{r.key}")

    def next_of(r: Request, now: float) -> None:
        if r.key in client_rng and now < duration_s:
            heapq.heappush(events, (now, next(order), "arrive", Request(now, r.key, *lengths(client_rng[r.key])), None))
    held: deque[Request] = deque()
    free = PLACES
    served_tokens = 0

    def start(r: Request, now: float) -> None:
        nonlocal free
        free -= 1
        charge = rule.dispatch(r)
        results[owner(r)].ttft.append(now - r.at + r.ttft_s)
        heapq.heappush(events, (now + r.service_s, next(order), "end", r, charge))

    while events:
        now, _, kind, r, charge = heapq.heappop(events)
        if kind == "arrive":
            result = results[owner(r)]
            result.requests += 1
            result.asked_tokens += r.tokens
            if not rule.admit(r, now):
                result.refused += 1
                next_of(r, now + 60 - now % 60)  # a closed-loop client waits for its Retry-After: the next minute
                continue
            if free and not held:
                start(r, now)
            else:
                rule.join(r, held)
                held.append(r)
                heapq.heappush(events, (r.at + HOLD_TIMEOUT_S, next(order), "deadline", r, None))
        elif kind == "deadline":
            if r in held:
                held.remove(r)
                results[owner(r)].failed += 1
                next_of(r, now)
        else:  # end
            free += 1
            rule.settle(r, charge)
            results[owner(r)].served_tokens += r.tokens
            served_tokens += r.tokens if now <= duration_s else 0
            next_of(r, now)
            while free and held:
                i = rule.first(held)
                chosen = held[i]
                del held[i]
                start(chosen, now)
    return results, served_tokens / duration_s


def owner(r: Request) -> str:
    """The key a request is of (a closed-loop client's `key#i` is of `key`)."""
    return r.key.partition("#")[0]


def fair_shares(scenario: Scenario, results: dict[str, KeyResult], served_total: int) -> dict[str, float]:
    """Each key's max-min fair share of the tokens served (weighted; capped at what it asked for)."""
    demand = {k.key: results[k.key].asked_tokens for k in scenario.keys}
    weight = {k.key: k.weight for k in scenario.keys}
    share: dict[str, float] = {k: 0.0 for k in demand}
    left, open_keys = float(served_total), set(demand)
    while open_keys and left > 1e-9:
        total_w = sum(weight[k] for k in open_keys)
        capped = [k for k in open_keys if demand[k] - share[k] <= left * weight[k] / total_w]
        if not capped:
            for k in open_keys:
                share[k] += left * weight[k] / total_w
            break
        for k in capped:
            left -= demand[k] - share[k]
            share[k] = demand[k]
            open_keys.discard(k)
    return share


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rules_for(scenario: Scenario) -> list[Callable[[], Rule]]:
    weights = {k.key: k.weight for k in scenario.keys}
    total = sum(weights.values())
    limits = {k: CAPACITY_RPS * 60 * w / total for k, w in weights.items()}  # each key its weight's share
    return [Fifo, lambda: Vtc(weights), lambda: RateLimits(limits)]


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(mean)} ± {fmt.format(sd)} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds = list(range(1, (2 if args.quick else args.seeds) + 1))
    duration = 200.0 if args.quick else 600.0
    print(f"SIMULATOR: {PLACES} places, capacity ≈ {CAPACITY_RPS:.2f} requests/s; {len(seeds)} seeds; "
          f"{duration:.0f} s per run; mean ± sd [min–max] over seeds")
    for scenario in scenarios():
        print(f"\n### {scenario.name}\n")
        keys = [k.key for k in scenario.keys]
        header = ["rule", "tokens/s served", "worst key: served / fair share"]
        for k in keys:
            header += [f"{k}: TTFT p50 ms", f"{k}: TTFT p99 ms", f"{k}: refused+failed %"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        makers = rules_for(scenario)
        rows: list[dict[str, list[float]]] = [{} for _ in makers]
        names = [make().name for make in makers]
        for seed in seeds:
            requests = trace(scenario, duration, seed)
            runs = [simulate(scenario, requests, make(), duration, seed) for make in makers]
            # the fair shares of what the best rule served on this seed: a rule that leaves places idle is short
            best = max(sum(r.served_tokens for r in results.values()) for results, _ in runs)
            for (results, throughput), row in zip(runs, rows, strict=True):
                shares = fair_shares(scenario, results, best)
                row.setdefault("throughput", []).append(throughput)
                row.setdefault("worst", []).append(min(results[k].served_tokens / shares[k] if shares[k] else 1.0
                                                       for k in keys))
                for k in keys:
                    r = results[k]
                    row.setdefault(f"{k}.p50", []).append(pct(r.ttft, 0.5) * 1000)
                    row.setdefault(f"{k}.p99", []).append(pct(r.ttft, 0.99) * 1000)
                    row.setdefault(f"{k}.lost", []).append(100 * (r.refused + r.failed) / max(1, r.requests))
        for name, rows_of in zip(names, rows, strict=True):
            cells = [name, spread(rows_of["throughput"]), spread(rows_of["worst"], "{:.2f}")]
            for k in keys:
                cells += [spread(rows_of[f"{k}.p50"]), spread(rows_of[f"{k}.p99"]),
                          spread(rows_of[f"{k}.lost"], "{:.1f}")]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
