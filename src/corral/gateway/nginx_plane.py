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
come from the same shared memory (a snapshot refreshed in the background, see `NginxStats`). Chosen by `CORRAL_GATEWAY_DATA_PLANE=nginx` (or `auto` when the
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
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest

from corral.aio import within
from corral.domain.load import BUCKETS, Sample
from corral.gateway.proxy import (
    NOT_RETRIED,
    RETRY_AFTER_S,
    GatewayLimits,
    budget_spent_suffix,
    held_too_long_suffix,
    hold_full_suffix,
    too_large_message,
)
from corral.gateway.routing import RoutingTable
from corral.gateway.stats import TrafficCollector, TrafficStats

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
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
STATS_REFRESH_S = 1.0  # background refresh of the counters snapshot
STATS_READ_TIMEOUT_S = 0.25  # an on-demand read of the counters, only while nginx answers


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
                  read_timeout_s: float, drain_timeout_s: float, workers: int, limits: GatewayLimits | None = None) -> str:
    """The nginx configuration. On timeouts: nginx has one read timeout for the response headers and
    for the silences between chunks (`proxy_read_timeout`), so it cannot tell a hung replica from a
    busy one (a non-streaming completion sends nothing until it is done; a stream may wait long for
    its first token): it keeps the read timeout, and a hung replica leaves rotation through its
    failed health checks (the replica supervisor, or Kubernetes readiness) while the requests it
    already holds wait up to the read timeout. The Python data plane probes a replica silent past the
    first-byte timeout instead (see proxy.py).

    On retries (domain/retries.py, the same rule as proxy.py): `proxy_next_upstream error timeout` without
    `non_idempotent`, so nginx itself never passes a POST to another replica once the request was sent to
    one; for every method the Lua balancer retries only an attempt that wrote no byte to its replica
    (`$upstream_bytes_sent`), within the service's retry budget, once (`proxy_next_upstream_tries 2`).

    On clients that leave: `proxy_ignore_client_abort` stays off, so nginx closes the replica's connection
    as soon as it notices the client's closed (epoll's EPOLLRDHUP, while waiting for the response headers
    and while streaming), and `lua_check_client_abort on` ends a request the Lua code holds (the hold queue)
    when its client leaves. The log phase runs the Lua accounting in every location of the server
    (`log_by_lua` at server level): a request answered through `error_page` (an internal redirect, which
    drops `ngx.ctx`) still gives its replica's place back, from the `$corral_*` variables."""
    limits = limits or GatewayLimits()
    too_large = _lua_string(too_large_message(limits.max_body_bytes))
    temp = "\n".join(f"  {k}_temp_path {workdir}/tmp/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
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
    # As root, nginx would run its workers as an unprivileged user that cannot enter a private data dir
    # (e.g. under /root) to spool a large request body: they run as the control plane's user instead.
    user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n" if os.geteuid() == 0 else ""
    return f"""# Generated by Corral; rewritten on every start. Routing changes never touch this file.
{modules}
{user}worker_processes {workers};
daemon off;
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
  lua_shared_dict corral_stats 16m;
  lua_shared_dict corral_retry 4m;  # per service and second: requests and retries (the retry budget)
  init_by_lua_block {{ corral = require "corral_gateway"; corral.configure({buckets}, {hold}, {retry}) }}
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
    location = /stats {{ content_by_lua_block {{ corral.get_stats() }} }}
    location / {{ return 404; }}
  }}
}}
"""


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
    digest = hashlib.sha256(os.fsencode(workdir.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"corral-{os.getuid()}-{digest}" / "control.sock"


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


def blocking_control_get(control_socket: Path, path: str, timeout_s: float) -> dict[str, Any]:
    """One GET on the control socket, for code that cannot await (start-up, the counters snapshot)."""
    connection = _UnixHTTPConnection(control_socket, timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"nginx control {path}: {response.status} {data[:200]!r}")
    return json.loads(data)


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
            targets.append(target)
        routes[name] = {"message": route.no_replica_message(), "busy": route.busy_message(),
                        "targets": targets}
        if route.answers_models():
            routes[name]["models"] = route.models_list()
        if any(t.rewrite_model for t in route.targets):
            routes[name]["model"] = route.model
    return json.dumps(routes).encode()


class NginxStats:
    """The Lua counters in nginx's shared memory, as a `TrafficStats` snapshot (the keys are listed at the
    top of corral_gateway.lua).

    Callers are synchronous (`/api/metrics`, the pool status), so they never wait on nginx beyond a
    short bound: a read answers from the control socket while nginx is responsive (`STATS_READ_TIMEOUT_S`
    at most), and from the last snapshot (refreshed every `STATS_REFRESH_S` by the load monitor's
    readings, or a background task) once nginx stopped answering, until it answers again.
    """

    def __init__(self, plane: NginxGateway) -> None:
        self._plane = plane
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TrafficCollector(self.snapshot))

    def snapshot(self) -> TrafficStats:
        return parse_stats(self._plane.stats_now())

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


COUNTER_FIELDS = {"rq": "requests", "er": "errors", "lt": "latency_sum", "ts": "ttfb_sum", "tk": "tokens", "tu": "usage"}


CONTROL_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError)


class NginxGateway:
    """Runs and feeds the nginx data plane; same surface as `corral.gateway.proxy.Gateway`:
    `start()`, `close()`, `push(table, version)`, `served_version()`, `drain()`, `stats`."""

    def __init__(self, workdir: Path, host: str, port: int, connect_timeout_s: float, read_timeout_s: float,
                 drain_timeout_s: float, workers: int = 1, control_timeout_s: float = 5.0,
                 limits: GatewayLimits | None = None) -> None:
        self.workdir = workdir
        self.host, self.port = host, port
        self.control_socket = control_socket_path(workdir)
        self.control_timeout_s = control_timeout_s
        self.limits = limits or GatewayLimits()
        self._config: dict[str, Any] = dict(connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
                                            drain_timeout_s=drain_timeout_s, workers=workers, limits=self.limits)
        self._process: subprocess.Popen | None = None
        self._session: aiohttp.ClientSession | None = None
        self._restart_lock = asyncio.Lock()
        self._stats_raw: dict[str, float] = {}
        self._stats_live = False  # nginx answered the last counters read
        self._stats_read_at = 0.0  # monotonic time of the last successful read (the monitor's or the refresher's)
        self._stats_task: asyncio.Task | None = None
        self.table: RoutingTable = {}  # the last table pushed
        self.stats = NginxStats(self)

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start nginx (blocking until its control socket answers: nothing is served before) and the
        counters refresher. Its routing table is empty (version 0) until the first push."""
        self._launch_and_wait()
        if self._stats_task is None:
            self._stats_task = asyncio.get_running_loop().create_task(self._refresh_stats(), name="nginx-stats")

    def _launch_and_wait(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        private_dir(self.control_socket.parent)
        self._stop_leftover()
        self.control_socket.unlink(missing_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(render_config(self.workdir, self.host, self.port, self.control_socket, **self._config))
        binary = nginx_binary()
        assert binary, missing_parts()
        log_file = open(self.workdir / "nginx.out", "ab")  # noqa: SIM115 (kept open for the child)
        self._process = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.workdir)], umask=0o077,
                                         stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited at start: {(self.workdir / 'nginx.out').read_text()[-2000:]}")
            try:
                blocking_control_get(self.control_socket, "/version", 1.0)
                break
            except (OSError, http.client.HTTPException, RuntimeError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        os.chmod(self.control_socket, 0o600)
        self._stats_live = True
        log.info("nginx data plane on %s:%d (control socket %s)", self.host, self.port, self.control_socket)

    async def close(self) -> None:
        if self._stats_task:
            self._stats_task.cancel()
            try:
                await self._stats_task
            except asyncio.CancelledError:
                pass
        if self._session:
            await self._session.close()
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)  # graceful: in-flight requests finish
            try:
                await within(self._config["drain_timeout_s"] + 5, asyncio.to_thread(self._process.wait))
            except TimeoutError:
                self._process.kill()

    def _stop_leftover(self) -> None:
        """An nginx left by a control plane that died holds the port: stop it."""
        pid_file = self.workdir / "nginx.pid"
        try:
            pid = int(pid_file.read_text().strip())
            if b"nginx" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return  # the pid was reused by something else
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)

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
        async with self._client().request(method, "http://nginx" + path, data=body, timeout=timeout) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"nginx control {path}: {response.status} {data[:300]!r}")
            return json.loads(data)

    # routing -----------------------------------------------------------------------------------
    async def push(self, table: RoutingTable, version: int) -> int:
        """Give nginx `table` as `version`; returns the version nginx serves now (never older than one
        it served: a stale push does not replace a newer table). Restarts nginx if it exited."""
        self.table = table
        await self._ensure_running()
        body = table_payload(table) if len(table) < 2000 else await asyncio.to_thread(table_payload, table)
        answer = await self._control("POST", f"/routes?version={int(version)}", body)
        return int(answer["version"])

    async def served_version(self) -> int:
        """The version of the table nginx serves; 0 when nginx restarted (empty shared memory) or exited."""
        if self._process is None or self._process.poll() is not None:
            return 0
        return int((await self._control("GET", "/version"))["version"])

    # counters ----------------------------------------------------------------------------------
    async def read_stats(self, timeout_s: float | None = None) -> dict[str, float]:
        raw = await self._control("GET", "/stats", timeout_s=timeout_s)
        return raw if isinstance(raw, dict) else {}  # cjson encodes an empty table as {}

    async def read_counters(self) -> Sample:
        """The traffic counters now (the load monitor's once-a-second reading). It also serves as the
        snapshot synchronous readers fall back to, so the background refresh skips its own read then."""
        try:
            raw = await self.read_stats(timeout_s=STATS_REFRESH_S)
        except CONTROL_ERRORS:
            self._stats_live = False
            raise
        self._stats_raw, self._stats_live, self._stats_read_at = raw, True, time.monotonic()
        return parse_stats(raw).sample()

    def stats_now(self) -> dict[str, float]:
        """The counters for synchronous callers: fresh while nginx answers, else the last snapshot."""
        if self._stats_live and self._process is not None and self._process.poll() is None:
            try:
                raw = blocking_control_get(self.control_socket, "/stats", STATS_READ_TIMEOUT_S)
                self._stats_raw = raw if isinstance(raw, dict) else {}
            except (OSError, http.client.HTTPException, RuntimeError, ValueError) as exc:
                log.warning("nginx did not answer a counters read (%s); serving the last snapshot", exc.__class__.__name__)
                self._stats_live = False
        return self._stats_raw

    async def _refresh_stats(self) -> None:
        while True:
            if time.monotonic() - self._stats_read_at >= STATS_REFRESH_S:  # else the load monitor just read them
                try:
                    self._stats_raw = await self.read_stats(timeout_s=STATS_REFRESH_S)
                    self._stats_live, self._stats_read_at = True, time.monotonic()
                except CONTROL_ERRORS:
                    self._stats_live = False
            await asyncio.sleep(STATS_REFRESH_S)

    async def drain(self, replica: str, timeout_s: float) -> None:
        """Return once no request is in flight on `replica`, or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                raw = await self.read_stats(timeout_s=max(0.05, min(1.0, left)))
            except CONTROL_ERRORS:
                raw = None  # nginx not answering: keep waiting until the deadline
            if raw is not None and raw.get(f"if:{replica}", 0) <= 0:
                return
            await asyncio.sleep(0.05)
        log.warning("replica %s still had requests in flight after %.0f s of draining", replica, timeout_s)
