"""The nginx data plane: the same gateway behaviour at nginx speed, without reloads.

nginx (Debian's `nginx-light` + `libnginx-mod-http-lua` + `lua-cjson`) proxies `/s/<service>/...`;
a Lua balancer (`nginx/corral_gateway.lua`) picks the replica from a routing table in shared memory.
The control plane pushes each new table, with its version, over a control channel: a unix socket
(mode 0600, in a 0700 directory of the gateway workdir), so that no other local user can replace
the routing table. The push answers the version nginx now serves, and every worker uses it for its
next request, so an assignment takes effect at once. Reloading nginx instead would cost ~100 ms per
change here and spawn new workers each time (measured). Every call on the control channel from the
event loop is asynchronous with a timeout (`corral.gateway.sync.RoutingSync` decides when to push
and retries): a hung nginx never stalls the API.

Draining uses the in-flight counters the Lua code keeps per replica; counters for `/api/metrics`
come from the same shared memory, read incrementally (only what changed since the last read: see the top of
corral_gateway.lua) into a copy kept here, which every synchronous reader uses (`NginxStats`): nothing on
the event loop waits for nginx. The counters of replicas and services that left are pruned there too
(`/prune`), and the outlier records the Lua code keeps (ejections, readmissions, cap refusals) are turned
into `on_outlier` events as reads see them. Chosen by `CORRAL_GATEWAY_DATA_PLANE=nginx` (or `auto` when the
packages are installed); the Python gateway stays the portable fallback.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import http.client
import json
import logging
import math
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest

from corral.aio import stop, within
from corral.domain.fairness import BYTES_PER_TOKEN, COMPLETION_COST, PROMPT_COST
from corral.domain.load import BUCKETS, Sample, departures, prunable
from corral.domain.outliers import (
    Outlier,
    OutlierEvent,
    Reason,
    capped_event,
    ejected_event,
    readmitted_event,
)
from corral.domain.replica_picking import ReplicaInputs, RoutingPolicy
from corral.domain.tenancy import DAY_S, MINUTE_S, WEIGHT_DEFAULT, Limits, RouteAccess, Usage
from corral.gateway.proxy import (
    NOT_RETRIED,
    RETRY_AFTER_S,
    GatewayLimits,
    budget_spent_suffix,
    ejection_view,
    held_too_long_suffix,
    hold_full_suffix,
    too_large_message,
)
from corral.gateway.routing import RoutingTable
from corral.gateway.stats import TrafficCollector, TrafficStats
from corral.paths import unprivileged_account
from corral.views import EjectionView

log = logging.getLogger("corral.gateway.nginx")

LUA_DIR = Path(__file__).parent / "nginx"
MODULES = (Path("/usr/lib/nginx/modules/ndk_http_module.so"), Path("/usr/lib/nginx/modules/ngx_http_lua_module.so"))
LUA_PATH = "/usr/share/lua/5.1/?.lua"  # lua-resty-core (ngx.balancer)
LUA_CPATH = "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;/usr/lib/aarch64-linux-gnu/lua/5.1/?.so"  # lua-cjson
# A table up to this size stays in memory on the control server; a larger one is spooled to a temp file
# (the Lua code reads it from there). The routing dict is sized to hold the largest accepted body.
CONTROL_BODY_BUFFER = "64k"
CONTROL_BODY_MAX = "32m"
ROUTES_DICT = "64m"
AFFINITY_DICT = "16m"  # ~100,000 prefix keys; nginx evicts the least recently used when full
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
STATS_REFRESH_S = 1.0  # background refresh of the counters snapshot
STATS_READ_TIMEOUT_S = 0.25  # an on-demand read of the counters (`NginxStats.refresh`), only while nginx answers
CONTROL_SECRET_ENV = "CORRAL_CONTROL_SECRET"  # nginx's environment only: never a replica's, never its config file
CONTROL_SECRET_HEADER = "X-Corral-Control"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def missing_parts() -> list[str]:
    """What the nginx data plane needs and this machine lacks (empty: it can run)."""
    missing = []
    if nginx_binary() is None:
        missing.append("nginx (apt-get install nginx-light)")
    if not all(m.exists() for m in MODULES):
        missing.append("the Lua module (apt-get install libnginx-mod-http-lua)")
    if not Path("/usr/share/lua/5.1/ngx/balancer.lua").exists():
        missing.append("lua-resty-core (installed with libnginx-mod-http-lua)")
    if not any(Path(p.replace("?", "cjson")).exists() for p in LUA_CPATH.split(";")):
        missing.append("lua-cjson (apt-get install lua-cjson)")
    return missing


def _lua_string(text: str) -> str:
    return json.dumps(text)  # ASCII text: a JSON string is a Lua string literal


def render_config(workdir: Path, host: str, port: int, control_socket: Path, connect_timeout_s: float,
                  read_timeout_s: float, drain_timeout_s: float, workers: int, limits: GatewayLimits | None = None,
                  worker_user: str | None = None, replica_user: str | None = None) -> str:
    """The nginx configuration. On timeouts: nginx has one read timeout for the response headers and
    for the silences between chunks (`proxy_read_timeout`), so it cannot tell a hung replica from a
    busy one (a non-streaming completion sends nothing until it is done; a stream may wait long for
    its first token): it keeps the read timeout, and a hung replica leaves rotation through its
    failed health checks (the replica supervisor, or Kubernetes readiness) while the requests it
    already holds wait up to the read timeout. The Python data plane checks a replica silent past the
    first-byte timeout instead (see proxy.py). Outlier detection otherwise is the same (domain/outliers.py,
    the numbers in `configure`): the Lua code counts failures in a row and ejects within the cap, and worker 0
    health-checks suspected and ejected replicas (`init_worker`).

    On retries (domain/retries.py, the same rule as proxy.py): `proxy_next_upstream error timeout` without
    `non_idempotent`, so nginx itself never passes a POST to another replica once the request was sent to
    one; for every method the Lua balancer retries only an attempt that wrote no byte to its replica
    (`$upstream_bytes_sent`), within the service's retry budget, once (`proxy_next_upstream_tries 2`).

    On clients that leave: `proxy_ignore_client_abort` stays off, so nginx closes the replica's connection
    as soon as it notices the client's closed (epoll's EPOLLRDHUP, while waiting for the response headers
    and while streaming), and `lua_check_client_abort on` ends a request the Lua code holds (the hold queue)
    when its client leaves. The log phase runs the Lua accounting in every location of the server
    (`log_by_lua` at server level): a request answered through `error_page` (an internal redirect, which
    drops `ngx.ctx`) still gives its replica's place back, from the `$corral_*` variables.

    As root, the worker processes (which parse every client's request and run the Lua code) run as `worker_user`
    (`CORRAL_GATEWAY_USER`, default nobody), never as root and never as the replicas' account (a replica could then
    signal a worker or read its memory): `worker_account`. They cannot enter the private data dir, so the files
    they spool large request bodies to live in a directory of their own (`worker_temp_dir`)."""
    limits = limits or GatewayLimits()
    account = worker_account(worker_user, replica_user) if os.geteuid() == 0 else None
    spool = worker_temp_dir(workdir) if account else workdir / "tmp"
    too_large = _lua_string(too_large_message(limits.max_body_bytes))
    temp = "\n".join(f"  {k}_temp_path {spool}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    modules = "\n".join(f"load_module {m};" for m in MODULES)
    buckets = "{" + ", ".join("math.huge" if math.isinf(b) else repr(b) for b in BUCKETS) + "}"  # the same as Python's
    hold = (f"{{ timeout = {limits.hold_timeout_s!r}, queue = {limits.hold_queue}, "
            f"retry_after = {RETRY_AFTER_S}, "
            f"held_suffix = {_lua_string(held_too_long_suffix(limits.hold_timeout_s))}, "
            f"full_suffix = {_lua_string(hold_full_suffix(limits.hold_queue))} }}")  # the same as proxy.py's
    budget = limits.retry_budget
    not_retried = ", ".join(f"[{status}] = {_lua_string(suffix)}" for status, suffix in NOT_RETRIED.values())
    retry = (f"{{ percent = {budget.percent!r}, min = {budget.min_retries}, window = {budget.window_s}, "
             f"spent_suffix = {_lua_string(budget_spent_suffix(budget))}, not_retried = {{ {not_retried} }} }}")
    policy = limits.outliers
    outlier = (f"{{ failures = {policy.consecutive_failures}, probes = {policy.failed_probes}, "
               f"passes = {policy.passed_probes}, base = {float(policy.base_ejection_s)!r}, "
               f"max = {float(policy.max_ejection_s)!r}, percent = {float(policy.max_ejection_percent)!r}, "
               f"decay = {float(policy.decay_s)!r}, interval = {float(limits.probe_interval_s)!r}, "
               f"timeout = {float(limits.health_probe_timeout_s)!r} }}")  # the same as proxy.py's
    fairness = (f"{{ prompt = {PROMPT_COST!r}, completion = {COMPLETION_COST!r}, "
                f"bytes_per_token = {BYTES_PER_TOKEN} }}")  # domain/fairness.py's
    user = f"user {account[0]} {account[1]};\n" if account else ""
    return f"""# Generated by Corral; rewritten on every start. Routing changes never touch this file.
{modules}
{user}worker_processes {workers};
daemon off;
env {CONTROL_SECRET_ENV};  # the control channel's secret (`control_secret`), for init_by_lua: not in this file
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_shutdown_timeout {max(1, int(drain_timeout_s))}s;
events {{ worker_connections 16384; }}
http {{
  access_log off;
{temp}
  lua_package_path "{LUA_DIR}/?.lua;{LUA_PATH};;";
  lua_package_cpath "{LUA_CPATH};;";
  lua_shared_dict corral_routes {ROUTES_DICT};
  lua_shared_dict corral_quota 8m;  # keys' last use and the quota windows (per service and key, minute and day)
  lua_shared_dict corral_stats 16m;
  lua_shared_dict corral_retry 4m;  # per service and second: requests and retries (the retry budget)
  lua_shared_dict corral_affinity {AFFINITY_DICT};  # prefix key → replica (domain/replica_picking.py), LRU
  init_by_lua_block {{ corral = require "corral_gateway"; corral.configure({buckets}, {hold}, {retry}, {outlier}, {fairness}) }}
  init_worker_by_lua_block {{ corral.init_worker() }}  # worker 0 health-checks suspected and ejected replicas
  lua_socket_log_errors off;  # (a failed health check is an outcome, not an error to log)
  upstream corral_replicas {{
    server 0.0.0.1;  # placeholder: the Lua balancer sets the peer of every request
    balancer_by_lua_block {{ corral.balance() }}
    keepalive 1024;
  }}
  server {{
    listen {host}:{port} reuseport;
    server_tokens off;
    client_header_timeout {int(limits.client_header_timeout_s * 1000)}ms;
    client_body_timeout {int(limits.client_body_timeout_s * 1000)}ms;
    client_max_body_size {limits.max_body_bytes};
    client_body_buffer_size 1m;  # bodies up to this stay in memory; larger ones are spooled to tmp/, never block
    # A client silent past either timeout gets its connection closed (nginx sends no 408 then).
    error_page 400 494 =400 /.corral/400;  # a URI, not a named location: a request line nginx could not parse has none
    error_page 413 = @too_large;
    log_by_lua_block {{ corral.log() }}  # every location, those reached through error_page included
    location /s/ {{
      set $corral_service "";
      set $corral_replica "";  # the replica of the last attempt
      set $corral_claim "";  # the replica whose place (`if:`) the request holds
      set $corral_started "";  # when the attempt counted in `ip:` started
      set $corral_refusal "";  # why the balancer refused a retry: `budget`, or 502/504 (the request was sent)
      set $corral_attempts "";  # attempts sent to a replica
      set $corral_judged "";  # the attempt whose outcome the balancer counted (outlier detection)
      lua_check_client_abort on;  # a held request whose client left ends there
      access_by_lua_block {{ corral.route() }}
      proxy_pass http://corral_replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_next_upstream error timeout;
      proxy_next_upstream_tries 2;
      proxy_connect_timeout {int(connect_timeout_s * 1000)}ms;
      proxy_send_timeout {int(read_timeout_s * 1000)}ms;
      proxy_read_timeout {int(read_timeout_s * 1000)}ms;
      header_filter_by_lua_block {{ corral.header() }}
      body_filter_by_lua_block {{ corral.body() }}
      error_page 502 504 = @unavailable;
      error_page 400 494 =400 /.corral/400;  # error_page on this level replaces the server's, so repeated
      error_page 413 = @too_large;
    }}
    location @unavailable {{ content_by_lua_block {{ corral.unavailable() }} }}
    location = /.corral/400 {{ internal; content_by_lua_block {{ corral.client_error(400, "malformed request (request line or headers, at most 8 KiB a line)") }} }}
    location @too_large {{ content_by_lua_block {{ corral.client_error(413, {too_large}) }} }}
    location / {{ content_by_lua_block {{ corral.no_route() }} }}
    location = /s {{ content_by_lua_block {{ corral.no_route() }} }}  # else nginx redirects to /s/
  }}
  server {{  # the control channel: a unix socket only the control plane's user can open
    listen unix:{control_socket};
    client_body_buffer_size {CONTROL_BODY_BUFFER};
    client_max_body_size {CONTROL_BODY_MAX};
    location = /routes {{ content_by_lua_block {{ corral.set_routes() }} }}
    location = /version {{ content_by_lua_block {{ corral.get_version() }} }}
    location = /inputs {{ content_by_lua_block {{ corral.set_inputs() }} }}
    location = /stats {{ content_by_lua_block {{ corral.get_stats() }} }}
    location = /prune {{ content_by_lua_block {{ corral.prune() }} }}
    location = /keys-used {{ content_by_lua_block {{ corral.keys_used() }} }}
    location = /quota {{ content_by_lua_block {{ corral.quota_windows() }} }}
    location / {{ return 404; }}
  }}
}}
"""


DEFAULT_WORKER_USER = "nobody"


def worker_account(name: str | None, replica_user: str | None = None) -> tuple[str, str]:
    """As root: the (user, group) nginx's workers run as: `name`, or nobody. Refused (ValueError, said at start): an
    unknown account, root, or the replicas' account (`CORRAL_REPLICA_USER`)."""
    name = name or DEFAULT_WORKER_USER
    entry = unprivileged_account(name, "CORRAL_GATEWAY_USER")
    if replica_user and replica_user == name:
        raise ValueError(f"CORRAL_GATEWAY_USER: {name!r} is also the replicas' account (CORRAL_REPLICA_USER): a replica "
                         "could then signal nginx's workers; give each its own")
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return name, group


