"""Mutations need `Authorization: Bearer <token>` when a token is configured; reads stay open."""

from __future__ import annotations

from fastapi import Request

from corral.auth import token_accepted
from corral.domain.errors import CorralError


class Unauthorized(CorralError):
    status_code = 401


def require_token(request: Request) -> None:
    expected: str | None = request.app.state.settings.api_token
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token_accepted(token, expected):
        raise Unauthorized("this Corral requires an API token: send 'Authorization: Bearer <token>' (CORRAL_API_TOKEN)")
