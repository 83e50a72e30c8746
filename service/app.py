"""The FastAPI application factory: wiring only; the work happens in the modules it assembles."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.access import AccessMiddleware
from service.api.connections import LIMITS_STATE_KEY, connection_limits
from service.api.errors import install_error_handlers
from service.api.limits import BodyLimitMiddleware
from service.api.openapi import complete_openapi
from service.api.routes import docs, drift, ops, page, predict, v2
from service.api.startup import StartupFailureMiddleware
from service.context import ServiceContext
from service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models load and the batch loop starts when it starts (its lifespan), not here."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Mapping[str, object]]:
        context = await ServiceContext.start(settings)
        app.state.context = context
        try:
            # Lifespan state reaches the server's connection protocol (service.api.connections).
            yield {LIMITS_STATE_KEY: connection_limits(settings)}
        finally:
            await context.stop()

    app = FastAPI(
        title="MixOE OOD-aware image classification",
        summary="Class, OOD score and accept/reject per image; Open Inference Protocol; Prometheus metrics.",
        lifespan=lifespan,
        docs_url=None,  # service.api.routes.docs serves them from local files
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.context = None
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(AccessMiddleware)  # times and counts every answer, 413s included
    app.add_middleware(StartupFailureMiddleware)  # sees the lifespan only
    app.include_router(predict.router)
    app.include_router(v2.router)
    app.include_router(v2.infer_router)
    app.include_router(drift.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.include_router(docs.router)
    app.mount(page.STATIC_URL, page.static_files(), name="static")
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs-assets")
    complete_openapi(app, api_keys=bool(settings.api_keys))
    return app
