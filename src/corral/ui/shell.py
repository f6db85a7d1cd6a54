"""The frame around every page (header, navigation, API token) and the routes between pages."""

from __future__ import annotations

import secrets

from fastapi import FastAPI
from nicegui import app, ui

from corral.ui import finetune, history, inference, usage
from corral.ui.live import ClientEvents, notify, runtime, token_ok

PAGES = {"/": ("Inference", "hub"), "/finetune": ("Finetune", "model_training"), "/history": ("History", "history"),
         "/usage": ("Usage", "bar_chart")}


def mount(api: FastAPI) -> None:
    """Serve the UI at `/` of the API's app; routes under /api, /ws and /docs keep precedence."""
    ui.run_with(api, root=root, title="Corral", favicon="🐎", storage_secret=secrets.token_hex(16),
                show_welcome_message=False, reconnect_timeout=10)


def root() -> None:
    events = ClientEvents()
    ui.colors(primary="#2f5d8a")
    with ui.header().classes("items-center gap-6 py-2 px-4"):
        ui.label("Corral").classes("text-xl font-bold")
        for path, (label, icon) in PAGES.items():
            with ui.link(target=path).classes("text-white no-underline flex items-center gap-1").mark(f"nav-{label.lower()}"):
                ui.icon(icon)
                ui.label(label)
        ui.space()
        rt = runtime()
        ui.label(f"{rt.settings.backend} backend · gateway {rt.data_plane} on :{rt.settings.gateway_port}").classes("text-sm opacity-80")
        if rt.settings.api_token:
            _token_button()
    ui.sub_pages({"/": inference.page, "/finetune": finetune.page, "/history": history.page,
                   "/usage": usage.page}, data={"events": events}) \
        .classes("w-full")


def _token_button() -> None:
    with ui.dialog() as dialog, ui.card():
        ui.label("API token").classes("text-lg")
        ui.label("Changes need the token this Corral was started with (CORRAL_API_TOKEN).")
        field = ui.input("token", password=True, password_toggle_button=True).classes("w-96")

        def save() -> None:
            app.storage.user["token"] = field.value
            notify("token accepted" if token_ok() else "wrong token", "positive" if token_ok() else "negative")
            dialog.close()

        ui.button("Save", on_click=save)
    ui.button(icon="key", on_click=dialog.open).props("flat round color=white").tooltip("API token for changes")
