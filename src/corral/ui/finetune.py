"""The finetune page (`/finetune`): GPU banner, submit form with the memory estimate, task table, task detail."""

from __future__ import annotations

import asyncio
import html
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from nicegui import app, run, ui
from nicegui import events as ui_events

from corral.auth import token_accepted
from corral.backends.local.process import tail_lines
from corral.domain.errors import CorralError
from corral.domain.finetune_request import ADAPTER_METHODS, METHODS
from corral.domain.hyperparameters import CHOICES, DEFAULTS, SWITCHES, TEXTS
from corral.domain.tasks import FINISHED, TaskState
from corral.events import EventType
from corral.finetune.dataset import read_dataset
from corral.finetune.intake import PREVIEW_TIMEOUT_S, training_estimate
from corral.paths import confine_dataset
from corral.ui.inference import engine_choices
from corral.ui.live import ClientEvents, act, live, notify, runtime
from corral.views import ExportState, FinetuneTask, GpuInfo, PreviewResult, gpu_info

STATUS_COLORS = {TaskState.PENDING: "grey-6", TaskState.QUEUED: "warning", TaskState.PREPARING: "light-blue-6",
                 TaskState.TRAINING: "primary", TaskState.COMPLETED: "positive", TaskState.FAILED: "negative",
                 TaskState.CANCELLED: "grey-8"}
TASK_EVENTS = (EventType.FINETUNE_TASK,)
# A task's detail also follows the pools and services deployed from it (its chat box).
DETAIL_EVENTS = (EventType.FINETUNE_TASK, EventType.DEPLOYMENT, EventType.SERVICE_DEPLOYMENT, EventType.POD_ASSIGNMENT,
                 EventType.REPLICA_STATUS, EventType.ADAPTERS)


