"""The web doors of the API app, checked before any route runs (a pure ASGI middleware, so bodies stream).

Every request: bound to a loopback address, only requests addressed to a loopback name are answered
(`corral.auth.host_allowed`, the DNS-rebinding guard).

`/api/*`:
- methods other than GET/HEAD/POST/PUT/PATCH/DELETE → 405 JSON;
- mutations (POST/PUT/PATCH/DELETE) from a browser page of another origin (`Origin` not this Corral's nor
  in `CORRAL_ALLOWED_ORIGINS`, or `Sec-Fetch-Site: cross-site`) → 403, token or not (CSRF);
- mutations with a body that is not declared JSON (`Content-Type: application/json`) → 415: an HTML form
  cannot send JSON to another site without a CORS preflight, which Corral never grants;
- bodies over `CORRAL_MAX_BODY_BYTES` → 413, from `Content-Length` before reading, or as soon as a chunked
  body passes the limit;
- a body not received whole within `CORRAL_API_BODY_TIMEOUT_S` of the request's start → 408 (the servers' client
  body timeout is a silence, which a body trickled a byte every few seconds never reaches).

The web UI's dataset upload (NiceGUI's `/_nicegui/client/{client}/upload/{element}`): the same origin check,
`CORRAL_UPLOAD_MAX_BYTES` (413) and `CORRAL_UPLOAD_MAX_FILES` (409); the widget itself is disabled, and
NiceGUI refuses its route (403), while a configured token has not been entered (`corral.ui.finetune`).

Refusals are `{"error": "…what to do…"}` and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.auth import host_allowed, origin_allowed

KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
MUTATIONS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DOOR_REFUSALS = {  # how /openapi.json documents the refusals below on every mutation
    "403": "A browser page of another origin (CSRF) or a Host that is not this Corral's: refused, token or not. "
           "Allow an origin with CORRAL_ALLOWED_ORIGINS.",
    "408": "The body did not arrive whole within CORRAL_API_BODY_TIMEOUT_S (30 s by default). Nothing was changed.",
    "413": "The body is larger than CORRAL_MAX_BODY_BYTES (1 MB by default). Nothing was read or changed.",
    "415": "A body that is not declared JSON: send `Content-Type: application/json`.",
}
API_CATCH_ALL = "/api/{path:path}"
UPLOAD_PATH = re.compile(r"/_nicegui/client/[^/]+/upload/[^/]+")  # `fullmatch` (`$` passes a trailing newline)


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes its limit (FastAPI re-raises HTTPExceptions from
    body parsing, so the route answers 413 instead of reading on)."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BodyTimeout(HTTPException):
    """Raised from `receive` when an `/api` body has not arrived whole by its deadline (answered 408, like
    `BodyTooLarge`); the connection is closed after the answer."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=408, detail=message, headers={"Connection": "close"})


