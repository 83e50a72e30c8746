"""Probe and scrape routes: liveness, readiness and Prometheus ``/metrics``; never behind an API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import get_context
from service.errors import ErrorBody, ErrorCode, NotReady
from service.schemas import Liveness, Readiness

router = APIRouter(tags=["operations"])


@router.get("/v2/health/live", response_model=Liveness)
async def live() -> Liveness:
    """The process answers: restart it only when this fails."""
    return Liveness(live=True)


@router.get(
    "/v2/health/ready",
    response_model=Readiness,
    responses={503: {"model": ErrorBody}},
    dependencies=[Depends(get_context)],  # the 503 while starting or shutting down
)
async def ready() -> Readiness:
    """Models are loaded and batchers run: send traffic. 503 while starting or shutting down."""
    return Readiness(ready=True)


@router.get("/metrics", response_class=Response, responses={503: {"model": ErrorBody}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry (served while shutting down, too)."""
    context = getattr(request.app.state, "context", None)
    if context is None:
        raise NotReady(ErrorCode.NOT_READY, "metrics are not available before the models are loaded")
    return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)