def page(events: ClientEvents) -> None:
    ui.page_title("Corral · Finetune")
    _gpu_banner(events)
    warning = ui.label().classes("w-full bg-warning text-black rounded p-2").props('data-testid="queue-warning"')

    def show_warning() -> None:
        text = runtime().finetune.queue_summary().warning
        warning.set_text(text or "")
        warning.set_visibility(bool(text))

    show_warning()
    live(events, TASK_EVENTS, show_warning)
    detail = ui.column().classes("w-full")
    # min-w-0: a flex item may shrink below its content's width, so the table wraps its cells instead of pushing the
    # row wider than the page (and scrolling sideways) at 1280 px.
    with ui.row().classes("w-full gap-4 items-start no-wrap"):
        with ui.card().classes("w-5/12 min-w-0").props('data-testid="submit-form"'):
            ui.label("New finetune task").classes("text-lg font-medium")
            _submit_form()
        with ui.card().classes("w-7/12 min-w-0").props('data-testid="tasks-card"'):
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
    hp = DEFAULTS
    base_model = ui.input("Base model", placeholder="a local model directory or org/name").classes("w-full").props('data-testid="ft-model"')
    with ui.row().classes("w-full items-center gap-2 no-wrap"):
        dataset = ui.input("Dataset (JSONL, Parquet, Arrow or a datasets directory)", placeholder="/path/to/train.jsonl") \
            .classes("grow").props('data-testid="ft-dataset"')
        upload = _upload_widget()
    dataset_note = ui.label().classes("text-xs").props('data-testid="ft-dataset-note"')
    mix = ui.textarea("Mix with (optional): one dataset a line, its path then its ratio (0 to 1, default 1)",
                      placeholder="/data/more.jsonl 0.5\n/data/other.parquet").classes("w-full").props(
                          'rows=2 autogrow data-testid="ft-mix"')
    with ui.row().classes("w-full gap-2 no-wrap"):
        method = ui.select(list(METHODS), value="lora", label="Method").classes("w-28")
        priority = ui.select(["high", "normal", "low"], value="normal", label="Priority").classes("w-28")
        gpus = ui.number("GPUs", value=1 if runtime().gpu_inventory.available else 0, min=0, max=64, precision=0).classes("w-20")
        timeout_h = ui.number("Timeout (h)", value=runtime().settings.finetune_timeout_s / 3600, min=0.01, precision=2).classes("w-28")
    business = ui.input("Business (optional)", placeholder="its GPU-seconds are billed to it (Usage page); empty: "
                        "under (finetune)").classes("w-full").props('data-testid="ft-business"')
    with ui.expansion("Hyperparameters").classes("w-full").props('data-testid="hp"'):
        with ui.row().classes("gap-2 items-center"):
            fields = {key: _hyperparameter_field(key, value) for key, value in hp.items()}
    estimate = ui.label().classes("text-sm text-grey-8").props('data-testid="ft-estimate"')
    error = ui.label().classes("text-negative").props('data-testid="ft-error"')

    def update_estimate() -> None:
        count = max(1, int(gpus.value or 1))
        known = training_estimate(base_model.value or "", method.value, {
            "maxSeqLen": fields["maxSeqLen"].value or 1024, "batchSize": fields["batchSize"].value or 1,
            "loraRank": fields["loraRank"].value or 8, "gradientCheckpointing": bool(fields["gradientCheckpointing"].value)}, count)
        if known is None:
            estimate.set_text("memory estimate: known for the catalogue models (e.g. Qwen/Qwen2.5-Coder-7B-Instruct's directory name)")
            return
        spec, memory = known
        estimate.set_text(f"estimated GPU memory for {spec.display} {method.value}: {memory.total_gb:.1f} GB"
                          + (f" on each of {count} GPUs (one data-parallel process per GPU, each with a whole copy)" if count > 1 else ""))

    checks = [0]  # the newest dataset check: an older one that ends later (a big file typed over) never writes its note

    async def check_dataset() -> None:
        checks[0] += 1
        mine = checks[0]
        path = (dataset.value or "").strip()
        if not path:
            dataset_note.set_text("")
            return
        try:  # only files under the dataset roots are opened: the note never tells what another file holds
            confined = confine_dataset(path, runtime().settings.dataset_roots)
            count = len((await run.io_bound(read_dataset, confined)).examples)
            text, colour = f"✓ {count} examples", "text-positive"
        except CorralError as exc:
            text, colour = exc.message, "text-negative"
        if mine == checks[0] and path == (dataset.value or "").strip():
            dataset_note.set_text(text).classes(replace=f"text-xs {colour}")

    def dataset_changed() -> None:
        if error.text:  # the last submit's error was about the form before this dataset (an upload too): not this one
            error.set_text("")

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
        # As typed: the manager's one check (domain.hyperparameters) takes 2.0 as 2 and refuses 2.5, NaN, ...
        hyperparameters = {k: v for k, v in values.items() if v is not None}
        result, problem = await act(lambda: _submit(base_model.value, dataset.value, method.value, priority.value,
                                                    int(gpus.value or 0), float(timeout_h.value or 0) * 3600, hyperparameters,
                                                    mix_entries(dataset.value or "", mix.value or ""),
                                                    (business.value or "").strip() or None))
        error.set_text(problem or "")
        if result:
            notify(f"{result.id}: {result.status}", "positive")

    for element in (base_model, method, gpus, fields["maxSeqLen"], fields["batchSize"], fields["loraRank"], fields["gradientCheckpointing"]):
        element.on_value_change(update_estimate)
    dataset.on("blur", check_dataset)
    dataset.on_value_change(check_dataset)
    dataset.on_value_change(dataset_changed)
    upload.on_upload(received)
    update_estimate()
    preview_box = ui.column().classes("w-full gap-1").props('data-testid="ft-preview-box"')

    previewing: list[asyncio.Task[Any] | None] = [None]

    async def show_preview() -> None:
        if previewing[0] is not None and not previewing[0].done():
            return  # one at a time: the button is disabled while it runs
        previewing[0] = asyncio.current_task()
        model, data = (base_model.value or "").strip(), (dataset.value or "").strip()
        mixed = mix_entries(data, mix.value or "")
        started = time.monotonic()
        preview_box.clear()
        with preview_box, ui.row().classes("items-center gap-2 no-wrap").props('data-testid="ft-preview-progress"'):
            ui.spinner(size="sm")
            doing = ui.label().classes("text-sm text-grey-8")
            ui.button("Cancel", on_click=lambda: previewing[0] and previewing[0].cancel()).props(
                'flat dense data-testid="ft-preview-cancel"')

            def tick() -> None:
                doing.set_text(preview_progress(model, data, time.monotonic() - started))

            tick()
            ui.timer(1.0, tick)  # goes with the row when the result replaces it
        preview_button.disable()
        try:
            result, problem = await act(lambda: runtime().finetune.preview(
                base_model=model, dataset_path=data if mixed is None else None, datasets=mixed,
                max_seq_len=fields["maxSeqLen"].value, train_on_prompt=bool(fields["trainOnPrompt"].value), examples=3,
                chat_template=fields["chatTemplate"].value, batch_size=fields["batchSize"].value, method=method.value))
        except asyncio.CancelledError:  # Cancel: the preview's child process is killed with it
            preview_box.clear()
            with preview_box:
                ui.label(f"preview cancelled after {time.monotonic() - started:.0f} s").classes("text-sm text-grey-8") \
                    .props('data-testid="ft-preview-error"')
            raise
        finally:
            preview_button.enable()
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
    if value is None and key == "loraAlpha":
        field.props('placeholder="2 × loraRank"')
    return field


