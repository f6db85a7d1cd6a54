"""`corral serve`: the API server and the gateway server in one process, over one Runtime.

One process keeps the routing table in memory next to the controller that changes it (no second
source of truth, no propagation delay). The gateway gets its own port so that business traffic and
control traffic can be bound, firewalled and scaled apart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator

import uvicorn

from corral.api.app import create_app
from corral.config import Settings
from corral.runtime import Runtime


class _GatewayServer(uvicorn.Server):
    """The second server leaves signal handling to the API server, which stops both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(settings: Settings, log_level: str = "info") -> None:
    runtime = Runtime(settings)
    api = uvicorn.Server(uvicorn.Config(create_app(runtime=runtime), host=settings.host, port=settings.port, log_level=log_level))
    if runtime.data_plane == "nginx":  # nginx serves the gateway port itself
        await api.serve()
        return
    gateway = _GatewayServer(uvicorn.Config(
        runtime.gateway, host=settings.host, port=settings.gateway_port, log_level=log_level,
        access_log=False, lifespan="off", timeout_keep_alive=30, proxy_headers=False, server_header=False,
    ))
    gateway_task = asyncio.create_task(gateway.serve())
    try:
        await api.serve()
    finally:
        gateway.should_exit = True
        await gateway_task


def run(settings: Settings, log_level: str = "info") -> None:
    asyncio.run(serve(settings, log_level))
