"""The inference page (`/`): configuration, test panel, deployment manager, business services with their live
load, pods and assignment board.

Each section is a refreshable redrawn from the events that concern it (`live`); load (figures, charts, the
pods' in-flight and requests/s, the board's per-business load) is set in place from the monitor's `load`
event once a second while the page is open (`corral.ui.load`). The pods table is a
Quasar table with client-side paging, sorting and filtering, so 1,000 pods cost one row list per
redraw and only one page of rows in the DOM; the business drop-down lives in a cell slot and emits
one `assign` event back to Python.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Any

import httpx
from nicegui import background_tasks, ui

from corral.domain import labels as L
from corral.domain.assignment import businesses_of_model
from corral.domain.deploy_request import DeploySpec
from corral.domain.errors import CorralError
from corral.domain.models import PodPhase
from corral.domain.sleep import SleepState
from corral.engines import engine_names, get_engine
from corral.events import EventType
from corral.ui import autopilot as autopilot_ui
from corral.ui import load as loadview
from corral.ui import tenancy as tenancy_ui
from corral.ui.live import ClientEvents, act, live, notify, runtime
from corral.views import PoolDeploymentView, StandardDeploymentView

POD_EVENTS = (EventType.REPLICA_STATUS, EventType.POD_ASSIGNMENT, EventType.DISTRIBUTION, EventType.SCALE,
              EventType.DEPLOYMENT, EventType.SERVICE_DEPLOYMENT)
DEPLOYMENT_EVENTS = (*POD_EVENTS, EventType.ADAPTERS)
POOL_TOOLTIP = ("A model pool gets no service of its own: its replicas start unassigned and are assigned, one by one, "
                "to business services (a label change, effective in milliseconds). Scale-down only removes unassigned replicas.")


def page(events: ClientEvents) -> None:
    ui.page_title("Corral · Inference")
    loadview.LoadWatch()  # load events once a second while this page is open
    with ui.row().classes("w-full gap-4 items-stretch no-wrap"):
        with ui.card().classes("w-1/2").props('data-testid="configuration"'):
            ui.label("Configuration").classes("text-lg font-medium")
            _configuration(events)
        with ui.card().classes("w-1/2").props('data-testid="test-panel"'):
            ui.label("Test panel").classes("text-lg font-medium")
            _test_panel(events)
    with ui.card().classes("w-full").props('data-testid="deployments"'):
        ui.label("Deployments").classes("text-lg font-medium")
        refusals: dict[str, str] = {}  # deployment → its last refusal, shown until it is scaled again

        @ui.refreshable
        def deployments() -> None:
            _deployments(refusals, deployments.refresh)

        deployments()
        live(events, DEPLOYMENT_EVENTS, deployments.refresh)
    with ui.card().classes("w-full").props('data-testid="business-services"'):
        with ui.row().classes("w-full items-baseline gap-2"):
            ui.label("Business services").classes("text-lg font-medium")
            ui.label(f"load over the last {loadview.WINDOW_S} s; chart: the last 5 minutes").classes("text-xs text-grey-7")
        _services(events)
    with ui.card().classes("w-full").props('data-testid="autopilot"'):
        with ui.row().classes("w-full items-baseline gap-2"):
            ui.label("Autopilot").classes("text-lg font-medium")
            ui.label("warm replicas follow demand: recent decisions and why").classes("text-xs text-grey-7")
        autopilot_ui.decisions(events)
    with ui.card().classes("w-full").props('data-testid="status-monitor"'):
        with ui.tabs().classes("w-full justify-start") as tabs:
            pods_tab = ui.tab("Pods")
            board_tab = ui.tab("Assignment board")
            gpus_tab = ui.tab("Shared GPUs")
        with ui.tab_panels(tabs, value=pods_tab).classes("w-full"):
            with ui.tab_panel(pods_tab):
                _pods(events)
            with ui.tab_panel(board_tab):
                _board(events)
            with ui.tab_panel(gpus_tab):
                _shared_gpus(events)


# configuration --------------------------------------------------------------------------------
def _configuration(events: ClientEvents) -> None:
    with ui.tabs().classes("w-full") as tabs:
        model_tab = ui.tab("Model Configuration")
        service_tab = ui.tab("Service Configuration")
    with ui.tab_panels(tabs, value=model_tab).classes("w-full"):
        with ui.tab_panel(model_tab).classes("gap-2"):
            _model_form()
        with ui.tab_panel(service_tab).classes("gap-2"):
            _service_form(events)


ENGINE_PREFERENCE = ("vllm", "sglang", "transformers", "simulator")  # the default: the first one that can run here


def engine_choices(backend: str) -> tuple[dict[str, str], str]:
    """The engine drop-down's options (label says which cannot run here) and its default: the first installed
    engine in ENGINE_PREFERENCE. Locally an engine runs in Corral's environment, so it must be installed here;
    in a cluster it runs in its container image, so every engine is available."""
    labels: dict[str, str] = {}
    installed: list[str] = []
    for name in engine_names():
        engine = get_engine(name)
        label = f"{name} (simulator)" if engine.is_simulator else name
        if backend == "local":
            try:
                engine.check_installed()
            except CorralError:
                label += " · not installed here"
            else:
                installed.append(name)
        else:
            installed.append(name)
        labels[name] = label
    ranked = [n for n in ENGINE_PREFERENCE if n in installed] + installed
    return labels, (ranked or list(labels))[0]


def _model_form() -> None:
    engines, default = engine_choices(runtime().settings.backend)
    with ui.row().classes("w-full gap-2 no-wrap"):
        engine = ui.select(engines, value=default, label="Engine").classes("w-60").props('data-testid="engine"')
        model_id = ui.input("Model", placeholder="Qwen/Qwen2.5-Coder-7B-Instruct or a local directory").classes("grow").props('data-testid="model"')
    with ui.row().classes("w-full gap-2 no-wrap"):
        tag = ui.input("Model tag", placeholder="qwen-coder-7b").classes("grow").props('data-testid="model-tag"')
        replicas = ui.number("Replicas", value=1, min=1, max=256, precision=0).classes("w-28").props('data-testid="replicas-input"')
        gpus = ui.number("GPUs per replica", min=0, max=16, precision=0).classes("w-36").tooltip("empty: 1 for vllm/sglang, 0 otherwise")
    engine_args = ui.input("Engine arguments", placeholder="--max-model-len 8192 --gpu-memory-utilization 0.9").classes("w-full").props('data-testid="engine-args"')
    with ui.row().classes("items-center"):
        pool = ui.checkbox("Deploy as Model Pool", value=True).props('data-testid="as-pool"')
        ui.icon("help_outline").classes("text-grey-7").tooltip(POOL_TOOLTIP)
    error = ui.label().classes("text-negative").props('data-testid="deploy-error"')

    async def deploy() -> None:
        spec = DeploySpec(engine=engine.value, model_id=(model_id.value or "").strip(), model_tag=(tag.value or "").strip(),
                          replicas=int(replicas.value or 0), deploy_as_pool=pool.value,
                          gpus_per_replica=None if gpus.value is None else int(gpus.value), engine_args=engine_args.value or "")
        button.props("loading")
        result, problem = await act(lambda: runtime().controller.deploy(spec))
        button.props(remove="loading")
        error.set_text(problem or "")
        if result:
            notify(f"{result.deployment.name}: starting {spec.replicas} replica(s)", "positive")

    button = ui.button(on_click=deploy).props('data-testid="deploy"')
    button.bind_text_from(pool, "value", backward=lambda is_pool: "Deploy as Model Pool" if is_pool else "Deploy")


def _pools() -> dict[str, str]:
    return {d.name: f"{d.name} ({d.modelName})" for d in runtime().controller.list_deployments() if d.isPool}


def _service_form(events: ClientEvents) -> None:
    pools = _pools()
    pool = ui.select(pools, label="Model pool", value=next(iter(pools), None)).classes("w-full").props('data-testid="service-pool"')
    with ui.row().classes("w-full gap-2 no-wrap"):
        business = ui.input("Business tag", placeholder="production").classes("grow").props('data-testid="service-business"')
        name = ui.input("Service name", placeholder="production-chat").classes("grow").props('data-testid="service-name"')
    external = ui.toggle({False: "internal (ClusterIP)", True: "external (LoadBalancer)"}, value=False)
    error = ui.label().classes("text-negative")

    async def create() -> None:
        if not pool.value:
            error.set_text("deploy a model pool first: a business service selects replicas of a pool")
            return
        result, problem = await act(lambda: runtime().controller.deploy_service(
            (name.value or "").strip(), pool.value, (business.value or "").strip(), bool(external.value)))
        error.set_text(problem or "")
        if result:
            notify(f"service {result.service.name} created", "positive")
            business.set_value("")
            name.set_value("")

    live(events, POD_EVENTS, lambda: keep_pool_choice(pool, _pools()))
    ui.button("Create Business Service", on_click=create).props('data-testid="create-service"')


# test panel -----------------------------------------------------------------------------------
MAX_TOKENS_DEFAULT = 128  # an engine's own default can be 1,024 tokens or more: minutes for a small model on a CPU
MAX_TOKENS_LIMIT = 4096
DRAW_INTERVAL_S = 0.1  # a streamed answer is redrawn at most this often (a redraw sends the whole text)


def bounded_max_tokens(value: Any) -> int | None:
    """The panel's `max_tokens`: a whole number in 1..MAX_TOKENS_LIMIT, or None for anything else."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not number.is_integer() or not 1 <= number <= MAX_TOKENS_LIMIT:
        return None
    return int(number)


