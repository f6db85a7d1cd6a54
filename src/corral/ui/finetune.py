"""The finetune page (`/finetune`): GPU banner, submit form with the memory estimate, task table, task detail."""

from __future__ import annotations

import html
import secrets
from pathlib import Path
from typing import Any

from nicegui import app, run, ui
from nicegui import events as ui_events

from corral.auth import token_accepted
from corral.backends.local.process import tail_lines
from corral.domain.errors import CorralError
from corral.events import EventType
from corral.finetune.dataset import read_dataset
from corral.finetune.hyperparameters import CHOICES, SWITCHES, TEXTS
from corral.finetune.manager import DEFAULT_HYPERPARAMETERS, METHODS, training_estimate
from corral.finetune.store import FINISHED, TaskState
from corral.paths import confine_dataset
from corral.ui.live import ClientEvents, act, live, notify, runtime
from corral.views import FinetuneTask, GpuInfo, PreviewResult, gpu_info

STATUS_COLORS = {TaskState.PENDING: "grey-6", TaskState.QUEUED: "warning", TaskState.PREPARING: "light-blue-6",
                 TaskState.TRAINING: "primary", TaskState.COMPLETED: "positive", TaskState.FAILED: "negative",
                 TaskState.CANCELLED: "grey-8"}
TASK_EVENTS = (EventType.FINETUNE_TASK,)
TASK_COLUMNS = [
    {"name": "id", "label": "Task", "field": "id", "sortable": True, "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "sortable": True, "align": "left"},
    {"name": "model", "label": "Base model", "field": "model", "align": "left"},
    {"name": "method", "label": "Method", "field": "method", "align": "left"},
    {"name": "priority", "label": "Priority", "field": "priority", "sortable": True, "align": "left"},
    {"name": "progress", "label": "Progress", "field": "fraction", "align": "left"},
    {"name": "created", "label": "Submitted", "field": "created", "sortable": True, "align": "left"},
    {"name": "actions", "label": "", "field": "id", "align": "right"},
]
STATUS_CELL = r"""
<q-td :props="props">
  <q-badge :color="props.row.color" :label="props.row.status" :data-testid="'status-' + props.row.id">
    <q-tooltip v-if="props.row.reason">{{ props.row.reason }}</q-tooltip>
  </q-badge>
</q-td>
"""
PROGRESS_CELL = r"""
<q-td :props="props" style="min-width: 12rem">
  <q-linear-progress v-if="props.row.fraction !== null" :value="props.row.fraction" size="10px" rounded class="q-mb-xs" />
  <span class="text-xs">{{ props.row.progressText }}</span>
</q-td>
"""
ACTIONS_CELL = r"""
<q-td :props="props">
  <q-btn flat dense icon="visibility" @click="() => $parent.$emit('detail', props.row.id)" :data-testid="'detail-' + props.row.id" />
  <q-btn v-if="props.row.cancellable" flat dense color="negative" icon="cancel"
         @click="() => $parent.$emit('cancel', props.row.id)" :data-testid="'cancel-' + props.row.id" />
</q-td>
"""


def page(events: ClientEvents) -> None:
    ui.page_title("Corral · Finetune")
    _gpu_banner(events)
    warning = ui.label().classes("w-full bg-warning text-black rounded p-2").props('data-testid="queue-warning"')

    def show_warning() -> None:
        text = runtime().finetune.queue_summary()["warning"]
        warning.set_text(text or "")
        warning.set_visibility(bool(text))

    show_warning()
    live(events, TASK_EVENTS, show_warning)
    detail = ui.column().classes("w-full")
    with ui.row().classes("w-full gap-4 items-start no-wrap"):
        with ui.card().classes("w-5/12").props('data-testid="submit-form"'):
            ui.label("New finetune task").classes("text-lg font-medium")
            _submit_form()
        with ui.card().classes("w-7/12"):
            ui.label("Tasks").classes("text-lg font-medium")
            _task_table(events, lambda task_id: _show_detail(detail, events, task_id))


# GPU banner -----------------------------------------------------------------------------------
def _gpu_banner(events: ClientEvents) -> None:
    banner = ui.card().classes("w-full").props('data-testid="gpu-banner"')
    with banner:
        with ui.row().classes("items-center"):
            ui.spinner(size="sm")
            ui.label("Detecting GPU…")

    def draw(info: GpuInfo) -> None:
        banner.clear()
        with banner:
            if info.available:
                with ui.row().classes("gap-4"):
                    for device in info.devices:
                        with ui.column().classes("gap-0"):
                            ui.label(f"GPU {device.id}: {device.name}").classes("font-medium")
                            used = f"{device.memory_used_gb:.1f} / {device.memory_gb:.0f} GB used"
                            util = f", {device.utilization}% busy" if device.utilization is not None else ""
                            ui.label(used + util).classes("text-sm text-grey-8")
            else:
                ui.label("No GPU detected: finetuning runs on the CPU, one task at a time (small models only).") \
                    .classes("text-warning font-medium").props('data-testid="no-gpu-warning"')
            if info.warning and info.warning != info.recommendation:
                ui.label(info.warning).classes("text-sm text-grey-8")
            ui.label(f"Recommendation: {info.recommendation}").classes("text-sm").props('data-testid="recommendation"')

    async def load() -> None:
        rt = runtime()
        draw(await run.io_bound(gpu_info, rt.gpu_inventory, rt.catalogue))

    ui.timer(0.05, load, once=True)  # the page is delivered first; detection fills the banner
    live(events, (EventType.GPU_INVENTORY,), load)


# submit form ----------------------------------------------------------------------------------
def _submit_form() -> None:
    hp = DEFAULT_HYPERPARAMETERS
    base_model = ui.input("Base model", placeholder="a local model directory or org/name").classes("w-full").props('data-testid="ft-model"')
    with ui.row().classes("w-full items-center gap-2 no-wrap"):
        dataset = ui.input("Dataset (JSONL)", placeholder="/path/to/train.jsonl").classes("grow").props('data-testid="ft-dataset"')
        upload = _upload_widget()
    dataset_note = ui.label().classes("text-xs").props('data-testid="ft-dataset-note"')
    with ui.row().classes("w-full gap-2 no-wrap"):
        method = ui.select(list(METHODS), value="lora", label="Method").classes("w-28")
        priority = ui.select(["high", "normal", "low"], value="normal", label="Priority").classes("w-28")
        gpus = ui.number("GPUs", value=1 if runtime().gpu_inventory.available else 0, min=0, max=64, precision=0).classes("w-20")
        timeout_h = ui.number("Timeout (h)", value=runtime().settings.finetune_timeout_s / 3600, min=0.01, precision=2).classes("w-28")
    with ui.expansion("Hyperparameters").classes("w-full").props('data-testid="hp"'):
        with ui.row().classes("gap-2 items-center"):
            fields = {key: _hyperparameter_field(key, value) for key, value in hp.items()}
    estimate = ui.label().classes("text-sm text-grey-8").props('data-testid="ft-estimate"')
    error = ui.label().classes("text-negative").props('data-testid="ft-error"')

    def update_estimate() -> None:
        known = training_estimate(base_model.value or "", method.value, {
            "maxSeqLen": fields["maxSeqLen"].value or 1024, "batchSize": fields["batchSize"].value or 1,
            "loraRank": fields["loraRank"].value or 8, "gradientCheckpointing": bool(fields["gradientCheckpointing"].value)})
        if known is None:
            estimate.set_text("memory estimate: known for the catalogue models (e.g. Qwen/Qwen2.5-Coder-7B-Instruct's directory name)")
            return
        spec, memory = known
        estimate.set_text(f"estimated GPU memory for {spec.display} {method.value}: {memory.total_gb:.1f} GB")

    async def check_dataset() -> None:
        path = (dataset.value or "").strip()
        if not path:
            dataset_note.set_text("")
            return
        try:  # only files under the dataset roots are opened: the note never tells what another file holds
            confined = confine_dataset(path, runtime().settings.dataset_roots)
            count = len((await run.io_bound(read_dataset, confined)).examples)
            dataset_note.set_text(f"✓ {count} examples").classes(replace="text-xs text-positive")
        except CorralError as exc:
            dataset_note.set_text(exc.message).classes(replace="text-xs text-negative")

    async def received(event: ui_events.UploadEventArguments) -> None:
        settings = runtime().settings
        folder = settings.uploads_dir
        held = sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0
        if not upload.enabled or held >= settings.upload_max_files:  # the route refuses these already; belt and braces
            notify("upload refused: " + ("enter the API token first (key icon)" if not upload.enabled else
                                         f"the uploads folder already holds {held} files"), "negative")
            upload.reset()
            return
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = folder / f"{secrets.token_hex(4)}-{Path(event.file.name).name}"
        await event.file.save(target)
        dataset.set_value(str(target))
        upload.reset()

    async def submit() -> None:
        values = {key: field.value for key, field in fields.items()}
        # As typed: the manager's one check (finetune.hyperparameters) takes 2.0 as 2 and refuses 2.5, NaN, ...
        hyperparameters = {k: v for k, v in values.items() if v is not None}
        result, problem = await act(lambda: _submit(base_model.value, dataset.value, method.value, priority.value,
                                                    int(gpus.value or 0), float(timeout_h.value or 0) * 3600, hyperparameters))
        error.set_text(problem or "")
        if result:
            notify(f"{result.id}: {result.status}", "positive")

    for element in (base_model, method, fields["maxSeqLen"], fields["batchSize"], fields["loraRank"], fields["gradientCheckpointing"]):
        element.on_value_change(update_estimate)
    dataset.on("blur", check_dataset)
    dataset.on_value_change(check_dataset)
    upload.on_upload(received)
    update_estimate()
    preview_box = ui.column().classes("w-full gap-1").props('data-testid="ft-preview-box"')

    async def show_preview() -> None:
        preview_button.props("loading")
        result, problem = await act(lambda: runtime().finetune.preview(
            base_model=(base_model.value or "").strip(), dataset_path=(dataset.value or "").strip(),
            max_seq_len=fields["maxSeqLen"].value, train_on_prompt=bool(fields["trainOnPrompt"].value), examples=3))
        preview_button.props(remove="loading")
        preview_box.clear()
        with preview_box:
            if problem:
                ui.label(problem).classes("text-negative text-sm").props('data-testid="ft-preview-error"')
            else:
                _preview(result)

    with ui.row().classes("gap-2"):
        preview_button = ui.button("Preview", icon="visibility", on_click=show_preview).props('outline data-testid="ft-preview"')
        ui.button("Submit", icon="play_arrow", on_click=submit).props('data-testid="ft-submit"')


def _hyperparameter_field(key: str, value: Any) -> Any:
    """The form's control for one hyperparameter, by its kind: a switch, a choice, text, or a number."""
    if key in SWITCHES:
        return ui.switch(key, value=bool(value)).props(f'dense data-testid="hp-{key}"')
    if key in CHOICES:
        return ui.select(list(CHOICES[key]), value=value, label=key).classes("w-48").props(f'data-testid="hp-{key}"')
    if key in TEXTS:
        return ui.input(key, value=value).classes("w-48").props(f'data-testid="hp-{key}"')
    field = ui.number(key, value=value).classes("w-36").props(f'data-testid="hp-{key}"')
    if value is None and key == "learningRate":
        field.props('placeholder="1e-4 (LoRA), 1e-5 (full)"')
    return field


def _preview(result: PreviewResult) -> None:
    """The dataset as the trainer sees it: counts, the first examples with the trained tokens highlighted, and the
    length histogram with what `maxSeqLen` cuts."""
    cut = f"{result.truncated} truncated on the prompt side, {result.dropped} dropped" + (
        " (" + "; ".join(f"{n} × {why}" for why, n in result.dropReasons.items()) + ")" if result.dropReasons else "")
    share = f"{100 * result.trainedTokens / result.totalTokens:.0f}%" if result.totalTokens else "0%"
    ui.label(f"{result.format}: {result.count} examples; {cut} at maxSeqLen {result.maxSeqLen}; {share} of the tokens trained"
             + ("" if result.analyzed == result.count else f" (first {result.analyzed} analysed)")) \
        .classes("text-sm").props('data-testid="ft-preview-summary"')
    ui.label("highlighted: what the loss covers").classes("text-xs text-grey-8")
    for number, example in enumerate(result.examples):
        parts, at = [], 0
        for span in example.spans:
            parts.append(html.escape(example.text[at:span.start]))
            parts.append(f'<mark class="bg-green-2">{html.escape(example.text[span.start:span.end])}</mark>')
            at = span.end
        parts.append(html.escape(example.text[at:]))
        note = f"{example.trainedTokens} of {example.totalTokens} tokens trained" + (
            f", truncated from {example.originalTokens}" if example.truncated else "")
        ui.label(note).classes("text-xs text-grey-8")
        ui.html('<pre class="text-xs whitespace-pre-wrap m-0 p-2 bg-grey-2 rounded">' + "".join(parts) + "</pre>") \
            .classes("w-full").props(f'data-testid="ft-preview-example-{number}"')
    bins = result.lengthHistogram
    ui.echart({
        "title": {"text": "tokens per example", "textStyle": {"fontSize": 12}}, "tooltip": {"trigger": "axis"},
        "grid": {"left": 40, "right": 10, "top": 30, "bottom": 30},
        "xAxis": {"type": "category", "data": [f"{b.min}-{b.max}" for b in bins]}, "yAxis": {"type": "value", "minInterval": 1},
        "series": [{"type": "bar", "data": [{"value": b.count, "itemStyle": {"color": "#c10015" if b.overMaxSeqLen else "#1976d2"}}
                                            for b in bins]}],
    }).classes("w-full h-40").props('data-testid="ft-preview-histogram"')


def _upload_widget() -> ui.upload:
    """The dataset upload: one .jsonl file, at most CORRAL_UPLOAD_MAX_BYTES (also enforced on the server, by
    `corral.api.doors`). With a token configured it is disabled until the token is entered: NiceGUI refuses
    the upload route of a disabled widget (403) before reading the body, so nothing is written."""
    settings = runtime().settings
    upload = ui.upload(label="upload", auto_upload=True, max_file_size=settings.upload_max_bytes, max_files=1) \
        .props('accept=.jsonl flat dense data-testid="ft-upload"').classes("w-40")
    if settings.api_token:
        def accepted(given: Any) -> bool:
            return token_accepted(str(given or ""), settings.api_token)

        upload.set_enabled(accepted(app.storage.user.get("token")))  # the binding below moves only once a token is saved
        upload.bind_enabled_from(app.storage.user, "token", backward=accepted)
    return upload


async def _submit(base_model: str, dataset: str, method: str, priority: str, gpus: int, timeout_s: float,
                  hyperparameters: dict[str, Any]) -> FinetuneTask:
    return runtime().finetune.submit(base_model=(base_model or "").strip(), dataset_path=(dataset or "").strip(), method=method,
                                     priority=priority, gpus=gpus, timeout_s=timeout_s, hyperparameters=hyperparameters)


# task table -----------------------------------------------------------------------------------
def _task_table(events: ClientEvents, open_detail: Any) -> None:
    table = ui.table(columns=TASK_COLUMNS, rows=[], row_key="id", pagination={"rowsPerPage": 15, "sortBy": "created", "descending": True}) \
        .classes("w-full").props('dense flat data-testid="tasks"')
    table.add_slot("body-cell-status", STATUS_CELL)
    table.add_slot("body-cell-progress", PROGRESS_CELL)
    table.add_slot("body-cell-actions", ACTIONS_CELL)

    def redraw() -> None:
        table.rows = [task_row(t) for t in runtime().finetune.list()]
        table.update()

    async def cancel(event: Any) -> None:
        _, problem = await act(lambda: runtime().finetune.cancel(event.args))
        notify(problem or f"{event.args} cancelled", "negative" if problem else "positive")

    table.on("cancel", cancel)
    table.on("detail", lambda event: open_detail(event.args))
    redraw()
    live(events, TASK_EVENTS, redraw)


def task_row(task: FinetuneTask) -> dict[str, Any]:
    progress = task.progress
    step, total = progress.get("step"), progress.get("totalSteps")
    fraction = step / total if step is not None and total else None
    if task.status == TaskState.COMPLETED:
        fraction = 1.0
    parts = [f"step {step}/{total}" if fraction is not None and step is not None else ""]
    if (loss := progress.get("loss")) is not None:
        parts.append(f"loss {loss:.3f}")
    if (eval_loss := progress.get("evalLoss")) is not None:
        parts.append(f"eval {eval_loss:.3f}")
    if progress.get("truncated") or progress.get("dropped"):
        parts.append(f"{progress.get('truncated', 0)} cut, {progress.get('dropped', 0)} dropped")
    if (eta := progress.get("eta")) is not None and task.status == TaskState.TRAINING:
        parts.append(f"ETA {int(eta)} s")
    return {
        "id": task.id, "status": task.status.value, "color": STATUS_COLORS.get(task.status, "grey"), "reason": task.reason,
        "model": Path(task.baseModel).name, "method": task.method, "priority": task.priority, "fraction": fraction,
        "progressText": " · ".join(p for p in parts if p), "created": (task.createdAt or "")[:19].replace("T", " "),
        "cancellable": task.status not in FINISHED,
    }


# task detail ----------------------------------------------------------------------------------
def _show_detail(container: ui.column, events: ClientEvents, task_id: str) -> None:
    container.clear()
    with container, ui.card().classes("w-full").props('data-testid="task-detail"'):
        with ui.row().classes("w-full items-center"):
            ui.label(f"Task {task_id}").classes("text-lg font-medium")
            ui.space()
            ui.button(icon="close", on_click=container.clear).props("flat round dense")
        with ui.row().classes("w-full gap-4 no-wrap items-start"):
            chart = ui.echart({
                "title": {"text": "training loss", "textStyle": {"fontSize": 13}}, "tooltip": {"trigger": "axis"},
                "xAxis": {"type": "value", "name": "step", "minInterval": 1}, "yAxis": {"type": "value", "name": "loss", "scale": True},
                "legend": {"data": ["train", "eval"], "right": 0},
                "series": [{"name": "train", "type": "line", "data": [], "showSymbol": False},
                           {"name": "eval", "type": "line", "data": [], "showSymbol": True}],
            }).classes("w-1/2 h-64").props('data-testid="loss-chart"')
            with ui.element("div").classes("w-1/2 h-64 overflow-auto flex flex-col-reverse"):  # reversed: stays scrolled to the end
                log = ui.code("", language="text").classes("w-full text-xs").props('data-testid="task-log"')
        curve = ui.label().classes("text-xs text-grey-8").props('data-testid="loss-summary"')
        about = ui.column().classes("w-full gap-1")

    def redraw() -> None:
        manager = runtime().finetune
        try:
            task = manager.get(task_id)
        except CorralError:
            container.clear()
            return
        points = manager.loss_curve(task_id)
        evals = manager.loss_curve(task_id, "evalLoss")
        chart.options["series"][0]["data"] = [list(point) for point in points]
        chart.options["series"][1]["data"] = [list(point) for point in evals]
        chart.update()
        text = f"{len(points)} logged steps, last loss {points[-1][1]:.4f}" if points else "no step logged yet"
        if evals:
            text += f"; eval loss {evals[-1][1]:.4f}"
        if (dropped := task.progress.get("dropped")) is not None:
            text += f"; dataset: {task.progress.get('truncated', 0)} truncated, {dropped} dropped at maxSeqLen"
        curve.set_text(text)
        log.set_content(tail_lines(manager.log_path(task_id), 200))
        about.clear()
        with about:
            ui.label(f"{task.status}: {task.reason}").classes("text-sm")
            ui.label("parameters: " + ", ".join(f"{k}={v}" for k, v in task.hyperparameters.items())).classes("text-xs font-mono")
            if task.output:
                ui.label(f"output: {task.output}").classes("text-xs font-mono")
            if task.status == TaskState.COMPLETED:
                _deploy_control(task)

    redraw()
    live(events, TASK_EVENTS, redraw)


def _deploy_control(task: FinetuneTask) -> None:
    with ui.row().classes("items-center gap-2"):
        engine = ui.select(["vllm", "sglang", "transformers"], value="vllm" if task.method != "full" else "transformers",
                           label="Engine").classes("w-36")
        tag = ui.input("Model tag", value=task.id).classes("w-48")
        replicas = ui.number("Replicas", value=1, min=1, max=64, precision=0).classes("w-24")

        async def deploy() -> None:
            button.props("loading")
            result, problem = await act(lambda: runtime().finetune.deploy(
                task.id, engine=engine.value, model_tag=(tag.value or "").strip(), replicas=int(replicas.value or 1)))
            button.props(remove="loading")
            notify(problem or f"deployed as {result['deployment']['name']}", "negative" if problem else "positive")

        button = ui.button("Deploy as pool", icon="rocket_launch", on_click=deploy).props('data-testid="deploy-as-pool"')
