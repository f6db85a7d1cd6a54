"""Replica picking by prefix cache (issue 25, benchmark 6(a)): TTFT and throughput of a multi-turn chat trace with
shared system prompts, through Corral least-load, Corral prefix-aware and vllm-router cache_aware, over the same
SIMULATOR replicas (real processes, real HTTP; no model runs: the simulator's prefix cache and prefill model,
`corral/engines/sim_model.py`, give the times).

    python bench/prefix_routing.py [--seeds 5] [--duration 15] [--replicas 4] [--router .venv-router/bin/vllm-router]

Traces (closed loop: `--users` clients, each sending its next request when the last one ended):
- `shared`: `--tenants` tenants, each with a long system prompt (~`--system-tokens` tokens) shared by its users;
  every user holds one conversation that grows turn by turn (its history resent, as chat clients do) and starts a
  new one after `--turns` turns. This is where picking by prefix should win: a replica that served a tenant
  holds its system prompt in its prefix cache, and prefill (10,000 tokens/s in the simulator) is skipped for it.
- `unique`: no shared prefix at all (every request its own random prompt of the same size, one turn): nothing to
  gain from the prefix; prefix-aware should do no better than least-load here, and may do worse.

Every run salts its prompts (policy, seed), so no run finds the cache warm from another. The replicas' cache
(`--num-gpu-blocks` × 16 tokens) is too small to hold every tenant's prompt on every replica, as on a GPU.
Figures per run, after a warm-up: TTFT p50/p90 (streamed, time to the first server-sent event at the client),
requests/s completed, and the share of prompt tokens the replicas found in their prefix cache (warm-up included);
the table gives the median over seeds and the spread (min-max) of each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Corral, _process, free_port  # noqa: E402

CHARS_PER_TOKEN = 4  # the simulator's rule (sim_model.CHARS_PER_TOKEN)
BUSINESS = "chat"


@dataclass(frozen=True)
class Trace:
    name: str
    tenants: int
    system_tokens: int
    turns: int
    shared: bool


def words(rng: random.Random, tokens: int) -> str:
    """Text of about `tokens` simulator tokens (random: no two texts share a prefix by chance); cheap, so the
    load generator is not what limits a run."""
    return rng.randbytes(tokens * CHARS_PER_TOKEN // 2).hex()


class User:
    """One client: conversations of its tenant, one request at a time."""

    def __init__(self, trace: Trace, tenant_prompts: list[str], rng: random.Random) -> None:
        self.trace, self.prompts, self.rng = trace, tenant_prompts, rng
        self.messages: list[dict] = []

    def next_body(self, max_tokens: int) -> dict:
        rng, trace = self.rng, self.trace
        if not trace.shared:
            messages = [{"role": "system", "content": words(rng, trace.system_tokens)},
                        {"role": "user", "content": words(rng, 60)}]
        else:
            if not self.messages or len(self.messages) >= 1 + 2 * trace.turns:
                self.messages = [{"role": "system", "content": rng.choice(self.prompts)}]
            else:
                self.messages.append({"role": "assistant", "content": words(rng, 40)})
            self.messages.append({"role": "user", "content": words(rng, 60)})
            messages = list(self.messages)
        return {"model": "m", "messages": messages, "max_tokens": max_tokens, "stream": True}


async def one(session: aiohttp.ClientSession, url: str, body: dict) -> float | None:
    """TTFT in seconds (None: failed)."""
    started = time.perf_counter()
    async with session.post(url, json=body) as response:
        if response.status != 200:
            await response.read()
            return None
        first = None
        async for _ in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
        return first


async def drive(url: str, trace: Trace, users: int, duration: float, warmup: float, seed: int, salt: str,
                max_tokens: int) -> tuple[list[float], int, int]:
    """Closed loop for `warmup` + `duration` seconds; what ended within the warm-up is not counted."""
    rng = random.Random(seed)
    prompts = [f"[{salt} tenant {t}] " + words(rng, trace.system_tokens) for t in range(trace.tenants)]
    clients = [User(trace, [prompts[i % trace.tenants]], random.Random(rng.random())) for i in range(users)]
    ttfts: list[float] = []
    failed = 0
    counted_from = time.monotonic() + warmup
    deadline = counted_from + duration

    async def run(user: User, session: aiohttp.ClientSession) -> None:
        nonlocal failed
        while time.monotonic() < deadline:
            try:
                ttft = await one(session, url, user.next_body(max_tokens))
            except aiohttp.ClientError:
                ttft = None
            if not counted_from <= time.monotonic() < deadline:
                continue
            if ttft is None:
                failed += 1
            else:
                ttfts.append(ttft)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(run(u, session) for u in clients))
    return ttfts, len(ttfts), failed


def cache_counters(endpoints: list[str]) -> tuple[float, float]:
    """(prompt tokens found in the prefix cache, prompt tokens looked up), summed over the replicas."""
    import re

    import httpx

    hits = queries = 0.0
    for endpoint in endpoints:
        page = httpx.get(f"{endpoint}/metrics", timeout=10).text
        for name, value in re.findall(r"^vllm:prefix_cache_(hits|queries)_total\{[^}]*\} (\S+)", page, re.M):
            if name == "hits":
                hits += float(value)
            else:
                queries += float(value)
    return hits, queries


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextlib.contextmanager
def vllm_router(binary: str, endpoints: list[str]):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *endpoints, "--policy", "cache_aware",
            "--max-concurrent-requests", "4096", "--log-level", "error",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    with _process(argv, f"{url}/v1/models", "vllm-router"):
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds run first, not measured (cold caches)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--users", type=int, default=32, help="default: the replicas' batch slots (4 x 8)")
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--system-tokens", type=int, default=6000)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-gpu-blocks", type=int, default=2048, help="the simulator's prefix cache, in 16-token blocks")
    parser.add_argument("--data-plane", default="nginx", choices=["nginx", "python"])
    parser.add_argument("--router", default=str(Path(__file__).resolve().parent.parent / ".venv-router/bin/vllm-router"),
                        help="the vllm-router binary (pip install vllm-router); absent: not run")
    parser.add_argument("--traces", nargs="+", default=["shared", "unique"])
    args = parser.parse_args()
    traces = {"shared": Trace("shared", args.tenants, args.system_tokens, args.turns, True),
              "unique": Trace("unique", args.users, args.system_tokens, 1, False)}
    engine_args = (f"--ttft-ms 20 --tokens-per-second 50 --max-num-seqs 8 --enable-prefix-caching "
                   f"--num-gpu-blocks {args.num_gpu_blocks}")
    corral = Corral(args.data_plane)
    results: dict[tuple[str, str], list[tuple[float, float, float, float, int]]] = {}
    try:
        pool = corral.pool("m", args.replicas, engine_args)
        service = corral.api("POST", "/api/deploy-service", json={"serviceName": BUSINESS, "modelPool": pool,
                                                                  "businessTag": BUSINESS})["service"]["name"]
        corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {BUSINESS: args.replicas}})
        endpoints = [p["endpoint"] for p in corral.pods(pool)]
        corral_url = f"{corral.gateway}/s/{service}/v1/chat/completions"
        router = Path(args.router)
        with contextlib.ExitStack() as stack:
            peers = {"corral least-load": corral_url, "corral prefix-aware": corral_url}
            if router.exists():
                peers["vllm-router cache_aware"] = stack.enter_context(vllm_router(str(router), endpoints)) + "/v1/chat/completions"
            else:
                print(f"vllm-router not found at {router}: not run", file=sys.stderr)
            for trace_name in args.traces:
                trace = traces[trace_name]
                for seed in range(args.seeds):
                    for name, url in peers.items():
                        if name.startswith("corral"):
                            policy = name.removeprefix("corral ")
                            corral.api("PUT", f"/api/business-services/{service}/routing", json={"policy": policy})
                        hits, queries = cache_counters(endpoints)
                        ttfts, done, failed = asyncio.run(drive(url, trace, args.users, args.duration, args.warmup, seed,
                                                                f"{name}/{seed}", args.max_tokens))
                        elapsed = args.duration
                        hits_after, queries_after = cache_counters(endpoints)  # (the warm-up's included)
                        hit_rate = 100 * (hits_after - hits) / max(queries_after - queries, 1.0)
                        row = (percentile(ttfts, 0.5) * 1000, percentile(ttfts, 0.9) * 1000, done / elapsed, hit_rate, failed)
                        results.setdefault((trace_name, name), []).append(row)
                        print(f"{trace_name:7} seed {seed} {name:24} TTFT p50 {row[0]:7.1f} ms  p90 {row[1]:7.1f} ms  "
                              f"{row[2]:6.1f} req/s  cache hits {hit_rate:4.1f}% of prompt tokens  failed {failed}", flush=True)
    finally:
        corral.close()
    print(f"\nSIMULATED engines ({args.replicas} replicas, {args.users} users, {args.tenants} tenants x ~{args.system_tokens}-token "
          f"system prompts, {args.turns} turns, {args.duration:g} s x {args.seeds} seeds, {args.data_plane} plane): "
          "median [min-max] over seeds")
    print(f"{'trace':7} {'picking':24} {'TTFT p50 ms':>22} {'TTFT p90 ms':>22} {'req/s':>20} {'cache hit %':>18} failed")
    for (trace_name, name), rows in results.items():
        cells = []
        for i in range(4):
            values = [r[i] for r in rows]
            cells.append(f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]")
        print(f"{trace_name:7} {name:24} {cells[0]:>22} {cells[1]:>22} {cells[2]:>20} {cells[3]:>18} {sum(r[4] for r in rows)}")


if __name__ == "__main__":
    main()
