"""The autopilot on the inference page: a pool's settings (on its deployment row), a business's policy
(on its service block), and the recent decisions with their reasons (a card of their own).

Changes go through `act` (the API token is honoured) and the same `Autopilot` methods as the REST API,
so a bad value is refused with the API's message; the decisions card redraws on `autopilot` events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from nicegui import ui
from pydantic import ValidationError

from corral.events import EventType
from corral.ui.live import ClientEvents, act, live, notify, runtime
from corral.views import AutopilotSpec, BusinessPolicySpec

EVENTS = (EventType.AUTOPILOT, EventType.HISTORY)
# A dialog's fields take the dialog's width: a field sized to its value cut its label to "warm …" or "min rep…".
FIELD = "w-full"


def _problem(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


Spec = TypeVar("Spec", AutopilotSpec, BusinessPolicySpec)


async def _save(problem: ui.label, build: Callable[[], Spec], store: Callable[[Spec], Any]) -> Spec | None:
    """Validate what the form holds and store it through `act` (the API's token and refusals); a refusal is shown
    beside the form and nothing changes. The stored spec, or None."""
    try:
        spec = build()
    except (ValidationError, ValueError, TypeError) as exc:
        problem.set_text(_problem(exc) if isinstance(exc, ValidationError) else str(exc))
        return None

    async def apply() -> Any:
        return store(spec)

    _, refused = await act(apply)
    if refused:
        problem.set_text(refused)
        return None
    return spec


def pool_badge(pool: str) -> None:
    """`autopilot on` beside a pool that has it enabled, and the button that opens its settings."""
    settings = runtime().autopilot.settings(pool)
    if settings.enabled:
        ui.badge("autopilot on", color="positive").props(f'data-testid="autopilot-on-{pool}"')
    ui.button("Autopilot", icon="auto_mode", on_click=lambda: settings_dialog(pool)).props(
        f'flat dense data-testid="autopilot-{pool}"').tooltip("warm replicas follow demand across this pool's businesses")


def settings_dialog(pool: str) -> None:
    now = runtime().autopilot.settings(pool)
    with ui.dialog() as dialog, ui.card().classes("w-[30rem]").props('data-testid="autopilot-dialog"'):
        ui.label(f"Autopilot of {pool}").classes("text-lg font-medium")
        enabled = ui.switch("enabled", value=now.enabled).props('data-testid="autopilot-enabled"')
        spares = ui.number("warm spares (unassigned ready replicas to keep)", value=now.warmSpares, min=0, max=64, precision=0) \
            .classes(FIELD)
        cooldown = ui.number("cooldown, s (a moved replica stays)", value=now.cooldownSeconds, min=0, max=86_400).classes(FIELD)
        with ui.row():
            scale_out = ui.switch("scale out", value=now.scaleOut).tooltip("add replicas when moves cannot meet demand")
            scale_in = ui.switch("scale in", value=now.scaleIn).tooltip("remove idle spares above the warm spares")
        ceiling = ui.number("max replicas (empty: none)", value=now.maxReplicas, min=0, max=256, precision=0).classes(FIELD)
        slots = ui.number("replica concurrency (empty: the engine's --max-num-seqs)", value=now.replicaConcurrency,
                          min=1, precision=0).classes(FIELD)
        problem = ui.label().classes("text-negative text-sm").props('data-testid="autopilot-problem"')

        def build() -> AutopilotSpec:
            return AutopilotSpec.model_validate(now.model_copy(update={
                "enabled": bool(enabled.value), "warmSpares": int(spares.value or 0),
                "cooldownSeconds": float(cooldown.value or 0), "scaleOut": bool(scale_out.value),
                "scaleIn": bool(scale_in.value), "maxReplicas": _optional_int(ceiling.value),
                "replicaConcurrency": _optional_int(slots.value)}).wire())

        async def save() -> None:
            spec = await _save(problem, build, lambda spec: runtime().autopilot.set_settings(pool, spec))
            if spec is not None:
                notify(f"autopilot {'on' if spec.enabled else 'off'} for {pool}")
                dialog.close()

        with ui.row():
            ui.button("Cancel", on_click=dialog.close).props("flat")
            ui.button("Save", on_click=save).props('data-testid="autopilot-save"')
    dialog.open()


def policy_label(service: str) -> str:
    spec = runtime().autopilot.policy(service)
    top = "∞" if spec.maxReplicas is None else spec.maxReplicas
    targets = [f"waiting/replica ≤ {spec.target.waitingPerReplica:g}"] if spec.target.waitingPerReplica is not None else []
    targets += [f"TTFT p90 ≤ {spec.target.ttftP90Ms:g} ms"] if spec.target.ttftP90Ms is not None else []
    targets += ([f"concurrency/replica ≤ {spec.target.concurrencyPerReplica:g}"]
                if spec.target.concurrencyPerReplica is not None else [])
    return f"priority {spec.priority} · replicas {spec.minReplicas or 0}..{top}" + (f" · {', '.join(targets)}" if targets else "")


def policy_button(service: str) -> None:
    label = ui.label(policy_label(service)).classes("text-xs text-grey-7").props(f'data-testid="policy-{service}"')
    ui.button(icon="tune", on_click=lambda: policy_dialog(service, lambda: label.set_text(policy_label(service)))).props(
        f'flat dense data-testid="policy-button-{service}"').tooltip("the autopilot's policy for this business")


def policy_dialog(service: str, saved: Any = None) -> None:
    now = runtime().autopilot.policy(service)
    with ui.dialog() as dialog, ui.card().classes("w-[28rem]").props('data-testid="policy-dialog"'):
        ui.label(f"Autopilot policy of {service}").classes("text-lg font-medium")
        low = ui.number("min replicas", value=now.minReplicas, min=0, max=256, precision=0).classes(FIELD)
        high = ui.number("max replicas (empty: none)", value=now.maxReplicas, min=0, max=256, precision=0).classes(FIELD)
        priority = ui.number("priority (higher wins under scarcity)", value=now.priority, min=-1000, max=1000, precision=0) \
            .classes(FIELD)
        waiting = ui.number("target: waiting requests per replica", value=now.target.waitingPerReplica, min=0).classes(FIELD)
        ttft = ui.number("target: TTFT p90, ms (empty: none)", value=now.target.ttftP90Ms, min=1).classes(FIELD)
        concurrency = ui.number("target: running + waiting per replica (empty: none)",
                                value=now.target.concurrencyPerReplica, min=0.1).classes(FIELD) \
            .props('data-testid="policy-concurrency"')
        problem = ui.label().classes("text-negative text-sm").props('data-testid="policy-problem"')

        def build() -> BusinessPolicySpec:
            return BusinessPolicySpec.model_validate({
                "minReplicas": _optional_int(low.value), "maxReplicas": _optional_int(high.value),
                "priority": int(priority.value or 0),
                "target": {"waitingPerReplica": waiting.value, "ttftP90Ms": ttft.value or None,
                           "concurrencyPerReplica": concurrency.value or None}})

        async def save() -> None:
            if await _save(problem, build, lambda spec: runtime().autopilot.set_policy(service, spec)) is None:
                return
            notify(f"policy of {service} saved")
            if saved is not None:
                saved()
            dialog.close()

        with ui.row():
            ui.button("Cancel", on_click=dialog.close).props("flat")
            ui.button("Save", on_click=save).props('data-testid="policy-save"')
    dialog.open()


def decisions(events: ClientEvents) -> None:
    """The autopilot's recent decisions of every pool that has it on, newest first, with their reasons,
    and what each business is short of now."""

    @ui.refreshable
    def body() -> None:
        autopilot = runtime().autopilot
        pools = [d.name for d in runtime().controller.list_deployments() if d.isPool]
        statuses = [autopilot.status(pool) for pool in pools]
        statuses = [s for s in statuses if s.settings.enabled or s.decisions]
        if not statuses:
            ui.label("The autopilot is off for every pool: turn it on with a pool's Autopilot button.").classes("text-grey-7")
            return
        for status in statuses:
            with ui.column().classes("w-full gap-1").props(f'data-testid="decisions-{status.pool}"'):
                with ui.row().classes("items-center gap-2"):
                    ui.label(status.pool).classes("font-medium")
                    for business in status.businesses:
                        color = "negative" if business.pressure else "grey-7"
                        ui.badge(f"{business.business}: {business.readyReplicas} ready"
                                 + (f" · waiting {business.waiting:g}" if business.waiting else ""), color=color) \
                            .props("outline").tooltip(business.pressure or "no pressure")
                rows = [{"at": d.at[11:19], "what": "; ".join(f"{m.podName}: {m.source} → {m.target}" for m in d.moves)
                         + (f" scaled to {d.scaledTo}" if d.scaledTo is not None else "")
                         + (f" removed {', '.join(d.removed)}" if d.removed else ""),
                         "why": d.error or d.reason} for d in status.decisions[:10]]
                if rows:
                    ui.table(columns=[{"name": "at", "label": "When", "field": "at", "align": "left"},
                                      {"name": "what", "label": "What", "field": "what", "align": "left"},
                                      {"name": "why", "label": "Why", "field": "why", "align": "left",
                                       "style": "white-space: normal"}],
                             rows=rows).classes("w-full").props("dense flat")
                for note in status.waitingFor:
                    ui.label(note).classes("text-xs text-warning")

    body()
    live(events, EVENTS, body.refresh)
