"""The FastAPI application (API at /api, OpenAPI docs at /docs, events at /ws, the UI at /) over a Runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import corral
from corral.api import autopilot, events, finetune, load, serving, sleep, system, tenancy, usage
from corral.api.doors import (
    API_CATCH_ALL,
    DOOR_REFUSALS,
    KNOWN_METHODS,
    MUTATIONS,
    BodyTimeout,
    BodyTooLarge,
    WebDoors,
    allowed_methods,
)
from corral.api.schemas import STATUS, error_body, plain_text
from corral.config import Settings
from corral.domain import labels as L
from corral.domain.errors import CorralError
from corral.engines import engine_names, get_engine
from corral.runtime import Runtime
from corral.ui import live as ui_live
from corral.ui import mount as mount_ui
from corral.views import EngineInfo, Health


def _http_error_message(exc: StarletteHTTPException) -> str:
    if isinstance(exc, (BodyTooLarge, BodyTimeout)):
        return str(exc.detail)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return "invalid request: the body is not valid JSON (UTF-8)"
    return str(exc.detail)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The API app. It starts and closes the runtime (created from `settings` unless given)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime(settings or Settings())
        ui_live.bind(rt)
        app.state.runtime = rt
        app.state.settings = rt.settings
        app.state.store = rt.store
        app.state.bus = rt.bus
        app.state.backend = rt.backend
        app.state.controller = rt.controller
        await rt.start()
        try:
            yield
        finally:
            await rt.close()

    app = FastAPI(
        title="Corral",
        version=corral.__version__,
        description="Model pools assigned to business services, on the GPUs of an LLM team.",
        lifespan=lifespan,
    )
    app.include_router(serving.router)
    app.include_router(sleep.router)
    app.include_router(load.router)
    app.include_router(system.router)
    app.include_router(finetune.router)
    app.include_router(autopilot.router)
    app.include_router(usage.router)
    app.include_router(tenancy.router)
    app.include_router(events.router)
    app.add_middleware(WebDoors)  # host, origin, content type and body size, before any route (corral.api.doors)

    @app.get("/api/health", tags=["system"], response_model=Health)
    async def health(request: Request) -> Health:
        return Health(
            status="ok",
            version=corral.__version__,
            backend=request.app.state.settings.backend,
            gatewayDataPlane=request.app.state.runtime.data_plane,
            gatewayPolicy=request.app.state.settings.gateway_policy if request.app.state.runtime.data_plane == "python"
            else "least-outstanding",
            engines=[EngineInfo(name=n, isSimulator=get_engine(n).is_simulator, description=get_engine(n).description)
                     for n in engine_names()],
        )

    @app.get("/api/metrics", tags=["system"], response_class=PlainTextResponse, response_model=str,
             responses=plain_text("Prometheus text exposition format"))
    async def metrics(request: Request) -> str:
        """Prometheus text: gateway requests, errors, in-flight and latency per service and replica; pods per business."""
        rt: Runtime = request.app.state.runtime
        await rt.gateway.stats.refresh()  # the data plane's counters now (nginx: awaited, never a blocking read)
        lines = ["# HELP corral_pool_pods Pods of a deployment per business and readiness.", "# TYPE corral_pool_pods gauge"]
        counts: dict[tuple[str, str, bool], int] = {}
        for pod in rt.backend.list_pods():
            key = (pod.deployment, pod.business or "N/A", pod.ready)
            counts[key] = counts.get(key, 0) + 1
        lines += [f'corral_pool_pods{{deployment="{d}",business="{b}",ready="{str(r).lower()}"}} {n}'
                  for (d, b, r), n in sorted(counts.items())]
        lines += rt.backend.metrics()
        lines += rt.autopilot.metrics()
        lines += rt.metering.metrics()
        lines += rt.sleeping.metrics()
        return "\n".join(lines) + "\n" + rt.gateway.stats.prometheus()

    @app.exception_handler(CorralError)
    async def corral_error(_: Request, exc: CorralError) -> JSONResponse:
        return JSONResponse(error_body(exc).wire(), status_code=STATUS[exc.kind])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that is not UTF-8 or not JSON, one over the cap) in the API's shape.
        return JSONResponse({"error": _http_error_message(exc)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            # A key of the body is quoted as written, control characters escaped (`secretEnv.KEY\n`): one line.
            where = ".".join(L.shown(str(part)) for part in error["loc"] if part != "body")
            problems.append(f"{where or 'body'}: {error['msg']}")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems), "details": problems}, status_code=400)

    @app.api_route(API_CATCH_ALL, methods=list(KNOWN_METHODS), include_in_schema=False)
    async def unknown_api(path: str, request: Request) -> JSONResponse:
        """JSON, not the UI's page, for API paths that do not exist (or exist for other methods); methods
        other than these are answered by `WebDoors`."""
        allowed = allowed_methods(app, request.scope)
        if allowed:
            return JSONResponse({"error": f"/api/{path} accepts {', '.join(allowed)}, not {request.method}"}, status_code=405,
                                headers={"Allow": ", ".join(allowed)})
        return JSONResponse({"error": f"no API endpoint /api/{path}; the API is described at /docs"}, status_code=404)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, less its default 422 answers: this app answers a malformed request with 400
        and `{"error", "details"}` (`invalid_body` above), which every route declares. Errors are JSON
        even on routes that answer text (FastAPI gives declared responses the route's media type).
        Mutations also declare the refusals of `WebDoors` (cross-origin 403, body too large 413, not JSON 415)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    if path.startswith("/api/") and method.upper() in MUTATIONS:
                        for code, description in DOOR_REFUSALS.items():
                            if code not in ("408", "413") or "requestBody" in operation:
                                responses.setdefault(code, {"description": description, "content": {
                                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
                    for code, response in responses.items():
                        if code[0] in "45" and response.get("content"):
                            response["content"] = {"application/json": next(iter(response["content"].values()))}
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    mount_ui(app)  # last: the UI takes every path the API does not
    return app
