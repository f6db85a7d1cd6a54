"""The gateway's data plane is reconciled: versioned routing tables, acknowledged by nginx over a private
unix socket; a hung nginx makes a change answer 503 in bounded time but never stalls the API, and the
reconciler applies the latest table once nginx is back (unit tests: tests/unit/test_routing_sync.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web

from corral.gateway.nginx_plane import (
    CONTROL_BODY_BUFFER,
    CONTROL_SECRET_ENV,
    CONTROL_SECRET_HEADER,
    NginxGateway,
    control_secret,
    missing_parts,
    table_payload,
)
from corral.gateway.routing import Route, RoutingTable, Target
from corral.gateway.sync import DataPlaneLagging, RoutingSync
from tests.conftest import wait_for, wait_for_async
from tests.integration.conftest import CorralServer, deploy_sim_pool, free_port, running_corral

needs_nginx = pytest.mark.skipif(bool(missing_parts()), reason="nginx data plane needs " + ", ".join(missing_parts()))
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def nginx_pids(master: int) -> list[int]:
    workers = [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    return [master, *workers]


@contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """nginx hung: every process of it stopped (SIGSTOP), continued on the way out whatever happens."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """A replica stand-in: answers every request with 200."""
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[NginxGateway]:
    if missing := missing_parts():
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    plane = NginxGateway(tmp_path / "gateway", "127.0.0.1", free_port(), connect_timeout_s=2, read_timeout_s=10,
                         drain_timeout_s=1, control_timeout_s=2)
    plane.start()
    yield plane
    await plane.close()


def big_table(endpoint: str, services: int = 500, per_service: int = 2, offset: int = 0) -> RoutingTable:
    return {
        f"service-{i}-nlb": Route(f"service-{i}-nlb", "qwen-06b", f"business-{i}", None,
                                  tuple(Target(f"simulator-qwen-06b-pool-{i}-{j + offset}", endpoint) for j in range(per_service)))
        for i in range(services)
    }


async def routed_to(plane: NginxGateway, service: str) -> str:
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{plane.port}/s/{service}/v1/models") as response:
        assert response.status == 200, await response.text()
        return response.headers["x-corral-replica"]


async def test_a_table_of_500_services_and_1000_targets_applies_on_nginx(nginx: NginxGateway, upstream: str) -> None:
    table = big_table(upstream)
    assert sum(len(r.targets) for r in table.values()) == 1000
    # Larger than the control server's body buffer: nginx spools it to a file, which the Lua code reads.
    assert len(table_payload(table)) > int(CONTROL_BODY_BUFFER.removesuffix("k")) * 1024
    sync = RoutingSync(lambda: table, nginx)
    try:
        assert await sync.sync() == 1
        assert await nginx.served_version() == 1
        assert await routed_to(nginx, "service-499-nlb") in {"simulator-qwen-06b-pool-499-0", "simulator-qwen-06b-pool-499-1"}
        table = big_table(upstream, offset=2)  # every target changes: the next version replaces the whole table
        sync.mark_dirty()
        assert await sync.sync() == 2
        assert await routed_to(nginx, "service-499-nlb") in {"simulator-qwen-06b-pool-499-2", "simulator-qwen-06b-pool-499-3"}
        assert sync.status() == {"desiredVersion": 2, "appliedVersion": 2, "lastError": None, "pushes": 2,
                                 "faults": 0, "lastFault": None}
    finally:
        await sync.close()


async def test_the_control_socket_is_private(nginx: NginxGateway) -> None:
    socket_path = nginx.control_socket
    assert socket_path.parent == (nginx.workdir / "control").resolve()
    info = os.stat(socket_path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
    conf = (nginx.workdir / "nginx.conf").read_text()
    assert f"listen unix:{socket_path};" in conf
    assert conf.count("listen ") == 2  # the gateway port and the socket: no control port on loopback


async def test_nginx_refuses_a_stale_version(nginx: NginxGateway, upstream: str) -> None:
    assert await nginx.push(big_table(upstream, services=3), 5) == 5
    assert await nginx.push(big_table(upstream, services=3, offset=9), 4) == 5  # e.g. a push queued while nginx was stopped
    assert await routed_to(nginx, "service-2-nlb") in {"simulator-qwen-06b-pool-2-0", "simulator-qwen-06b-pool-2-1"}


async def test_a_hung_nginx_raises_lagging_in_time_and_gets_the_latest_table_once_resumed(nginx: NginxGateway,
                                                                                          upstream: str) -> None:
    tables = [big_table(upstream, services=3)]
    sync = RoutingSync(lambda: tables[-1], nginx, timeout_s=1.0, verify_interval_s=0.2, push_timeout_s=2.0,
                       backoff_max_s=0.5)
    sync.start()
    try:
        assert await sync.sync() == 1
        await nginx.read_stats()  # counters exist to snapshot
        with stopped(nginx_pids(nginx._process.pid)):  # type: ignore[union-attr]
            for offset in (2, 4):  # two changes while hung: the latest one wins
                tables.append(big_table(upstream, services=3, offset=offset))
                sync.mark_dirty()
            started = time.monotonic()
            with pytest.raises(DataPlaneLagging):
                await sync.sync()
            assert time.monotonic() - started < 1.5
            started = time.monotonic()
            nginx.stats.prometheus()  # /api/metrics' source answers from the snapshot
            nginx.stats.replica_summary({"x"})
            assert time.monotonic() - started < 0.6
            await wait_for_async(lambda: sync.status()["lastError"], timeout=10, what="the failure to be reported")
        # Resumed: no further call; the reconciler applies the latest version by itself.
        await wait_for_async(lambda: sync.status()["appliedVersion"] == sync.status()["desiredVersion"], timeout=15,
                             what="the latest version applied")
        assert await nginx.served_version() == sync.status()["desiredVersion"]
        assert await routed_to(nginx, "service-2-nlb") in {"simulator-qwen-06b-pool-2-4", "simulator-qwen-06b-pool-2-5"}
    finally:
        await sync.close()


@needs_nginx
def test_a_hung_nginx_never_stalls_the_api_and_catches_up_without_another_call(tmp_path: Path) -> None:
    with running_corral(tmp_path / "data", {"CORRAL_GATEWAY_DATA_PLANE": "nginx"}) as corral:
        pool = deploy_sim_pool(corral, tag="m", replicas=2)
        corral.ok("POST", "/api/deploy-service", json={"serviceName": "a", "modelPool": pool, "businessTag": "a"})
        wait_for(lambda: (s := corral.ok("GET", "/api/system/data-plane"))["appliedVersion"] == s["desiredVersion"],
                 what="the gateway to serve the latest table")
        pod = corral.pods(pool)[0]["name"]
        master = int((corral.data_dir / "gateway" / "nginx.pid").read_text())
        with stopped(nginx_pids(master)):
            for path in ("/api/pods", "/api/metrics", f"/api/pool-status/{pool}", "/api/deployments",
                         "/api/system/data-plane", "/api/health"):
                started = time.monotonic()
                response = corral.http.get(path)
                assert response.status_code == 200, response.text
                assert time.monotonic() - started < 1.0, path
            started = time.monotonic()
            response = corral.http.post("/api/assign-pod", json={"podName": pod, "businessTag": "a"})
            assert time.monotonic() - started < 6
            assert response.status_code == 503, response.text
            assert "has not applied it yet" in response.json()["error"]
            assert {p["name"]: p["business"] for p in corral.pods(pool)}[pod] == "a"  # the change is recorded
            started = time.monotonic()
            assert corral.http.get("/api/pods").status_code == 200
            assert time.monotonic() - started < 1.0
        wait_for(lambda: (s := corral.ok("GET", "/api/system/data-plane"))["appliedVersion"] == s["desiredVersion"]
                 and s["lastError"] is None, timeout=20, what="the reconciler to apply the latest table")
        with httpx.Client(base_url=f"{corral.gateway_url}/s/a-nlb/v1", timeout=30) as client:
            for _ in range(5):
                response = client.post("/chat/completions", json=CHAT)
                assert response.status_code == 200 and response.headers["x-corral-replica"] == pod


@pytest.mark.parametrize("data_plane", ["python", "nginx"])
def test_a_distribution_is_one_push(tmp_path: Path, data_plane: str) -> None:
    if data_plane == "nginx" and (missing := missing_parts()):
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    with running_corral(tmp_path / "data", {"CORRAL_GATEWAY_DATA_PLANE": data_plane}) as corral:
        pool = deploy_sim_pool(corral, tag="m", replicas=6)
        for name in ("a", "b"):
            corral.ok("POST", "/api/deploy-service", json={"serviceName": name, "modelPool": pool, "businessTag": name})
        before = wait_for(lambda: (s := corral.ok("GET", "/api/system/data-plane"))["appliedVersion"] == s["desiredVersion"]
                          and s, what="the gateway to serve the latest table")
        assert before["dataPlane"] == data_plane
        result = corral.ok("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"a": 3, "b": 3}})
        assert len(result["moves"]) == 6
        after = corral.ok("GET", "/api/system/data-plane")  # the call returned: the gateway serves it already
        assert after["pushes"] == before["pushes"] + 1
        assert after["appliedVersion"] == after["desiredVersion"] == before["desiredVersion"] + 1
        assert _served(corral, "a") | _served(corral, "b") == {p["name"] for p in corral.pods(pool)}


def _served(corral: CorralServer, service: str) -> set[str]:
    with httpx.Client(base_url=f"{corral.gateway_url}/s/{service}-nlb/v1", timeout=30) as client:
        return {client.post("/chat/completions", json=CHAT).headers["x-corral-replica"] for _ in range(20)}


async def test_the_control_channel_refuses_a_call_without_its_secret_and_a_foreign_table_is_replaced(
        nginx: NginxGateway, upstream: str) -> None:
    """A process that reaches the control socket but was never given the secret (as a replica is not) can neither
    read nor change routing (403); one that pushes a table anyway (here with the secret, as a compromised
    process could) is found by the reconciler, counted as a fault and replaced."""
    mine, foreign = big_table(upstream, services=2), big_table(upstream, services=2, offset=4)
    sync = RoutingSync(lambda: mine, nginx, verify_interval_s=0.1)
    sync.start()
    try:
        assert await sync.sync() == 1
        connector = aiohttp.UnixConnector(path=str(nginx.control_socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            for method, path in (("POST", "/routes?version=500"), ("GET", "/version"), ("GET", "/stats"),
                                 ("POST", "/prune"), ("POST", "/routes?version=500&replace=1")):
                for headers in ({}, {CONTROL_SECRET_HEADER: "not-the-secret"}):
                    async with session.request(method, "http://nginx" + path, data=table_payload(foreign),
                                               headers=headers) as answer:
                        assert answer.status == 403, (method, path, headers)
            assert await nginx.served_version() == 1
            secret = control_secret(nginx.control_socket.parent)
            assert stat.S_IMODE(os.stat(nginx.control_socket.parent / "secret").st_mode) == 0o600
            assert secret not in (nginx.workdir / "nginx.conf").read_text() and CONTROL_SECRET_ENV not in os.environ
            async with session.post("http://nginx/routes?version=500", data=table_payload(foreign),
                                    headers={CONTROL_SECRET_HEADER: secret}) as answer:
                assert answer.status == 200 and (await answer.json())["version"] == 500
        await wait_for_async(lambda: sync.faults == 1, timeout=5, what="the foreign table found")
        await wait_for_async(lambda: sync.status()["appliedVersion"] == 1, timeout=5, what="the table replaced")
        assert await nginx.served_version() == 1
        assert await routed_to(nginx, "service-1-nlb") in {"simulator-qwen-06b-pool-1-0", "simulator-qwen-06b-pool-1-1"}
        assert "500" in sync.status()["lastFault"]
    finally:
        await sync.close()


def established_to(port: int) -> int:
    """TCP connections established to `port` on this machine (/proc/net/tcp: state 01), seen from either end."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state == "01" and int(local.split(":")[1], 16) == port:
            count += 1
    return count


async def test_a_request_before_the_first_push_waits_for_the_table_instead_of_a_404(nginx: NginxGateway,
                                                                                    upstream: str) -> None:
    """A fresh nginx listens before the control plane's first push: a request for an existing service that comes in
    between waits for the table (it got `404 service not found` before)."""
    assert await nginx.served_version() == 0
    async with aiohttp.ClientSession() as client:
        async def ask() -> tuple[int, str]:
            async with client.get(f"http://127.0.0.1:{nginx.port}/s/service-0-nlb/v1/models") as response:
                return response.status, await response.text()

        request = asyncio.create_task(ask())
        await wait_for_async(lambda: established_to(nginx.port) > 0, timeout=5, what="the request's connection")
        assert not request.done()
        assert await nginx.push(big_table(upstream, services=1), 1) == 1
        status, text = await asyncio.wait_for(request, 10)
    assert status == 200, text