def chat_body(model: str, message: str, max_tokens: int) -> dict[str, Any]:
    """What the Test panel sends: one user message, streamed, bounded by `max_tokens`."""
    return {"model": model, "messages": [{"role": "user", "content": message}], "stream": True, "max_tokens": max_tokens}


def answer_status(seconds: float, chunks: int, finish: str | None, max_tokens: int, stopped: bool = False) -> str:
    """`done in 1.3 s · 128 chunks · finish: length (max_tokens 128 reached)`, or `stopped after …`."""
    head = f"stopped after {seconds:.1f} s" if stopped else f"done in {seconds:.1f} s"
    parts = [head, f"{chunks} chunk{'s' if chunks != 1 else ''}"]
    if finish and not stopped:
        parts.append(f"finish: {finish}" + (f" (max_tokens {max_tokens} reached)" if finish == "length" else ""))
    return " · ".join(parts)


def _test_panel(events: ClientEvents) -> None:
    """A streamed chat through a business service. Send always works: it stops the answer in flight (if any) and asks
    again, with the service chosen now; Stop closes the stream (the gateway then stops the replica's work). What the
    panel shows belongs to the newest request only: the replica line is cleared when a request starts and set from
    that request's `x-corral-replica` header."""
    def options() -> dict[str, str]:
        return {s.name: f"{s.displayName} → {s.modelName} ({s.readyReplicas} ready)"
                for s in runtime().controller.list_business_services()}

    service = ui.select(options(), label="Business service").classes("w-full").props('data-testid="test-service"')
    def refresh_options() -> None:
        current = options()
        if current != service.options:
            service.set_options(current, value=service.value if service.value in current else None)

    live(events, POD_EVENTS, refresh_options)
    message = ui.textarea("Message", value="Hello! Who are you?").classes("w-full").props("autogrow")
    with ui.row().classes("w-full items-center gap-2 no-wrap"):
        max_tokens = ui.number("Max tokens", value=MAX_TOKENS_DEFAULT, min=1, max=MAX_TOKENS_LIMIT, precision=0) \
            .classes("w-32").props('dense data-testid="test-max-tokens"') \
            .tooltip(f"max_tokens of the request (1..{MAX_TOKENS_LIMIT}): the answer stops there")
        button = ui.button("Send", icon="send").props('data-testid="test-send"')
        stop_button = ui.button("Stop", icon="stop").props('outline color=negative data-testid="test-stop"')
        stop_button.set_enabled(False)
    reply = ui.markdown().classes("w-full bg-grey-2 rounded p-2 min-h-12").props('data-testid="test-reply"')
    replica = ui.label().classes("text-sm text-grey-8").props('data-testid="test-replica"')
    status = ui.label().classes("text-xs text-grey-8 -mt-3").props('data-testid="test-status"')
    current: list[asyncio.Task[Any] | None] = [None]  # the request whose answer the panel shows

    async def send() -> None:
        me = asyncio.current_task()
        previous, current[0] = current[0], me
        if previous is not None and not previous.done():  # a new Send replaces the answer in flight
            previous.cancel()
            await asyncio.wait({previous})
        stop_button.set_enabled(False)
        replica.set_text("")
        if not service.value:
            replica.set_text("pick a business service first")
            return
        limit = bounded_max_tokens(max_tokens.value)
        if limit is None:
            status.set_text(f"max tokens: a whole number from 1 to {MAX_TOKENS_LIMIT}")
            return
        view = next((s for s in runtime().controller.list_business_services() if s.name == service.value), None)
        if view is None or not view.baseUrl:
            replica.set_text(f"{service.value}: no such business service any more")
            return
        mine = lambda: current[0] is me  # noqa: E731 (a cancelled request never writes over a newer one)
        text, chunks, finish, started, drawn = "", 0, None, time.monotonic(), 0.0
        reply.set_content("…")
        replica.set_text(f"asking {view.name}…")
        status.set_text("")
        stop_button.set_enabled(True)
        try:
            async with httpx.AsyncClient(timeout=120) as client, \
                    client.stream("POST", f"{view.baseUrl}/chat/completions",
                                  json=chat_body(view.modelName, message.value or "", limit)) as response:
                replica.set_text(f"answered by {response.headers.get('x-corral-replica', '?')} (HTTP {response.status_code})")
                if response.status_code != 200:
                    reply.set_content(f"`{_error_text(await response.aread())[:500]}`")
                    status.set_text("")
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                    if piece := (choice.get("delta") or {}).get("content"):
                        text += piece
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
                    if (now := time.monotonic()) - drawn >= DRAW_INTERVAL_S:
                        drawn = now
                        reply.set_content(text)
                        status.set_text(f"streaming · {chunks} chunks · {now - started:.1f} s")
            reply.set_content(text or "(empty answer)")
            status.set_text(answer_status(time.monotonic() - started, chunks, finish, limit))
        except asyncio.CancelledError:  # Stop, a newer Send, or the browser went away: the stream is closed
            if mine():
                reply.set_content(text or "(stopped before the first chunk)")
                status.set_text(answer_status(time.monotonic() - started, chunks, None, limit, stopped=True))
            raise
        except (httpx.HTTPError, ValueError) as exc:
            if mine():
                replica.set_text(f"request failed: {exc}")
                status.set_text("")
        finally:
            if mine():
                stop_button.set_enabled(False)

    def stop() -> None:
        if current[0] is not None and not current[0].done():
            current[0].cancel()

    button.on_click(send)
    stop_button.on_click(stop)
    ui.context.client.on_delete(stop)


