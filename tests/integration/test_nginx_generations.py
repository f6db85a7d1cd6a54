"""nginx generations (issue 26): a worker left by a SIGKILLed nginx master keeps its `reuseport` listener and its
old routing table; Corral stops every process of an earlier generation of its data dir before it starts nginx, and
when it stops, so that two generations never serve."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.backends.local.process import process_start_time
from corral.gateway.nginx_plane import missing_parts
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, deploy_sim_pool, running_corral

pytestmark = pytest.mark.skipif(bool(missing_parts()), reason="the nginx data plane needs " + ", ".join(missing_parts()))

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def corral(tmp_path: Path) -> Iterator[CorralServer]:
    with running_corral(tmp_path / "data", {"CORRAL_GATEWAY_DATA_PLANE": "nginx", "CORRAL_GATEWAY_WORKERS": "2",
                                              "CORRAL_GATEWAY_HOLD_TIMEOUT_S": "0.5"}) as server:
        yield server


def nginx_processes(corral: CorralServer) -> dict[int, str]:
    """The master of `nginx.pid` and its workers, pid → start time."""
    master = int((corral.data_dir / "gateway" / "nginx.pid").read_text())
    pids = [master, *(int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split())]
    return {pid: start for pid in pids if (start := process_start_time(pid)) is not None}


def alive(processes: dict[int, str]) -> list[int]:
    return [pid for pid, start in processes.items() if process_start_time(pid) == start]


def answered_by(corral: CorralServer, service: str, n: int) -> set[str]:
    replicas = set()
    with httpx.Client(base_url=f"{corral.gateway_url}/s/{service}/v1", timeout=30) as client:
        for _ in range(n):  # a new connection each time: the kernel spreads them over every `reuseport` listener
            response = client.post("/chat/completions", json=CHAT, headers={"Connection": "close"})
            assert response.status_code == 200, response.text
            replicas.add(response.headers["x-corral-replica"])
    return replicas


def test_a_worker_of_a_killed_master_never_serves_again(corral: CorralServer) -> None:
    pool = deploy_sim_pool(corral, tag="m", replicas=2)
    first, second = sorted(p["name"] for p in corral.pods(pool))
    for name in ("a", "b"):
        corral.ok("POST", "/api/deploy-service", json={"serviceName": name, "modelPool": pool, "businessTag": name})
    corral.ok("POST", "/api/assign-pod", json={"podName": first, "businessTag": "a"})
    corral.ok("POST", "/api/assign-pod", json={"podName": second, "businessTag": "b"})
    wait_for(lambda: answered_by(corral, "a-nlb", 4) == {first}, what="a-nlb served by its replica")

    old = nginx_processes(corral)
    master = int((corral.data_dir / "gateway" / "nginx.pid").read_text())
    assert len(old) == 3  # the master and its 2 workers
    os.kill(master, signal.SIGKILL)  # its workers stay, children of init, listening with the old table
    wait_for(lambda: process_start_time(master) is None, what="the master to die")

    # The next change restarts nginx; the replicas swap businesses.
    corral.ok("POST", "/api/assign-pod", json={"podName": first, "businessTag": "b"})
    corral.ok("POST", "/api/assign-pod", json={"podName": second, "businessTag": "a"})
    wait_for(lambda: nginx_processes(corral).keys().isdisjoint(old), what="a new nginx")
    assert alive(old) == []  # no worker of the old generation remains
    assert answered_by(corral, "a-nlb", 60) == {second}  # only the business's replica answers
    assert answered_by(corral, "b-nlb", 60) == {first}


def test_stopping_corral_stops_the_workers_of_a_killed_master(corral: CorralServer) -> None:
    old = nginx_processes(corral)
    master = int((corral.data_dir / "gateway" / "nginx.pid").read_text())
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: process_start_time(master) is None, what="the master to die")
    corral.stop()
    assert alive(old) == []
    corral.start()
    assert alive(old) == []
    assert httpx.get(f"{corral.gateway_url}/s/nope-nlb/v1/models").status_code == 404  # the new nginx answers


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_restarted_control_plane_comes_back_without_a_gap_in_traffic(corral: CorralServer, how: str) -> None:
    """`corral serve` killed (no clean-up) or stopped (graceful, replicas kept: the default) and started again under
    streamed and non-streamed load: nginx keeps serving throughout and is adopted; no refused connection, no 404."""
    pool = deploy_sim_pool(corral, tag="m", replicas=2)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "a", "modelPool": pool, "businessTag": "a"})
    for pod in corral.pods(pool):
        corral.ok("POST", "/api/assign-pod", json={"podName": pod["name"], "businessTag": "a"})
    replicas = {p["name"] for p in corral.pods(pool)}
    nginx = nginx_processes(corral)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load(stream: bool) -> None:
        with httpx.Client(base_url=f"{corral.gateway_url}/s/a-nlb/v1", timeout=30) as client:
            while not stop.is_set():
                try:
                    body = {**CHAT, "stream": stream, "max_tokens": 20}
                    with client.stream("POST", "/chat/completions", json=body,
                                       headers={"Connection": "close"} if not stream else {}) as response:
                        text = response.read().decode()
                    if response.status_code != 200 or response.headers["x-corral-replica"] not in replicas:
                        failures.append(f"{response.status_code} {text[:200]}")
                    elif stream and "[DONE]" not in text:
                        failures.append(f"cut stream: {text[-200:]}")
                    else:
                        answered[0] += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(stream,)) for stream in (False, True, False, True)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: answered[0] >= 20, what="traffic")
        assert corral.process is not None
        corral.process.send_signal(getattr(signal, how))
        corral.process.wait(timeout=60)
        corral.start()
        before = answered[0]
        wait_for(lambda: answered[0] >= before + 40, what="traffic after the restart")
        corral.ok("POST", "/api/deploy-service", json={"serviceName": "b", "modelPool": pool, "businessTag": "b"})
        assert httpx.get(f"{corral.gateway_url}/s/b-nlb/v1/models").status_code == 503  # the new table, held: no replica
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert alive(nginx) == list(nginx)  # the running nginx was adopted, not replaced


def test_a_python_gateway_replaces_an_nginx_left_serving(corral: CorralServer) -> None:
    """nginx outlives a stopped `corral serve`; the next one, told to use the Python gateway, must not leave it holding
    the gateway port with its last table."""
    old = nginx_processes(corral)
    corral.stop()
    assert alive(old) == list(old)  # kept serving, by design
    corral.extra_env["CORRAL_GATEWAY_DATA_PLANE"] = "python"
    corral.start()
    assert alive(old) == []
    assert corral.ok("GET", "/api/system/data-plane")["dataPlane"] == "python"
    assert httpx.get(f"{corral.gateway_url}/s/nope-nlb/v1/models").status_code == 404  # the Python gateway answers
