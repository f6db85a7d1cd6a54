"""Replicas outlive the control plane; crashed replicas come back with their name and business."""

from __future__ import annotations

import os
import signal

from corral.backends.local.process import process_start_time
from tests.conftest import wait_for
from tests.integration.conftest import CorralServer, deploy_sim_pool


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    return process_start_time(pid) is not None


def test_restart_readopts_running_replicas_and_restarts_dead_ones(corral: CorralServer) -> None:
    pool = deploy_sim_pool(corral, replicas=3)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "prod", "modelPool": pool, "businessTag": "production"})
    corral.ok("POST", "/api/distribute-pods", json={"deploymentName": pool, "counts": {"production": 2}})
    before = {p["name"]: p for p in corral.pods(pool)}

    corral.stop()
    pids = corral.replica_pids()
    assert len(pids) == 3 and all(alive(pid) for pid in pids), "replicas must outlive the control plane"
    # One replica dies while the control plane is down.
    victim = next(p for p in before.values() if p["business"] == "production")
    victim_pid = corral.replica_pid(victim["name"])
    os.killpg(victim_pid, signal.SIGKILL)
    wait_for(lambda: not alive(victim_pid), what="the victim to die")

    corral.start()
    after = {p["name"]: p for p in corral.wait_ready(pool, 3)}
    assert set(after) == set(before)
    for name, pod in after.items():
        assert pod["labels"] == before[name]["labels"], "labels survive a restart"
        assert pod["restarts"] == (1 if name == victim["name"] else 0)
    now = {name: corral.replica_pid(name) for name in after}
    survivors = [pid for pid in pids if pid != victim_pid]
    assert sorted(pid for name, pid in now.items() if name != victim["name"]) == sorted(survivors), "re-adopted, not restarted"
    assert now[victim["name"]] != victim_pid
    status = corral.ok("GET", f"/api/pool-status/{pool}")
    assert status["podDistribution"] == {"unassigned": 1, "production": 2}


def test_crashed_replica_is_restarted_with_its_name_and_business(corral: CorralServer) -> None:
    pool = deploy_sim_pool(corral, replicas=2)
    corral.ok("POST", "/api/deploy-service", json={"serviceName": "prod", "modelPool": pool, "businessTag": "production"})
    target = corral.pods(pool)[0]
    corral.ok("POST", "/api/assign-pod", json={"podName": target["name"], "businessTag": "production"})
    os.killpg(corral.replica_pid(target["name"]), signal.SIGKILL)

    def restarted() -> dict | None:
        pod = next(p for p in corral.pods(pool) if p["name"] == target["name"])
        return pod if pod["restarts"] == 1 and pod["ready"] else None

    pod = wait_for(restarted, timeout=30, what="the crashed replica to be restarted and ready")
    assert pod["business"] == "production" and pod["labels"] == {**target["labels"], "business": "production"}
    history = corral.ok("GET", "/api/history", params={"target": target["name"]})
    assert [h["action"] for h in history] == ["crash", "assign"]
    assert history[0]["outcome"] == "restarting" and "process exited (code -9); restart #1" in history[0]["message"]
    # Its log shows both starts, through the API and the CLI.
    log = corral.http.get(f"/api/pods/{target['name']}/logs", params={"tail": 50}).text
    assert log.count("starting: [") == 2 and "corral.engines.simulator" in log
    assert corral.http.get("/api/pods/ghost/logs").status_code == 404