def _error_text(body: bytes) -> str:
    """An error answer's reason: the gateway's (and engines') OpenAI shape `{"error": {"message": …}}`, else the body."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return error if isinstance(error, str) else body.decode(errors="replace")


# deployments ----------------------------------------------------------------------------------
def _deployments(refusals: dict[str, str], redraw: Any) -> None:
    views = runtime().controller.list_deployments()
    if not views:
        ui.label("Nothing deployed yet: use the Model Configuration tab.").classes("text-grey-7")
    for view in views:
        with ui.row().classes("w-full items-center gap-4 border-b py-2").props(f'data-testid="deployment-{view.name}"'):
            with ui.column().classes("gap-0 w-72"):
                ui.label(view.name).classes("font-medium")
                ui.label(f"{view.engine}{' (simulator)' if view.isSimulator else ''} · {view.modelId}").classes("text-xs text-grey-7")
            ui.badge("Model Pool" if view.isPool else "Standard", color="primary" if view.isPool else "grey-7")
            with ui.column().classes("gap-0 w-36"):
                ui.label(f"replicas {view.currentReplicas}, ready {view.readyReplicas}").props('data-testid="replicas"')
                if view.readyReplicas < view.currentReplicas:
                    ui.linear_progress(value=view.readyReplicas / max(1, view.currentReplicas), show_value=False).props("instant-feedback")
            with ui.column().classes("gap-0 grow"):
                if isinstance(view, PoolDeploymentView):
                    ui.label(f"Assignment: {view.assignment}").props('data-testid="assignment"')
                    ui.label(f"available for scale-down: {view.availableForScaleDown}").classes("text-sm")
                    if view.availableForScaleDown < view.currentReplicas:  # else any scale-down is allowed: no warning
                        ui.label("Can only scale down unassigned pods").classes("text-xs text-warning").props('data-testid="scale-warning"')
                    with ui.row().classes("items-center gap-1"):
                        autopilot_ui.pool_badge(view.name)
                    _adapters(view)
                elif view.baseUrl:
                    ui.label(view.baseUrl).classes("text-xs font-mono")
                if view.name in refusals:
                    ui.label(refusals[view.name]).classes("text-negative text-sm").props('data-testid="refusal"')
            _scale_control(view, refusals, redraw)


def _scale_control(view: PoolDeploymentView | StandardDeploymentView, refusals: dict[str, str], redraw: Any) -> None:
    target = ui.number("target", value=view.currentReplicas, min=0, max=256, precision=0).classes("w-24").props('dense data-testid="scale-target"')

    async def scale() -> None:
        wanted = int(target.value if target.value is not None else -1)
        if wanted < view.currentReplicas and not await confirm(
                f"Scale {view.name} down from {view.currentReplicas} to {wanted} replicas?"):
            return
        refusals.pop(view.name, None)
        result, problem = await act(lambda: runtime().controller.scale(view.name, wanted, pool_endpoint=view.isPool))
        if problem:
            refusals[view.name] = problem
            notify(problem, "negative")
            redraw()
        elif result:
            notify(f"{view.name}: {result.currentReplicas} → {result.targetReplicas} replicas", "positive")

    async def delete() -> None:
        if await confirm(f"Delete {view.name} and stop its {view.currentReplicas} replica(s)?"):
            _, problem = await act(lambda: runtime().controller.delete_deployment(view.name))
            if problem:
                notify(problem, "negative")

    ui.button("Scale", on_click=scale).props('dense data-testid="scale"')
    ui.button(icon="delete", on_click=delete).props("flat dense color=negative").tooltip("delete")


def _adapters(view: PoolDeploymentView) -> None:
    """A vLLM pool's LoRA adapters (multi-LoRA): each answers to its own `model` name on the pool's business
    services; how many ready replicas have it loaded; removed here (unloaded from every replica)."""
    for adapter in view.adapters:
        with ui.row().classes("items-center gap-1 text-sm").props(f'data-testid="adapter-{view.name}-{adapter.name}"'):
            ui.icon("extension", size="xs").classes("text-grey-7")
            ui.label(f"{adapter.name} ({adapter.loadedOn}/{adapter.readyReplicas} loaded)").tooltip(
                f"LoRA rank {adapter.rank} from {adapter.taskId or adapter.path}: send model: {adapter.name}")

            async def remove(_: Any, name: str = adapter.name) -> None:
                if await confirm(f"Unload adapter {name} from every replica of {view.name}?"):
                    _, problem = await act(lambda: runtime().adapters.remove(view.name, name))
                    notify(problem or f"adapter {name} removed", "negative" if problem else "positive")

            ui.button(icon="close", on_click=remove).props("flat dense size=sm color=negative").tooltip("remove this adapter")


async def confirm(question: str) -> bool:
    with ui.dialog() as dialog, ui.card():
        ui.label(question)
        with ui.row():
            ui.button("Cancel", on_click=lambda: dialog.submit(False)).props("flat")
            ui.button("Yes", on_click=lambda: dialog.submit(True)).props('color=negative data-testid="confirm"')
    answer = await dialog
    dialog.delete()
    return bool(answer)


# business services and their load --------------------------------------------------------------
def _services(events: ClientEvents) -> None:
    """One block per business service: what it selects, its endpoint, its load figures and chart. Rebuilt only
    when the set of services changes; readiness and load are set in place (see `corral.ui.load`)."""
    shown: dict[str, loadview.ServiceFigures] = {}
    ready: dict[str, ui.label] = {}
    built: list[Any] = [None]  # the services' identities the blocks were built for

    def identity(views: list[Any]) -> list[tuple[str, ...]]:
        return [(v.name, v.displayName, v.businessTag or "", v.modelName, v.baseUrl or "") for v in views]

    @ui.refreshable
    def blocks() -> None:
        shown.clear()
        ready.clear()
        views = runtime().controller.list_business_services()
        built[0] = identity(views)
        if not views:
            ui.label("No business service yet: create one in the Service Configuration tab.").classes("text-grey-7")
        for view in views:
            with ui.column().classes("w-full border-b border-gray-200 pb-2 gap-1").props(f'data-testid="service-{view.name}"'):
                with ui.row().classes("w-full items-center gap-3"):
                    ui.label(view.name).classes("font-medium")
                    ui.badge(view.businessTag or "", color="primary").props("outline")
                    ui.label(f"→ {view.modelName}").classes("text-sm")
                    ready[view.name] = ui.label().classes("text-sm").props(f'data-testid="service-ready-{view.name}"')
                    ui.label(view.baseUrl or "").classes("text-xs font-mono text-grey-7")
                    ui.space()
                    autopilot_ui.policy_button(view.name)
                    tenancy_ui.keys_button(view.name)
                    ui.button(icon="delete", on_click=lambda _, v=view: delete(v)) \
                        .props(f'flat dense color=negative data-testid="delete-service-{view.name}"') \
                        .tooltip("delete this business service")
                shown[view.name] = loadview.ServiceFigures(view.name)
        follow()

    def follow() -> None:  # on events: the structure if it changed, else the ready counts
        views = runtime().controller.list_business_services()
        if identity(views) != built[0]:
            blocks.refresh()
            return
        for view in views:
            text = f"{view.readyReplicas} ready of {view.replicas} assigned"
            if view.name in ready and ready[view.name].text != text:
                ready[view.name].set_text(text)
        redraw_load()

    def redraw_load() -> None:
        loads = loadview.by_service(loadview.overview(events))
        for name, figures in shown.items():
            figures.show(loads.get(name))

    async def delete(view: Any) -> None:
        stranded = f" Its {view.replicas} replica(s) go back to unassigned." if view.replicas else ""
        if await confirm(f"Delete business service {view.name}?{stranded}"):
            _, problem = await act(lambda: runtime().controller.delete_service(view.name, force=True))
            notify(problem or f"service {view.name} deleted", "negative" if problem else "positive")

    blocks()
    live(events, POD_EVENTS, follow)
    live(events, loadview.EVENTS, redraw_load)


# pods -----------------------------------------------------------------------------------------
POD_COLUMNS = [
    {"name": "name", "label": "Pod name", "field": "name", "sortable": True, "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "sortable": True, "align": "left"},
    {"name": "model", "label": "Model", "field": "model", "sortable": True, "align": "left"},
    {"name": "business", "label": "Business", "field": "business", "sortable": True, "align": "left"},
    {"name": "placement", "label": "Node / GPU", "field": "placement", "align": "left"},
    {"name": "inFlight", "label": "In flight", "field": "inFlight", "sortable": True, "align": "right"},
    {"name": "rps", "label": "Req/s", "field": "rps", "sortable": True, "align": "right"},
    {"name": "age", "label": "Age", "field": "age", "sortable": True, "align": "left"},  # sorted by creation time
    {"name": "action", "label": "Action", "field": "result", "align": "left"},
]
BUSINESS_CELL = r"""
<q-td :props="props">
  <q-select v-if="props.row.isPoolPod" dense options-dense borderless style="min-width: 9rem"
            :options="props.row.options" :model-value="props.row.business" :data-testid="'business-' + props.row.name"
            @update:model-value="value => $parent.$emit('assign', {pod: props.row.name, business: value, model: props.row.model})" />
  <span v-else>N/A</span>
