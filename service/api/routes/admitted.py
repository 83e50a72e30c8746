"""The route class of the prediction routes: API key, readiness and admission before the body.

See :mod:`service.api.admission` for what admission counts and why it comes before parsing.
"""

from __future__ import annotations

from fastapi import Request, Response

from service.api.admission import Ticket
from service.api.auth import ProtectedRoute, RouteHandler
from service.api.deps import get_context

_TICKET_STATE_KEY = "admission"


class AdmittedRoute(ProtectedRoute):
    """Checks the API key (:class:`ProtectedRoute`), then readiness, then admits the request on one
    image, all before FastAPI reads the body; the request's places are given back when it ends,
    whatever its answer.

    The key first, so that a caller without one can neither make the server parse an upload nor
    take a place another caller could have had."""

    async def handle_authorised(self, handler: RouteHandler, request: Request) -> Response:
        context = await get_context(request)
        ticket = context.admission.ticket()
        setattr(request.state, _TICKET_STATE_KEY, ticket)
        try:
            return await handler(request)
        finally:
            ticket.release()


def admission_ticket(request: Request) -> Ticket:
    """The places ``request`` holds; the predictor holds all of its images on it before decoding any."""
    ticket: Ticket = getattr(request.state, _TICKET_STATE_KEY)
    return ticket
