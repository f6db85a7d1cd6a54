"""The `corral` entry point: the client commands of `corral.cli` and the two that start processes on this
machine, `corral serve` (the control plane) and `corral dev tiny-model`. They live here so that the CLI module
itself stays a client that imports no server code; `corral --help` lists the commands as it always has."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from corral import cli
from corral.cli import DEFAULT_URL, client_url, console, fail


def serve(
    data_dir: Optional[Path] = typer.Option(None, help="state, logs and manifests [env CORRAL_DATA_DIR; default ./corral-data]"),
    host: Optional[str] = typer.Option(None, help="bind address [env CORRAL_HOST; default 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, help="API and UI port [env CORRAL_PORT; default 8080]"),
    gateway_port: Optional[int] = typer.Option(None, help="business-service traffic port [env CORRAL_GATEWAY_PORT; default 8000]"),
    api_token: Optional[str] = typer.Option(None, help="require this bearer token for mutations [env CORRAL_API_TOKEN]"),
    backend: Optional[str] = typer.Option(None, help="local | kubernetes [env CORRAL_BACKEND; kubernetes settings: CORRAL_KUBERNETES_*]"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
    stop_replicas_on_exit: Optional[bool] = typer.Option(
        None, "--stop-replicas-on-exit", help="stop this machine's replicas when Corral exits (by default they keep "
        "serving and the next `corral serve` adopts them) [env CORRAL_STOP_REPLICAS_ON_EXIT]"),
) -> None:
    """Run the control plane (API at /api, docs at /docs, events at /ws)."""
    import logging

    from pydantic import ValidationError

    from corral.config import Settings
    from corral.server import run

    flags = {"data_dir": data_dir, "host": host, "port": port, "gateway_port": gateway_port,
             "api_token": api_token, "backend": backend, "stop_replicas_on_exit": stop_replicas_on_exit}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe is noise
    url = client_url(settings.host, settings.port)
    gateway = client_url(settings.host, settings.gateway_port)
    console.print(f"Corral {settings.backend} backend, data in {settings.data_dir.resolve()}", highlight=False, soft_wrap=True)
    bound = f" (bound to {settings.host})" if url.removeprefix("http://").rsplit(":", 1)[0].strip("[]") != settings.host else ""
    console.print(f"Corral is running at [bold]{url}[/bold]{bound}  (API docs: {url}/docs)", highlight=False, soft_wrap=True)
    console.print(f"Business services at {gateway}/s/<service>/v1", highlight=False, soft_wrap=True)
    if url != DEFAULT_URL:
        console.print("For the `corral` commands in another shell:", highlight=False)
        console.print(f"export CORRAL_URL={url}", markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()
    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default action would end the
    # process before it could say what happens to the replicas. As KeyboardInterrupt, both end up here.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(settings, log_level)
    except KeyboardInterrupt:
        pass  # Ctrl+C or SIGTERM: uvicorn has shut the servers down; what follows is said either way
    if settings.backend == "local":
        _after_exit(settings)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _after_exit(settings) -> None:
    """Say what happens to the replicas: a newcomer's Ctrl+C left them running without a word."""
    from corral.backends.local.process import find_replicas, stop_all

    home = settings.data_dir.resolve()
    if settings.stop_replicas_on_exit:
        stopped = stop_all(home, settings.stop_grace_s)
        console.print(f"Corral stopped; {stopped} replica(s) stopped with it (the next `corral serve` starts them "
                      "again).", highlight=False, soft_wrap=True)
        return
    running = len(find_replicas(home))
    if running:
        from corral.gateway.nginx_plane import generation_processes

        if generation_processes(home / "gateway"):
            serving = (f"keep running and serving business traffic: the gateway on port {settings.gateway_port} (nginx) "
                       "keeps routing to them with the last routing table")
        else:  # the Python gateway lives in `corral serve`
            serving = "keep running; business traffic resumes when the gateway does"
        console.print(f"Corral stopped; {running} replica(s) {serving} — the "
                      "next `corral serve` adopts them. To stop them with Corral: `corral serve --stop-replicas-on-exit`; "
                      "to remove them: `corral delete DEPLOYMENT` while Corral runs.", highlight=False, soft_wrap=True)


def dev_tiny_model(
    directory: Path = typer.Argument(..., help="where to write it (created; an existing tiny model there is replaced)"),
) -> None:
    """Build a tiny chat model with RANDOM weights (~1.4 MB, offline): for trying engines, services and
    finetuning without a model hub. Its answers are noise. Needs `pip install 'corral[train]'`."""
    from rich.markup import escape

    from corral import devtools

    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not devtools.is_tiny_model(directory))):
        fail(f"{directory} exists and is not an empty directory or a tiny model built before; choose another directory")
    if missing := devtools.missing_packages():
        fail(escape(f"the tiny model needs {', '.join(missing)}: pip install 'corral[train]' (the same packages finetuning needs)"))
    current = ["importing torch and transformers", time.monotonic()]  # the step under way, and since when
    with console.status(f"{current[0]}…") as status:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # its own bars would interleave with this status

        def step(name: str) -> None:  # the previous step is done: ✓ with its time; the status shows the next
            console.print(f"[green]✓[/] {current[0]} ({time.monotonic() - float(current[1]):.1f} s)", highlight=False)
            current[:] = [name, time.monotonic()]
            status.update(f"{name}…")

        try:
            devtools.build_tiny_model(directory, step)
        except devtools.MissingPackages as exc:
            fail(escape(str(exc)))
        step("done")
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    console.print(f"[bold yellow]RANDOM WEIGHTS[/]: a tiny test model in {directory} ({size / 1e6:.1f} MB) that answers with noise; "
                  f"see {directory / devtools.MARKER}", soft_wrap=True)
    console.print(f"serve it:    corral deploy transformers {directory.resolve()} --tag tiny --pool", soft_wrap=True, highlight=False)
    console.print(f"finetune it: corral finetune submit {directory.resolve()} DATASET.jsonl   (chat, ShareGPT or Alpaca JSONL)",
                  soft_wrap=True, highlight=False)


def build_app() -> typer.Typer:
    """`corral`: `serve` first, then the client commands, and the `dev` group after `finetune`."""
    app = typer.Typer(help=cli.app.info.help, no_args_is_help=True)
    app.command()(serve)
    app.registered_commands += cli.app.registered_commands
    dev_app = typer.Typer(help="Developer tools: try Corral without a model hub.", no_args_is_help=True)
    dev_app.command("tiny-model")(dev_tiny_model)
    for group in cli.app.registered_groups:
        app.registered_groups.append(group)
        if group.name == "finetune":
            app.add_typer(dev_app, name="dev")
    return app


app = build_app()

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
