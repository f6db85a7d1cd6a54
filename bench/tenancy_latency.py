"""What key checks and quotas add to the gateway's latency (issue 28), per data plane, at 1 and 16 clients.

    python bench/tenancy_latency.py [--duration 3] [--concurrency 1 16] [--rounds 2]

One `corral serve` per data plane with two identical pools of one simulator replica each (no time-to-first-token,
one token), so what is measured is the cost of the hop: `open-nlb` (auth none, no quota) and `keyed-nlb` (auth keys,
the service's requests/tokens per minute and tokens per day, a key with its own three limits: every check and every
count on, limits far too high to refuse). wrk sends the same request to both, the key in `Authorization: Bearer`, the
two services alternated `--rounds` times so that drift shows. Added cost = keyed p50 minus open p50, same run, same
plane; the spread between an open service's rounds is the noise to judge it by. On a shared machine latency is noisy:
the gateway's CPU time per request (from /proc: nginx's master and workers, or `corral serve`) is the steadier figure.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import gateway_latency
from harness import Corral, cpu_seconds
from rich.console import Console
from rich.table import Table

CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
ENGINE_ARGS = "--ttft-ms 0 --tokens-per-second 1000000 --max-tokens 1"
HIGH = 10**11  # a limit no bench reaches: every check runs, none refuses


def wrk(url: str, concurrency: int, duration: float, key: str | None, model: str) -> dict[str, float]:
    return gateway_latency.wrk(url, concurrency, duration, {**CHAT_BODY, "model": model},
                               {"Authorization": f"Bearer {key}"} if key else None)


def gateway_pids(corral: Corral, plane: str) -> list[int]:
    """The processes that run the data plane: nginx's master and workers, or `corral serve` (the Python gateway)."""
    if plane == "python":
        return [corral.process.pid]
    master = int((corral.dir / "gateway" / "nginx.pid").read_text())
    return [master, *(int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split())]


def setup(corral: Corral) -> str:
    """The two services; returns the key of `keyed-nlb`."""
    for name, auth in [("open", "none"), ("keyed", "keys")]:
        pool = corral.pool(name, 1, ENGINE_ARGS)
        corral.api("POST", "/api/deploy-service", json={"serviceName": name, "modelPool": pool, "businessTag": name,
                                                        "auth": auth})
        corral.api("POST", "/api/distribute-pods", json={"deploymentName": pool, "ratios": {name: 1}})
    limits = {"requestsPerMinute": HIGH, "tokensPerMinute": HIGH, "tokensPerDay": HIGH}
    corral.api("PUT", "/api/business-services/keyed-nlb/access", json={"limits": limits})
    return corral.api("POST", "/api/business-services/keyed-nlb/keys", json={"name": "bench", "limits": limits})["key"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of wrk load per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2, help="open/keyed alternations per concurrency")
    parser.add_argument("--data-planes", nargs="+", default=["python", "nginx"], choices=["python", "nginx"])
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    console = Console(width=160)
    table = Table(title="Key check + quotas: gateway latency (ms), 1 simulator replica per service")
    for column in ["plane", "clients", "service", "p50 (rounds)", "p99 (median)", "req/s (median)", "CPU µs/request"]:
        table.add_column(column, justify="right")
    verdicts = []
    for plane in args.data_planes:
        corral = Corral(data_plane=plane)
        try:
            key = setup(corral)
            urls = {"open": (f"{corral.gateway}/s/open-nlb/v1/chat/completions", None),
                    "keyed": (f"{corral.gateway}/s/keyed-nlb/v1/chat/completions", key)}
            for name, (url, k) in urls.items():
                wrk(url, 4, 1, k, name)  # warm-up
            for c in args.concurrency:
                console.print(f"[dim]{plane}: {c} concurrent…[/dim]")
                runs: dict[str, list[dict[str, float]]] = {"open": [], "keyed": []}
                for _ in range(args.rounds):
                    for name, (url, k) in urls.items():
                        pids = gateway_pids(corral, plane)
                        before = cpu_seconds(pids)
                        cell = wrk(url, c, args.duration, k, name)
                        cell["cpu_us"] = (cpu_seconds(pids) - before) / max(1, cell["requests"]) * 1e6
                        if cell["errors"]:  # a refused or failed request measures something else
                            raise SystemExit(f"{plane} {name}: {int(cell['errors'])} non-2xx answers; see {corral.dir}")
                        runs[name].append(cell)
                for name, cells in runs.items():
                    table.add_row(plane, str(c), name, " / ".join(f"{x['p50']:.3f}" for x in cells),
                                  f"{statistics.median(x['p99'] for x in cells):.3f}",
                                  f"{statistics.median(x['rps'] for x in cells):.0f}",
                                  " / ".join(f"{x['cpu_us']:.0f}" for x in cells))
                open_p50 = statistics.median(x["p50"] for x in runs["open"])
                keyed_p50 = statistics.median(x["p50"] for x in runs["keyed"])
                spread = max(x["p50"] for x in runs["open"]) - min(x["p50"] for x in runs["open"])
                cpu = statistics.median(x["cpu_us"] for x in runs["keyed"]) - statistics.median(x["cpu_us"] for x in runs["open"])
                verdicts.append(f"{plane}, {c} clients: keys + quotas {keyed_p50 - open_p50:+.3f} ms p50 "
                                f"(open rounds spread {spread:.3f} ms), {cpu:+.0f} µs of gateway CPU per request")
        finally:
            corral.close()
    console.print(table)
    for line in verdicts:
        console.print(line)


if __name__ == "__main__":
    main()
