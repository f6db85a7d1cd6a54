"""Kill `corral serve` (SIGKILL, a real process) at points inside a deploy, a distribution, a
scale-down and a delete; restart it; every change is then either wholly applied or not at all,
there is one process per replica and none that Corral does not list, and every change has a
completed history row.

The kill comes from failpoints (`corral.failpoints`): the server sends itself SIGKILL at the named
point, so each test hits its instant exactly instead of racing a timer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.backends.local.process import find_replicas, identity_env, process_start_time
from tests.conftest import wait_for
from tests.integration.conftest import SIM_ARGS, CorralServer, deploy_sim_pool

POOL = "simulator-qwen-06b-pool"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CorralServer]:
    data = tmp_path / "data"
    data.mkdir()
    corral = CorralServer(data, env={"CORRAL_GATEWAY_DATA_PLANE": "python"})
    try:
        yield corral
    finally:
        corral.stop()
        corral.kill_replicas()


def crash_during(server: CorralServer, failpoint: str, method: str, path: str, body: dict) -> None:
    """Start the server armed with `failpoint`, send the request, and see the server die at that point."""
    server.extra_env["CORRAL_FAILPOINTS"] = failpoint
    server.start()
    with pytest.raises(httpx.HTTPError):  # the server dies mid-request: the connection drops
        server.http.request(method, path, json=body)
    assert server.process is not None and server.process.wait(timeout=30) == -9, "killed by its failpoint"
    server.extra_env.pop("CORRAL_FAILPOINTS")
    server.start()


def processes(server: CorralServer) -> dict[str, int]:
    """Replica name → how many main processes run for it (one, always)."""
    return {name: len(copies) for name, copies in find_replicas(server.data_dir.resolve()).items()}


def assert_consistent(server: CorralServer) -> list[dict]:
    """One process per listed replica, none unlisted, no history row left pending."""
    pods = server.pods()
    wait_for(lambda: processes(server) == {p["name"]: 1 for p in pods}, timeout=30,
             what=f"one process per replica ({sorted(p['name'] for p in pods)}), got {processes(server)}")
    history = server.ok("GET", "/api/history", params={"limit": 500})
    assert [h for h in history if h["outcome"] == "pending"] == []
    return history  # type: ignore[return-value]


def setup_pool(server: CorralServer, replicas: int = 4) -> None:
    deploy_sim_pool(server, replicas=replicas)
    for business in ("production", "testing"):
        server.ok("POST", "/api/deploy-service", json={"serviceName": f"{business}-chat", "modelPool": POOL,
                                                       "businessTag": business})


def test_kill_after_spawning_a_replica_before_its_pid_is_saved(server: CorralServer) -> None:
    crash_during(server, "replica.spawned", "POST", "/api/deploy",
                 {"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 3, "deployAsPool": True,
                  "engineArgs": SIM_ARGS})
    pods = server.wait_ready(POOL, 3)
    history = assert_consistent(server)
    assert len(pods) == 3
    deploy = [h for h in history if h["action"] == "deploy"]
    assert len(deploy) == 1 and deploy[0]["outcome"] == "success" and "after a control-plane restart" in deploy[0]["message"]
    assert all(p["restarts"] == 0 for p in pods), "the orphaned first process is adopted, not restarted"


def test_kill_after_recording_a_deploy_before_starting_anything(server: CorralServer) -> None:
    crash_during(server, "deploy.intent-recorded", "POST", "/api/deploy",
                 {"engine": "simulator", "modelId": "sim", "modelTag": "qwen-06b", "replicas": 2, "deployAsPool": True,
                  "engineArgs": SIM_ARGS})
    server.wait_ready(POOL, 2)
    history = assert_consistent(server)
    assert [h["outcome"] for h in history if h["action"] == "deploy"] == ["success"]


def test_kill_during_a_distribution_leaves_all_of_it_applied(server: CorralServer) -> None:
    server.start()
    setup_pool(server)
    server.stop()
    crash_during(server, "distribute.intent-recorded", "POST", "/api/distribute-pods",
                 {"deploymentName": POOL, "counts": {"production": 3, "testing": 1}})
    pods = server.wait_ready(POOL, 4)
    assert Counter(p["business"] for p in pods) == Counter({"production": 3, "testing": 1})
    history = assert_consistent(server)
    distribute = [h for h in history if h["action"] == "distribute"]
    assert len(distribute) == 1 and distribute[0]["outcome"] == "success"
    assert Counter(h["after"]["business"] for h in history if h["action"] == "assign") == Counter({"production": 3, "testing": 1})
    # Traffic follows the recorded assignment after the restart.
    production = {p["name"] for p in pods if p["business"] == "production"}
    served = {httpx.post(f"{server.gateway_url}/s/production-chat-nlb/v1/chat/completions", timeout=10,
                         json={"model": "qwen-06b", "messages": [{"role": "user", "content": "hi"}]}).headers["x-corral-replica"]
              for _ in range(12)}
    assert served <= production


def test_kill_during_a_scale_down_finishes_it(server: CorralServer) -> None:
    server.start()
    setup_pool(server)
    server.ok("POST", "/api/distribute-pods", json={"deploymentName": POOL, "counts": {"production": 1}})
    server.stop()
    crash_during(server, "scale-down.intent-recorded", "POST", "/api/scale-pool-deployment",
                 {"deploymentName": POOL, "targetReplicas": 2})
    pods = server.wait_ready(POOL, 2)
    assert Counter(p["business"] for p in pods) == Counter({"production": 1, "unassigned": 1})
    history = assert_consistent(server)
    scale = [h for h in history if h["action"] == "scale"]
    assert len(scale) == 1 and scale[0]["outcome"] == "success" and scale[0]["after"] == {"replicas": 2}
    assert server.ok("GET", "/api/deployments")[0]["replicas"] == 2


def test_kill_during_a_delete_finishes_it(server: CorralServer) -> None:
    server.start()
    setup_pool(server, replicas=2)
    server.stop()
    crash_during(server, "delete.intent-recorded", "DELETE", f"/api/deployments/{POOL}", {})
    wait_for(lambda: processes(server) == {}, timeout=30, what="every replica of the deleted pool stopped")
    assert server.ok("GET", "/api/deployments") == []
    history = assert_consistent(server)
    assert [h["outcome"] for h in history if h["action"] == "delete"] == ["success"]


def test_a_stray_replica_process_is_stopped_and_recorded(server: CorralServer) -> None:
    """A process that carries this data dir's identity but no replica of that name is desired
    (say, a copy left by an older Corral): stopped on start, with a history row."""
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                             env={**os.environ, **identity_env("ghost-replica", server.data_dir.resolve())})
    try:
        # Until the child has exec'd, /proc shows the parent's environment: wait for its identity to be readable.
        wait_for(lambda: processes(server) == {"ghost-replica": 1}, timeout=10, what="the stray process to carry its identity")
        server.start()
        wait_for(lambda: stray.poll() is not None, timeout=30, what="the stray process to be stopped")
        history = assert_consistent(server)
        row = next(h for h in history if h["action"] == "stray")
        assert row["target"] == "ghost-replica" and f"stopped stray process {stray.pid}" in row["message"]
    finally:
        if process_start_time(stray.pid):
            stray.kill()


def test_a_worker_orphaned_while_corral_was_down_is_not_taken_for_its_replica(server: CorralServer) -> None:
    """vLLM's API server dies and leaves its engine core (same environment, not the session leader) while
    Corral is down: on start the replica is restarted and the orphan stopped, not adopted as the replica."""
    server.start()
    deploy_sim_pool(server, replicas=1)
    [pod] = server.pods(POOL)
    server.stop()
    main = server.replica_pid(pod["name"])
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],  # same session as the test: no leader
                              env={**os.environ, **identity_env(pod["name"], server.data_dir.resolve())})
    try:
        os.killpg(main, 9)
        wait_for(lambda: not process_start_time(main), timeout=10, what="the replica's main process to die")
        server.start()
        wait_for(lambda: orphan.poll() is not None, timeout=30, what="the orphaned worker to be stopped")
        server.wait_ready(POOL, 1)
        assert server.replica_pid(pod["name"]) not in (main, orphan.pid)
        assert_consistent(server)
    finally:
        if orphan.poll() is None:
            orphan.kill()
