"""Corral: a control plane for the GPUs of an LLM team.

Public surface: the `corral` CLI, the REST API (`corral.api.app.create_app`) and the settings
(`corral.config.Settings`). Everything else is internal and layered, imports only going down:
domain (pure) < kits (engines, store, backends, gateway, ...) < services (controller, intents, autopilot,
finetune manager) < wiring (runtime, platform) < front ends (api, ui, server); the CLI is an HTTP client.
docs/architecture.md draws it; `lint-imports` checks it (pyproject.toml's contracts).
"""

__version__ = "0.1.0"