def _preview(result: PreviewResult) -> None:
    """The dataset as the trainer sees it: counts, the first examples with the trained tokens highlighted, and the
    length histogram with what `maxSeqLen` cuts."""
    cut = f"{result.truncated} truncated at turn boundaries ({result.turnsCut} earlier messages left out), {result.dropped} dropped" + (
        " (" + "; ".join(f"{n} × {why}" for why, n in result.dropReasons.items()) + ")" if result.dropReasons else "")
    share = f"{100 * result.trainedTokens / result.totalTokens:.0f}%" if result.totalTokens else "0%"
    ui.label(f"{result.format}: {result.count} examples; {cut} at maxSeqLen {result.maxSeqLen}; {share} of the tokens trained"
             + ("" if result.analyzed == result.count else f" (first {result.analyzed} analysed)")) \
        .classes("text-sm").props('data-testid="ft-preview-summary"')
    for source in result.sources:  # a mix: what each source gives
        ui.label(f"{source.path}: {source.taken} of {source.examples} examples ({source.format}, ratio {source.ratio:g})") \
            .classes("text-xs font-mono").props('data-testid="ft-preview-source"')
    if (packing := result.packing) is not None:
        ui.label(f"padding per epoch at batchSize {packing.batchSize}: {packing.padTokens} tokens unpacked ({packing.rows} rows), "
                 f"{packing.packedPadTokens} packed ({packing.packedRows} rows of at most {result.maxSeqLen} tokens)") \
            .classes("text-xs text-grey-8").props('data-testid="ft-preview-packing"')
    for warning in result.warnings:  # the end of a turn against the model's EOS, markers that are not tokens
        ui.label(f"⚠ {warning}").classes("text-sm text-warning").props('data-testid="ft-preview-warning"')
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
    upload.add_slot("header", UPLOAD_HEADER.replace("IDLE", f".jsonl, ≤ {size_text(settings.upload_max_bytes)}"))
    if settings.api_token:
        def accepted(given: Any) -> bool:
            return token_accepted(str(given or ""), settings.api_token)

        upload.set_enabled(accepted(app.storage.user.get("token")))  # the binding below moves only once a token is saved
        upload.bind_enabled_from(app.storage.user, "token", backward=accepted)
    return upload


# Quasar's header read "0.0B / 0.00%" whenever no upload runs (after a good one too); this one shows the progress only
# while a file goes up, else what it takes.
UPLOAD_HEADER = r"""
<div class="q-uploader__header-content column">
  <div class="flex flex-center no-wrap q-gutter-xs">
    <q-spinner v-if="props.isUploading" class="q-uploader__spinner" />
    <div class="col column justify-center">
      <div class="q-uploader__title">upload</div>
      <div class="q-uploader__subtitle" data-testid="ft-upload-state">{{ props.isUploading ? props.uploadProgressLabel : 'IDLE' }}</div>
    </div>
    <q-btn v-if="props.canAddFiles" type="a" icon="add_box" flat dense @click="props.pickFiles"><q-uploader-add-trigger /></q-btn>
    <q-btn v-if="props.isUploading" type="a" icon="clear" flat dense @click="props.abort" />
  </div>
</div>
"""