</q-td>
"""
ACTION_CELL = r"""
<q-td :props="props" :data-testid="'result-' + props.row.name">
  <span v-if="props.row.result === '✓'" class="text-positive text-lg">✓</span>
  <span v-else class="text-negative text-xs">{{ props.row.result }}</span>
</q-td>
"""


def _pods(events: ClientEvents) -> None:
    results: dict[str, str] = {}  # pod → ✓ or the error of its last assignment from this page
    search = ui.input(placeholder="filter by name, model, business, status…").props("dense clearable").classes("w-96")
    # Paged on the server: a redraw sends one page of rows, however many pods there are.
    wanted: dict[str, Any] = {"rowsPerPage": 25, "sortBy": "name", "descending": False, "page": 1}
    table = ui.table(columns=POD_COLUMNS, rows=[], row_key="name", pagination={**wanted, "rowsNumber": 0}) \
        .classes("w-full").props('dense flat data-testid="pods"')
    table.add_slot("body-cell-business", BUSINESS_CELL)
    table.add_slot("body-cell-action", ACTION_CELL)

    load: list[dict[str, loadview.PodLoad]] = [{}]  # the replicas' load the rows were built with

    def redraw() -> None:
        rows, pagination = page_of(pod_rows(results, load[0]), search.value or "", wanted)
        if rows != table.rows or pagination != table.pagination:  # an event that changed nothing here sends nothing
            table.rows = rows
            table.pagination = pagination
            table.update()

    def request(event: Any) -> None:  # the table asks for another page, sort order or page size
        wanted.update(event.args["pagination"])
        redraw()

    async def assign(event: Any) -> None:
        pod, business, model = event.args["pod"], event.args["business"], event.args.get("model")
        _, problem = await act(lambda: runtime().controller.assign_pod(pod, business, model))
        results[pod] = problem or "✓"
        redraw()

    def follow_load() -> None:  # on each load event (once a second): rows are rebuilt only when some replica's load moved
        current = loadview.by_pod(loadview.overview(events))
        if current != load[0]:
            load[0] = current
            redraw()

    table.on("request", request)
    table.on("assign", assign)
    search.on_value_change(lambda: (wanted.update(page=1), redraw()))
    follow_load()
    redraw()
    live(events, POD_EVENTS, redraw)
    live(events, loadview.EVENTS, follow_load)


SHARED_GPU_COLUMNS = [
    {"name": "unit", "label": "GPU", "field": "unit", "align": "left"},
    {"name": "awake", "label": "Awake", "field": "awake", "align": "left"},
    {"name": "sleeping", "label": "Asleep (level)", "field": "sleeping", "align": "left"},
]
TIMING_COLUMNS = [
    {"name": "model", "label": "Model", "field": "model", "align": "left"},
    {"name": "wake", "label": "Wake p50 / p95 (s)", "field": "wake", "align": "right"},
    {"name": "sleep", "label": "Sleep p50 / p95 (s)", "field": "sleep", "align": "right"},
    {"name": "count", "label": "Wakes / sleeps", "field": "count", "align": "right"},
]


def sharing_rows(sharing: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """`SleepManager.sharing` as the tab's two tables and its host-memory line."""
    gpus = [{"unit": g["unit"], "awake": f"{g['awake']} ({g['awakeModel']})" if g["awake"] else "—",
             "sleeping": ", ".join(f"{s['pod']} ({s['model']}, {s['level']})" for s in g["sleeping"]) or "—"}
            for g in sharing["gpus"] if g["awake"] or g["sleeping"]]

    def pair(a: float | None, b: float | None) -> str:
        return "—" if a is None else f"{a:.2f} / {b:.2f}"

    timings = [{"model": m["model"], "wake": pair(m["wakeP50S"], m["wakeP95S"]),
                "sleep": pair(m["sleepP50S"], m["sleepP95S"]), "count": f"{m['wakes']} / {m['sleeps']}"}
               for m in sharing["models"]]
    budget = sharing["hostBytesBudget"]
    host = (f"host memory of level-1 sleepers: {sharing['hostBytesUsed'] / 1024**3:.1f} GiB"
            + (f" of {budget / 1024**3:.0f} GiB" if budget else " (no budget set)"))
    return gpus, timings, host


