"""Replicas are kept away from the control plane: they never inherit Corral's secrets, and as root they run as an
unprivileged user (`CORRAL_REPLICA_USER`) that cannot reach the gateway's control channel (a unix socket in a 0700
directory). Real processes; the system's python3, which every user may run (Corral's may live under /root)."""

from __future__ import annotations

import os
import pwd
import socket
import sys
from pathlib import Path

import pytest

from corral.backends.local import process
from corral.gateway.nginx_plane import private_dir

SYSTEM_PYTHON = "/usr/bin/python3"


def finished_output(started: process.Started, log: Path) -> str:
    assert started.handle is not None
    started.handle.wait(timeout=30)
    return log.read_text()


def test_a_replica_never_inherits_corral_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_API_TOKEN", "the-api-token-9f2c")
    monkeypatch.setenv("HF_TOKEN", "an-engine-needs-this")  # everything else is inherited as before
    log = tmp_path / "replica.log"
    started = process.spawn([sys.executable, "-c", "import os; print(sorted(os.environ))"], {"OWN": "1"}, log)
    output = finished_output(started, log)
    assert "'HF_TOKEN'" in output and "'OWN'" in output
    assert "CORRAL_API_TOKEN" not in output and "the-api-token-9f2c" not in output


def test_an_unknown_or_root_replica_user_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="no user named"):
        process.child_user("no-such-user-xyz")
    if os.geteuid() == 0:
        with pytest.raises(ValueError, match="is root"):
            process.child_user("root")
    assert process.child_user(None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no system python3")
def test_as_root_a_replica_runs_as_the_replica_user_and_cannot_reach_the_control_socket(tmp_path: Path) -> None:
    control = private_dir(tmp_path / "control")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control / "control.sock"))
    listener.listen(1)
    try:
        user = process.child_user("nobody")
        assert user is not None
        script = ("import os, socket\n"
                  "print('uid', os.getuid())\n"
                  "s = socket.socket(socket.AF_UNIX)\n"
                  "try:\n"
                  f"    s.connect({str(control / 'control.sock')!r}); print('connected')\n"
                  "except OSError as e:\n"
                  "    print('refused', type(e).__name__)\n")
        log = tmp_path / "replica.log"
        started = process.spawn([SYSTEM_PYTHON, "-c", script], {}, log, user)
        output = finished_output(started, log)
        assert f"uid {pwd.getpwnam('nobody').pw_uid}" in output
        assert "\nrefused PermissionError\n" in output and "\nconnected\n" not in output
    finally:
        listener.close()


def test_nginx_workers_never_run_as_root_nor_as_the_replicas_account() -> None:
    from corral.gateway.nginx_plane import worker_account

    with pytest.raises(ValueError, match="no user named"):
        worker_account("no-such-user-xyz")
    with pytest.raises(ValueError, match="is root"):
        worker_account("root")
    with pytest.raises(ValueError, match="replicas' account"):
        worker_account("nobody", replica_user="nobody")
    assert worker_account(None)[0] == "nobody"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_as_root_nginx_workers_run_unprivileged_and_spool_large_bodies(tmp_path: Path) -> None:
    """The master stays root (it binds the port); its workers, which parse the clients' requests, are nobody's, and a
    body too large for memory (the control channel's routing push, spooled to a file the workers own) still gets in."""
    from corral.gateway.nginx_plane import (
        CONTROL_BODY_BUFFER,
        NginxGateway,
        missing_parts,
        table_payload,
        worker_temp_dir,
    )
    from corral.gateway.routing import Route, Target
    from tests.integration.conftest import free_port

    if missing := missing_parts():
        pytest.skip("nginx data plane needs " + ", ".join(missing))
    nginx = NginxGateway(tmp_path / "gateway", "127.0.0.1", free_port(), connect_timeout_s=2, read_timeout_s=10,
                         drain_timeout_s=1, control_timeout_s=5)
    nginx.start()
    try:
        master = nginx._process.pid  # type: ignore[union-attr]
        workers = [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
        uids = {int(line.split()[1]) for w in workers
                for line in Path(f"/proc/{w}/status").read_text().splitlines() if line.startswith("Uid:")}
        assert workers and uids == {pwd.getpwnam("nobody").pw_uid}
        spool = worker_temp_dir(tmp_path / "gateway")
        assert spool.stat().st_uid == pwd.getpwnam("nobody").pw_uid and spool.stat().st_mode & 0o777 == 0o700
        targets = tuple(Target(f"replica-{i:04d}-" + "x" * 40, f"http://127.0.0.1:{9000 + i % 1000}") for i in range(600))
        table = {f"svc-{i}": Route(f"svc-{i}", "m", "b", "pool", targets[i * 6:(i + 1) * 6]) for i in range(100)}
        assert len(table_payload(table)) > int(CONTROL_BODY_BUFFER.removesuffix("k")) * 1024  # spooled to a file
        assert await nginx.push(table, 1) == 1
    finally:
        await nginx.close()
