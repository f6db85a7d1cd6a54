"""The web UI: NiceGUI pages served by `corral serve` on the API's port, at `/`.

Why in-process, and why no fetches from the browser: the pages call the same controller and finetune
manager as the REST API — one source of truth, the same validation, refusals and history — and
redraw from the same event bus that feeds `/ws`. The browser holds no state of its own beyond what
it is showing, so a page is never staler than the last event.

    shell.py      the frame (header, navigation, token) and client-side routing between pages
    live.py       per-browser event counters and the `live` redraw helper; `act` for mutations
    inference.py  configuration, test panel, deployments, business services with their load, pods and
                  the assignment board                                                   (/)
    load.py       live load (per service and replica) from the monitor's `load` events: figures and charts
    finetune.py   GPU banner, submit form, task table and task detail                   (/finetune)
    history.py    every scheduling action, filterable                                    (/history)
    usage.py      usage per business and hour, a chart per business (corral.metering)    (/usage)
"""

from corral.ui.shell import mount

__all__ = ["mount"]
