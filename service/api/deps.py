"""FastAPI dependencies, as ``Annotated`` aliases the routes declare (``context: ContextDep``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import ErrorCode, NotReady
from service.context import ServiceContext


async def get_context(request: Request) -> ServiceContext:
    """The running service, or 503 while models load or after shutdown began.

    ``async`` although it never awaits: FastAPI runs plain ``def`` dependencies in its thread
    pool, a thread hop per request that the event loop pays for on the hot path."""
    context: ServiceContext | None = getattr(request.app.state, "context", None)
    if context is None or not context.ready:
        raise NotReady(ErrorCode.NOT_READY, "the service is not ready (models loading or shutting down)")
    return context


ContextDep = Annotated[ServiceContext, Depends(get_context)]
