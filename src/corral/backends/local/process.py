"""Detached engine processes: start, identify after a control-plane restart, stop.

Replicas run in their own session (`start_new_session`), so they outlive the control plane and a
Ctrl+C in its terminal. A pid alone does not identify a process across restarts (pids are reused),
so the process start time from `/proc/<pid>/stat` is stored beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from corral.engines.base import redact_args
from corral.paths import unprivileged_account

log = logging.getLogger("corral.local")

# Every replica process carries these, so that it is found by what it is, not by a pid saved later:
# a control plane killed between starting a process and recording its pid finds it on restart.
REPLICA_NAME_ENV = "CORRAL_REPLICA_NAME"
REPLICA_HOME_ENV = "CORRAL_REPLICA_HOME"  # the data dir of the control plane that owns it


@dataclass(frozen=True)
class Found:
    """A replica's main process found by scanning /proc (its workers, children of it, are not listed)."""

    pid: int
    pid_start: str


@dataclass
class Started:
    pid: int
    pid_start: str | None
    handle: subprocess.Popen | None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); None if the process is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    state, start = fields[0], fields[19]
    return None if state in ("Z", "X") else start


def identity_env(replica: str, home: Path) -> dict[str, str]:
    return {REPLICA_NAME_ENV: replica, REPLICA_HOME_ENV: str(home)}


def find_replicas(home: Path) -> dict[str, list[Found]]:
    """Replica name → its running main processes (normally one), for the control plane of `home`.

    A process counts when its environment names this home and it leads its own session: Corral starts
    every replica in a new session (`spawn`), and an engine's workers inherit the environment but not
    the leadership, so an engine core orphaned by its dead API server is never taken for the replica
    (it is a leftover, for `kill_leftovers`). Processes of other users cannot be read and are never ours.
    """
    marker = f"{REPLICA_HOME_ENV}={home}".encode()
    matched: dict[int, tuple[str, str, int]] = {}  # pid → (replica, start, ppid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if marker not in environ:
            continue
        name = next((v.partition(b"=")[2].decode() for v in environ if v.startswith(REPLICA_NAME_ENV.encode() + b"=")), None)
        fields = stat[stat.rindex(")") + 2 :].split()
        if name is None or fields[0] in ("Z", "X") or int(fields[3]) != int(entry.name):  # fields[3]: the session id
            continue
        matched[int(entry.name)] = (name, fields[19])
    found: dict[str, list[Found]] = {}
    for pid, (name, start) in sorted(matched.items(), key=lambda item: int(item[1][1])):  # oldest first
        found.setdefault(name, []).append(Found(pid, start))
    return found


def kill_leftovers(replica: str, home: Path) -> list[int]:
    """SIGKILL every process still carrying the identity of a replica whose main process is dead: an engine's
    workers outlive their parent (a SIGKILLed vLLM API server leaves its EngineCore and Worker running, holding
    host memory and, on a GPU, its memory), and a restart would start beside them. Matched by the replica's
    environment, never by pid alone (a pid may be reused). Returns the pids signalled."""
    markers = {f"{REPLICA_NAME_ENV}={replica}".encode(), f"{REPLICA_HOME_ENV}={home}".encode()}
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if markers <= environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def stop_all(home: Path, grace_s: float) -> int:
    """Stop every replica of the control plane of `home` (`corral serve --stop-replicas-on-exit`): SIGTERM to each
    replica's process group (its engine's workers with it), SIGKILL after `grace_s` to what is left, leftovers
    included. Returns how many replicas there were."""
    found = find_replicas(home)
    groups = [copy.pid for copies in found.values() for copy in copies]
    for pid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and find_replicas(home):
        time.sleep(0.1)  # a wait on processes that are not our children: nothing to block on
    for pid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for name in found:
        kill_leftovers(name, home)
    return len(found)


# Corral's own secrets, never inherited by a replica or a trainer (they get the environment of `corral serve`
# otherwise): the API token, and the gateway's control secret (gateway/nginx_plane.py; it is never in Corral's
# environment, but a wrapper script could export it).
HIDDEN_FROM_CHILDREN = frozenset({"CORRAL_API_TOKEN", "CORRAL_CONTROL_SECRET"})


def child_user(name: str | None) -> pwd.struct_passwd | None:
    """The account replicas run as (`CORRAL_REPLICA_USER`), when this process may switch to it (root); None:
    they run as Corral's user. An unknown name is an error at start, not at the first launch."""
    if name is None:
        return None
    account = unprivileged_account(name, "CORRAL_REPLICA_USER", refuse_root=os.geteuid() == 0)
    if os.geteuid() != 0:
        log.warning("CORRAL_REPLICA_USER=%s is ignored: Corral does not run as root, replicas run as its user", name)
        return None
    return account


def spawn(argv: list[str], env: dict[str, str], log_path: Path, user: pwd.struct_passwd | None = None) -> Started:
    """Start `argv` in a session of its own (its process group is stopped as one), its output appended to
    `log_path` (opened here, so a replica running as `user` needs no access to Corral's data dir)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {redact_args(argv)!r}\n".encode())  # no secret values
        log.flush()
        handle = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if k not in HIDDEN_FROM_CHILDREN}, **env},
            start_new_session=True,
            close_fds=True,
            **({"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user is not None else {}),
        )
    return Started(handle.pid, process_start_time(handle.pid), handle)


def is_alive(pid: int | None, pid_start: str | None, handle: subprocess.Popen | None = None) -> bool:
    if pid is None:
        return False
    if handle is not None and handle.poll() is not None:  # our child: poll() also reaps it
        return False
    current = process_start_time(pid)
    return current is not None and (pid_start is None or current == pid_start)


async def stop_group(pid: int | None, pid_start: str | None, handle: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM the replica's process group (engines fork workers), SIGKILL after `grace_s`."""
    if not is_alive(pid, pid_start, handle):
        return
    assert pid is not None
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not is_alive(pid, pid_start, handle):
            return
        await asyncio.sleep(0.05)
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while is_alive(pid, pid_start, handle) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def tail_lines(path: Path, count: int, chunk: int = 64 * 1024) -> str:
    """The last `count` lines of a log file, reading only as much of its end as needed."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            data = b""
            while size > 0 and data.count(b"\n") <= count:
                step = min(chunk, size)
                size -= step
                log.seek(size)
                data = log.read(step) + data
    except FileNotFoundError:
        return ""
    return b"\n".join(data.splitlines()[-count:]).decode(errors="replace")


def exit_code(handle: subprocess.Popen | None) -> int | None:
    """The exit status of our own child; None for a re-adopted process (not our child)."""
    return handle.poll() if handle is not None else None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)
