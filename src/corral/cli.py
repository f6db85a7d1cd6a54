"""The `corral` command. `serve` runs the control plane; every other command talks to its API."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

app = typer.Typer(help="Corral: model pools assigned to business services, on your GPUs.", no_args_is_help=True)
service_app = typer.Typer(help="Business services: stable endpoints selecting {model, business}.", no_args_is_help=True)
app.add_typer(service_app, name="service")
finetune_app = typer.Typer(help="Finetune tasks: a queue on the same GPUs as the model pools.", no_args_is_help=True)
app.add_typer(finetune_app, name="finetune")

console = Console()
err = Console(stderr=True)

URL_OPTION = typer.Option("http://127.0.0.1:8080", "--url", envvar="CORRAL_URL", help="Corral API address")
TOKEN_OPTION = typer.Option(None, "--token", envvar="CORRAL_API_TOKEN", help="API token, when one is configured")


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response of a successful request; anything else ends the command with its one-line reason."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach Corral at {self.url} ({exc.__class__.__name__}); is `corral serve` running?")
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            fail(body["error"] if isinstance(body, dict) and "error" in body else f"HTTP {response.status_code}: {response.text}")
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
    (`lrScheduler=linear`); the types and ranges are checked by `finetune.hyperparameters`."""
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


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


