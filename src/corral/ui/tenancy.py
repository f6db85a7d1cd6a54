"""A business service's API keys and quotas on its card (corral.tenancy): the auth mode, the keys without their
secrets, a new key shown once with a copy button, revocation. The key lives only in the dialog that shows it: closing
the dialog deletes it from the page."""

from __future__ import annotations

from typing import Any

from nicegui import ui

from corral.domain.tenancy import WEIGHT_DEFAULT, WEIGHT_MAX, WEIGHT_MIN, AuthMode, Limits
from corral.ui.live import act, notify, runtime

FIELD = "w-full"


def keys_label(service: str) -> str:
    access = runtime().tenancy.access(service)
    if access.auth == AuthMode.NONE.value:
        return "open"
    return f"{access.keys} key(s)"


def keys_button(service: str) -> None:
    label = ui.label(keys_label(service)).classes("text-xs text-grey-7").props(f'data-testid="keys-{service}"')
    ui.button(icon="key", on_click=lambda: keys_dialog(service, lambda: label.set_text(keys_label(service)))).props(
        f'flat dense data-testid="keys-button-{service}"').tooltip("API keys and quotas of this business service")


def _limit(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def keys_dialog(service: str, changed: Any = None) -> None:
    tenancy = runtime().tenancy

    def done() -> None:
        if changed is not None:
            changed()

    with ui.dialog() as dialog, ui.card().classes("w-[40rem]").props('data-testid="keys-dialog"'):
        ui.label(f"API keys and quotas of {service}").classes("text-lg font-medium")

        @ui.refreshable
        def body() -> None:
            access = tenancy.access(service)
            with ui.row().classes("items-center gap-2"):
                protected = ui.switch("requests need one of its keys", value=access.auth == AuthMode.KEYS.value) \
                    .props('data-testid="keys-auth"')
            ui.label("Quotas of the service (empty: no limit, 0: refuse all)").classes("text-sm text-grey-7")
            with ui.row().classes("w-full no-wrap gap-2"):
                rpm = ui.number("requests / min", value=access.limits.requestsPerMinute, min=0, precision=0) \
                    .props('data-testid="keys-rpm"')
                tpm = ui.number("tokens / min", value=access.limits.tokensPerMinute, min=0, precision=0)
                tpd = ui.number("tokens / day", value=access.limits.tokensPerDay, min=0, precision=0)

            async def save() -> None:
                auth = AuthMode.KEYS if protected.value else AuthMode.NONE
                limits = Limits(_limit(rpm.value), _limit(tpm.value), _limit(tpd.value))
                _, problem = await act(lambda: tenancy.set_access(service, auth, limits))
                notify(problem or f"access of {service} saved", "negative" if problem else "positive")
                body.refresh()
                done()

            ui.button("Save access", on_click=save).props('flat data-testid="keys-save"')
            ui.separator()
            keys_list()

        @ui.refreshable
        def keys_list() -> None:
            keys = tenancy.key_views(service)
            if not keys:
                ui.label("No key yet.").classes("text-grey-7 text-sm")
            for key in keys:
                with ui.row().classes("w-full items-center gap-2").props(f'data-testid="key-{key.id}"'):
                    ui.label(key.name or key.id).classes("font-medium")
                    ui.label(f"{key.prefix}…").classes("font-mono text-xs")
                    ui.label(f"weight {key.weight}").classes("text-xs text-grey-7").props(f'data-testid="key-weight-{key.id}"')
                    ui.label(f"last used {key.lastUsedAt[:19] if key.lastUsedAt else 'never'}").classes("text-xs text-grey-7")
                    ui.space()
                    edit = ui.number(value=key.weight, min=WEIGHT_MIN, max=WEIGHT_MAX, precision=0) \
                        .props(f'dense data-testid="key-weight-edit-{key.id}"').classes("w-16") \
                        .tooltip("change its weight (Enter): in force at the gateway at once")

                    async def reweigh(_: Any, key_id: str = key.id, field: Any = edit, before: int = key.weight) -> None:
                        if _limit(field.value) == before:
                            return
                        _, problem = await act(lambda: tenancy.update_key(service, key_id, weight=_limit(field.value)))
                        notify(problem or f"key {key_id}: weight {_limit(field.value)}", "negative" if problem else "positive")
                        keys_list.refresh()

                    edit.on("keydown.enter", reweigh)

                    async def revoke(_: Any, key_id: str = key.id) -> None:
                        _, problem = await act(lambda: tenancy.revoke_key(service, key_id))
                        notify(problem or f"key {key_id} revoked", "negative" if problem else "positive")
                        keys_list.refresh()
                        done()

                    ui.button(icon="delete", on_click=revoke).props(f'flat dense color=negative data-testid="revoke-{key.id}"') \
                        .tooltip("revoke: refused by the gateway at once")
            with ui.row().classes("w-full items-center gap-2"):
                name = ui.input("new key's name (optional)").props('data-testid="key-name"').classes("grow")
                weight = ui.number("weight", value=WEIGHT_DEFAULT, min=WEIGHT_MIN, max=WEIGHT_MAX, precision=0) \
                    .props('data-testid="key-weight"').classes("w-24") \
                    .tooltip("its share when the business's keys compete for its replicas (1 to 1000)")

                async def create() -> None:
                    made, problem = await act(lambda: tenancy.create_key(service, name.value or None,
                                                                         weight=_limit(weight.value)))
                    if problem:
                        notify(problem, "negative")
                        return
                    keys_list.refresh()
                    with holder:  # outside the list just rebuilt (a refresh deletes what was made inside it)
                        show_once(made.key, made.id)
                    done()

                ui.button("New key", on_click=create).props('data-testid="key-create"')

        body()
        holder = ui.element()  # where the new key's dialog goes
        with ui.row():
            ui.button("Close", on_click=dialog.close).props("flat")
    dialog.on("hide", dialog.delete)
    dialog.open()


def show_once(key: str, key_id: str) -> None:
    """The new key, in a dialog of its own that is deleted (from the page too) when closed."""
    with ui.dialog().props("persistent") as shown, ui.card().classes("w-[36rem]").props('data-testid="key-shown"'):
        ui.label(f"Key {key_id}: copy it now, it is shown this once.").classes("font-medium")
        with ui.row().classes("w-full items-center no-wrap"):
            ui.input(value=key).props('readonly dense data-testid="key-secret"').classes("grow font-mono")
            ui.button(icon="content_copy", on_click=lambda: (ui.clipboard.write(key), notify("copied"))) \
                .props('flat dense data-testid="key-copy"').tooltip("copy")
        ui.button("I have copied it", on_click=shown.close).props('data-testid="key-shown-close"')
    shown.on("hide", shown.delete)
    shown.open()
