"""Added latency of the gateway over calling a replica directly, side by side with nginx and vllm-router.

    python bench/gateway_latency.py [--duration 5] [--concurrency 1 16 128]

One simulator replica (no time-to-first-token, one token) sits behind every proxy, so what is
measured is the cost of the hop itself. Non-streaming latency and throughput come from `wrk`
(C, so the load generator costs little); streaming time-to-first-byte from an aiohttp client.
Added latency = a proxy's percentile minus the direct percentile at the same concurrency, same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import Corral, nginx, vllm_router
from rich.console import Console
from rich.table import Table

CHAT_BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def wrk(url: str, concurrency: int, duration: float) -> dict[str, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(CHAT_BODY))}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    threads = min(concurrency, 2)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    script.unlink()

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50": ms("50%"), "p99": ms("99%"), "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "errors": int(errors.group(1)) if errors else 0}


async def ttfb(url: str, concurrency: int, requests: int) -> dict[str, float]:
    """Time to the first streamed byte, in ms."""
    import aiohttp

    body = {**CHAT_BODY, "max_tokens": 4, "stream": True}
    samples: list[float] = []
    queue = list(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker() -> None:
            while queue:
                queue.pop()
                started = time.perf_counter()
                async with session.post(url, json=body) as response:
                    await response.content.readany()
                    samples.append((time.perf_counter() - started) * 1000)
                    await response.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.sort()
    return {"p50": statistics.median(samples), "p99": samples[int(0.99 * (len(samples) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk load per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--stream-requests", type=int, default=600)
    parser.add_argument("--data-planes", nargs="+", default=["python", "nginx"], choices=["python", "nginx"])
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    console = Console(width=160)
    results: dict[str, dict[int, dict[str, float]]] = {}
    baseline: dict[str, str] = {}  # each proxy row → the direct row measured against the same replica

    def measure(name: str, base: str, direct: str) -> None:
        url = f"{base}/v1/chat/completions"
        wrk(url, 4, 1)  # warm-up: connections, caches
        results[name], baseline[name] = {}, direct
        for c in args.concurrency:
            console.print(f"[dim]{name}: {c} concurrent…[/dim]")
            cell = wrk(url, c, args.duration)
            stream = asyncio.run(ttfb(url, c, max(args.stream_requests, 4 * c)))
            results[name][c] = cell | {"ttfb_p50": stream["p50"], "ttfb_p99": stream["p99"]}

    for plane in args.data_planes:
        corral = Corral(data_plane=plane)
        try:
            pool = corral.pool("bench", 1, "--ttft-ms 0 --tokens-per-second 1000000 --max-tokens 1")
            corral.api("POST", "/api/deploy-service", json={"serviceName": "bench", "modelPool": pool, "businessTag": "bench"})
            corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "ratios": {"bench": 1}})
            endpoint = corral.pods(pool)[0]["endpoint"]
            direct = f"direct ({plane} run)"
            measure(direct, endpoint, direct)
            measure(f"corral {plane}", f"{corral.gateway}/s/bench-nlb", direct)
            if plane == args.data_planes[-1]:  # the peers, against the same replica
                with nginx([endpoint]) as nginx_url, vllm_router([endpoint]) as router_url:
                    measure("nginx", nginx_url, direct)
                    measure("vllm-router", router_url, direct)
        finally:
            corral.close()

    table = Table(title="Gateway added latency (ms) over direct, 1 simulator replica, same run")
    for column in ["target", "clients", "p50", "p99", "added p50", "added p99", "req/s", "non-2xx",
                   "stream TTFB p50", "TTFB p99", "added TTFB p50"]:
        table.add_column(column, justify="right")
    for name, cells in results.items():
        is_direct = baseline[name] == name
        for c, cell in cells.items():
            base = results[baseline[name]][c]
            table.add_row(name, str(c), f"{cell['p50']:.2f}", f"{cell['p99']:.2f}",
                          "—" if is_direct else f"{cell['p50'] - base['p50']:+.2f}",
                          "—" if is_direct else f"{cell['p99'] - base['p99']:+.2f}",
                          f"{cell['rps']:.0f}", str(int(cell["errors"])), f"{cell['ttfb_p50']:.2f}", f"{cell['ttfb_p99']:.2f}",
                          "—" if is_direct else f"{cell['ttfb_p50'] - base['ttfb_p50']:+.2f}")
    console.print(table)

    def added(name: str, c: int) -> float:
        return results[name][c]["p50"] - results[baseline[name]][c]["p50"]

    for c in args.concurrency:
        for plane in args.data_planes:
            nginx_added = added("nginx", c)
            ratio = added(f"corral {plane}", c) / nginx_added if nginx_added > 0 else float("inf")
            console.print(f"{c} clients: corral {plane} added p50 {added(f'corral {plane}', c):+.2f} ms "
                          f"({ratio:.1f}× nginx's {nginx_added:+.2f} ms)")


if __name__ == "__main__":
    main()
