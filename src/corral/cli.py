"""The `corral` command's client commands: each talks to a Corral's API over HTTP, so this module imports no server
code (`corral.main` adds `serve` and `dev`, which start processes on this machine)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Optional

import httpx
import typer
from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from corral.domain.errors import Hint, InvalidInput, Wording, worded
from corral.domain.usage import GroupBy

app = typer.Typer(help="Corral: model pools assigned to business services, on your GPUs.", no_args_is_help=True)
service_app = typer.Typer(help="Business services: stable endpoints selecting {model, business}.", no_args_is_help=True)
app.add_typer(service_app, name="service")
finetune_app = typer.Typer(help="Finetune tasks: a queue on the same GPUs as the model pools.", no_args_is_help=True)
app.add_typer(finetune_app, name="finetune")
autopilot_app = typer.Typer(help="The autopilot: warm replicas follow demand across a pool's businesses.",
                            no_args_is_help=True)
app.add_typer(autopilot_app, name="autopilot")

console = Console()
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8080"
URL_OPTION = typer.Option(None, "--url", envvar="CORRAL_URL", show_default=False,
                          help="Corral API address (env CORRAL_URL; else http://CORRAL_HOST:CORRAL_PORT, the variables "
                               "`corral serve` reads; else http://127.0.0.1:8080)")
TOKEN_OPTION = typer.Option(None, "--token", envvar="CORRAL_API_TOKEN", help="API token, when one is configured")
OUTPUT_FORMATS = ("table", "wide", "json", "yaml", "name")
OUTPUT_OPTION = typer.Option("table", "--output", "-o", help="table | wide (more columns) | json | yaml (the API's objects, "
                                                              "unchanged) | name (one name a line)")


def client_url(host: str | None, port: str | int | None) -> str:
    """The address a client on this machine reaches a server bound to host:port at (0.0.0.0 / :: → loopback)."""
    host = (host or "").strip() or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]", "*"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port or 8080}"


def server_url(url: str | None = None, environ: Any = None) -> str:
    """--url / CORRAL_URL, else CORRAL_HOST / CORRAL_PORT (what `corral serve` binds to), else http://127.0.0.1:8080."""
    env = os.environ if environ is None else environ
    if url:
        return url
    host, port = env.get("CORRAL_HOST"), env.get("CORRAL_PORT")
    if not host and not port:
        return DEFAULT_URL
    if port and not (port.strip().isdigit() and 1 <= int(port) <= 65535):
        fail(f"CORRAL_PORT={port!r} is not a port number; set it (or CORRAL_URL, or --url) to the one `corral serve` uses")
    return client_url(host, port.strip() if port else None)


# The CLI's words for the hints of a refusal (`corral.domain.errors.Hint`): commands and flags, where the API
# words them as its paths and query parameters.
CLI_WORDING: Wording = {
    Hint.LIST_PODS: "; list pods with `corral pods`",
    Hint.LIST_SERVICES: "; list them with `corral service list`",
    Hint.LIST_DEPLOYMENTS: "; list deployments with `corral deployments`",
    Hint.LIST_FINETUNE_TASKS: "; list them with `corral finetune list`",
    Hint.LIST_ADAPTERS: "; list them with `corral adapters list {pool}`",
    Hint.REMOVE_ADAPTER: "; remove it first (`corral adapters remove {pool} {adapter}`) or choose another name",
    Hint.CREATE_SERVICE: ": create one first `corral service create NAME --pool POOL --business BUSINESS` "
                         "or choose one of: {choices}",
    Hint.SCALE_STANDARD: "; scale it with `corral scale NAME REPLICAS`",
    Hint.FORCE: " or delete with `--force`",
    Hint.FORCE_UNASSIGN: " or delete with `--force` (unassigns them)",
    Hint.DEPLOY_AS_POOL: "; deploy it as its own pool (`corral finetune deploy {task} --tag TAG`)",
    Hint.SEND_TOKEN: ": give it with --token or export CORRAL_API_TOKEN",
}


def cli_error(body: dict[str, Any]) -> str:
    """An API error body as the command line words it: its problem, and its typed hints as commands. A body
    without hints (or with one this CLI does not know, from a newer server) is shown as the API words it."""
    try:
        hints = [Hint(hint) for hint in body.get("hints") or ()]
        return worded(str(body["problem"]), hints, CLI_WORDING, body) if hints else str(body["error"])
    except (ValueError, KeyError):  # a hint this CLI does not know, or a detail it needs missing
        return str(body["error"])


class Client:
    def __init__(self, url: str | None, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = server_url(url).rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response of a successful request; anything else ends the command with its one-line reason.
        A name given on the command line goes into `path` as typed: what a URL cannot carry (a newline, a space)
        is percent-encoded, so Corral itself says what is wrong with the name (httpx would refuse the URL)."""
        from urllib.parse import quote

        path = quote(path, safe="/?&=%:@!$'()*+,;~")
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach Corral at {self.url} ({exc.__class__.__name__}); is `corral serve` running?")
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            fail(cli_error(body) if isinstance(body, dict) and isinstance(body.get("error"), str)
                 else f"HTTP {response.status_code}: {response.text}")
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.send(method, path, **kwargs).json()


def _pairs(items: list[str], convert: type, form: str) -> dict[str, Any]:
    """`key=value` arguments as a dict; the first malformed one ends the command, naming the expected form."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            parsed[key] = convert(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            fail(f"'{item}' is not {form}")
    return parsed


def _secret_env(items: list[str]) -> dict[str, str]:
    """`--secret-env NAME=VALUE`, or `--secret-env NAME` to take the value from this shell's environment (it then
    appears in no command line or shell history)."""
    import os

    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                fail(f"--secret-env {name}: no such variable in this shell's environment; export it or give NAME=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def _hyperparameter(text: str) -> int | float | bool | str:
    """`3` → 3 (an integer stays an integer), `1e-4` → 0.0001, `true`/`false` → a switch, anything else a name
    (`lrScheduler=linear`); the types and ranges are checked by `domain.hyperparameters`."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if not text:
        raise ValueError("empty")
    return text


PROGRESS_COLUMNS = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[note]}"))


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _cell(value: Any) -> Text:
    """Values from the API are text, never rich markup (a message with `[...]` is shown as it is)."""
    if isinstance(value, Text):
        return value
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    return Text("" if value is None else str(value))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table that never cuts a value: cells fold onto more lines in a narrow terminal; written to a pipe or a
    file, the table takes the width it needs (no terminal to fit)."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=False)
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    out = console if console.is_terminal else Console(width=100_000, soft_wrap=False)
    out.print(table)


class Column(NamedTuple):
    header: str
    value: Callable[[dict], Any]
    wide: bool = False  # only with `-o wide`


def _check_output(output: str) -> str:
    if output not in OUTPUT_FORMATS:
        fail(f"-o {output}: choose one of {', '.join(OUTPUT_FORMATS)}")
    return output


def _dump(output: str, data: Any) -> bool:
    """json / yaml: the API's objects as they came (types kept) on stdout; True when done."""
    if output == "json":
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    elif output == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False))
    else:
        return False
    sys.stdout.flush()
    return True


