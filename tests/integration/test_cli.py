"""The `corral` CLI against a real server: tables, progress, and exit code ≠ 0 with a one-line reason."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.integration.conftest import CorralServer, free_port


def cli(server_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_URL": server_url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_drives_the_whole_flow(corral: CorralServer) -> None:
    pool = "simulator-qwen-06b-pool"
    deployed = cli(corral.url, "deploy", "simulator", "sim", "--tag", "qwen-06b", "-n", "4", "--pool", "--engine-args", "--ttft-ms 5")
    assert deployed.returncode == 0, deployed.stderr
    assert f"deployed {pool}" in deployed.stdout and "replicas ready" in deployed.stdout and "4/4" in deployed.stdout

    for name, business in [("production-chat", "production"), ("testing-chat", "testing")]:
        created = cli(corral.url, "service", "create", name, "--pool", pool, "--business", business)
        assert created.returncode == 0 and f"created {name}-nlb" in created.stdout
    listed = cli(corral.url, "service", "list")
    assert "production-chat-nlb" in listed.stdout and "testing-chat-nlb" in listed.stdout

    distributed = cli(corral.url, "distribute", pool, "production=3", "testing=1")
    assert distributed.returncode == 0 and "4 move(s)" in distributed.stdout
    assert "0 move(s)" in cli(corral.url, "distribute", pool, "production=3", "testing=1").stdout

    pod = next(p["name"] for p in corral.pods(pool) if p["business"] == "testing")
    assigned = cli(corral.url, "assign", pod, "unassigned")
    assert assigned.returncode == 0 and "testing → unassigned" in assigned.stdout

    refused = cli(corral.url, "scale", pool, "2")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: Cannot scale down: need 2 unassigned pods, but only 1 available"

    scaled = cli(corral.url, "scale", pool, "3")
    assert scaled.returncode == 0 and "4 → 3 replicas" in scaled.stdout

    status = cli(corral.url, "status", pool)
    assert "available for scale-down: 0" in status.stdout and "production" in status.stdout
    assert "Model Pool" in cli(corral.url, "deployments").stdout and "production(3)" in cli(corral.url, "deployments").stdout
    assert pool in cli(corral.url, "pods").stdout
    assert "starting: [" in cli(corral.url, "logs", corral.pods(pool)[0]["name"], "--tail", "5").stdout
    missing = cli(corral.url, "logs", "ghost")
    assert missing.returncode == 1 and "pod 'ghost' not found" in missing.stderr
    history = cli(corral.url, "history", "--action", "scale")
    assert "refused" in history.stdout and "success" in history.stdout

    bad = cli(corral.url, "distribute", pool, "production")
    assert bad.returncode == 1 and "'production' is not business=N" in bad.stderr
    unknown = cli(corral.url, "assign", "ghost", "production")
    assert unknown.returncode == 1 and "pod 'ghost' not found" in unknown.stderr

    deleted = cli(corral.url, "delete", pool, "--yes", "--force")
    assert deleted.returncode == 0 and corral.pods() == []


def test_cli_says_when_corral_is_unreachable() -> None:
    result = cli(f"http://127.0.0.1:{free_port()}", "pods")
    assert result.returncode == 1 and "cannot reach Corral" in result.stderr and "corral serve" in result.stderr
