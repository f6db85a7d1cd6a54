"""Faults under load, on both data planes: replicas SIGKILLed, SIGSTOPped, and one that reads every request and drops
the connection. How many requests ran twice (counted at the replicas), how many failed, and how long until the
faulty replica left rotation (ejection) and came back (readmission).

    python bench/gateway_faults.py [--clients 16] [--planes python nginx]   # ~2 min

Each data plane is Corral's own (`proxy.Gateway` served by uvicorn; `NginxGateway`: nginx + the Lua module), with
the product's default outlier settings (`GatewayLimits()`), routing one service to four **recording replicas**:
small OpenAI-compatible servers (this file, `replica` mode), each its own process, that stream 20 tokens 5 ms apart
and append the id of every request they start to a log, so a request run twice is seen where it ran. The clients
send streamed chat requests, each with a unique id, back to back, and count every answer that is not a whole
stream (a status other than 200, or a cut stream). The faults, one after another, each on a different replica:

1. **SIGKILL** (connections refused from then on); restarted 10 s later on the same port.
2. **SIGSTOP** for 10 s, then SIGCONT (a hung server: connections accepted, nothing answered).
3. **drop**: for 10 s the replica reads each request whole and closes the connection without answering (the
   case where a replay would run the request twice).

Eject: from the fault to the plane's ejection of the replica. Readmit: from the end of the fault (restart, SIGCONT,
drop off) to its readmission.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import uvicorn
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "bench-nlb"
TOKENS, TOKEN_GAP_S = 20, 0.005
FAULT_S = 10.0


# the recording replica -------------------------------------------------------------------------------------------
def replica_main(port: int, log: Path) -> None:
    mode = {"drop": False}
    out = log.open("a", buffering=1)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def fault(request: web.Request) -> web.Response:
        mode["drop"] = request.query.get("mode") == "drop"
        return web.json_response(mode)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        out.write(body["messages"][0]["content"] + "\n")  # started: counted here, whatever happens next
        if mode["drop"]:
            assert request.transport is not None
            request.transport.abort()  # read whole, no answer
            raise ConnectionResetError
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(TOKENS):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(TOKEN_GAP_S)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/_fault", fault)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replicas:
    def __init__(self, count: int, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = [free_port() for _ in range(count)]
        self.names = [f"replica-{i}" for i in range(count)]
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        port = self.ports[self.names.index(name)]
        self.processes[name] = subprocess.Popen(
            [sys.executable, __file__, "replica", "--port", str(port), "--log", str(self.workdir / f"{name}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self, name: str) -> None:
        url = f"http://127.0.0.1:{self.ports[self.names.index(name)]}/health"
        async with aiohttp.ClientSession() as client:
            for _ in range(500):
                with contextlib.suppress(aiohttp.ClientError):
                    async with client.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.02)
        raise RuntimeError(f"{name} did not start")

    async def fault(self, name: str, mode: str) -> None:
        url = f"http://127.0.0.1:{self.ports[self.names.index(name)]}/_fault?mode={mode}"
        async with aiohttp.ClientSession() as client, client.post(url) as response:
            response.raise_for_status()

    def executions(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for name in self.names:
            path = self.workdir / f"{name}.log"
            if path.exists():
                counts.update(line for line in path.read_text().splitlines() if line)
        return counts

    def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait()


# the planes ------------------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201
        yield


@contextlib.asynccontextmanager
async def plane(kind: str, workdir: Path) -> AsyncIterator[tuple[str, object]]:
    from corral.gateway.nginx_plane import NginxGateway
    from corral.gateway.policies import LeastOutstanding
    from corral.gateway.proxy import Gateway, GatewayLimits
    from corral.server import deadline_protocol

    port, limits = free_port(), GatewayLimits()
    if kind == "nginx":
        nginx = NginxGateway(workdir / "nginx", "127.0.0.1", port, connect_timeout_s=2, read_timeout_s=30,
                             drain_timeout_s=1, limits=limits)
        nginx.start()
        try:
            yield f"http://127.0.0.1:{port}", nginx
        finally:
            await nginx.close()
        return
    gateway = Gateway(LeastOutstanding(), connect_timeout_s=2, read_timeout_s=30, health_path=lambda _: "/health",
                      limits=limits)
    gateway.start()
    server = _Server(uvicorn.Config(gateway, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                    lifespan="off", http=deadline_protocol(limits)))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", gateway
    finally:
        server.should_exit = True
        await task
        await gateway.close()


async def ejected(kind: str, gateway: object) -> set[str]:
    if kind == "nginx":
        await gateway.refresh_stats(1.0)  # type: ignore[attr-defined]
        return set(gateway.traffic_now().ejected)  # type: ignore[attr-defined]
    return set(gateway.ejected)  # type: ignore[attr-defined]


# the run ---------------------------------------------------------------------------------------------------------
async def run_plane(kind: str, clients: int) -> dict[str, object]:
    from corral.gateway.routing import Route, Target

    workdir = Path(tempfile.mkdtemp(prefix=f"corral-faults-{kind}-"))
    replicas = Replicas(4, workdir)
    for name in replicas.names:
        replicas.start(name)
    for name in replicas.names:
        await replicas.ready(name)
    results: dict[str, object] = {"plane": kind}
    failures: list[tuple[float, str]] = []
    sent = [0]
    stop = asyncio.Event()
    try:
        async with plane(kind, workdir) as (url, gateway):
            targets = tuple(Target(n, f"http://127.0.0.1:{p}") for n, p in zip(replicas.names, replicas.ports, strict=True))
            await gateway.push({SERVICE: Route(SERVICE, "bench", "bench", None, targets)}, 1)  # type: ignore[attr-defined]

            async def client() -> None:
                timeout = aiohttp.ClientTimeout(total=60)
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    while not stop.is_set():
                        rid = uuid.uuid4().hex
                        body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": rid}]}
                        sent[0] += 1
                        try:
                            async with session.post(f"{url}/s/{SERVICE}/v1/chat/completions", json=body) as response:
                                text = (await response.read()).decode(errors="replace")
                                if response.status != 200 or "[DONE]" not in text:
                                    failures.append((time.monotonic(), f"{response.status}"))
                        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                            failures.append((time.monotonic(), type(exc).__name__))

            async def until_ejection(name: str, present: bool, since: float, limit: float = 60.0) -> float | None:
                while time.monotonic() - since < limit:
                    if (name in await ejected(kind, gateway)) == present:
                        return time.monotonic() - since
                    await asyncio.sleep(0.05)
                return None

            load = [asyncio.create_task(client()) for _ in range(clients)]
            await asyncio.sleep(3.0)  # warm: not a synchronisation, the load's lead-in

            async def fault(label: str, name: str, begin, end) -> None:  # noqa: ANN001
                before = len(failures)
                started = time.monotonic()
                await begin()
                eject = await until_ejection(name, True, started, FAULT_S)
                await asyncio.sleep(max(0.0, FAULT_S - (time.monotonic() - started)))
                ended = time.monotonic()
                await end()
                readmit = await until_ejection(name, False, ended)
                results[label] = {"failed": len(failures) - before, "eject_s": eject, "readmit_s": readmit}

            r0, r1, r2 = replicas.names[:3]

            async def kill() -> None:
                replicas.processes[r0].kill()

            async def restart() -> None:
                replicas.processes[r0].wait()
                replicas.start(r0)

            async def sigstop() -> None:
                os.kill(replicas.processes[r1].pid, signal.SIGSTOP)

            async def sigcont() -> None:
                os.kill(replicas.processes[r1].pid, signal.SIGCONT)

            await fault("SIGKILL", r0, kill, restart)
            await fault("SIGSTOP", r1, sigstop, sigcont)
            await fault("drop", r2, lambda: replicas.fault(r2, "drop"), lambda: replicas.fault(r2, "normal"))
            stop.set()
            await asyncio.gather(*load)
    finally:
        replicas.stop()
    executions = replicas.executions()
    results["sent"] = sent[0]
    results["failed"] = len(failures)
    results["ran_twice"] = sum(1 for count in executions.values() if count > 1)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "replica":
        parser = argparse.ArgumentParser()
        parser.add_argument("mode")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--log", type=Path, required=True)
        args = parser.parse_args()
        replica_main(args.port, args.log)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--planes", nargs="+", default=["python", "nginx"])
    args = parser.parse_args()
    print(f"{args.clients} streaming clients; 4 recording replicas; faults of {FAULT_S:.0f} s; default outlier settings")
    print("| plane | fault | failed requests | eject (s) | readmit (s) |")
    print("|---|---|---|---|---|")
    totals = []
    for kind in args.planes:
        result = asyncio.run(run_plane(kind, args.clients))
        for label in ("SIGKILL", "SIGSTOP", "drop"):
            row = result[label]
            assert isinstance(row, dict)

            def s(value: float | None) -> str:
                return "not within the bound" if value is None else f"{value:.2f}"

            print(f"| {kind} | {label} | {row['failed']} | {s(row['eject_s'])} | {s(row['readmit_s'])} |")
        totals.append(f"{kind}: {result['sent']} requests, {result['failed']} failed, {result['ran_twice']} ran twice")
    print("\n" + "; ".join(totals))


if __name__ == "__main__":
    main()