def worker_temp_dir(workdir: Path) -> Path:
    """As root: where nginx's workers spool large request bodies (outside the private data dir, which they cannot
    enter): a directory of the system temp dir named after the workdir, owned by the workers' account (0700)."""
    return Path(tempfile.gettempdir()) / f"corral-nginx-{_workdir_digest(workdir)}"


def _workdir_digest(workdir: Path) -> str:
    """A short name for the workdir, for what Corral keeps of it in the system temp dir."""
    return hashlib.sha256(os.fsencode(workdir.resolve())).hexdigest()[:16]


def worker_dir(path: Path, user: str) -> Path:
    """Create `path` for the workers' account (mode 0700, owned by it) or check that it is root's or theirs; refuse a
    link or a directory someone else made (the system temp dir is everyone's)."""
    entry = pwd.getpwnam(user)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, entry.pw_uid):
        raise RuntimeError(f"{path} must be a directory owned by root or {user}")
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, 0o700)
    return path


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) or check that it is ours; refuse a directory someone else owns."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(f"{path} must be a directory owned by this user (uid {os.getuid()})")
    os.chmod(path, 0o700)
    return path


def control_socket_path(workdir: Path) -> Path:
    """`<workdir>/control/control.sock`; where that path is too long for a unix socket address, a
    private directory in the system temp dir named after the workdir."""
    path = workdir.resolve() / "control" / "control.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.gettempdir()) / f"corral-{os.getuid()}-{_workdir_digest(workdir)}" / "control.sock"