def _listing(output: str, title: str, columns: list[Column], rows: list[dict], name: str = "name") -> None:
    """A listing in the chosen format: table, wide (every column), json, yaml, or the names one a line."""
    _check_output(output)
    if _dump(output, rows):
        return
    if output == "name":
        for row in rows:
            sys.stdout.write(f"{row[name]}\n")
        return
    shown = [c for c in columns if output == "wide" or not c.wide]
    _table(title, [c.header for c in shown], [[c.value(row) for c in shown] for row in rows])


def _labels(labels: dict | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (labels or {}).items())


# deployments -----------------------------------------------------------------------------------
@app.command()
def deploy(
    engine: str = typer.Argument(..., help="vllm | sglang | transformers | simulator"),
    model_id: str = typer.Argument(..., help="local model directory or hub id"),
    tag: str = typer.Option(..., "--tag", "-t", help="model tag (the `model` label), e.g. qwen-06b"),
    replicas: int = typer.Option(1, "--replicas", "-n"),
    pool: bool = typer.Option(False, "--pool/--standard", help="deploy as a model pool (replicas start unassigned)"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs per replica (default: 1 for vllm/sglang, 0 otherwise)"),
    engine_args: str = typer.Option("", "--engine-args", help="extra engine arguments, e.g. '--max-model-len 4096'"),
    secret_env: list[str] = typer.Option([], "--secret-env", help="NAME (its value from this shell's environment) or "
                                         "NAME=VALUE: an environment variable for every replica, e.g. --secret-env "
                                         "VLLM_API_KEY; stored by Corral, never shown"),
    wait: bool = typer.Option(True, help="wait until every replica is ready, with progress"),
    timeout: float = typer.Option(900, help="seconds to wait for readiness"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Deploy a model pool or a standard deployment."""
    client = Client(url, token)
    body = {"engine": engine, "modelId": model_id, "modelTag": tag, "replicas": replicas, "deployAsPool": pool,
            "gpusPerReplica": gpus, "engineArgs": engine_args}
    if secret_env:
        body["secretEnv"] = _secret_env(secret_env)
    result = client.call("POST", "/api/deploy", json=body)
    name = result["deployment"]["name"]
    console.print(f"deployed [bold]{name}[/bold] ({result['deployment']['type']}); manifest: {result['manifestPath']}")
    if wait and replicas:
        wait_ready(client, name, replicas, timeout)


def wait_ready(client: Client, name: str, replicas: int, timeout: float) -> None:
    """A progress bar of ready replicas; crash-looping ones are named, with how to read their logs."""
    deadline = time.monotonic() + timeout
    with Progress(*PROGRESS_COLUMNS, console=console) as progress:
        task = progress.add_task(f"{name}: replicas ready", total=replicas, note="")
        while True:
            pods = client.call("GET", "/api/pods", params={"deployment": name})
            ready = sum(p["ready"] for p in pods)
            crashing = [p["name"] for p in pods if p["status"] == "CrashLoopBackOff" or p["restarts"]]
            note = f"[yellow]restarting: {', '.join(crashing)} (corral logs POD)[/yellow]" if crashing else ""
            progress.update(task, completed=ready, note=note)
            if ready >= replicas:
                return
            if time.monotonic() > deadline:
                fail(f"{ready}/{replicas} replicas ready after {timeout:.0f} s; see `corral pods` and `corral logs POD`")
            time.sleep(0.5)


@app.command()
def logs(pod: str, tail: int = typer.Option(200, "--tail", "-n"), url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Print the last lines of a replica's engine output."""
    text = Client(url, token).send("GET", f"/api/pods/{pod}/logs", params={"tail": tail}).text
    console.print(text, markup=False, highlight=False, soft_wrap=True)


DEPLOYMENT_COLUMNS = [
    Column("Name", lambda d: d["name"]),
    Column("Type", lambda d: "Model Pool" if d["isPool"] else "Standard"),
    Column("Engine", lambda d: d["engine"] + (" (simulator)" if d["isSimulator"] else "")),
    Column("Model", lambda d: d["modelName"]),
    Column("Model id", lambda d: d["modelId"], wide=True),
    Column("Replicas", lambda d: d["replicas"]),
    Column("Ready", lambda d: d["readyReplicas"]),
    Column("GPUs/replica", lambda d: d["gpusPerReplica"], wide=True),
    Column("Assignment", lambda d: d.get("assignment", "N/A")),
    Column("Scale-down available", lambda d: d.get("availableForScaleDown", "N/A")),
    Column("Engine args", lambda d: " ".join(d.get("engineArgs") or []), wide=True),
    Column("Base URL", lambda d: d.get("baseUrl") or "", wide=True),
    Column("Created", lambda d: (d.get("createdAt") or "")[:19], wide=True),
]

POD_COLUMNS = [
    Column("Name", lambda p: p["name"]),
    Column("Deployment", lambda p: p["deployment"], wide=True),
    Column("Status", lambda p: p["status"]),
    Column("Ready", lambda p: p["ready"]),
    Column("Model", lambda p: p["model"]),
    Column("Business", lambda p: p["business"] or "N/A"),
    Column("Endpoint", lambda p: p["endpoint"]),
    Column("Restarts", lambda p: p["restarts"]),
    Column("GPU ids", lambda p: ",".join(map(str, p.get("gpuIds") or [])), wide=True),
    Column("Sleep", lambda p: (p.get("sleep") or "awake") + (f" (level {p['sleepLevel']})" if p.get("sleepLevel") else ""),
           wide=True),
    Column("Labels", lambda p: _labels(p.get("labels")), wide=True),
    Column("Created", lambda p: (p.get("createdAt") or "")[:19], wide=True),
]


@app.command()
def deployments(output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """List deployments, pools included."""
    _check_output(output)
    _listing(output, "Deployments", DEPLOYMENT_COLUMNS, Client(url, token).call("GET", "/api/deployments"))


@app.command()
def pods(deployment: Optional[str] = typer.Option(None, "--deployment", "-d"), output: str = OUTPUT_OPTION,
         url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """List replicas (pods) with their status and business (`-o name`: one pod name a line, for scripts)."""
    _check_output(output)
    params = {"deployment": deployment} if deployment else {}
    _listing(output, "Pods", POD_COLUMNS, Client(url, token).call("GET", "/api/pods", params=params))


@app.command()
def delete(
    name: str,
    force: bool = typer.Option(False, help="delete a pool even while it serves businesses"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Delete a deployment and stop its replicas."""
    if not yes and sys.stdin.isatty():
        typer.confirm(f"Delete deployment {name} and stop its replicas?", abort=True)
    Client(url, token).call("DELETE", f"/api/deployments/{name}", params={"force": str(force).lower()})
    console.print(f"deleted {name}")


@app.command()
def sleep(pod: str, level: int = typer.Option(1, "--level", min=1, max=2,
                                              help="1: weights offloaded to host memory (fast wake); 2: discarded"),
          url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Put a replica to sleep (its engine needs a sleep mode, e.g. vLLM with --enable-sleep-mode): it leaves routing
    and gives its GPU memory back; `corral wake` brings it back in seconds."""
    result = Client(url, token).call("POST", f"/api/pods/{pod}/sleep", json={"level": level})
    console.print(f"{pod} is {result['sleep']} (level {result['sleepLevel']}) after {result['seconds']:.2f} s")


@app.command()
def wake(pod: str, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Wake a sleeping replica: it serves again once its weights are back on the GPU."""
    result = Client(url, token).call("POST", f"/api/pods/{pod}/wake")
    console.print(f"{pod} is {result['sleep']} after {result['seconds']:.2f} s")


@app.command()
def scale(name: str, replicas: int, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Scale a deployment; a pool only ever loses unassigned replicas."""
    result = Client(url, token).call("POST", "/api/scale-deployment", json={"deploymentName": name, "targetReplicas": replicas})
    console.print(f"{name}: {result['currentReplicas']} → {result['targetReplicas']} replicas"
                  + (f"; removed {', '.join(result['removed'])}" if result["removed"] else "")
                  + (f"; added {', '.join(result['added'])}" if result["added"] else ""))


@app.command()
def status(pool: str, output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Pool status: pods per business and how many may be scaled down (`-o wide`: gateway traffic per replica)."""
    _check_output(output)
    result = Client(url, token).call("GET", f"/api/pool-status/{pool}")
    if _dump(output, result):
        return
    if output == "name":
        sys.stdout.write(f"{result['deploymentName']}\n")
        return
    console.print(f"[bold]{pool}[/bold] (model {result['modelName']}): {result['totalPods']} pods, {result['readyPods']} ready",
                  highlight=False)
    _table("Assignment", ["Business", "Pods"], [[b, n] for b, n in result["podDistribution"].items()])
    if output == "wide" and result.get("traffic"):
        _table("Traffic", ["Replica", "Requests", "Errors", "In flight", "Mean latency ms"], [
            [name, t["requests"], t["errors"], t["inFlight"], t["meanLatencyMs"]] for name, t in result["traffic"].items()])
    console.print(f"available for scale-down: {result['availableForScaleDown']}")


# live load -------------------------------------------------------------------------------------
LOAD_COLUMNS = ["Service / replica", "Pool", "Ready", "Req/s", "In flight", "Held", "Held p95", "Err/s", "p50 ms",
                "p95 ms", "p99 ms", "TTFB p50", "TTFB p95", "Tok/s"]


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _load_cells(load: dict) -> list[str]:
    """A row's figures; `Held` (requests the gateway holds for want of a free replica, and their wait's p95
    in ms) is a service's only: a replica's cells stay empty."""
    latency, ttfb = load["latencyMs"], load["ttfbMs"]
    held = [str(load["held"]), _figure(load["heldWaitMs"]["p95"])] if "held" in load else ["", ""]
    return [_figure(load["requestsPerSecond"]), str(load["inFlight"]), *held, _figure(load["errorsPerSecond"]),
            _figure(latency["p50"]), _figure(latency["p95"]), _figure(latency["p99"]), _figure(ttfb["p50"]),
            _figure(ttfb["p95"]), _figure(load["tokensPerSecond"])]


def _sharing_table(sharing: dict) -> Table | None:
    """`GET /api/gpus/sharing` for `corral top`: the GPUs where replicas sleep (None when no replica sleeps)."""
    gpus = [g for g in sharing.get("gpus", []) if g["sleeping"]]
    if not gpus:
        return None
    timings = {m["model"]: m for m in sharing.get("models", [])}
    table = Table(title="Shared GPUs: awake and sleeping replicas (wake p50/p95 s, measured)", title_justify="left")
    for column in ("GPU", "Awake", "Sleeping"):
        table.add_column(column, overflow="fold")

    def wake(model: str) -> str:
        t = timings.get(model)
        return f" {t['wakeP50S']}/{t['wakeP95S']}" if t and t.get("wakeP50S") is not None else ""

    for g in gpus:
        awake = f"{g['awake']} ({g['awakeModel']})" if g["awake"] else "-"
        sleeping = ", ".join(f"{s['pod']} ({s['model']}, level {s['level']}{wake(s['model'])})" for s in g["sleeping"])
        table.add_row(g["unit"], awake, sleeping)
    return table


def _load_table(load: dict) -> Table:
    """`GET /api/load` as one table: each business service (bold), then its replicas (indented)."""
    table = Table(title=f"Load over the last {load['windowSeconds']} s, {time.strftime('%H:%M:%S')}", title_justify="left")
    for column in LOAD_COLUMNS:
        table.add_column(column, justify="left" if column in ("Service / replica", "Pool") else "right", overflow="fold")
    for service in load["services"]:
        table.add_row(Text(service["service"], style="bold"), _cell(service["pool"]), str(service["readyReplicas"]),
                      *_load_cells(service))
        for replica in service["replicas"]:
            table.add_row(Text("  " + replica["pod"]), "", "", *_load_cells(replica))
    if not load["services"]:
        table.add_row("(no business services)", *[""] * (len(LOAD_COLUMNS) - 1))
    return table


@app.command()
def top(
    window: int = typer.Option(30, "--window", "-w", min=5, max=300, help="seconds of the sliding window (5..300)"),
    once: bool = typer.Option(False, "--once", help="print one frame and exit (so does a pipe or -o json|yaml|name)"),
    output: str = OUTPUT_OPTION,
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Live load of every business service and its replicas: requests/s, in flight, held by the gateway for
    want of a free replica (and their wait's p95, ms), errors/s, latency and time-to-first-byte percentiles
    (ms), tokens/s; refreshed every second until Ctrl+C."""
    _check_output(output)
    client = Client(url, token)

    def fetch() -> dict:
        return client.call("GET", "/api/load", params={"window": window})

    def frame(load: dict) -> Group:
        """The load table, and the GPUs where replicas sleep (sharedGpus pools) under it."""
        sharing = _sharing_table(client.call("GET", "/api/gpus/sharing"))
        return Group(_load_table(load), *([sharing] if sharing is not None else []))

    load = fetch()
    if _dump(output, load):
        return
    if output == "name":
        for service in load["services"]:
            sys.stdout.write(f"{service['service']}\n")
        return
    if once or not console.is_terminal:
        (console if console.is_terminal else Console(width=100_000, soft_wrap=False)).print(frame(load))
        return
    from rich.live import Live

    try:
        with Live(frame(load), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(1)  # the refresh period (the API keeps the window; nothing to wait for)
                live.update(frame(fetch()))
    except KeyboardInterrupt:
        pass


# assignment ------------------------------------------------------------------------------------
@app.command()
def assign(pod: str, business: str, model: Optional[str] = typer.Option(None, help="check the pod serves this model"),
           pin: Optional[bool] = typer.Option(None, "--pin/--no-pin", show_default=False,
                                              help="while the pool's autopilot is on, the pod is pinned (the autopilot "
                                                   "leaves it there) unless --no-pin"),
           url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Assign a pool pod to a business (or `unassigned`)."""
    result = Client(url, token).call("POST", "/api/assign-pod", json={"podName": pod, "businessTag": business, "modelName": model,
                                                                      "pin": pin})
    change = "unchanged" if not result["changed"] else f"{result['previousBusiness']} → {result['businessTag']}"
    console.print(f"✓ {pod}: {change}" + (" (pinned: the autopilot leaves it there; `corral autopilot unpin POD`)"
                                          if result.get("pinned") else ""))


@app.command()
def distribute(
    pool: str,
    shares: list[str] = typer.Argument(..., help="business=N pairs, e.g. production=3 testing=1"),
    counts: bool = typer.Option(False, "--counts", help="N are exact pod counts, not ratios"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Distribute a pool's pods over businesses by ratio (or exact counts), with the fewest moves."""
    parsed = _pairs(shares, int if counts else float, "business=N (e.g. production=3)")
    body = {"deploymentName": pool, ("counts" if counts else "ratios"): parsed}
    result = Client(url, token).call("POST", "/api/distribute-pods", json=body)
    for move in result["moves"]:
        console.print(f"  {move['podName']}: {move['from']} → {move['to']}")
    console.print(f"✓ {len(result['moves'])} move(s); now " + ", ".join(f"{b}={n}" for b, n in result["podDistribution"].items()))


# autopilot -------------------------------------------------------------------------------------
def _fmt_number(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"


@autopilot_app.command("status")
def autopilot_status(pool: Optional[str] = typer.Argument(None, help="one pool (default: every pool)"),
                     output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Settings, the signals per business, and the last decisions of a pool's autopilot."""
    _check_output(output)
    client = Client(url, token)
    statuses = [client.call("GET", f"/api/autopilot/{pool}")] if pool else client.call("GET", "/api/autopilot")
    if _dump(output, statuses if not pool else statuses[0]):
        return
    if output == "name":
        for status in statuses:
            sys.stdout.write(f"{status['pool']}\n")
        return
    for status in statuses:
        settings = status["settings"]
        state = "on" if settings["enabled"] else "off"
        console.print(f"[bold]{status['pool']}[/bold]: autopilot {state} · warm spares {settings['warmSpares']} · "
                      f"cooldown {settings['cooldownSeconds']:g} s · scale out {'on' if settings['scaleOut'] else 'off'} · "
                      f"scale in {'on' if settings['scaleIn'] else 'off'} · replica concurrency "
                      f"{status.get('replicaConcurrency', '?')} ({status.get('replicaConcurrencySource', '?')})", highlight=False)
        rows = [[b["business"], b["policy"]["priority"], f"{b['policy']['minReplicas'] or 0}..{b['policy']['maxReplicas'] or '∞'}",
                 f"{b['readyReplicas']}/{b['replicas']}", b["pinned"], _fmt_number(b["running"]), _fmt_number(b["waiting"]),
                 _fmt_number(b.get("held")), _fmt_number(b.get("stableLoad")), _fmt_number(b.get("panicLoad")),
                 b.get("source") or "", _fmt_number(b["ttftP90Ms"], " ms"), _fmt_number(b["requestsPerSecond"]),
                 b["pressure"] or ""]
                for b in status["businesses"]]
        # SOURCE: where the load came from (engine /metrics, the gateway's counts, or unknown: never taken from).
        _table("businesses", ["BUSINESS", "PRIORITY", "MIN..MAX", "READY", "PINNED", "RUNNING", "WAITING", "HELD",
                              "STABLE", "PANIC", "SOURCE", "TTFT P90", "REQ/S", "PRESSURE"], rows)
        if output == "wide":
            _table("replicas", ["POD", "BUSINESS", "READY", "PINNED", "RUNNING", "WAITING", "KV CACHE", "SOURCE", "AGE",
                                "MOVED AT"],
                   [[r["pod"], r["business"], r["ready"], r["pinned"], _fmt_number(r["running"]), _fmt_number(r["waiting"]),
                     _fmt_number(r["kvCacheUsage"]), r.get("source") or "", _fmt_number(r.get("ageSeconds"), " s"),
                     r["movedAt"] or ""] for r in status["replicas"]])
        for decision in status["decisions"][:10]:
            what = ", ".join(f"{m['podName']}: {m['from']} → {m['to']}" for m in decision["moves"])
            if decision["scaledTo"] is not None:
                what = (what + "; " if what else "") + f"scaled to {decision['scaledTo']}"
            if decision["removed"]:
                what = (what + "; " if what else "") + f"removed {', '.join(decision['removed'])}"
            console.print(Text(f"  {decision['at']}  {what}  ({decision['error'] or decision['reason']})"))
        for note in status["waitingFor"]:
            console.print(Text(f"  waiting: {note}"))


def _set_autopilot(pool: str, client: Client, **changes: Any) -> dict:
    settings = client.call("GET", f"/api/autopilot/{pool}")["settings"] | {k: v for k, v in changes.items() if v is not None}
    return client.call("PUT", f"/api/autopilot/{pool}", json=settings)


@autopilot_app.command("enable")
def autopilot_enable(
    pool: str,
    warm_spares: Optional[int] = typer.Option(None, "--warm-spares", help="unassigned ready replicas to keep"),
    cooldown: Optional[float] = typer.Option(None, "--cooldown", help="seconds a moved replica stays"),
    scale_out: Optional[bool] = typer.Option(None, "--scale-out/--no-scale-out", show_default=False,
                                             help="add replicas when moves cannot meet demand"),
    scale_in: Optional[bool] = typer.Option(None, "--scale-in/--no-scale-in", show_default=False, help="remove idle spares"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="the pool's ceiling for scale-out"),
    url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Turn a pool's autopilot on (other settings kept unless given)."""
    _set_autopilot(pool, Client(url, token), enabled=True, warmSpares=warm_spares, cooldownSeconds=cooldown, scaleOut=scale_out,
                   scaleIn=scale_in, maxReplicas=max_replicas)
    console.print(f"✓ autopilot on for {pool}; watch it with `corral autopilot status {pool}`")


@autopilot_app.command("disable")
def autopilot_disable(pool: str, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Turn a pool's autopilot off (replicas stay where they are)."""
    _set_autopilot(pool, Client(url, token), enabled=False)
    console.print(f"✓ autopilot off for {pool}")


@autopilot_app.command("policy")
def autopilot_policy(
    service: str = typer.Argument(..., help="the business service (e.g. production-nlb)"),
    min_replicas: Optional[int] = typer.Option(None, "--min", help="never fewer replicas (while the pool has them)"),
    max_replicas: Optional[int] = typer.Option(None, "--max", help="never more replicas"),
    no_max: bool = typer.Option(False, "--no-max", help="remove the maximum"),
    priority: Optional[int] = typer.Option(None, "--priority", help="higher wins under scarcity"),
    ttft_p90_ms: Optional[float] = typer.Option(None, "--ttft-p90-ms", help="target time to first token, p90"),
    waiting_per_replica: Optional[float] = typer.Option(None, "--waiting-per-replica", help="target queued requests per replica"),
    concurrency_per_replica: Optional[float] = typer.Option(
        None, "--concurrency-per-replica", help="target running + waiting requests per replica (e.g. 70%% of --max-num-seqs)"),
    output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Show a business's autopilot policy, or change the fields given (the rest kept)."""
    _check_output(output)
    client = Client(url, token)
    policy = client.call("GET", f"/api/business-services/{service}/policy")
    changes = {"minReplicas": min_replicas, "maxReplicas": max_replicas, "priority": priority}
    target = {"ttftP90Ms": ttft_p90_ms, "waitingPerReplica": waiting_per_replica, "concurrencyPerReplica": concurrency_per_replica}
    if any(v is not None for v in [*changes.values(), *target.values()]) or no_max:
        policy |= {k: v for k, v in changes.items() if v is not None}
        if no_max:
            policy["maxReplicas"] = None
        policy["target"] = policy["target"] | {k: v for k, v in target.items() if v is not None}
        policy = client.call("PUT", f"/api/business-services/{service}/policy", json=policy)
    if _dump(output, policy):
        return
    _table(f"policy of {service}", ["MIN", "MAX", "PRIORITY", "TTFT P90 TARGET", "WAITING/REPLICA TARGET",
                                    "CONCURRENCY/REPLICA TARGET"],
           [[policy["minReplicas"] if policy["minReplicas"] is not None else "1 while it has traffic", policy["maxReplicas"] if policy["maxReplicas"] is not None else "none", policy["priority"],
             _fmt_number(policy["target"]["ttftP90Ms"], " ms"), _fmt_number(policy["target"]["waitingPerReplica"]),
             _fmt_number(policy["target"].get("concurrencyPerReplica"))]])


@autopilot_app.command("unpin")
def autopilot_unpin(pod: str, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Let the autopilot move a replica that a manual assignment pinned."""
    result = Client(url, token).call("POST", f"/api/pods/{pod}/unpin")
    console.print(f"✓ {pod} unpinned" if result["changed"] else f"✓ {pod} was not pinned")


# services --------------------------------------------------------------------------------------
@service_app.command("create")
def service_create(
    name: str = typer.Argument(..., help="service name; '-nlb' is appended"),
    pool: str = typer.Option(..., "--pool", help="the model pool whose model it serves"),
    business: str = typer.Option(..., "--business", "-b"),
    external: bool = typer.Option(False, "--external/--internal"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Create a business service selecting {model, business}."""
    body = {"serviceName": name, "modelPool": pool, "businessTag": business, "isExternal": external}
    result = Client(url, token).call("POST", "/api/deploy-service", json=body)
    console.print(f"created {result['service']['name']} → {result['service']['selector']}; base URL {result['service']['baseUrl']}")


SERVICE_COLUMNS = [
    Column("Name", lambda s: s["name"]),
    Column("Business", lambda s: s["businessTag"]),
    Column("Model", lambda s: s["modelName"]),
    Column("Pool", lambda s: s.get("modelPool"), wide=True),
    Column("Type", lambda s: s["type"]),
    Column("Replicas", lambda s: s["replicas"]),
    Column("Ready", lambda s: s["readyReplicas"]),
    Column("Base URL", lambda s: s["baseUrl"]),
    Column("Selector", lambda s: _labels(s.get("selector")), wide=True),
    Column("Created", lambda s: (s.get("createdAt") or "")[:19], wide=True),
]


@service_app.command("list")
def service_list(output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """List business services."""
    _check_output(output)
    _listing(output, "Business services", SERVICE_COLUMNS, Client(url, token).call("GET", "/api/business-services"))


@service_app.command("delete")
def service_delete(name: str, force: bool = typer.Option(False, help="unassign pods that would be left without a service"),
                   url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Delete a business service."""
    result = Client(url, token).call("DELETE", f"/api/business-services/{name}", params={"force": str(force).lower()})
    console.print(f"deleted {name}" + (f"; unassigned {', '.join(result['unassignedPods'])}" if result["unassignedPods"] else ""))


@app.command()
def history(
    action: Optional[str] = typer.Option(None, help="deploy, delete, deploy-service, delete-service, assign, distribute, scale, "
                                                    "autopilot, policy, pin, finetune, crash, ..."),
    target: Optional[str] = None,
    limit: int = 50,
    output: str = OUTPUT_OPTION,
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Scheduling history, newest first."""
    _check_output(output)
    params: dict[str, Any] = {"limit": limit} | ({"action": action} if action else {}) | ({"target": target} if target else {})
    rows = Client(url, token).call("GET", "/api/history", params=params)
    _listing(output, "History", [
        Column("Id", lambda h: h["id"], wide=True),
        Column("When", lambda h: h["timestamp"] if output == "wide" else h["timestamp"][:19]),
        Column("Action", lambda h: h["action"]),
        Column("Target", lambda h: h["target"]),
        Column("Before", lambda h: _compact(h["before"])),
        Column("After", lambda h: _compact(h["after"])),
        Column("Outcome", lambda h: h["outcome"]),
        Column("Message", lambda h: h["message"]),
    ], rows, name="id")


@app.command()
def usage(
    start: Optional[str] = typer.Option(None, "--from", help="ISO 8601 start (default: 24 hours before --to); no zone: UTC"),
    to: Optional[str] = typer.Option(None, "--to", help="ISO 8601 end (default: now)"),
    group_by: GroupBy = typer.Option(GroupBy.BUSINESS, "--group-by", help="business, key, or hour"),
    as_csv: bool = typer.Option(False, "--csv", help="the rows as CSV (for a spreadsheet)"),
    output: str = OUTPUT_OPTION,
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """What each business used: requests, tokens, errors, held and rejected requests, GPU-seconds (hourly rows)."""
    _check_output(output)
    params: dict[str, Any] = {"groupBy": group_by.value} | ({"from": start} if start else {}) | ({"to": to} if to else {})
    client = Client(url, token)
    if as_csv:
        sys.stdout.write(client.send("GET", "/api/usage", params={**params, "format": "csv"}).text)
        return
    report = client.call("GET", "/api/usage", params=params)
    _listing(output, f"Usage {report['from'][:19]} → {report['to'][:19]} (UTC)", [
        Column("Hour", lambda r: (r["hour"] or "")[:16], wide=group_by is not GroupBy.HOUR),
        Column("Business", lambda r: r["business"]),
        Column("Key", lambda r: r["keyId"] or "", wide=group_by is not GroupBy.KEY),
        Column("Requests", lambda r: r["requests"]),
        Column("Prompt tok", lambda r: r["promptTokens"]),
        Column("Completion tok", lambda r: r["completionTokens"]),
        Column("Errors", lambda r: r["errors"]),
        Column("Held", lambda r: r["held"]),
        Column("Rejected", lambda r: r["rejected"]),
        Column("Replica-s", lambda r: f"{r['replicaSeconds']:.0f}", wide=True),
        Column("GPU-s", lambda r: f"{r['gpuSeconds']:.0f}"),
    ], report["rows"], name="business")


@app.command()
def gpus(output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Detected GPUs (NVML) and the finetune recommendation for them."""
    _check_output(output)
    info = Client(url, token).call("GET", "/api/system/gpu-info")
    if _dump(output, info):
        return
    if output == "name":
        for d in info["devices"]:
            sys.stdout.write(f"{d['id']}\n")
        return
    if info["devices"]:
        _listing(output, "GPUs", [
            Column("Id", lambda d: d["id"]),
            Column("Name", lambda d: d["name"]),
            Column("UUID", lambda d: d.get("uuid"), wide=True),
            Column("Memory GB", lambda d: d["memory_gb"]),
            Column("Used GB", lambda d: d["memory_used_gb"]),
            Column("Free GB", lambda d: d.get("memory_free_gb"), wide=True),
            Column("Utilisation %", lambda d: d["utilization"]),
            Column("Processes", lambda d: len(d["processes"])),
            Column("MIG", lambda d: d.get("mig"), wide=True),
        ], info["devices"], name="id")
    style = "yellow" if info.get("warning") else "green"
    console.print(f"[{style}]{info['recommendation']}[/{style}]", highlight=False)


@app.command()
def estimate(
    model: str = typer.Argument(..., help="e.g. qwen2.5-coder-7b"),
    method: str = typer.Option("lora", help="full | lora | qlora | freeze"),
    seq_len: int = typer.Option(1024, "--seq-len", help="the submit's default maxSeqLen"),
    batch_size: int = typer.Option(4, "--batch-size", help="the submit's default batchSize"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """GPU memory to finetune and to serve a model (by default the task a submit with default hyperparameters creates)."""
    params = {"model": model, "method": method, "seqLen": seq_len, "batchSize": batch_size}
    result = Client(url, token).call("GET", "/api/system/estimate", params=params)
    training, serving = result["training"], result["serving"]
    console.print(f"[bold]{result['displayName']}[/bold] {method}: about {training['totalGb']} GB to finetune, "
                  f"{serving['totalGb']} GB to serve ({serving['contextTokens']} tokens × {serving['concurrency']} sequences)")
    _table("Finetune memory (GB)", list(training["breakdownGb"]), [list(training["breakdownGb"].values())])


# finetune --------------------------------------------------------------------------------------
STATUS_STYLE = {"queued": "yellow", "preparing": "cyan", "training": "blue", "completed": "green", "failed": "red",
                "cancelled": "bright_black", "pending": "white"}


def _status(task: dict) -> str:
    return f"[{STATUS_STYLE.get(task['status'], 'white')}]{task['status']}[/]"


def _status_cell(task: dict) -> Text:
    return Text(task["status"], style=STATUS_STYLE.get(task["status"], "white"))


@finetune_app.command("submit")
def finetune_submit(
    base_model: str = typer.Argument(..., help="local model directory or hub id"),
    dataset: Path = typer.Argument(..., help="JSONL or a JSON array: messages, ShareGPT, Alpaca, prompt/completion or text "
                                   "(dpo, orpo: prompt/chosen/rejected pairs); or a Parquet / Arrow file, a datasets directory"),
    method: str = typer.Option("lora", help="lora | qlora | full | dpo | orpo"),
    priority: str = typer.Option("normal", help="high | normal | low"),
    gpus: Optional[int] = typer.Option(None, help="GPUs (default 1, or 0 without GPU)"),
    timeout_s: Optional[float] = typer.Option(None, "--timeout", help="seconds before the task is cancelled (default 6 h)"),
    business: Optional[str] = typer.Option(None, "--business", help="the business its GPU-seconds are billed to (`corral "
                                           "usage`); default none: billed under (finetune)"),
    hp: list[str] = typer.Option([], "--hp", help="hyperparameter, e.g. --hp epochs=3 --hp learningRate=1e-4 --hp trainOnPrompt=true"),
    follow: bool = typer.Option(False, "--follow", "-f", help="show a live progress bar until the task ends"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Validate and queue a finetune task."""
    from corral.domain.hyperparameters import validate

    hyperparameters = _pairs(hp, _hyperparameter, "name=number (e.g. epochs=3)")  # type: ignore[arg-type]
    try:
        validate(hyperparameters, method)  # the API checks them the same way; failing here spares the round trip
    except InvalidInput as exc:
        fail(exc.message)
    body = {"baseModel": base_model, "datasetPath": str(dataset.resolve()), "method": method, "priority": priority,
            "gpus": gpus, "timeoutSeconds": timeout_s, "hyperparameters": hyperparameters}
    if business is not None:
        body["businessTag"] = business
    client = Client(url, token)
    task = client.call("POST", "/api/finetune/tasks", json=body)
    console.print(f"{task['id']}: {_status(task)} — {task['reason']}", highlight=False)
    if follow:
        _follow(client, task["id"])


@finetune_app.command("preview")
def finetune_preview(
    base_model: str = typer.Argument(..., help="local model directory or hub id (its tokenizer is used)"),
    dataset: Path = typer.Argument(..., help="the dataset, as for submit"),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="default: the maxSeqLen default (1024)"),
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt", help="the loss on every token, not only the answers"),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="model (the tokenizer's own) or a built-in "
                                                "template: chatml, qwen, llama3, mistral, gemma"),
    examples: int = typer.Option(2, "--examples", "-n", help="how many examples to show"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """What the trainer would make of a dataset: format, examples with the trained tokens, what maxSeqLen cuts."""
    from rich.text import Text

    body = {"baseModel": base_model, "datasetPath": str(dataset.resolve()), "maxSeqLen": max_seq_len,
            "trainOnPrompt": train_on_prompt, "chatTemplate": chat_template, "examples": examples}
    result = Client(url, token).call("POST", "/api/finetune/preview", json=body)
    share = f"{100 * result['trainedTokens'] / result['totalTokens']:.0f}%" if result["totalTokens"] else "0%"
    console.print(f"{result['format']}: {result['count']} examples; {result['truncated']} truncated on the prompt side, "
                  f"{result['dropped']} dropped at maxSeqLen {result['maxSeqLen']}; {share} of the tokens trained", highlight=False)
    for why, count in result["dropReasons"].items():
        console.print(f"  dropped: {count} × {why}", highlight=False)
    for example in result["examples"]:
        console.rule(f"{example['trainedTokens']} of {example['totalTokens']} tokens trained (green)"
                     + (f", truncated from {example['originalTokens']}" if example["truncated"] else ""))
        text, at = Text(), 0
        for span in example["spans"]:
            text.append(example["text"][at:span["start"]], style="dim")
            text.append(example["text"][span["start"]:span["end"]], style="bold green")
            at = span["end"]
        text.append(example["text"][at:], style="dim")
        console.print(text)
    _table("Tokens per example", ["Tokens", "Examples", ""], [
        [f"{b['min']}-{b['max']}", b["count"], "[red]cut at maxSeqLen[/red]" if b["overMaxSeqLen"] else ""]
        for b in result["lengthHistogram"]])


def _follow(client: Client, task_id: str) -> None:
    """A live progress bar (steps, loss, ETA) until the task ends; exit code 1 unless it completed."""
    with Progress(*PROGRESS_COLUMNS, console=console) as progress:
        bar = progress.add_task(task_id, total=None, note="")
        while True:
            task = client.call("GET", f"/api/finetune/tasks/{task_id}")
            p = task["progress"]
            note = f"{task['status']}" + (f" loss {p['loss']:.4f}" if p.get("loss") is not None else "")
            note += f" eval {p['evalLoss']:.4f}" if p.get("evalLoss") is not None else ""
            note += f" ETA {p['eta']:.0f}s" if p.get("eta") is not None else ""
            progress.update(bar, completed=p.get("step") or 0, total=p.get("totalSteps"), note=note)
            if task["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)
    console.print(f"{task_id}: {_status(task)} — {task['reason']}", highlight=False)
    if task["status"] != "completed":
        raise typer.Exit(1)


TASK_COLUMNS = [
    Column("Id", lambda t: t["id"]),
    Column("Status", _status_cell),
    Column("Base model", lambda t: t["baseModel"], wide=True),
    Column("Method", lambda t: t["method"]),
    Column("Priority", lambda t: t["priority"]),
    Column("Business", lambda t: t.get("businessTag") or "", wide=True),  # its GPU-seconds are billed to
    Column("GPUs", lambda t: t["gpus"], wide=True),
    Column("Units", lambda t: ",".join(t.get("units") or []), wide=True),
    Column("Progress", lambda t: f"{t['progress'].get('step', 0)}/{t['progress'].get('totalSteps', '?')}"),
    Column("Loss", lambda t: None if (loss := t["progress"].get("loss")) is None else f"{loss:.4g}"),  # not 5.92929744720459
    Column("Reason", lambda t: t["reason"]),
    Column("Start by (UTC)", lambda t: (t.get("startBy") or "")[:16].replace("T", " "), wide=True),  # easy-backfill's promise
    Column("Output", lambda t: t.get("output"), wide=True),
    Column("Created", lambda t: (t.get("createdAt") or "")[:19], wide=True),
]


@finetune_app.command("list")
def finetune_list(output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Finetune tasks, oldest first, with the queue warning when more than 5 wait."""
    _check_output(output)
    client = Client(url, token)
    rows = client.call("GET", "/api/finetune/tasks")
    _listing(output, "Finetune tasks", TASK_COLUMNS, rows, name="id")
    if output in ("table", "wide"):
        warning = client.call("GET", "/api/finetune/queue")["warning"]
        if warning:
            console.print(f"[yellow]{warning}[/yellow]", highlight=False)


@finetune_app.command("show")
def finetune_show(task_id: str, follow: bool = typer.Option(False, "--follow", "-f"),
                  output: str = typer.Option("json", "--output", "-o", help="json (the API's object) | yaml | table | "
                                                                             "wide (one field a row) | name"),
                  url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """One task: status, reason, progress, parameters, output."""
    _check_output(output)
    client = Client(url, token)
    task = client.call("GET", f"/api/finetune/tasks/{task_id}")
    if follow:
        _follow(client, task_id)
        return
    if _dump(output, task):
        return
    if output == "name":
        sys.stdout.write(f"{task['id']}\n")
        return
    fields = task if output == "wide" else {k: task.get(k) for k in (
        "id", "status", "reason", "baseModel", "datasetPath", "method", "priority", "businessTag", "gpus", "progress", "output")}
    _table(f"Finetune task {task['id']}", ["Field", "Value"], [
        [key, _status_cell(task) if key == "status" else
         json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value]
        for key, value in fields.items()])


@finetune_app.command("logs")
def finetune_logs(task_id: str, tail: int = typer.Option(200, "--tail", "-n"), follow: bool = typer.Option(False, "--follow", "-f"),
                  url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """The task's log; --follow streams it until the task ends."""
    client = Client(url, token)
    params = {"tail": tail, "follow": str(follow).lower()}
    try:
        with client.http.stream("GET", f"/api/finetune/tasks/{task_id}/logs", params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                body = response.json()
                fail(cli_error(body) if isinstance(body, dict) and "error" in body else response.text)
            for chunk in response.iter_text():
                sys.stdout.write(chunk)
                sys.stdout.flush()
    except httpx.HTTPError as exc:
        fail(f"cannot reach Corral at {client.url} ({exc.__class__.__name__}); is `corral serve` running?")


@finetune_app.command("cancel")
def finetune_cancel(task_id: str, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Cancel a task in any state (a running trainer is stopped)."""
    task = Client(url, token).call("POST", f"/api/finetune/tasks/{task_id}/cancel")
    console.print(f"{task_id}: {_status(task)}", highlight=False)


@finetune_app.command("resume")
def finetune_resume(task_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="show a live progress bar until it ends"),
                    url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Queue a cancelled, timed-out or failed task again; it continues from its last checkpoint."""
    client = Client(url, token)
    task = client.call("POST", f"/api/finetune/tasks/{task_id}/resume")
    console.print(f"{task_id}: {_status(task)} — {task['reason']}", highlight=False)
    if follow:
        _follow(client, task_id)


@finetune_app.command("export")
def finetune_export(task_id: str, wait: bool = typer.Option(True, help="wait until the merged weights are written"),
                    url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Write a completed task's merged weights (adapter merged into the base model) and print their directory."""
    client = Client(url, token)
    state = client.call("POST", f"/api/finetune/tasks/{task_id}/export")
    while wait and state["state"] == "running":
        time.sleep(1)
        state = client.call("GET", f"/api/finetune/tasks/{task_id}/export")
    if state["state"] == "failed":
        fail(f"export of {task_id} failed: {state['reason']}")
    console.print(state["directory"] if state["state"] == "done" else f"{task_id}: export {state['state']} — {state['reason']}",
                  highlight=False, soft_wrap=True)


@finetune_app.command("deploy")
def finetune_deploy(
    task_id: str,
    tag: str = typer.Option(..., "--tag", "-t", help="model tag of the new pool"),
    engine: str = typer.Option("vllm", help="vllm (LoRA adapter on the base model) or another engine (merged weights)"),
    replicas: int = typer.Option(1, "--replicas", "-n"),
    gpus: Optional[int] = typer.Option(None, "--gpus"),
    merge: bool = typer.Option(False, help="serve merged weights even with vLLM"),
    wait: bool = typer.Option(True, help="wait until every replica is ready"),
    url: Optional[str] = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Deploy a completed task's result as a model pool."""
    client = Client(url, token)
    body = {"engine": engine, "modelTag": tag, "replicas": replicas, "gpusPerReplica": gpus, "merge": merge}
    result = client.call("POST", f"/api/finetune/tasks/{task_id}/deploy", json=body)
    name = result["deployment"]["name"]
    console.print(f"deployed {name} from {task_id} ({result['deployment']['modelId']})")
    if wait and replicas:
        wait_ready(client, name, replicas, 900)


adapters_app = typer.Typer(help="LoRA adapters on running vLLM pools (multi-LoRA): clients send the adapter's name as "
                           "`model` to the pool's business services.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
ADAPTER_COLUMNS = [
    Column("Name", lambda a: a["name"]),
    Column("Task", lambda a: a["taskId"]),
    Column("Loaded", lambda a: f"{a['loadedOn']}/{a['readyReplicas']}"),
    Column("Rank", lambda a: a["rank"], wide=True),
    Column("Path", lambda a: a["path"], wide=True),
]


@adapters_app.command("add")
def adapters_add(pool: str, task_id: str = typer.Argument(..., help="a completed LoRA/QLoRA finetune task"),
                 name: str = typer.Option(..., "--name", help="the `model` name clients will send"),
                 url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Add a finished task's LoRA adapter to a running vLLM pool (started with --enable-lora): loaded on every replica,
    and on every replica that starts later."""
    result = Client(url, token).call("POST", f"/api/finetune/tasks/{task_id}/deploy", json={"pool": pool, "adapterName": name})
    console.print(result["message"], highlight=False, soft_wrap=True)


@adapters_app.command("list")
def adapters_list(pool: str, output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION,
                  token: Optional[str] = TOKEN_OPTION) -> None:
    """A pool's adapters and on how many of its ready replicas each is loaded."""
    _listing(output, f"Adapters of {pool}", ADAPTER_COLUMNS, Client(url, token).call("GET", f"/api/deployments/{pool}/adapters"))


@adapters_app.command("remove")
def adapters_remove(pool: str, name: str, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Remove an adapter from a pool: unloaded from every replica."""
    Client(url, token).call("DELETE", f"/api/deployments/{pool}/adapters/{name}")
    console.print(f"removed adapter {name} from {pool}", highlight=False)


# API keys and quotas of business services (corral.tenancy) --------------------------------------------------------
keys_app = typer.Typer(help="API keys and quotas of business services: who may call a business's endpoint, how much.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")
LIMIT_HELP = "a whole number (0 refuses all), or 'none' for no limit"


def _limit(value: Optional[str], option: str) -> Optional[int]:
    if value is None or value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        fail(f"{option} must be {LIMIT_HELP}; got {value!r}")


def _limits(rpm: Optional[str], tpm: Optional[str], tpd: Optional[str]) -> dict[str, Optional[int]]:
    return {"requestsPerMinute": _limit(rpm, "--rpm"), "tokensPerMinute": _limit(tpm, "--tpm"),
            "tokensPerDay": _limit(tpd, "--tpd")}


def _given_limits(rpm: Optional[str], tpm: Optional[str], tpd: Optional[str]) -> dict[str, Optional[int]]:
    """Only the limits given (a limit not given keeps its value: the caller merges these into the current ones)."""
    given = {"requestsPerMinute": (rpm, "--rpm"), "tokensPerMinute": (tpm, "--tpm"), "tokensPerDay": (tpd, "--tpd")}
    return {k: _limit(v, option) for k, (v, option) in given.items() if v is not None}


def _limits_said(limits: dict[str, Any]) -> str:
    return _compact({n: v for n, v in limits.items() if v is not None}) or "no limits"


# a key's options (`keys create`, `keys update`)
KEY_NAME_OPTION = typer.Option(None, "--name", help="what the key is for")
KEY_RPM_OPTION = typer.Option(None, "--rpm", help="this key's requests per minute: " + LIMIT_HELP)
KEY_TPM_OPTION = typer.Option(None, "--tpm", help="this key's tokens per minute: " + LIMIT_HELP)
KEY_TPD_OPTION = typer.Option(None, "--tpd", help="this key's tokens per UTC day: " + LIMIT_HELP)
KEY_WEIGHT_OPTION = typer.Option(None, "--weight", help="1 to 1000 (default 1): its share when the business's keys "
                                 "compete for its replicas")


@keys_app.command("create")
def keys_create(service: str = typer.Argument(..., help="the business service (e.g. production-nlb)"),
                name: Optional[str] = KEY_NAME_OPTION,
                expires: Optional[str] = typer.Option(None, "--expires", help="when it stops working (ISO 8601, with a zone)"),
                rpm: Optional[str] = KEY_RPM_OPTION, tpm: Optional[str] = KEY_TPM_OPTION,
                tpd: Optional[str] = KEY_TPD_OPTION, weight: Optional[int] = KEY_WEIGHT_OPTION,
                url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Create an API key: printed once, here; Corral keeps only its hash. Clients send it as `Authorization: Bearer`."""
    body: dict[str, Any] = {"name": name, "expiresAt": expires, "limits": _limits(rpm, tpm, tpd)}
    if weight is not None:
        body["weight"] = weight
    made = Client(url, token).call("POST", f"/api/business-services/{service}/keys", json=body)
    console.print(f"created key {made['id']} of {service}; it is shown this once, keep it now:", highlight=False)
    print(made["key"])  # alone on its line, unstyled: easy to copy or pipe


KEY_COLUMNS = [
    Column("Id", lambda k: k["id"]),
    Column("Name", lambda k: k.get("name")),
    Column("Prefix", lambda k: k["prefix"] + "…"),
    Column("Created", lambda k: (k.get("createdAt") or "")[:19]),
    Column("Last used", lambda k: (k.get("lastUsedAt") or "")[:19]),
    Column("Expires", lambda k: (k.get("expiresAt") or "")[:19]),
    Column("Weight", lambda k: k.get("weight", 1)),
    Column("Limits", lambda k: _compact({n: v for n, v in k["limits"].items() if v is not None}), wide=True),
]


@keys_app.command("list")
def keys_list(service: str, output: str = OUTPUT_OPTION, url: Optional[str] = URL_OPTION,
              token: Optional[str] = TOKEN_OPTION) -> None:
    """A business service's keys, without their secrets."""
    _listing(output, f"API keys of {service}", KEY_COLUMNS,
             Client(url, token).call("GET", f"/api/business-services/{service}/keys"), name="id")


@keys_app.command("update")
def keys_update(service: str = typer.Argument(..., help="the business service (e.g. production-nlb)"),
                key_id: str = typer.Argument(..., help="the key's id (from `corral keys list`)"),
                name: Optional[str] = KEY_NAME_OPTION,
                expires: Optional[str] = typer.Option(None, "--expires", help="when it stops working (ISO 8601, with a "
                                                      "zone), or 'never'"),
                rpm: Optional[str] = KEY_RPM_OPTION, tpm: Optional[str] = KEY_TPM_OPTION,
                tpd: Optional[str] = KEY_TPD_OPTION,
                weight: Optional[int] = typer.Option(None, "--weight", help="1 to 1000: its share when the business's "
                                                     "keys compete for its replicas"),
                url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Change a key without re-issuing it (only the options given change; a limit not given keeps its value)."""
    client = Client(url, token)
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if expires is not None:
        body["expiresAt"] = None if expires.lower() == "never" else expires
    if weight is not None:
        body["weight"] = weight
    if limits := _given_limits(rpm, tpm, tpd):
        keys = client.call("GET", f"/api/business-services/{service}/keys")
        current = next((k["limits"] for k in keys if k["id"] == key_id), {})  # an unknown key: the API says so
        body["limits"] = {**current, **limits}  # the API replaces them whole
    if not body:
        fail("nothing to change: give --name, --expires, --rpm, --tpm, --tpd or --weight")
    updated = client.call("PATCH", f"/api/business-services/{service}/keys/{key_id}", json=body)
    console.print(f"updated key {updated['id']} of {service}: name {updated.get('name') or '-'}, expires "
                  f"{updated.get('expiresAt') or 'never'}, weight {updated['weight']}, {_limits_said(updated['limits'])}",
                  highlight=False)


@keys_app.command("revoke")
def keys_revoke(service: str, key_id: str, url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Revoke a key: the gateway refuses it once this returns."""
    Client(url, token).call("DELETE", f"/api/business-services/{service}/keys/{key_id}")
    console.print(f"revoked key {key_id} of {service}", highlight=False)


@keys_app.command("access")
def keys_access(service: str,
                auth: Optional[str] = typer.Option(None, "--auth", help="keys (a key is needed) | none (open)"),
                rpm: Optional[str] = typer.Option(None, "--rpm", help="the service's requests per minute: " + LIMIT_HELP),
                tpm: Optional[str] = typer.Option(None, "--tpm", help="the service's tokens per minute: " + LIMIT_HELP),
                tpd: Optional[str] = typer.Option(None, "--tpd", help="the service's tokens per UTC day: " + LIMIT_HELP),
                url: Optional[str] = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Show, or change, a business service's auth mode and quotas (a limit not given keeps its value)."""
    client = Client(url, token)
    path = f"/api/business-services/{service}/access"
    current = client.call("GET", path)
    if auth is not None or rpm is not None or tpm is not None or tpd is not None:
        limits = {**current["limits"], **_given_limits(rpm, tpm, tpd)}
        current = client.call("PUT", path, json={"auth": auth, "limits": limits})
    console.print(f"{service}: auth {current['auth']}, {current['keys']} key(s), {_limits_said(current['limits'])}",
                  highlight=False)


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    return "" if value is None else str(value)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