def size_text(size: int) -> str:
    """`256 MB`, `1.5 kB`: a byte count as people read it (powers of 1,024)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 or value.is_integer() else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def preview_progress(model: str, dataset: str, elapsed_s: float) -> str:
    """What a running preview does, and for how long (it loads transformers and a tokenizer in a child process:
    seconds to a minute)."""
    return (f"loading the tokenizer of {Path(model).name or model} and tokenizing {Path(dataset).name or dataset} in a child "
            f"process… {elapsed_s:.0f} s (gives up after {PREVIEW_TIMEOUT_S:.0f} s)")


async def _submit(base_model: str, dataset: str, method: str, priority: str, gpus: int, timeout_s: float,
                  hyperparameters: dict[str, Any], datasets: list[dict[str, Any]] | None = None,
                  business_tag: str | None = None) -> FinetuneTask:
    return runtime().finetune.submit(base_model=(base_model or "").strip(),
                                     dataset_path=(dataset or "").strip() if datasets is None else None, method=method,
                                     priority=priority, gpus=gpus, timeout_s=timeout_s, hyperparameters=hyperparameters,
                                     datasets=datasets, business_tag=business_tag)


def mix_entries(dataset: str, mix: str) -> list[dict[str, Any]] | None:
    """The form's `datasets`: None when the mix box is empty (the dataset field alone, as `datasetPath`); else the
    dataset field (ratio 1, when filled) then each line of the box, `path [ratio]` (a last word that is a number is the
    ratio). The manager's one check (`domain.finetune_request.check_dataset_sources`) judges the result."""
    lines = [line.strip() for line in mix.splitlines() if line.strip()]
    if not lines:
        return None
    entries: list[dict[str, Any]] = [{"path": dataset.strip(), "ratio": 1.0}] if dataset.strip() else []
    for line in lines:
        path, _, last = line.rpartition(" ")
        try:
            entries.append({"path": path.strip(), "ratio": float(last)} if path.strip() else {"path": line})
        except ValueError:
            entries.append({"path": line})
    return entries


# task table -----------------------------------------------------------------------------------
def _task_table(events: ClientEvents, open_detail: Any) -> None:
    """The tasks, sized for the card at 1280 px: cells wrap instead of scrolling sideways (model and submit time
    under the id, method over priority, a failed or cancelled task's reason under its status)."""
    table = ui.table(columns=TASK_COLUMNS, rows=[], row_key="id", pagination={"rowsPerPage": 15, "sortBy": "created", "descending": True}) \
        .classes("w-full").props(f'dense flat wrap-cells data-testid="tasks" :visible-columns="{VISIBLE_COLUMNS!r}"')
    table.add_slot("body-cell-id", ID_CELL)
    table.add_slot("body-cell-status", STATUS_CELL)
    table.add_slot("body-cell-method", METHOD_CELL)
    table.add_slot("body-cell-progress", PROGRESS_CELL)
    table.add_slot("body-cell-actions", ACTIONS_CELL)

    def redraw() -> None:
        manager = runtime().finetune
        table.rows = [task_row(t, manager.resumable(t.id)) for t in manager.list()]
        table.update()

    async def cancel(event: Any) -> None:
        _, problem = await act(lambda: runtime().finetune.cancel(event.args))
        notify(problem or f"{event.args} cancelled", "negative" if problem else "positive")

    async def resume(event: Any) -> None:
        _, problem = await act(lambda: runtime().finetune.resume(event.args))
        notify(problem or f"{event.args} resumed from its last checkpoint", "negative" if problem else "positive")

    table.on("cancel", cancel)
    table.on("resume", resume)
    table.on("detail", lambda event: open_detail(event.args))
    redraw()
    live(events, TASK_EVENTS, redraw)
    ui.timer(30, redraw)  # "ETA … (in 5 min)" stays true between progress reports


def eta_text(eta_at: float | None, now: float | None = None, label: str = "ETA") -> str | None:
    """`ETA 14:32 (in 5 min)`: the expected end (or another time, after `label`) as a clock time (this server's time
    zone), and how far off it is."""
    if eta_at is None:
        return None
    now = time.time() if now is None else now
    left = max(0.0, eta_at - now)
    if left < 60:
        distance = f"in {left:.0f} s"
    elif left < 3600:
        distance = f"in {left / 60:.0f} min"
    else:
        distance = f"in {int(left // 3600)} h {int(left % 3600 // 60)} min"
    clock = time.strftime("%H:%M" if left < 20 * 3600 else "%a %H:%M", time.localtime(eta_at))
    return f"{label} {clock} ({distance})"