def _shared_gpus(events: ClientEvents) -> None:
    """Each GPU with its awake replica and those asleep on it (sharedGpus pools), and the wake and sleep times
    measured per model: redrawn on every replica status change (a sleep or a wake is one)."""
    ui.label("Replicas of sharedGpus pools: one awake per GPU, the others asleep (issue 31). The gateway wakes a "
             "model on the first request it holds.").classes("text-xs text-grey-7")
    gpus = ui.table(columns=SHARED_GPU_COLUMNS, rows=[], row_key="unit").classes("w-full") \
        .props('dense flat data-testid="shared-gpus"')
    timings = ui.table(columns=TIMING_COLUMNS, rows=[], row_key="model").classes("w-full") \
        .props('dense flat data-testid="sleep-timings"')
    host = ui.label("").classes("text-xs text-grey-8").props('data-testid="host-memory"')

    async def redraw() -> None:
        ledger = await asyncio.to_thread(runtime().gpu_ledger)  # reads the inventory: off the event loop
        gpu_rows, timing_rows, host_text = sharing_rows(runtime().sleeping.sharing(ledger))
        if gpu_rows != gpus.rows or timing_rows != timings.rows:
            gpus.rows, timings.rows = gpu_rows, timing_rows
            gpus.update()
            timings.update()
        host.set_text(host_text)

    ui.timer(0.1, redraw, once=True)
    live(events, POD_EVENTS, lambda: background_tasks.create(redraw(), name="shared-gpus"))


