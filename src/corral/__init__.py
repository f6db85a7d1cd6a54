"""Corral: a control plane for the GPUs of an LLM team.

Public surface: the `corral` CLI, the REST API (`corral.api.app.create_app`) and the settings
(`corral.config.Settings`). Everything else is internal and layered:

- `corral.domain`   pure decisions (names, labels, assignment, distribution, scaling); no I/O.
- `corral.engines`  how to launch and health-check each inference engine.
- `corral.store`    the SQLite state store and the history of scheduling actions.
- `corral.backends` where replicas really run (local processes now; Kubernetes later).
- `corral.controller` the one place that validates, plans, applies, records and announces.
- `corral.api`      FastAPI routers and the WebSocket event stream.
"""

__version__ = "0.1.0"
