"""`/ws`: every change as it happens, so no client has to poll.

Messages are `{"type", "data", "timestamp"}`; `type` is one of `corral.events.EventType` (`deployment`,
`service_deployment`, `pod_assignment`, `distribution`, `scale`, `replica_status`, `history`,
`finetune_task`, `gpu_inventory`, `load`, ...), and `data` the wire form of the matching view in `corral.views`
where there is one. The first message is `{"type": "hello", "data": {"version"}}`. While a client is
connected, `load` comes once a second: `data` is `GET /api/load`'s body (window 30 s).

Who may listen (the stream carries every change, history included):
- a browser page only of this Corral's origin or of `CORRAL_ALLOWED_ORIGINS` (browsers always send
  `Origin` on a WebSocket handshake; other origins get 403);
- with `CORRAL_API_TOKEN` set, only with the token: `Authorization: Bearer <token>` (non-browser clients),
  the subprotocol `corral.token.<token>` (`new WebSocket(url, ["corral", "corral.token." + token])`; the
  answer selects `corral` when offered), or `?token=<token>` (which may end up in access logs). Else 401.
A refused handshake is an HTTP answer with `{"error"}` where the server supports it (uvicorn does).
The web UI does not use `/ws`: its pages redraw from the same bus inside the server.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from corral.auth import bearer, origin_allowed, token_accepted

router = APIRouter()
TOKEN_PROTOCOL = "corral.token."


def refusal(websocket: WebSocket) -> tuple[int, str] | tuple[None, str | None]:
    """(status, message) when the handshake must be refused, else (None, the subprotocol to select)."""
    settings = websocket.app.state.settings
    headers = websocket.headers
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, headers.get("host"), settings.host, settings.allowed_origins):
        return 403, (f"a page of {origin} may not open this Corral's event stream; add the origin to "
                     "CORRAL_ALLOWED_ORIGINS if it is yours")
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    from_protocol = next((p[len(TOKEN_PROTOCOL):] for p in offered if p.startswith(TOKEN_PROTOCOL)), "")
    expected = settings.api_token
    if expected:
        given = bearer(headers.get("authorization")) or from_protocol or websocket.query_params.get("token", "")
        if not token_accepted(given, expected):
            return 401, ("this Corral requires an API token for /ws: send 'Authorization: Bearer <token>', the subprotocol "
                         "'corral.token.<token>' or ?token=<token> (CORRAL_API_TOKEN)")
    if not offered:
        return None, None
    return None, "corral" if "corral" in offered else offered[0]


@router.websocket("/ws")
async def events(websocket: WebSocket) -> None:
    status, detail = refusal(websocket)
    if status is not None:
        try:
            await websocket.send_denial_response(JSONResponse({"error": detail}, status_code=status))
        except RuntimeError:  # a server without the denial extension: a plain refusal (403)
            await websocket.close(code=1008, reason=(detail or "")[:120])
        return
    await websocket.accept(subprotocol=detail)
    with websocket.app.state.bus.subscribe() as queue, websocket.app.state.runtime.load.watching():
        await websocket.send_json({"type": "hello", "data": {"version": websocket.app.version}})
        # Listen for the close as well, so a quiet bus does not keep a dead subscription alive.
        closed = asyncio.create_task(_until_closed(websocket))
        try:
            while not closed.done():
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                await websocket.send_json(getter.result())
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            closed.cancel()


async def _until_closed(websocket: WebSocket) -> None:
    try:
        while True:
            await websocket.receive_text()
    except (WebSocketDisconnect, RuntimeError):
        return
