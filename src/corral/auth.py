"""The API token check, shared by the REST API (`corral.api.auth`) and the web UI (`corral.ui.live`):
both enforce the same token the same way."""

from __future__ import annotations

import hmac


def token_accepted(given: str, expected: str | None) -> bool:
    """True when no token is configured, or `given` is it (compared in constant time)."""
    return not expected or hmac.compare_digest(given.encode(), expected.encode())