def _stat(pid: int) -> tuple[str, int] | None:
    """(when `pid` started: field 22 of /proc/<pid>/stat, its parent); None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (fields[19], int(fields[1]))


def _started(pid: int) -> str | None:
    return stat[0] if (stat := _stat(pid)) else None


def generation_processes(workdir: Path) -> dict[int, str]:
    """Every live nginx process of this workdir, of any generation, pid → start time: an `nginx` process (its
    `comm`) started with this prefix, or holding the workdir's error log or output open (the workers inherit them;
    a worker's command line names no prefix). A worker whose master was SIGKILLed is found this way too."""
    workdir = workdir.resolve()
    prefix = os.fsencode(workdir)
    marks = {str(workdir / "error.log"), str(workdir / "nginx.out")}
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "comm").read_text().strip() != "nginx" or (started := _started(int(entry.name))) is None:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
            ours = any(a == b"-p" and b == prefix for a, b in zip(args, args[1:], strict=False))
            if not ours:
                for fd in (entry / "fd").iterdir():
                    try:
                        if os.readlink(fd) in marks:
                            ours = True
                            break
                    except OSError:
                        continue
        except OSError:
            continue  # gone, or not ours to read
        if ours:
            found[int(entry.name)] = started
    return found


def stop_generations(workdir: Path, timeout_s: float = 5.0, keep: int | None = None) -> None:
    """Stop every nginx process of `workdir` (`generation_processes`) but the master `keep` and its workers:
    SIGTERM, then SIGKILL what is left after `timeout_s`; returns once all are gone (else raises)."""
    processes = {pid: start for pid, start in generation_processes(workdir).items()
                 if keep is None or (pid != keep and (stat := _stat(pid)) is not None and stat[1] != keep)}
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 2.0)):
        left = {pid: start for pid, start in processes.items() if _started(pid) == start}
        if not left:
            return
        log.warning("stopping %d process(es) of an earlier nginx of %s (%s): %s", len(left), workdir, sig.name,
                    sorted(left))
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_started(pid) == start for pid, start in left.items()):
            time.sleep(0.02)
    if left := [pid for pid, start in processes.items() if _started(pid) == start]:
        raise RuntimeError(f"nginx processes of an earlier generation of {workdir} would not stop: {left}")