def page_of(rows: list[dict[str, Any]], text: str, wanted: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Filter (any column contains `text`), sort and cut one page; the pagination the table shows."""
    if needle := text.strip().lower():
        rows = [r for r in rows if any(needle in str(r[k]).lower() for k in ("name", "status", "model", "business", "placement"))]
    key = wanted.get("sortBy") or "name"
    by_age = key == "age"  # youngest first: newest creation time first

    def order(row: dict[str, Any]) -> Any:
        value = row["createdAt"] if by_age else row.get(key, "")
        return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))  # numbers as numbers

    rows = sorted(rows, key=order, reverse=bool(wanted.get("descending")) != by_age)
    per_page = int(wanted.get("rowsPerPage") or 0) or max(1, len(rows))  # 0: all rows
    pages = max(1, -(-len(rows) // per_page))
    page = min(max(1, int(wanted.get("page") or 1)), pages)
    pagination = {"rowsPerPage": int(wanted.get("rowsPerPage") or 0), "sortBy": key, "descending": bool(wanted.get("descending")),
                  "page": page, "rowsNumber": len(rows)}
    return rows[(page - 1) * per_page: page * per_page], pagination


def pod_rows(results: dict[str, str], load: dict[str, loadview.PodLoad] | None = None) -> list[dict[str, Any]]:
    load = load or {}
    controller = runtime().controller
    pods = controller.list_pods()
    services = controller.services()
    options = {m: [L.UNASSIGNED, *businesses_of_model(services, m)] for m in {p.model for p in pods if p.isPoolPod and p.model}}
    now = datetime.now(timezone.utc)
    rows = []
    for pod in pods:
        status = pod.status.value + ("" if pod.ready or pod.status != PodPhase.RUNNING else " (not ready)")
        if pod.sleep != SleepState.AWAKE:  # sleep mode (issue 31): asleep at level N, or waking
            status += f" · {pod.sleep.value}" + (f" (level {pod.sleepLevel})" if pod.sleepLevel else "")
        rows.append({
            "name": pod.name, "status": status, "model": pod.model or "", "isPoolPod": pod.isPoolPod,
            "business": pod.business if pod.isPoolPod else "N/A",
            "options": options.get(pod.model or "", [L.UNASSIGNED]),
            "placement": f"{runtime().settings.backend} · " + (f"GPU {','.join(map(str, pod.gpuIds))}" if pod.gpuIds else "CPU"),
            "age": _age(now, pod.createdAt), "createdAt": pod.createdAt or "", "result": results.get(pod.name, ""),
            "inFlight": load.get(pod.name, IDLE).in_flight, "rps": load.get(pod.name, IDLE).requests_per_s,
        })
    return rows


IDLE = loadview.PodLoad()


def _age(now: datetime, created: str | None) -> str:
    if not created:
        return ""
    seconds = int((now - datetime.fromisoformat(created)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(0, seconds)}s"


# assignment board -----------------------------------------------------------------------------
def _board(events: ClientEvents) -> None:
    pools = _pools
    with ui.row().classes("items-center gap-4"):
        chosen = ui.select(pools(), label="Model pool", value=next(iter(pools()), None)).classes("w-96").props('data-testid="board-pool"')
        ui.button("Distribute by ratio…", icon="balance", on_click=lambda: _distribute_dialog(chosen.value)) \
            .props('outline data-testid="distribute"')
    dragged: dict[str, str] = {}
    # Load, set in place once a second: business → (its label, its pods, its services); pod → its label.
    business_load: dict[str, tuple[ui.label, list[str], list[str]]] = {}
    pod_load: dict[str, ui.label] = {}

    @ui.refreshable
    def columns() -> None:
        business_load.clear()
        pod_load.clear()
        if not chosen.value:
            ui.label("No model pool yet.").classes("text-grey-7")
            return
        status = runtime().controller.pool_status(chosen.value)
        pods = runtime().controller.list_pods(chosen.value)
        services = [s for s in runtime().backend.list_services() if s.is_business_service and s.model == status.modelName]
        businesses = [b for b in status.podDistribution if b != L.UNASSIGNED] + [L.UNASSIGNED]
        with ui.row().classes("w-full gap-3 items-start"):
            for business in businesses:
                mine = [p for p in pods if p.business == business]
                column = ui.column().classes("w-60 min-h-40 bg-grey-2 rounded p-2 gap-2").props(f'data-testid="board-column-{business}"')
                column.on("dragover.prevent", lambda: None)
                column.on("drop", lambda _, target=business: move(target))
                with column:
                    ui.label(f"{business} ({len(mine)})").classes("font-medium")
                    label = ui.label().classes("text-xs text-grey-8 -mt-2").props(f'data-testid="board-load-{business}"')
                    business_load[business] = (label, [p.name for p in mine], [s.name for s in services if s.business == business])
                    for pod in mine:
                        card = ui.card().classes("w-full p-2 cursor-grab gap-0").props(f'draggable data-testid="card-{pod.name}"')
                        card.on("dragstart", lambda _, name=pod.name: dragged.update(pod=name))
                        with card:
                            ui.label(pod.name).classes("text-sm font-mono")
                            ui.label(pod.status.value + (" · ready" if pod.ready else "")).classes("text-xs text-grey-7")
                            pod_load[pod.name] = ui.label().classes("text-xs text-grey-8")
        show_load()

    def show_load() -> None:
        """Each business's load next to its replicas: the requests/s and in-flight of its replicas in this pool, the
        p95 latency of its services; each card its replica's."""
        load = loadview.overview(events)
        pods, services = loadview.by_pod(load), loadview.by_service(load)
        for label, names, service_names in business_load.values():
            mine = [pods.get(n, IDLE) for n in names]
            p95s = [v for n in service_names if n in services and (v := services[n].latencyMs.p95) is not None]
            text = (f"{loadview.rate(sum(m.requests_per_s for m in mine))} · {sum(m.in_flight for m in mine)} in flight"
                    + (f" · p95 {loadview.ms(max(p95s))}" if p95s else ""))
            if label.text != text:
                label.set_text(text)
        for name, label in pod_load.items():
            mine = pods.get(name, IDLE)
            text = f"{loadview.rate(mine.requests_per_s)} · {mine.in_flight} in flight"
            if label.text != text:
                label.set_text(text)

    async def move(target: str) -> None:
        pod = dragged.pop("pod", None)
        if pod is None:
            return
        _, problem = await act(lambda: runtime().controller.assign_pod(pod, target, None))
        notify(problem or f"{pod} → {target}", "negative" if problem else "positive")

    def redraw() -> None:
        keep_pool_choice(chosen, pools())
        columns.refresh()

    chosen.on_value_change(columns.refresh)
    columns()
    live(events, POD_EVENTS, redraw)
    live(events, loadview.EVENTS, show_load)


def keep_pool_choice(select: ui.select, pools: dict[str, str]) -> None:
    """New options; the choice stays if that pool still exists, else the first pool (or none)."""
    if pools != select.options or select.value not in pools:
        select.set_options(pools, value=select.value if select.value in pools else next(iter(pools), None))


def _distribute_dialog(pool: str | None) -> None:
    if not pool:
        notify("no model pool selected", "warning")
        return
    status = runtime().controller.pool_status(pool)
    businesses = [b for b in status.podDistribution if b != L.UNASSIGNED]
    with ui.dialog() as dialog, ui.card().classes("w-[32rem]"):
        ui.label(f"Distribute {pool} by ratio").classes("text-lg")
        if not businesses:
            ui.label("Create a business service for this pool's model first.")
        ratios = {b: ui.number(b, value=1, min=0, precision=2).classes("w-full") for b in businesses}
        preview = ui.column().classes("gap-0").props('data-testid="distribute-preview"')
        error = ui.label().classes("text-negative")

        async def run(dry_run: bool) -> None:
            wanted = {b: float(field.value or 0) for b, field in ratios.items()}
            result, problem = await act(lambda: runtime().controller.distribute(pool, wanted, None, dry_run=dry_run))
            error.set_text(problem or "")
            if not result:
                return
            if dry_run:
                preview.clear()
                with preview:
                    ui.label("targets: " + ", ".join(f"{b} {n}" for b, n in result.targets.items())).classes("font-medium")
                    for m in result.moves:
                        ui.label(f"{m.podName}: {m.from_} → {m.to}").classes("text-sm font-mono")
                    if not result.moves:
                        ui.label("no moves needed").classes("text-sm font-mono")
            else:
                notify(f"{len(result.moves)} move(s) applied", "positive")
                dialog.close()

        with ui.row():
            ui.button("Preview", on_click=lambda: run(True)).props('outline data-testid="distribute-preview-button"')
            ui.button("Apply", on_click=lambda: run(False)).props('data-testid="distribute-apply"')
            ui.button("Close", on_click=dialog.close).props("flat")
    dialog.open()
