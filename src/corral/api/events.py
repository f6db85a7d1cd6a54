"""`/ws`: every change as it happens, so no client has to poll.

Messages are `{"type", "data", "timestamp"}`; `type` is one of `corral.events.EventType` (`deployment`,
`service_deployment`, `pod_assignment`, `distribution`, `scale`, `replica_status`, `history`,
`finetune_task`, `gpu_inventory`, ...), and `data` the wire form of the matching view in `corral.views`
where there is one. The first message is `{"type": "hello", "data": {"version"}}`.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

router = APIRouter()


@router.websocket("/ws")
async def events(websocket: WebSocket) -> None:
    await websocket.accept()
    with websocket.app.state.bus.subscribe() as queue:
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