class _Adopted:
    """A running nginx master this control plane adopted (it did not start it): what the plane uses of `Popen`."""

    def __init__(self, pid: int, started: str) -> None:
        self.pid, self._started, self.returncode = pid, started, None

    def poll(self) -> int | None:
        if self.returncode is None and _started(self.pid) != self._started:
            self.returncode = -1  # not our child: its exit status is unknown
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        while (code := self.poll()) is None:
            time.sleep(0.05)
        return code


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def control_secret(control_dir: Path, renew: bool = False) -> str:
    """The control channel's secret: every call on the control socket carries it (`CONTROL_SECRET_HEADER`), and
    the Lua code refuses a call without it (403). The socket is already 0600 in a 0700 directory; the secret is
    a second lock for whatever can reach the socket but was never given the secret: it lives in that private
    directory (0600) and in nginx's environment, never in a replica's environment, arguments or files, nor in
    nginx.conf. A new nginx gets a new one (`renew`); a control plane that adopts a running nginx reads it.
    A replica running as the same user could still read the file (or nginx's /proc environ): the boundary
    against replicas is a different user (`CORRAL_REPLICA_USER`, README "Security")."""
    path = control_dir / "secret"
    if not renew:
        try:
            return path.read_text().strip()
        except OSError:
            pass
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret)
    return secret


def blocking_control_get(control_socket: Path, path: str, timeout_s: float, secret: str) -> dict[str, Any]:
    """One GET on the control socket, for code that cannot await and runs off the event loop or before it
    serves (start-up, in a thread on a restart)."""
    connection = _UnixHTTPConnection(control_socket, timeout_s)
    try:
        connection.request("GET", path, headers={CONTROL_SECRET_HEADER: secret})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"nginx control {path}: {response.status} {data[:200]!r}")
    return json.loads(data)


def _limits_payload(limits: Limits) -> dict[str, int]:
    return {k: v for k, v in limits.wire().items() if v is not None}  # (absent: no limit; Lua reads a JSON null as a value)


def access_payload(access: RouteAccess) -> dict[str, Any]:
    """A service's verifier table and limits for the Lua code: keys by their SHA-256, never the keys."""
    keys = {}
    for k in access.keys:
        entry: dict[str, Any] = {"id": k.id}
        if k.expires_at is not None:
            entry["exp"] = k.expires_at
        if k.limits.any:
            entry["limits"] = _limits_payload(k.limits)
        if k.weight != WEIGHT_DEFAULT:  # (absent: 1; the Lua code reads `entry.weight or 1`)
            entry["weight"] = k.weight
        keys[k.digest] = entry
    payload: dict[str, Any] = {"auth": access.auth.value, "keys": keys}
    if access.limits.any:
        payload["limits"] = _limits_payload(access.limits)
    if access.business is not None:
        payload["business"] = access.business
    return payload


