"""Added latency of the gateway over calling a replica directly, side by side with nginx and vllm-router.

    python bench/gateway_latency.py [--duration 5] [--concurrency 1 16 128]
    python bench/gateway_latency.py --monitoring [--baseline-ref cac8641]     # the cost of load monitoring, ~2 min

One simulator replica (no time-to-first-token, one token) sits behind every proxy, so what is
measured is the cost of the hop itself. Non-streaming latency and throughput come from `wrk`
(C, so the load generator costs little); streaming time-to-first-byte from an aiohttp client.
Added latency = a proxy's percentile minus the direct percentile at the same concurrency, same run.

`--monitoring` measures what live load monitoring costs the gateway, per data plane, in one run:
`baseline` is Corral at `--baseline-ref` (the last commit before monitoring: no histograms, no
first-byte or usage counting, no sampler), exported with `git archive` and run from there with
today's simulator copied in (so that only the gateway differs); `off` is this tree with
`CORRAL_LOAD_SAMPLING=false` (the per-request counting still on, no sampler); `on` is this tree as
shipped, with a `/ws` client listening (the sampler plus a `load` event every second). `baseline`
is measured first and again last: the difference between its two runs is the noise to judge by.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from harness import Corral, cpu_seconds, nginx, nginx_family, vllm_router
from rich.console import Console
from rich.table import Table

CHAT_BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def wrk(url: str, concurrency: int, duration: float, body: dict | None = None,
        headers: dict[str, str] | None = None) -> dict[str, float]:
    """`wrk` POSTing `body` (the chat request by default) with `headers`: p50, p99 (ms), req/s, errors, requests."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    extra = "".join(f'wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n' for k, v in (headers or {}).items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body or CHAT_BODY))}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n{extra}')
    threads = min(concurrency, 2)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    script.unlink()

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50": ms("50%"), "p99": ms("99%"), "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "errors": int(errors.group(1)) if errors else 0,
            "requests": int(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]


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


def baseline_tree(ref: str) -> Path:
    """`src/` of `ref` in a temporary directory (read from git, the checkout untouched), with this tree's
    simulator: replicas then behave the same behind both, and only the control plane and gateway differ."""
    repo = Path(__file__).resolve().parents[1]
    root = Path(tempfile.mkdtemp(prefix="corral-baseline-"))
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    for name in ("simulator.py", "sim_model.py"):
        if (repo / "src/corral/engines" / name).exists():
            shutil.copy(repo / "src/corral/engines" / name, root / "src/corral/engines" / name)
    return root / "src"


@contextlib.contextmanager
def ws_listener(url: str) -> Iterator[list[int]]:
    """A `/ws` client reading every message in a thread (the monitor then publishes `load` each second)."""
    from websockets.sync.client import connect

    seen = [0]
    stop = threading.Event()
    with connect(url.replace("http://", "ws://") + "/ws", open_timeout=10) as connection:
        def read() -> None:
            while not stop.is_set():
                try:
                    if json.loads(connection.recv(timeout=0.5))["type"] == "load":
                        seen[0] += 1
                except TimeoutError:
                    continue
                except Exception:  # noqa: BLE001 (closed)
                    return

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            stop.set()
            thread.join(5)


def monitoring_cost(args: argparse.Namespace) -> None:
    console = Console(width=160)
    source = baseline_tree(args.baseline_ref)
    variants = {"baseline": {"PYTHONPATH": str(source)}, "off": {"CORRAL_LOAD_SAMPLING": "false"}, "on": {}}
    duration = args.duration or 2.0
    stream_requests = args.stream_requests or 200
    concurrency = args.concurrency or [1, 16]
    table = Table(title=f"Load monitoring cost: gateway latency (ms), baseline = {args.baseline_ref}, 1 simulator replica")
    for column in ["plane", "clients", "target", "p50", "p99", "added p50", "req/s", "non-2xx", "TTFB p50", "TTFB p99"]:
        table.add_column(column, justify="right")
    verdicts = []
    for plane in args.data_planes:
        servers: dict[str, Corral] = {}
        try:
            for name, env in variants.items():
                servers[name] = corral = Corral(data_plane=plane, env=env)
                pool = corral.pool("bench", 1, "--ttft-ms 0 --tokens-per-second 1000000 --max-tokens 1")
                corral.api("POST", "/api/deploy-service", json={"serviceName": "bench", "modelPool": pool, "businessTag": "bench"})
                corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "ratios": {"bench": 1}})
            direct = servers["on"].pods(pool)[0]["endpoint"]
            targets = [("direct", direct), ("baseline", servers["baseline"].gateway + "/s/bench-nlb"),
                       ("off", servers["off"].gateway + "/s/bench-nlb"), ("on", servers["on"].gateway + "/s/bench-nlb"),
                       ("baseline again", servers["baseline"].gateway + "/s/bench-nlb")]
            for _, base in targets[:4]:
                wrk(f"{base}/v1/chat/completions", 4, 1)  # warm-up: connections, caches
            with ws_listener(servers["on"].url) as loads:
                for c in concurrency:
                    console.print(f"[dim]{plane}: {c} concurrent…[/dim]")
                    cells = {}
                    for name, base in targets:
                        url = f"{base}/v1/chat/completions"
                        cells[name] = wrk(url, c, duration) | {f"ttfb_{k}": v for k, v in
                                                               asyncio.run(ttfb(url, c, max(stream_requests, 4 * c))).items()}
                    for name, cell in cells.items():
                        table.add_row(plane, str(c), name, f"{cell['p50']:.2f}", f"{cell['p99']:.2f}",
                                      "—" if name == "direct" else f"{cell['p50'] - cells['direct']['p50']:+.2f}",
                                      f"{cell['rps']:.0f}", str(int(cell["errors"])), f"{cell['ttfb_p50']:.2f}",
                                      f"{cell['ttfb_p99']:.2f}")
                    noise = abs(cells["baseline again"]["p50"] - cells["baseline"]["p50"])
                    base_p50 = (cells["baseline"]["p50"] + cells["baseline again"]["p50"]) / 2
                    verdicts.append(f"{plane}, {c} clients: on {cells['on']['p50'] - base_p50:+.2f} ms p50, off "
                                    f"{cells['off']['p50'] - base_p50:+.2f} ms vs the baseline's mean; the baseline's two "
                                    f"runs differ by {noise:.2f} ms")
            assert loads[0] > 0, "the /ws listener received no load event"
        finally:
            for corral in servers.values():
                corral.close()
    shutil.rmtree(source.parent, ignore_errors=True)
    console.print(table)
    for line in verdicts:
        console.print(line)


