"""The FastAPI application: wires settings, store, event bus, backend and controller together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import corral
from corral.api import events, serving
from corral.backends.base import Backend
from corral.backends.local import LocalBackend
from corral.config import Settings
from corral.controller import Controller
from corral.domain.errors import CorralError
from corral.engines import engine_names, get_engine
from corral.events import EventBus
from corral.store.state import StateStore

log = logging.getLogger("corral")


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = StateStore(settings.database_path)
        bus = EventBus()
        chosen = backend or LocalBackend(settings, store, bus.publish)
        app.state.settings = settings
        app.state.store = store
        app.state.bus = bus
        app.state.backend = chosen
        app.state.controller = Controller(chosen, store, bus)
        await chosen.start()
        try:
            yield
        finally:
            await chosen.close()
            store.close()

    app = FastAPI(
        title="Corral",
        version=corral.__version__,
        description="Model pools assigned to business services, on the GPUs of an LLM team.",
        lifespan=lifespan,
    )
    app.include_router(serving.router)
    app.include_router(events.router)

    @app.get("/api/health", tags=["system"])
    async def health(request: Request) -> dict:
        return {
            "status": "ok",
            "version": corral.__version__,
            "backend": request.app.state.settings.backend,
            "engines": [{"name": n, "isSimulator": get_engine(n).is_simulator, "description": get_engine(n).description}
                        for n in engine_names()],
        }

    @app.exception_handler(CorralError)
    async def corral_error(_: Request, exc: CorralError) -> JSONResponse:
        return JSONResponse({"error": exc.message, **exc.details}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"] if part != "body")
            problems.append(f"{where or 'body'}: {error['msg']}")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems), "details": problems}, status_code=400)

    return app