def quota_usage(counts: Mapping[str, int], now: float) -> dict[str, Usage]:
    """The Lua quota keys (`r:`/`t:<scope>|<minute>`, `d:<scope>|<day>`) of the current windows, as `Usage` per scope."""
    minute, day = int(now // MINUTE_S), int(now // DAY_S)
    found: dict[str, Usage] = {}
    for key, value in counts.items():
        kind, _, rest = key.partition(":")
        scope, _, stamp = rest.rpartition("|")
        if not stamp.isdigit() or int(stamp) != (day if kind == "d" else minute):
            continue
        usage = found.setdefault(scope, Usage(minute=minute, day=day))
        if kind == "r":
            usage.requests = int(value)
        elif kind == "t":
            usage.tokens = int(value)
        elif kind == "d":
            usage.day_tokens = int(value)
    return found


def table_payload(table: RoutingTable) -> bytes:
    routes = {}
    for name, route in table.items():
        targets = []
        for t in route.targets:
            host, _, port = t.endpoint.removeprefix("http://").rpartition(":")
            target = {"name": t.name, "host": host, "port": int(port)}
            if t.rewrite_model:
                target["rewrite"] = True
            if t.concurrency is not None:
                target["concurrency"] = t.concurrency
            if t.health_path != "/health":
                target["health"] = t.health_path
            targets.append(target)
        # `model`: the tag, for rewriting a request's model where an engine does not answer to it, and for naming the
        # model in an engine's error instead of its path on disk (domain/engine_errors.py).
        routes[name] = {"message": route.no_replica_message(), "busy": route.busy_message(),
                        "targets": targets, "model": route.model}
        if route.answers_models():
            routes[name]["models"] = route.models_list()
        if route.access is not None:  # keys and quotas (the Lua `check_access`)
            routes[name]["access"] = access_payload(route.access)
        if route.routing.policy is RoutingPolicy.PREFIX_AWARE:  # else least-load (the Lua `pick`)
            w = route.routing.weights
            routes[name]["picking"] = {"prefix": w.prefix, "queue": w.queue, "kv": w.kv_cache}
    return json.dumps(routes).encode()


class NginxStats:
    """The Lua counters in nginx's shared memory, as a `TrafficStats` (the keys are listed at the top of
    corral_gateway.lua), from the copy the plane keeps (`NginxGateway.stats_now`): synchronous readers
    (`/api/metrics`, the pool status) never wait on nginx. The copy is at most `STATS_REFRESH_S` old (the
    load monitor's readings, or a background task); `await refresh()` first makes it current where a reader
    can await (the API does), while nginx answers within `STATS_READ_TIMEOUT_S`.
    """

    def __init__(self, plane: NginxGateway) -> None:
        self._plane = plane
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TrafficCollector(self.snapshot))

    async def refresh(self) -> None:
        """Read what changed in nginx now (bounded by `STATS_READ_TIMEOUT_S`; the last copy when nginx is slow)."""
        await self._plane.refresh_stats(STATS_READ_TIMEOUT_S)

    def snapshot(self) -> TrafficStats:
        return self._plane.traffic_now()

    def replica_summary(self, replicas: set[str]) -> dict[str, dict[str, float | int]]:
        return self.snapshot().replica_summary(replicas)

    def prometheus(self) -> str:
        return generate_latest(self.registry).decode()


def parse_stats(raw: dict[str, float]) -> TrafficStats:
    """nginx's counters (`GET /stats` on the control socket) as a `TrafficStats`."""
    view = TrafficStats()
    ejected: set[str] = set()
    view.ejected = ejected
    buckets = len(BUCKETS)
    for key, value in raw.items():
        kind, _, rest = key.partition(":")
        if kind == "if":
            if value > 0:
                view.in_flight_by_replica[rest] = int(value)
        elif kind == "ip":
            if value > 0:
                service, _, replica = rest.partition("|")
                view.in_flight_by_pair[(service, replica)] = int(value)
        elif kind == "ej":
            ejected.add(rest)
        elif kind == "rj":
            service, _, code = rest.rpartition("|")
            view.rejected[(service, int(code))] = int(value)
        elif kind == "hq":
            if value > 0:
                view.held[rest] = int(value)
        elif kind == "hs":
            view.held_wait_sum[rest] = float(value)
        elif kind == "cc":
            view.client_cancelled[rest] = int(value)
        elif kind == "hb":
            service, _, index = rest.rpartition("|")
            if index.isdigit() and int(index) < buckets:
                view.held_wait.setdefault(service, [0] * buckets)[int(index)] = int(value)
        elif kind in METER_FIELDS:
            service, _, key_id = rest.partition("|")
            view.metered.setdefault((service, key_id or None), [0, 0, 0, 0])[METER_FIELDS[kind]] = int(value)
        elif kind in ("lb", "tb"):
            pair, _, index = rest.rpartition("|")
            service, _, replica = pair.partition("|")
            if index.isdigit() and int(index) < buckets:
                c = view.by_pair[(service, replica)]
                (c.latency if kind == "lb" else c.ttfb)[int(index)] = int(value)
        elif kind in COUNTER_FIELDS:
            service, _, replica = rest.partition("|")
            c = view.by_pair[(service, replica)]
            field = COUNTER_FIELDS[kind]
            setattr(c, field, float(value) if field.endswith("_sum") else int(value))
    return view


METER_FIELDS = {"mq": 0, "mp": 1, "mc": 2, "me": 3}  # per "<service>|<key id>": TrafficStats.metered's positions
COUNTER_FIELDS = {"rq": "requests", "er": "errors", "lt": "latency_sum", "ts": "ttfb_sum", "tk": "tokens", "tu": "usage"}
OUTLIER_KINDS = frozenset({"ej", "ea", "en", "ew", "ot", "oc"})


def parse_outliers(raw: dict[str, Any]) -> dict[str, Outlier]:
    """The Lua code's outlier records (`ej:` until, `ea:` at, `en:` count, `ew:` why, `ot:` readmitted at, `oc:`
    failures in a row) as `Outlier`s, per replica that has one."""
    fields: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        kind, _, name = key.partition(":")
        if kind in OUTLIER_KINDS:
            fields.setdefault(name, {})[kind] = value
    out = {}
    for name, f in fields.items():
        until = f.get("ej")
        ejected = isinstance(until, (int, float)) and not isinstance(until, bool)
        why = f.get("ew")
        out[name] = Outlier(
            failures=int(f.get("oc") or 0), ejections=int(f.get("en") or 0),
            ejected_at=float(f.get("ea") or 0.0) if ejected else None, until=float(until) if ejected else None,
            readmitted_at=float(f["ot"]) if isinstance(f.get("ot"), (int, float)) else None,
            reason=Reason(why) if ejected and why in {r.value for r in Reason} else None)
    return out


CONTROL_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError)