def task_row(task: FinetuneTask, resumable: bool = False) -> dict[str, Any]:
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
    if task.status == TaskState.TRAINING:
        eta_at = progress.get("etaAt")
        if eta_at is None and (eta := progress.get("eta")) is not None:  # reported by an older trainer: a duration only
            parts.append(f"ETA in {int(eta)} s")
        elif text := eta_text(eta_at):
            parts.append(text)
    if task.status == TaskState.QUEUED and task.startBy:  # easy-backfill's promise to the head of the queue
        parts.append(eta_text(datetime.fromisoformat(task.startBy).timestamp(), label="GPUs reserved, starts by") or "")
    created = (task.createdAt or "")[:19].replace("T", " ")
    return {
        "id": task.id, "status": task.status.value, "color": STATUS_COLORS.get(task.status, "grey"), "reason": task.reason,
        # The reason is the point of a failed or cancelled row: shown in it, not only on hover.
        "shownReason": task.reason if task.status in (TaskState.FAILED, TaskState.CANCELLED) else "",
        "failed": task.status == TaskState.FAILED,
        "model": Path(task.baseModel).name, "method": task.method, "priority": task.priority, "fraction": fraction,
        "progressText": " · ".join(p for p in parts if p), "created": created, "createdShort": created[5:16],
        "cancellable": task.status not in FINISHED, "resumable": resumable,
    }


TASK_COLUMNS = [
    {"name": "id", "label": "Task", "field": "id", "sortable": True, "align": "left"},
    {"name": "status", "label": "Status", "field": "status", "sortable": True, "align": "left"},
    {"name": "method", "label": "Method", "field": "method", "align": "left"},
    {"name": "progress", "label": "Progress", "field": "fraction", "align": "left"},
    {"name": "created", "label": "Submitted", "field": "created", "sortable": True, "align": "left"},  # sorts; shown under the id
    {"name": "actions", "label": "", "field": "id", "align": "right"},
]
VISIBLE_COLUMNS = ["id", "status", "method", "progress", "actions"]
ID_CELL = r"""
<q-td :props="props">
  <div class="font-mono text-xs">{{ props.row.id }}</div>
  <div class="text-xs text-grey-7" style="word-break: break-all">{{ props.row.model }}
    <q-tooltip>{{ props.row.model }}, submitted {{ props.row.created }} UTC</q-tooltip>
  </div>
  <div class="text-xs text-grey-7" style="white-space: nowrap">{{ props.row.createdShort }}</div>
</q-td>
"""
STATUS_CELL = r"""
<q-td :props="props" style="max-width: 15rem">
  <q-badge :color="props.row.color" :label="props.row.status" :data-testid="'status-' + props.row.id">
    <q-tooltip v-if="props.row.reason">{{ props.row.reason }}</q-tooltip>
  </q-badge>
  <div v-if="props.row.shownReason" class="text-xs q-mt-xs" style="white-space: normal; word-break: break-word"
       :class="props.row.failed ? 'text-negative' : 'text-grey-8'" :data-testid="'reason-' + props.row.id">
    {{ props.row.shownReason.length > 160 ? props.row.shownReason.slice(0, 160) + '…' : props.row.shownReason }}
  </div>
</q-td>
"""
METHOD_CELL = r"""
<q-td :props="props">
  <div>{{ props.row.method }}</div>
  <div class="text-xs text-grey-7">{{ props.row.priority }}</div>
</q-td>
"""
PROGRESS_CELL = r"""
<q-td :props="props" style="min-width: 8rem">
  <q-linear-progress v-if="props.row.fraction !== null" :value="props.row.fraction" size="8px" rounded class="q-mb-xs" />
  <span class="text-xs" :data-testid="'progress-' + props.row.id">{{ props.row.progressText }}</span>
</q-td>
"""
ACTIONS_CELL = r"""
<q-td :props="props" style="white-space: nowrap">
  <q-btn flat dense icon="visibility" @click="() => $parent.$emit('detail', props.row.id)" :data-testid="'detail-' + props.row.id" />
  <q-btn v-if="props.row.cancellable" flat dense color="negative" icon="cancel"
         @click="() => $parent.$emit('cancel', props.row.id)" :data-testid="'cancel-' + props.row.id" />
  <q-btn v-if="props.row.resumable" flat dense color="primary" icon="replay"
         @click="() => $parent.$emit('resume', props.row.id)" :data-testid="'resume-' + props.row.id">
    <q-tooltip>resume from its last checkpoint</q-tooltip>
  </q-btn>
</q-td>
"""


# task detail ----------------------------------------------------------------------------------
# The tooltip's figures rounded as the summary line shows them (ECharts shows a float as stored: 5.92929744720459).
LOSS_FORMAT = "v => v == null ? '–' : Number(v).toPrecision(4)"
RATE_FORMAT = "v => v == null ? '–' : Number(v).toExponential(2)"


