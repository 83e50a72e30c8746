"""The route class of the prediction routes: API key, readiness and admission before the body.

See :mod:`service.admission` for what admission counts and why it comes before parsing.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.admission import Ticket
from service.auth import check_api_key
from service.deps import get_context

_TICKET_STATE_KEY = "admission"


class AdmittedRoute(APIRoute):
    """Checks the API key, then readiness, then admits the request on one image, all before FastAPI
    reads the body; the request's places are given back when it ends, whatever its answer.

    The key first, so that a caller without one can neither make the server parse an upload nor
    take a place another caller could have had."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admitted(request: Request) -> Response:
            check_api_key(request.headers, request.app.state.settings.api_keys)
            context = await get_context(request)
            ticket = context.admission.ticket()
            setattr(request.state, _TICKET_STATE_KEY, ticket)
            try:
                return await handler(request)
            finally:
                ticket.release()

        return admitted


def admission_ticket(request: Request) -> Ticket:
    """The places ``request`` holds; the predictor holds all of its images on it before decoding any."""
    ticket: Ticket = getattr(request.state, _TICKET_STATE_KEY)
    return ticket
