"""Mutations need `Authorization: Bearer <token>` when a token is configured; reads stay open.
(Origins, content types and body sizes are checked before any route, by `corral.api.doors`.)"""

from __future__ import annotations

from fastapi import Request

from corral.auth import bearer, token_accepted
from corral.domain.errors import CorralError, ErrorKind, Hint


class Unauthorized(CorralError):
    kind = ErrorKind.UNAUTHORIZED


def require_token(request: Request) -> None:
    expected: str | None = request.app.state.settings.api_token
    if expected and not token_accepted(bearer(request.headers.get("authorization")), expected):
        raise Unauthorized("this Corral requires an API token", Hint.SEND_TOKEN)