def _curve_chart(title: str, names: list[str], y_name: str, test_id: str, value_format: str = LOSS_FORMAT) -> ui.echart:
    return ui.echart({
        "title": {"text": title, "textStyle": {"fontSize": 13}}, "tooltip": {"trigger": "axis", ":valueFormatter": value_format},
        "animation": False,
        "grid": {"left": 60, "right": 15, "top": 35, "bottom": 40},
        "xAxis": {"type": "value", "name": "step", "nameLocation": "middle", "nameGap": 24, "minInterval": 1},
        "yAxis": {"type": "value", "name": y_name, "scale": True},
        "legend": {"data": names, "top": 0, "right": 0, "show": len(names) > 1},
        "series": [{"name": name, "type": "line", "data": [], "showSymbol": name == "eval"} for name in names],
    }).classes("w-1/2 h-56").props(f'data-testid="{test_id}"')


def _show_detail(container: ui.column, events: ClientEvents, task_id: str) -> None:
    """One task as LlamaBoard shows it: loss (train and eval) and learning-rate curves, ETA, the log, and for a result:
    export (merged weights), deploy as a pool, and a chat with the deployed pool through its business service."""
    container.clear()
    with container, ui.card().classes("w-full").props('data-testid="task-detail"'):
        with ui.row().classes("w-full items-center"):
            ui.label(f"Task {task_id}").classes("text-lg font-medium")
            ui.space()
            ui.button(icon="close", on_click=container.clear).props("flat round dense")
        with ui.row().classes("w-full gap-0 no-wrap items-start"):
            loss_chart = _curve_chart("loss", ["train", "eval"], "loss", "loss-chart")
            lr_chart = _curve_chart("learning rate", ["lr"], "lr", "lr-chart", RATE_FORMAT)
        curve = ui.label().classes("text-xs text-grey-8").props('data-testid="loss-summary"')
        with ui.element("div").classes("w-full h-48 overflow-auto flex flex-col-reverse"):  # reversed: stays scrolled to the end
            log = ui.code("", language="text").classes("w-full text-xs").props('data-testid="task-log"')
        about = ui.column().classes("w-full gap-1")
        results = _Results(ui.column().classes("w-full gap-2"), task_id)

    def redraw() -> None:
        manager = runtime().finetune
        try:
            task = manager.get(task_id)
        except CorralError:
            container.clear()
            return
        curves = manager.curves(task_id)
        points, evals, rates = curves["loss"], curves["evalLoss"], curves["learningRate"]
        loss_chart.options["series"][0]["data"] = [list(point) for point in points]
        loss_chart.options["series"][1]["data"] = [list(point) for point in evals]
        lr_chart.options["series"][0]["data"] = [list(point) for point in rates]
        loss_chart.update()
        lr_chart.update()
        text = f"{len(points)} logged steps, last loss {points[-1][1]:.4f}" if points else "no step logged yet"
        if evals:
            text += f"; eval loss {evals[-1][1]:.4f}"
        if rates:
            text += f"; learning rate {rates[-1][1]:.2e}"
        if (dropped := task.progress.get("dropped")) is not None:
            text += f"; dataset: {task.progress.get('truncated', 0)} truncated, {dropped} dropped at maxSeqLen"
        if (padding := task.progress.get("padTokens")) is not None and task.progress.get("batchTokens"):
            text += (f"; padding {padding} of {task.progress['batchTokens']} batch tokens"
                     + (f" (packed into {task.progress['packedRows']} rows)" if task.progress.get("packedRows") else ""))
        if task.status == TaskState.TRAINING and (eta := eta_text(task.progress.get("etaAt"))):
            text += f"; {eta}"
        curve.set_text(text)
        log.set_content(tail_lines(manager.log_path(task_id), 200))
        about.clear()
        with about:
            ui.label(f"{task.status.value}: {task.reason}").classes("text-sm").style("word-break: break-word") \
                .props('data-testid="task-status-line"')
            ui.label("parameters: " + ", ".join(f"{k}={v}" for k, v in task.hyperparameters.items())) \
                .classes("text-xs font-mono").style("word-break: break-word")
            if task.output:
                ui.label(f"output: {task.output}").classes("text-xs font-mono")
            if log_dir := task.progress.get("logDir"):  # reportTo tensorboard: Corral runs no TensorBoard, it says where
                ui.label(f"TensorBoard: tensorboard --logdir {log_dir}").classes("text-xs font-mono") \
                    .props('data-testid="task-logdir"')
            for source in task.datasets or []:
                ui.label(f"dataset {source.path}: {source.taken} of {source.examples} examples (ratio {source.ratio:g})") \
                    .classes("text-xs font-mono")
            if manager.resumable(task_id):
                async def resume() -> None:
                    _, problem = await act(lambda: manager.resume(task_id))
                    notify(problem or f"{task_id} resumed from its last checkpoint", "negative" if problem else "positive")

                ui.button("Resume from checkpoint", icon="replay", on_click=resume).props('outline dense data-testid="resume"')
        results.refresh(task)

    redraw()
    live(events, DETAIL_EVENTS, redraw)


