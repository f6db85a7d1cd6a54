"""Reassignment under load: how fast traffic follows an assignment, and how many requests fail.

    python bench/reassignment.py [--data-planes python nginx] [--seconds 20] [--clients 64]

1. Cut-over: business B has no replica; a replica of A is assigned to B. Measured: the assign API
   round trip, and the time from its return until a request to B is answered by that replica
   (the first request after the return is sent at once; any 503 before would count as a miss).
2. Load run: `--clients` streaming clients on A and B for `--seconds`, while one replica moves
   between A and B every 200 ms and the pool is scaled up by one and back down (removing only
   unassigned replicas) in a loop. Counted: requests, failures (non-200 or a stream without [DONE]).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import threading
import time

import httpx
from harness import Corral, wait_until
from rich.console import Console
from rich.table import Table

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def cutover(corral: Corral, pool: str, rounds: int) -> dict[str, float]:
    api_ms, follow_ms, misses = [], [], 0
    gateway = httpx.Client(base_url=f"{corral.gateway}/s/b-nlb/v1", timeout=10)
    for _ in range(rounds):
        replica = random.choice([p["name"] for p in corral.pods(pool) if p["business"] == "a"])
        started = time.perf_counter()
        corral.api("POST", "/api/assign-pod", json={"podName": replica, "businessTag": "b"})
        returned = time.perf_counter()
        while True:
            response = gateway.post("/chat/completions", json={**CHAT, "max_tokens": 1})
            if response.status_code == 200 and response.headers["x-corral-replica"] == replica:
                break
            misses += 1
        follow_ms.append((time.perf_counter() - returned) * 1000)
        api_ms.append((returned - started) * 1000)
        corral.api("POST", "/api/assign-pod", json={"podName": replica, "businessTag": "a"})
    return {"api_p50": statistics.median(api_ms), "api_p99": percentile(api_ms, 0.99),
            "follow_p50": statistics.median(follow_ms), "follow_p99": percentile(follow_ms, 0.99), "misses": misses}


async def clients(corral: Corral, n: int, seconds: float) -> dict[str, int]:
    import aiohttp

    counts = {"requests": 0, "failed": 0}
    failures: list[str] = []
    deadline = time.monotonic() + seconds

    async def client(service: str, session: aiohttp.ClientSession) -> None:
        url = f"{corral.gateway}/s/{service}/v1/chat/completions"
        while time.monotonic() < deadline:
            counts["requests"] += 1
            try:
                async with session.post(url, json={**CHAT, "max_tokens": 20, "stream": True}) as response:
                    body = await response.read()
                    if response.status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
                        counts["failed"] += 1
                        failures.append(f"{response.status} {body[-120:]!r}")
            except aiohttp.ClientError as exc:
                counts["failed"] += 1
                failures.append(repr(exc))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client("a-nlb" if i % 2 else "b-nlb", session) for i in range(n)))
    for failure in failures[:5]:
        print("  failure:", failure)
    return counts


def churn(corral: Corral, pool: str, stop: threading.Event, actions: dict[str, int]) -> None:
    """Move a replica every 200 ms (each business keeps ≥ 1); scale up by one and back down, repeatedly."""
    next_scale = time.monotonic() + 1.0
    scaled_up = False
    while not stop.is_set():
        pods = corral.pods(pool)
        a = [p["name"] for p in pods if p["business"] == "a"]
        b = [p["name"] for p in pods if p["business"] == "b"]
        source, target = (a, "b") if len(a) > len(b) or (len(a) == len(b) and random.random() < 0.5) else (b, "a")
        if len(source) > 1:
            corral.api("POST", "/api/assign-pod", json={"podName": random.choice(source), "businessTag": target})
            actions["reassignments"] += 1
        if time.monotonic() >= next_scale:
            total = len(pods)
            corral.api("POST", "/api/scale-pool-deployment",
                       json={"deploymentName": pool, "targetReplicas": total - 1 if scaled_up else total + 1})
            actions["scale-downs" if scaled_up else "scale-ups"] += 1
            scaled_up = not scaled_up
            next_scale = time.monotonic() + 1.5
        stop.wait(0.2)


def run(plane: str, seconds: float, n_clients: int, rounds: int) -> dict[str, float]:
    corral = Corral(data_plane=plane)
    try:
        pool = corral.pool("m", 6, "--ttft-ms 20 --tokens-per-second 400")
        for business in ("a", "b"):
            corral.api("POST", "/api/deploy-service", json={"serviceName": business, "modelPool": pool, "businessTag": business})
        corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"a": 5}})
        result = cutover(corral, pool, rounds)
        corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"a": 3, "b": 3}})
        actions = {"reassignments": 0, "scale-ups": 0, "scale-downs": 0}
        stop = threading.Event()
        mover = threading.Thread(target=churn, args=(corral, pool, stop, actions))
        mover.start()
        try:
            counts = asyncio.run(clients(corral, n_clients, seconds))
        finally:
            stop.set()
            mover.join()
        wait_until(lambda: all(p["ready"] for p in corral.pods(pool)), 30, "the pool to settle")
        return result | counts | actions
    finally:
        corral.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-planes", nargs="+", default=["python", "nginx"], choices=["python", "nginx"])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=50, help="cut-over measurements")
    args = parser.parse_args()
    console = Console(width=160)
    rows = {plane: run(plane, args.seconds, args.clients, args.rounds) for plane in args.data_planes}
    table = Table(title=f"Reassignment: cut-over ({args.rounds} rounds) and a {args.seconds:.0f} s load run, "
                        f"{args.clients} streaming clients")
    for column in ["data plane", "assign API p50 ms", "p99", "return → served by new replica p50 ms", "p99", "misses",
                   "requests", "failed", "reassignments", "scale-ups", "scale-downs"]:
        table.add_column(column, justify="right")
    for plane, r in rows.items():
        table.add_row(plane, f"{r['api_p50']:.1f}", f"{r['api_p99']:.1f}", f"{r['follow_p50']:.2f}", f"{r['follow_p99']:.2f}",
                      str(r["misses"]), str(r["requests"]), str(r["failed"]), str(r["reassignments"]),
                      str(r["scale-ups"]), str(r["scale-downs"]))
    console.print(table)


if __name__ == "__main__":
    main()