async def stream_tokens(url: str, clients: int, requests: int, max_tokens: int) -> int:
    """Streamed requests of `max_tokens` tokens from `clients` at once; the server-sent events received."""
    import aiohttp

    body = {**CHAT_BODY, "max_tokens": max_tokens, "stream": True}
    events = [0]
    queue = list(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker() -> None:
            while queue:
                queue.pop()
                async with session.post(url, json=body) as response:
                    events[0] += (await response.read()).count(b"data: ")

        await asyncio.gather(*(worker() for _ in range(clients)))
    return events[0]


def token_cost(args: argparse.Namespace) -> None:
    """The gateway's CPU per streamed token event: each proxy's processes' CPU time (/proc) over a streaming run,
    divided by the events the clients received. Corral's two planes (load monitoring on, as shipped) and plain
    nginx, in front of the same simulator replica."""
    console = Console(width=160)
    rows = []
    tokens, requests = 200, 400

    def run(name: str, url: str, pids: Callable[[], list[int]]) -> None:
        asyncio.run(stream_tokens(url, 4, 20, tokens))  # warm-up
        for clients in args.concurrency:
            before = cpu_seconds(pids())
            events = asyncio.run(stream_tokens(url, clients, requests, tokens))
            used = cpu_seconds(pids()) - before
            rows.append((name, clients, events, used, used / events * 1e6))

    for plane in args.data_planes:
        corral = Corral(data_plane=plane)
        try:
            pool = corral.pool("bench", 1, f"--ttft-ms 0 --tokens-per-second 1000000 --max-tokens {tokens}")
            corral.api("POST", "/api/deploy-service", json={"serviceName": "bench", "modelPool": pool, "businessTag": "bench"})
            corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "ratios": {"bench": 1}})
            gateway = corral.dir / "gateway"

            def pids(plane: str = plane, corral: Corral = corral, gateway: Path = gateway) -> list[int]:
                return [corral.process.pid] if plane == "python" else nginx_family(str(gateway))

            run(f"corral {plane}", f"{corral.gateway}/s/bench-nlb/v1/chat/completions", pids)
            if plane == args.data_planes[-1]:
                endpoint = corral.pods(pool)[0]["endpoint"]
                with nginx([endpoint]) as nginx_url:
                    run("nginx", f"{nginx_url}/v1/chat/completions", lambda: nginx_family("corral-nginx-"))
        finally:
            corral.close()
    table = Table(title=f"Gateway CPU per streamed token event ({tokens} tokens a request, {requests} requests a cell)")
    for column in ["proxy", "clients", "events", "CPU s", "CPU µs / event"]:
        table.add_column(column, justify="right")
    for name, clients, events, used, per in rows:
        table.add_row(name, str(clients), str(events), f"{used:.2f}", f"{per:.1f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, help="seconds of wrk load per cell (5; --monitoring 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="clients (1 16 128; --monitoring 1 16)")
    parser.add_argument("--stream-requests", type=int, default=None, help="streamed requests per cell (600; --monitoring 200)")
    parser.add_argument("--data-planes", nargs="+", default=["python", "nginx"], choices=["python", "nginx"])
    parser.add_argument("--monitoring", action="store_true", help="measure the cost of load monitoring instead")
    parser.add_argument("--token-cost", action="store_true", help="measure the CPU per streamed token event instead")
    parser.add_argument("--baseline-ref", default="cac8641", help="--monitoring: the commit to compare with (default: "
                                                                  "the last one before load monitoring)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    if args.monitoring:
        monitoring_cost(args)
        return
    if args.token_cost:
        args.concurrency = args.concurrency or [1, 16, 128]
        token_cost(args)
        return
    args.duration = args.duration or 5.0
    args.concurrency = args.concurrency or [1, 16, 128]
    args.stream_requests = args.stream_requests or 600

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