class _Results:
    """Export, deploy and chat for a completed task. The controls are drawn once (what is typed in them survives the
    redraws that progress and pod events cause); the export line and the chat targets follow every redraw."""

    def __init__(self, container: ui.column, task_id: str) -> None:
        self.container = container
        self.task_id = task_id
        self.state_label: ui.label | None = None
        self.chat: ui.column | None = None
        self.chat_key = ""

    def refresh(self, task: FinetuneTask) -> None:
        manager = runtime().finetune
        if task.status != TaskState.COMPLETED:
            if self.state_label is not None:
                self.container.clear()
                self.state_label = self.chat = None
            return
        if self.state_label is None:
            with self.container:
                with ui.row().classes("items-center gap-2"):
                    ui.button("Export merged weights", icon="download", on_click=self.export) \
                        .props('outline dense data-testid="export"')
                    self.state_label = ui.label().classes("text-xs font-mono").props('data-testid="export-state"')
                _deploy_control(task)
                self.chat = ui.column().classes("w-full gap-1").props('data-testid="chat-box"')
            self.chat_key = ""
        self.show(manager.export_state(self.task_id))
        targets = chat_targets(task)
        if repr(targets) != self.chat_key:  # redrawn only when a pool or service changed: a typed message stays
            self.chat_key = repr(targets)
            assert self.chat is not None
            self.chat.clear()
            with self.chat:
                _chat_box(*targets)

    def show(self, state: ExportState) -> None:
        assert self.state_label is not None
        self.state_label.set_text({"done": f"merged weights in {state.directory}", "running": "merging…",
                                   "failed": f"export failed: {state.reason}", "none": ""}[state.state])

    async def export(self) -> None:
        async def start() -> ExportState:
            return runtime().finetune.export(self.task_id)

        state, problem = await act(start)
        notify(problem or f"export {state.state}: " + (state.directory or state.reason), "negative" if problem else "positive")
        if state is not None:
            self.show(state)


def chat_targets(task: FinetuneTask) -> tuple[list[dict[str, str]], list[str]]:
    """Where to chat with a task's result: ([{service, url, model}] of business services on pools deployed from it,
    [pools deployed from it that no business service serves yet])."""
    controller = runtime().controller
    output = task.output or ""
    merged = str(Path(output).parent / "merged") if output else ""
    pools: dict[str, str] = {}  # pool → the model name requests must carry
    for deployment in controller.list_deployments():
        if not deployment.isPool:
            continue
        if output and (deployment.modelId in (output, merged) or any(output in arg for arg in deployment.engineArgs)):
            pools[deployment.name] = deployment.modelName
        for adapter in getattr(deployment, "adapters", None) or []:  # added to a running vLLM pool
            if adapter.taskId == task.id:
                pools[deployment.name] = adapter.name
    targets, served = [], set()
    for service in controller.list_business_services():
        if service.modelPool in pools and service.baseUrl:
            targets.append({"service": service.name, "url": service.baseUrl, "model": pools[service.modelPool],
                            "ready": str(service.readyReplicas)})
            served.add(service.modelPool)
    return targets, [pool for pool in pools if pool not in served]