# control plane ---------------------------------------------------------------------------------
@app.command()
def serve(
    data_dir: Optional[Path] = typer.Option(None, help="state, logs and manifests [env CORRAL_DATA_DIR; default ./corral-data]"),
    host: Optional[str] = typer.Option(None, help="bind address [env CORRAL_HOST; default 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, help="API and UI port [env CORRAL_PORT; default 8080]"),
    gateway_port: Optional[int] = typer.Option(None, help="business-service traffic port [env CORRAL_GATEWAY_PORT; default 8000]"),
    api_token: Optional[str] = typer.Option(None, help="require this bearer token for mutations [env CORRAL_API_TOKEN]"),
    backend: Optional[str] = typer.Option(None, help="local | kubernetes [env CORRAL_BACKEND; kubernetes settings: CORRAL_KUBERNETES_*]"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Run the control plane (API at /api, docs at /docs, events at /ws)."""
    import logging

    from pydantic import ValidationError

    from corral.config import Settings
    from corral.server import run

    flags = {"data_dir": data_dir, "host": host, "port": port, "gateway_port": gateway_port,
             "api_token": api_token, "backend": backend}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe is noise
    url = f"http://{settings.host}:{settings.port}"
    console.print(f"Corral {settings.backend} backend, data in {settings.data_dir.resolve()}")
    console.print(f"Corral is running at [bold]{url}[/bold]  (API docs: {url}/docs)", highlight=False)
    console.print(f"Business services at http://{settings.host}:{settings.gateway_port}/s/<service>/v1", highlight=False)
    run(settings, log_level)


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
    url: str = URL_OPTION,
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
def logs(pod: str, tail: int = typer.Option(200, "--tail", "-n"), url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Print the last lines of a replica's engine output."""
    text = Client(url, token).send("GET", f"/api/pods/{pod}/logs", params={"tail": tail}).text
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command()
def deployments(url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """List deployments, pools included."""
    rows = Client(url, token).call("GET", "/api/deployments")
    _table("Deployments", ["Name", "Type", "Engine", "Model", "Replicas", "Ready", "Assignment", "Scale-down available"], [
        [d["name"], "Model Pool" if d["isPool"] else "Standard", d["engine"] + (" (simulator)" if d["isSimulator"] else ""),
         d["modelName"], d["replicas"], d["readyReplicas"], d.get("assignment", "N/A"), d.get("availableForScaleDown", "N/A")]
        for d in rows
    ])


@app.command()
def pods(deployment: Optional[str] = typer.Option(None, "--deployment", "-d"), url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """List replicas (pods) with their status and business."""
    params = {"deployment": deployment} if deployment else {}
    rows = Client(url, token).call("GET", "/api/pods", params=params)
    _table("Pods", ["Name", "Status", "Ready", "Model", "Business", "Endpoint", "Restarts"], [
        [p["name"], p["status"], "yes" if p["ready"] else "no", p["model"], p["business"] or "N/A", p["endpoint"], p["restarts"]]
        for p in rows
    ])


@app.command()
def delete(
    name: str,
    force: bool = typer.Option(False, help="delete a pool even while it serves businesses"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    url: str = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Delete a deployment and stop its replicas."""
    if not yes and sys.stdin.isatty():
        typer.confirm(f"Delete deployment {name} and stop its replicas?", abort=True)
    Client(url, token).call("DELETE", f"/api/deployments/{name}", params={"force": str(force).lower()})
    console.print(f"deleted {name}")


@app.command()
def scale(name: str, replicas: int, url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Scale a deployment; a pool only ever loses unassigned replicas."""
    result = Client(url, token).call("POST", "/api/scale-deployment", json={"deploymentName": name, "targetReplicas": replicas})
    console.print(f"{name}: {result['currentReplicas']} → {result['targetReplicas']} replicas"
                  + (f"; removed {', '.join(result['removed'])}" if result["removed"] else "")
                  + (f"; added {', '.join(result['added'])}" if result["added"] else ""))


@app.command()
def status(pool: str, url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Pool status: pods per business and how many may be scaled down."""
    result = Client(url, token).call("GET", f"/api/pool-status/{pool}")
    console.print(f"[bold]{pool}[/bold] (model {result['modelName']}): {result['totalPods']} pods, {result['readyPods']} ready")
    _table("Assignment", ["Business", "Pods"], [[b, n] for b, n in result["podDistribution"].items()])
    console.print(f"available for scale-down: {result['availableForScaleDown']}")


# assignment ------------------------------------------------------------------------------------
@app.command()
def assign(pod: str, business: str, model: Optional[str] = typer.Option(None, help="check the pod serves this model"),
           url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Assign a pool pod to a business (or `unassigned`)."""
    result = Client(url, token).call("POST", "/api/assign-pod", json={"podName": pod, "businessTag": business, "modelName": model})
    change = "unchanged" if not result["changed"] else f"{result['previousBusiness']} → {result['businessTag']}"
    console.print(f"✓ {pod}: {change}")


@app.command()
def distribute(
    pool: str,
    shares: list[str] = typer.Argument(..., help="business=N pairs, e.g. production=3 testing=1"),
    counts: bool = typer.Option(False, "--counts", help="N are exact pod counts, not ratios"),
    url: str = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Distribute a pool's pods over businesses by ratio (or exact counts), with the fewest moves."""
    parsed = _pairs(shares, int if counts else float, "business=N (e.g. production=3)")
    body = {"deploymentName": pool, ("counts" if counts else "ratios"): parsed}
    result = Client(url, token).call("POST", "/api/distribute-pods", json=body)
    for move in result["moves"]:
        console.print(f"  {move['podName']}: {move['from']} → {move['to']}")
    console.print(f"✓ {len(result['moves'])} move(s); now " + ", ".join(f"{b}={n}" for b, n in result["podDistribution"].items()))


# services --------------------------------------------------------------------------------------
@service_app.command("create")
def service_create(
    name: str = typer.Argument(..., help="service name; '-nlb' is appended"),
    pool: str = typer.Option(..., "--pool", help="the model pool whose model it serves"),
    business: str = typer.Option(..., "--business", "-b"),
    external: bool = typer.Option(False, "--external/--internal"),
    url: str = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Create a business service selecting {model, business}."""
    body = {"serviceName": name, "modelPool": pool, "businessTag": business, "isExternal": external}
    result = Client(url, token).call("POST", "/api/deploy-service", json=body)
    console.print(f"created {result['service']['name']} → {result['service']['selector']}; base URL {result['service']['baseUrl']}")


@service_app.command("list")
def service_list(url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """List business services."""
    rows = Client(url, token).call("GET", "/api/business-services")
    _table("Business services", ["Name", "Business", "Model", "Type", "Replicas", "Ready", "Base URL"], [
        [s["name"], s["businessTag"], s["modelName"], s["type"], s["replicas"], s["readyReplicas"], s["baseUrl"]] for s in rows
    ])


@service_app.command("delete")
def service_delete(name: str, force: bool = typer.Option(False, help="unassign pods that would be left without a service"),
                   url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Delete a business service."""
    result = Client(url, token).call("DELETE", f"/api/business-services/{name}", params={"force": str(force).lower()})
    console.print(f"deleted {name}" + (f"; unassigned {', '.join(result['unassignedPods'])}" if result["unassignedPods"] else ""))


@app.command()
def history(
    action: Optional[str] = typer.Option(None, help="deploy, delete, deploy-service, delete-service, assign, distribute, scale"),
    target: Optional[str] = None,
    limit: int = 50,
    url: str = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Scheduling history, newest first."""
    params: dict[str, Any] = {"limit": limit} | ({"action": action} if action else {}) | ({"target": target} if target else {})
    rows = Client(url, token).call("GET", "/api/history", params=params)
    _table("History", ["When", "Action", "Target", "Before", "After", "Outcome", "Message"], [
        [h["timestamp"][:19], h["action"], h["target"], _compact(h["before"]), _compact(h["after"]), h["outcome"], h["message"]]
        for h in rows
    ])


@app.command()
def gpus(url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Detected GPUs (NVML) and the finetune recommendation for them."""
    info = Client(url, token).call("GET", "/api/system/gpu-info")
    if info["devices"]:
        _table("GPUs", ["Id", "Name", "Memory GB", "Used GB", "Utilisation %", "Processes"], [
            [d["id"], d["name"], d["memory_gb"], d["memory_used_gb"], d["utilization"], len(d["processes"])]
            for d in info["devices"]
        ])
    style = "yellow" if info.get("warning") else "green"
    console.print(f"[{style}]{info['recommendation']}[/{style}]", highlight=False)


@app.command()
def estimate(
    model: str = typer.Argument(..., help="e.g. qwen2.5-coder-7b"),
    method: str = typer.Option("lora", help="full | lora | qlora | freeze"),
    seq_len: int = typer.Option(2048, "--seq-len"),
    batch_size: int = typer.Option(1, "--batch-size"),
    url: str = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """GPU memory to finetune and to serve a model."""
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


@finetune_app.command("submit")
def finetune_submit(
    base_model: str = typer.Argument(..., help="local model directory or hub id"),
    dataset: Path = typer.Argument(..., help="JSONL or a JSON array: messages, ShareGPT, Alpaca, prompt/completion or text"),
    method: str = typer.Option("lora", help="lora | qlora | full"),
    priority: str = typer.Option("normal", help="high | normal | low"),
    gpus: Optional[int] = typer.Option(None, help="GPUs (default 1, or 0 without GPU)"),
    timeout_s: Optional[float] = typer.Option(None, "--timeout", help="seconds before the task is cancelled (default 6 h)"),
    hp: list[str] = typer.Option([], "--hp", help="hyperparameter, e.g. --hp epochs=3 --hp learningRate=1e-4 --hp trainOnPrompt=true"),
    follow: bool = typer.Option(False, "--follow", "-f", help="show a live progress bar until the task ends"),
    url: str = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """Validate and queue a finetune task."""
    from corral.domain.errors import InvalidInput
    from corral.finetune.hyperparameters import validate

    hyperparameters = _pairs(hp, _hyperparameter, "name=number (e.g. epochs=3)")  # type: ignore[arg-type]
    try:
        validate(hyperparameters, method)  # the API checks them the same way; failing here spares the round trip
    except InvalidInput as exc:
        fail(exc.message)
    body = {"baseModel": base_model, "datasetPath": str(dataset.resolve()), "method": method, "priority": priority,
            "gpus": gpus, "timeoutSeconds": timeout_s, "hyperparameters": hyperparameters}
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
    examples: int = typer.Option(2, "--examples", "-n", help="how many examples to show"),
    url: str = URL_OPTION,
    token: Optional[str] = TOKEN_OPTION,
) -> None:
    """What the trainer would make of a dataset: format, examples with the trained tokens, what maxSeqLen cuts."""
    from rich.text import Text

    body = {"baseModel": base_model, "datasetPath": str(dataset.resolve()), "maxSeqLen": max_seq_len,
            "trainOnPrompt": train_on_prompt, "examples": examples}
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


@finetune_app.command("list")
def finetune_list(url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Finetune tasks, oldest first, with the queue warning when more than 5 wait."""
    client = Client(url, token)
    rows = client.call("GET", "/api/finetune/tasks")
    _table("Finetune tasks", ["Id", "Status", "Method", "Priority", "Progress", "Loss", "Reason"], [
        [t["id"], _status(t), t["method"], t["priority"],
         f"{t['progress'].get('step', 0)}/{t['progress'].get('totalSteps', '?')}", t["progress"].get("loss"), t["reason"]]
        for t in rows
    ])
    warning = client.call("GET", "/api/finetune/queue")["warning"]
    if warning:
        console.print(f"[yellow]{warning}[/yellow]")


@finetune_app.command("show")
def finetune_show(task_id: str, follow: bool = typer.Option(False, "--follow", "-f"), url: str = URL_OPTION,
                  token: Optional[str] = TOKEN_OPTION) -> None:
    """One task: status, reason, progress, parameters, output."""
    client = Client(url, token)
    task = client.call("GET", f"/api/finetune/tasks/{task_id}")
    if follow:
        _follow(client, task_id)
        return
    console.print_json(data=task)


@finetune_app.command("logs")
def finetune_logs(task_id: str, tail: int = typer.Option(200, "--tail", "-n"), follow: bool = typer.Option(False, "--follow", "-f"),
                  url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """The task's log; --follow streams it until the task ends."""
    client = Client(url, token)
    params = {"tail": tail, "follow": str(follow).lower()}
    try:
        with client.http.stream("GET", f"/api/finetune/tasks/{task_id}/logs", params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                fail(response.json().get("error", response.text))
            for chunk in response.iter_text():
                sys.stdout.write(chunk)
                sys.stdout.flush()
    except httpx.HTTPError as exc:
        fail(f"cannot reach Corral at {client.url} ({exc.__class__.__name__}); is `corral serve` running?")


@finetune_app.command("cancel")
def finetune_cancel(task_id: str, url: str = URL_OPTION, token: Optional[str] = TOKEN_OPTION) -> None:
    """Cancel a task in any state (a running trainer is stopped)."""
    task = Client(url, token).call("POST", f"/api/finetune/tasks/{task_id}/cancel")
    console.print(f"{task_id}: {_status(task)}", highlight=False)


@finetune_app.command("deploy")
def finetune_deploy(
    task_id: str,
    tag: str = typer.Option(..., "--tag", "-t", help="model tag of the new pool"),
    engine: str = typer.Option("vllm", help="vllm (LoRA adapter on the base model) or another engine (merged weights)"),
    replicas: int = typer.Option(1, "--replicas", "-n"),
    gpus: Optional[int] = typer.Option(None, "--gpus"),
    merge: bool = typer.Option(False, help="serve merged weights even with vLLM"),
    wait: bool = typer.Option(True, help="wait until every replica is ready"),
    url: str = URL_OPTION,
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


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    return "" if value is None else str(value)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