class NginxGateway:
    """Runs and feeds the nginx data plane; same surface as `corral.gateway.proxy.Gateway`:
    `start()`, `close()`, `push(table, version)`, `served_version()`, `drain()`, `stats`."""

    def __init__(self, workdir: Path, host: str, port: int, connect_timeout_s: float, read_timeout_s: float,
                 drain_timeout_s: float, workers: int = 1, control_timeout_s: float = 5.0,
                 limits: GatewayLimits | None = None, worker_user: str | None = None,
                 replica_user: str | None = None) -> None:
        """`worker_user`, `replica_user`: as root, the account nginx's workers run as (default nobody) and the
        replicas' one, which must differ (`render_config`)."""
        self.workdir = workdir
        self.host, self.port = host, port
        self.control_socket = control_socket_path(workdir)
        self.control_timeout_s = control_timeout_s
        self.limits = limits or GatewayLimits()
        self._config: dict[str, Any] = dict(connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
                                            drain_timeout_s=drain_timeout_s, workers=workers, limits=self.limits,
                                            worker_user=worker_user, replica_user=replica_user)
        self._process: subprocess.Popen | _Adopted | None = None
        # Added to every version pushed: the version an adopted nginx served (a new control plane counts from 1).
        self._version_base = 0
        self._secret = ""  # the control channel's (`control_secret`), set when nginx is started or adopted
        # `corral serve` whose replicas outlive it (the default): nginx keeps serving them with the last table when
        # it stops, and the next one adopts it (`_adopt`), so a restart has no gap. Off: `close` stops nginx.
        self.outlive_control_plane = False
        self._session: aiohttp.ClientSession | None = None
        self._restart_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()  # one counters read at a time (each takes what changed since the last)
        self._units: dict[str, dict[str, Any]] = {}  # the copy of nginx's counters, per unit (corral_gateway.lua)
        self._stats_seq, self._stats_epoch = 0, None  # where the last read ended, in which nginx
        self.last_read: tuple[bool, frozenset[str]] = (False, frozenset())  # (a full read?, the units it brought)
        self._stats_raw: dict[str, Any] = {}  # the copy, flat
        self._traffic: TrafficStats | None = None  # the copy, parsed (once per read)
        self._stats_live = False  # nginx answered the last counters read
        self._stats_read_at = 0.0  # monotonic time of the last successful read (the monitor's or the refresher's)
        self._stats_task: asyncio.Task | None = None
        self.table: RoutingTable = {}  # the last table pushed
        # The quota windows as last read (`served_version`, once a second): given back to an nginx that restarted
        # with empty shared memory, before its table (`push`), so a restart does not reset a tenant's counts.
        self._quota_seen: dict[str, int] = {}
        self.stats = NginxStats(self)
        # Ejections, readmissions and cap refusals (decided by the Lua code, seen by the reads).
        self.on_outlier: Callable[[OutlierEvent], None] | None = None
        self._outliers: dict[str, Outlier] = {}  # as last read
        self._capped: dict[str, int] = {}  # replica → cap refusals, as last read
        self._departed: dict[str, float] = {}  # replica → when it left every route (pruning)
        self._services_departed: dict[str, float] = {}  # service → when it left the table

    # lifecycle ---------------------------------------------------------------------------------
    @property
    def counters_from_zero(self) -> bool:
        """nginx's counters started at zero with this control plane: it launched nginx rather than adopting one
        that served before (the load monitor's first reading: `LoadMonitor.start`)."""
        return not isinstance(self._process, _Adopted)

    def start(self) -> None:
        """Start nginx (blocking until its control socket answers: nothing is served before) and the
        counters refresher. Its routing table is empty (version 0) until the first push. A healthy nginx of this
        workdir that a control plane left running (killed, crashed) is adopted instead: it serves its table until
        the first push, with no gap (`_adopt`)."""
        if not self._adopt():
            self._launch_and_wait()
        if self._stats_task is None:
            self._stats_task = asyncio.get_running_loop().create_task(self._refresh_stats(), name="nginx-stats")

    def _adopt(self) -> bool:
        """Adopt the running nginx of `nginx.pid` if it has this configuration and answers its control socket;
        stop every other process of an earlier generation (`stop_generations`)."""
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        private_dir(self.control_socket.parent)
        try:
            master = int((self.workdir / "nginx.pid").read_text().strip())
            same = (self.workdir / "nginx.conf").read_text() == render_config(
                self.workdir, self.host, self.port, self.control_socket, **self._config)
        except (OSError, ValueError):
            return False
        started = _started(master)
        if not same or started is None or master not in generation_processes(self.workdir):
            return False
        try:
            self._secret = control_secret(self.control_socket.parent)
            version = int(blocking_control_get(self.control_socket, "/version", 1.0, self._secret)["version"])
        except (OSError, http.client.HTTPException, RuntimeError, ValueError, KeyError, TypeError):
            return False
        stop_generations(self.workdir, keep=master)
        self._process, self._version_base = _Adopted(master, started), version
        self._stats_live = True
        log.info("adopted the running nginx data plane (pid %d, table version %d) on %s:%d", master, version,
                 self.host, self.port)
        return True

    def _launch_and_wait(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        private_dir(self.control_socket.parent)
        if os.geteuid() == 0:  # the workers' own spool directory (render_config)
            account = worker_account(self._config["worker_user"], self._config["replica_user"])
            worker_dir(worker_temp_dir(self.workdir), account[0])
        self._stop_leftover()
        self.control_socket.unlink(missing_ok=True)
        self._secret = control_secret(self.control_socket.parent, renew=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(render_config(self.workdir, self.host, self.port, self.control_socket, **self._config))
        binary = nginx_binary()
        assert binary, missing_parts()
        log_file = open(self.workdir / "nginx.out", "ab")  # noqa: SIM115 (kept open for the child)
        self._process = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.workdir)], umask=0o077,
                                         stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, CONTROL_SECRET_ENV: self._secret})
        deadline = time.monotonic() + 15
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited at start: {(self.workdir / 'nginx.out').read_text()[-2000:]}")
            try:
                blocking_control_get(self.control_socket, "/version", 1.0, self._secret)
                break
            except (OSError, http.client.HTTPException, RuntimeError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        os.chmod(self.control_socket, 0o600)
        self._stats_live = True
        log.info("nginx data plane on %s:%d (control socket %s)", self.host, self.port, self.control_socket)

    async def close(self) -> None:
        await stop(self._stats_task)
        if self._session:
            await self._session.close()
        if self.outlive_control_plane and self._process and self._process.poll() is None:
            log.info("the nginx data plane (pid %d) keeps serving the replicas with the last routing table; the next "
                     "`corral serve` adopts it", self._process.pid)
            return
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)  # graceful: in-flight requests finish
            try:
                await within(self._config["drain_timeout_s"] + 5, asyncio.to_thread(self._process.wait))
            except TimeoutError:
                self._process.kill()
        try:
            await asyncio.to_thread(stop_generations, self.workdir)  # the workers of a master that was SIGKILLed
        except RuntimeError as exc:
            log.error("%s", exc)

    def _stop_leftover(self) -> None:
        """Every process of an earlier nginx generation of this workdir (a master left by a control plane that
        died, the workers of a master killed with SIGKILL) holds the port with an old table: stop them all."""
        stop_generations(self.workdir)

    async def _ensure_running(self) -> None:
        if self._process is None:
            raise RuntimeError("the nginx data plane is not started")
        if self._process.poll() is None:
            return
        async with self._restart_lock:
            if self._process.poll() is None:
                return
            log.error("nginx exited (code %s); restarting the data plane", self._process.returncode)
            if self._session:
                await self._session.close()  # its connections went to the old nginx
                self._session = None
            await asyncio.to_thread(self._launch_and_wait)

    # control channel ---------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.control_socket)))
        return self._session

    async def _control(self, method: str, path: str, body: bytes | None = None, timeout_s: float | None = None) -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.control_timeout_s)
        async with self._client().request(method, "http://nginx" + path, data=body, timeout=timeout,
                                          headers={CONTROL_SECRET_HEADER: self._secret}) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"nginx control {path}: {response.status} {data[:300]!r}")
            return json.loads(data)

    async def keys_last_used(self) -> dict[str, float]:
        """Key id → when a request last presented it (epoch seconds), as the Lua code saw it."""
        return {str(k): float(v) for k, v in (await self._control("GET", "/keys-used")).items()}

    # routing -----------------------------------------------------------------------------------
    async def push(self, table: RoutingTable, version: int, replace: bool = False) -> int:
        """Give nginx `table` as `version`; returns the version nginx serves now (never older than one
        it served: a stale push does not replace a newer table, unless `replace`: the repair of a version
        nobody here pushed, `sync.RoutingSync`). Restarts nginx if it exited."""
        now = time.time()
        live_before = {t.name for route in self.table.values() for t in route.targets}
        live = {t.name for route in table.values() for t in route.targets}
        self._departed = departures(live_before, live, self._departed, now)
        self._services_departed = departures(set(self.table), table.keys(), self._services_departed, now)
        self.table = table
        await self._ensure_running()
        body = table_payload(table) if len(table) < 2000 else await asyncio.to_thread(table_payload, table)
        if self._quota_seen:  # (nginx adds only the windows it lacks: its own counts are never replaced)
            await self._control("POST", "/quota", json.dumps(self._quota_seen).encode())
        query = f"version={int(version) + self._version_base}" + ("&replace=1" if replace else "")
        answer = await self._control("POST", f"/routes?{query}", body)
        return max(0, int(answer["version"]) - self._version_base)

    async def served_version(self) -> int:
        """The version of the table nginx serves; 0 when nginx restarted (empty shared memory) or exited."""
        if self._process is None or self._process.poll() is not None:
            return 0
        served = max(0, int((await self._control("GET", "/version"))["version"]) - self._version_base)
        if served and any(route.access is not None for route in self.table.values()):
            self._quota_seen = {str(k): int(v) for k, v in (await self._control("GET", "/quota")).items()}
        return served

    def quota_windows(self) -> dict[str, Usage]:
        """Each quota scope's current windows (`s:<service>`, `k:<key id>`), as last read from nginx."""
        return quota_usage(self._quota_seen, time.time())

    async def push_inputs(self, inputs: Mapping[str, ReplicaInputs]) -> None:
        """The engines' figures per replica, for replica picking (domain/replica_picking.py; the Lua `inputs`)."""
        if self._process is None or self._process.poll() is not None:
            return  # the next push (every second) reaches the restarted nginx
        await self._control("POST", "/inputs", json.dumps({name: i.wire() for name, i in inputs.items()}).encode())

    # counters ----------------------------------------------------------------------------------
    async def read_stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Read what changed in nginx's counters since the last read (serialised: one read at a time) into the
        copy kept here; the copy, flat (key → value, as `parse_stats` takes it)."""
        async with self._read_lock:
            query = urlencode({"since": self._stats_seq, "epoch": self._stats_epoch}) if self._stats_epoch else ""
            answer = await self._control("GET", "/stats" + (f"?{query}" if query else ""), timeout_s=timeout_s)
            units = answer.get("units") or {}
            if answer.get("full") or answer.get("epoch") != self._stats_epoch:
                self._units = {}
            for unit, values in units.items():
                if values:
                    self._units[unit] = values
                else:
                    self._units.pop(unit, None)
            self._stats_seq, self._stats_epoch = int(answer.get("seq", 0)), answer.get("epoch")
            self.last_read = (bool(answer.get("full")), frozenset(units))
            self._stats_raw = {key: value for values in self._units.values() for key, value in values.items()}
            self._traffic = None
            self._stats_live, self._stats_read_at = True, time.monotonic()
            self._outlier_events()
            return self._stats_raw

    async def read_counters(self) -> Sample:
        """The traffic counters now (the load monitor's once-a-second reading). It also keeps the copy
        synchronous readers use current, so the background refresh skips its own read then."""
        try:
            await self.read_stats(timeout_s=STATS_REFRESH_S)
        except CONTROL_ERRORS:
            self._stats_live = False
            raise
        return self.traffic_now().sample()

    async def refresh_stats(self, timeout_s: float) -> None:
        """A read now, while nginx answers: on failure (or nginx known not to answer) the copy stays as it is."""
        if not self._stats_live or self._process is None or self._process.poll() is not None:
            return
        try:
            await self.read_stats(timeout_s=timeout_s)
        except CONTROL_ERRORS as exc:
            log.warning("nginx did not answer a counters read (%s); serving the last copy", exc.__class__.__name__)
            self._stats_live = False

    def stats_now(self) -> dict[str, Any]:
        """The counters as last read (never waits on nginx)."""
        return self._stats_raw

    def traffic_now(self) -> TrafficStats:
        """The counters as last read, as a `TrafficStats` (parsed once per read)."""
        if self._traffic is None:
            self._traffic = parse_stats(self._stats_raw)
            # nginx's run: its counters only grow within it (metering); "" until read once (nothing to flush yet)
            self._traffic.epoch = f"nginx-{self._stats_epoch}" if self._stats_epoch else ""
        return self._traffic

    async def _refresh_stats(self) -> None:
        while True:
            if time.monotonic() - self._stats_read_at >= STATS_REFRESH_S:  # else the load monitor just read them
                try:
                    await self.read_stats(timeout_s=STATS_REFRESH_S)
                except CONTROL_ERRORS:
                    self._stats_live = False
            try:
                await self.prune()
            except CONTROL_ERRORS:
                pass  # the next round prunes them
            await asyncio.sleep(STATS_REFRESH_S)

    async def prune(self) -> list[str]:
        """Drop the units (counters, outlier records) of replicas and services gone for `counters_retention_s`
        with nothing in flight, in nginx and in the copy; the units dropped."""
        now, keep = time.time(), self.limits.counters_retention_s
        in_flight = self.traffic_now().in_flight_by_replica
        replicas = set(prunable(self._departed, now, keep, in_flight))
        held = {s for s, n in self.traffic_now().held.items() if n > 0}
        services = set(prunable(self._services_departed, now, keep, held))
        if not replicas and not services:
            return []
        units = [f"r:{r}" for r in replicas] + [f"s:{s}" for s in services]
        for unit in self._units:
            if unit.startswith("p:"):
                service, _, replica = unit[2:].partition("|")
                if replica in replicas or service in services:
                    units.append(unit)
            elif unit.startswith("m:") and unit[2:].partition("|")[0] in services:  # metering's, per service and key
                units.append(unit)
        await self._control("POST", "/prune", json.dumps({"units": units}).encode())
        for unit in units:
            self._units.pop(unit, None)
        self._stats_raw = {key: value for values in self._units.values() for key, value in values.items()}
        self._traffic = None
        for name in replicas:
            self._departed.pop(name, None)
            self._outliers.pop(name, None)
            self._capped.pop(name, None)
        for service in services:
            self._services_departed.pop(service, None)
        return sorted(units)

    # outlier detection: the Lua code decides; this reports what it decided --------------------------
    def outliers_now(self) -> dict[str, Outlier]:
        """Replica → its outlier record as last read (the replicas with one)."""
        return parse_outliers(self._stats_raw)

    def ejection_views(self) -> dict[str, EjectionView]:
        """The replicas of the routing table out of rotation now, for the pods view."""
        live = {t.name for route in self.table.values() for t in route.targets}
        return {name: ejection_view(state, self.limits.outliers) for name, state in self._outliers.items()
                if state.ejected and name in live}

    def _outlier_events(self) -> None:
        """Compare the outlier records just read with the last ones: an ejection, a readmission, a cap refusal."""
        policy, now = self.limits.outliers, time.time()
        current = parse_outliers(self._stats_raw)
        capped = {key[3:]: int(value) for key, value in self._stats_raw.items() if key.startswith("cp:")}
        events: list[OutlierEvent] = []
        for name, state in current.items():
            before = self._outliers.get(name)
            if state.ejected and (before is None or before.ejected_at != state.ejected_at):
                events.append(ejected_event(name, state, policy))
            elif before is not None and before.ejected and not state.ejected:
                events.append(readmitted_event(name, state, now - (before.ejected_at or now), policy))
            if capped.get(name, 0) > self._capped.get(name, 0):
                reason = Reason.FAILURES if state.failures >= policy.consecutive_failures > 0 else Reason.PROBES
                events.append(capped_event(name, state, reason, policy))
        for name, before in self._outliers.items():
            if before.ejected and name not in current:  # its record went with a restart of nginx
                events.append(readmitted_event(name, Outlier(ejections=before.ejections), now - (before.ejected_at or now),
                                               policy))
        self._outliers, self._capped = current, capped
        if self.on_outlier is not None:
            for event in events:
                try:
                    self.on_outlier(event)
                except Exception:  # noqa: BLE001 (recording it must not stop the reads)
                    log.exception("could not record the outlier event of %s", event.replica)

    async def drain(self, replica: str, timeout_s: float) -> None:
        """Return once no request is in flight on `replica`, or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = await self.read_stats(timeout_s=max(0.05, min(1.0, left)))  # what changed: a few units
            except CONTROL_ERRORS:
                raw = None  # nginx not answering: keep waiting until the deadline
            if raw is not None and raw.get(f"if:{replica}", 0) <= 0:
                return
            await asyncio.sleep(0.05)
        log.warning("replica %s still had requests in flight after %.0f s of draining", replica, timeout_s)