def allowed_methods(app: Any, scope: Scope) -> list[str]:
    """The methods some route of `app` serves at this path (not counting the UI's mount and the API's
    catch-all `/api/{path:path}`, which answers the JSON 404/405)."""
    routes = [r for r in app.routes if not isinstance(r, Mount) and getattr(r, "path", None) != API_CATCH_ALL]
    return [m for m in KNOWN_METHODS if any(r.matches({**scope, "method": m})[0] == Match.FULL for r in routes)]


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                 headers: dict[str, str] | None = None) -> None:
    """Answer `{"error": message}` with `status`, over HTTP or as a WebSocket handshake's denial."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": raw})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})


class WebDoors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
        if scope["type"] not in ("http", "websocket") or settings is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if not host_allowed(host, settings.host, settings.allowed_origins):
            await refuse(scope, receive, send, 403,
                         f"this Corral listens on {settings.host} and answers loopback names only, not Host '{host}' "
                         "(a guard against DNS rebinding); list the address you use in CORRAL_ALLOWED_ORIGINS")
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        deadline_s = None
        if path.startswith("/api/") or path == "/api":
            problem = self._api_problem(scope, headers, settings)
            limit, what = settings.max_body_bytes, "CORRAL_MAX_BODY_BYTES"
            deadline_s = settings.api_body_timeout_s  # a UI upload (hundreds of MB) is bounded by its size only
        elif method == "POST" and UPLOAD_PATH.fullmatch(path):
            problem = self._upload_problem(headers, settings)
            limit, what = settings.upload_max_bytes, "CORRAL_UPLOAD_MAX_BYTES"
        else:
            await self.app(scope, receive, send)
            return
        if problem is None:
            length = headers.get("content-length", "0").strip()
            if not length.isdigit():
                problem = (400, {}, "Content-Length must be a number of bytes")
            elif int(length) > limit:
                problem = (413, {}, _too_large(int(length), limit, what))
        if problem is not None:
            status, extra, message = problem
            await refuse(scope, receive, send, status, message, extra)
            return
        await self._capped(scope, receive, send, limit, what, deadline_s)

    def _api_problem(self, scope: Scope, headers: dict[str, str], settings: Any) -> tuple[int, dict, str] | None:
        method, path = scope["method"], scope["path"]
        if method not in KNOWN_METHODS:
            allowed = allowed_methods(scope["app"], scope)
            if not allowed:
                return 404, {}, f"no API endpoint {path}; the API is described at /docs"
            return 405, {"Allow": ", ".join(allowed)}, f"{path} accepts {', '.join(allowed)}, not {method}"
        if method not in MUTATIONS:
            return None
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, headers.get("host"), settings.host, settings.allowed_origins):
            return 403, {}, (f"cross-origin request refused: a page of {origin} may not change this Corral; "
                             "add the origin to CORRAL_ALLOWED_ORIGINS if it is yours")
        if origin is None and headers.get("sec-fetch-site") == "cross-site":
            return 403, {}, "cross-site request refused: a page of another site may not change this Corral"
        content_type = headers.get("content-type")
        has_body = headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers
        if (content_type is not None or has_body) and not is_json(content_type or ""):
            return 415, {}, (f"send the request body as JSON with 'Content-Type: application/json' "
                             f"(got {repr(content_type) if content_type else 'none'})")
        return None

    def _upload_problem(self, headers: dict[str, str], settings: Any) -> tuple[int, dict, str] | None:
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, headers.get("host"), settings.host, settings.allowed_origins):
            return 403, {}, f"cross-origin upload refused: a page of {origin} may not upload to this Corral"
        folder = settings.uploads_dir
        held = sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0
        if held >= settings.upload_max_files:
            return 409, {}, (f"the uploads folder {folder} already holds {held} files (CORRAL_UPLOAD_MAX_FILES="
                             f"{settings.upload_max_files}): remove old ones first")
        return None

    async def _capped(self, scope: Scope, receive: Receive, send: Send, limit: int, what: str,
                      deadline_s: float | None = None) -> None:
        """Run the app with a `receive` that stops a body passing `limit` (chunked, or longer than announced) or, with
        `deadline_s`, not received whole that many seconds after the request began. Once the body is complete,
        `receive` waits as long as the app likes (a streamed answer waits on it for the client's disconnect)."""
        received = 0
        started = False
        ends = asyncio.get_running_loop().time() + deadline_s if deadline_s is not None else None
        body_done = False

        async def capped_receive() -> Message:
            nonlocal received, body_done
            if ends is None or body_done:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(ends):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(f"request body not received whole within {deadline_s:g} s of the request's start "
                                      f"({received} bytes arrived; CORRAL_API_BODY_TIMEOUT_S)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(_too_large(received, limit, what, more=True))
                body_done = not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, tracked_send)
        except (BodyTooLarge, BodyTimeout) as exc:
            if started:
                raise
            await refuse(scope, receive, send, exc.status_code, exc.detail, exc.headers)


def _too_large(size: int, limit: int, setting: str, more: bool = False) -> str:
    return (f"request body too large: {'more than ' if more else ''}{size} bytes, the limit is {limit} ({setting})")
