"""Probe and scrape routes: liveness, readiness and Prometheus ``/metrics``; never behind an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ContextDep
from service.api.errors import ErrorBody, ErrorCode, NotReady
from service.api.schemas import Liveness, Readiness

router = APIRouter(tags=["operations"])


@router.get("/v2/health/live", response_model=Liveness, responses={503: {"model": ErrorBody}})
async def live(request: Request) -> Liveness:
    """The process answers: restart it only when this fails (503: the batch loop has failed, which only
    a restart mends)."""
    context = getattr(request.app.state, "context", None)
    failure = context.loop_failure if context is not None else None
    if failure is not None:
        raise NotReady(ErrorCode.NOT_READY, failure)
    return Liveness(live=True)


@router.get("/v2/health/ready", response_model=Readiness, responses={503: {"model": ErrorBody}})
async def ready(context: ContextDep) -> Readiness:
    """Models are loaded and the batch loop answers: send traffic. 503 while starting or shutting
    down, after the batch loop failed, or while it does not answer in time."""
    reason = context.unready_reason()
    if reason is not None:
        raise NotReady(ErrorCode.NOT_READY, reason)
    return Readiness(ready=True)


@router.get("/metrics", response_class=Response, responses={503: {"model": ErrorBody}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry (served while shutting down, too)."""
    context = getattr(request.app.state, "context", None)
    if context is None:
        raise NotReady(ErrorCode.NOT_READY, "metrics are not available before the models are loaded")
    return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)