def _chat_box(targets: list[dict[str, str]], unserved: list[str]) -> None:
    """Chat with the result the way the Test panel does: through a business service of a pool deployed from it."""
    if not targets:
        if unserved:
            ui.label(f"deployed as {', '.join(unserved)}: create a business service for it and assign replicas on the "
                     "Inference page to chat with it").classes("text-xs text-grey-8").props('data-testid="chat-hint"')
            ui.link("open the Inference page (Test panel)", "/").classes("text-xs")
        return
    ui.label("Chat with the result").classes("text-sm font-medium")
    options = {t["service"]: f"{t['service']} ({t['ready']} ready) → {t['model']}" for t in targets}
    service = ui.select(options, value=targets[0]["service"], label="Business service").classes("w-72") \
        .props('dense data-testid="chat-service"')
    message = ui.input("Message", value="Hello! Who are you?").classes("w-full").props('dense data-testid="chat-message"')
    reply = ui.label().classes("text-sm bg-grey-2 rounded p-2 w-full").style("white-space: pre-wrap").props('data-testid="chat-reply"')

    async def send() -> None:
        target = next(t for t in targets if t["service"] == service.value)
        body = {"model": target["model"], "messages": [{"role": "user", "content": message.value or ""}], "max_tokens": 256}
        button.props("loading")
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                response = await client.post(f"{target['url']}/chat/completions", json=body)
            if response.status_code == 200:
                choices = response.json().get("choices") or [{}]
                reply.set_text((choices[0].get("message") or {}).get("content") or "(empty answer)")
            else:
                reply.set_text(f"HTTP {response.status_code}: {response.text[:500]}")
        except httpx.HTTPError as exc:
            reply.set_text(f"request failed: {exc}")
        finally:
            button.props(remove="loading")

    button = ui.button("Send", icon="send", on_click=send).props('dense data-testid="chat-send"')


def deploy_engines(task: FinetuneTask) -> tuple[dict[str, str], str]:
    """The engines "Deploy as pool" offers (those that cannot run here say so, as on the Inference page) and its
    default: vLLM for an adapter (it serves the LoRA on its base model) and `transformers` for full weights when
    installed, else the Inference page's default (the first engine installed here)."""
    labels, default = engine_choices(runtime().settings.backend)
    preferred = "vllm" if task.method != "full" else "transformers"
    if preferred in labels and "not installed" not in labels[preferred]:
        default = preferred
    return labels, default


def _deploy_control(task: FinetuneTask) -> None:
    with ui.row().classes("items-center gap-2"):
        engines, default = deploy_engines(task)
        engine = ui.select(engines, value=default, label="Engine").classes("w-64").props('data-testid="deploy-engine"')
        tag = ui.input("Model tag", value=task.id).classes("w-48")
        replicas = ui.number("Replicas", value=1, min=1, max=64, precision=0).classes("w-24")

        async def deploy() -> None:
            button.props("loading")
            result, problem = await act(lambda: runtime().finetune.deploy(
                task.id, engine=engine.value, model_tag=(tag.value or "").strip(), replicas=int(replicas.value or 1)))
            button.props(remove="loading")
            notify(problem or f"deployed as {result.deployment.name}", "negative" if problem else "positive")

        button = ui.button("Deploy as pool", icon="rocket_launch", on_click=deploy).props('data-testid="deploy-as-pool"')
    if task.method in ADAPTER_METHODS:
        _adapter_control(task)


def lora_pools() -> dict[str, str]:
    """Running vLLM pools that can take an adapter at run time (started with --enable-lora)."""
    return {d.name: f"{d.name} ({d.modelName})" for d in runtime().controller.list_deployments()
            if d.isPool and d.engine == "vllm" and "--enable-lora" in d.engineArgs}


def _adapter_control(task: FinetuneTask) -> None:
    """Deploy as adapter on pool…: the task's LoRA adapter loaded on every replica of a running vLLM pool (multi-LoRA);
    clients then send `model: <adapter name>` to the pool's business services."""
    pools = lora_pools()
    with ui.row().classes("items-center gap-2").props('data-testid="adapter-control"'):
        if not pools:
            ui.label("Deploy as adapter: no running vLLM pool started with --enable-lora").classes("text-xs text-grey-7")
            return
        pool = ui.select(pools, value=next(iter(pools)), label="Pool").classes("w-64").props('data-testid="adapter-pool"')
        name = ui.input("Adapter name", value=task.id).classes("w-48").props('data-testid="adapter-name"')

        async def add() -> None:
            from corral.adapters import task_adapter

            async def run() -> Any:
                path, rank = task_adapter(runtime().finetune.get(task.id))
                return await runtime().adapters.add(pool.value, (name.value or "").strip(), path=path, task_id=task.id, rank=rank)

            result, problem = await act(run)
            notify(problem or result.message, "negative" if problem else "positive")

        ui.button("Deploy as adapter on pool…", icon="extension", on_click=add).props('outline dense data-testid="deploy-as-adapter"')
