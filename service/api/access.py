"""Per-request observability: the request metrics and one JSON access-log line per request.

A pure ASGI middleware (outermost), so it times the whole request and sees the final status of
every answer, error answers included. Labels stay few whatever clients send: ``route`` is the
matched route's template (``/v2/models/{name}/infer``), never the raw path (raw paths would give one
time series per model name or scanner URL), and requests matching no route are labelled
``unmatched``; ``method`` is one of the standard HTTP methods or ``other`` (the method is any token
a client cares to send). The log line keeps the method as sent.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("mixoe.access")

_IMAGES_STATE_KEY = "images"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def record_images(request: Request, count: int) -> None:
    """Note how many images ``request`` carried, for its access-log line."""
    setattr(request.state, _IMAGES_STATE_KEY, count)


def method_label(method: str) -> str:
    """The ``method`` label: a standard HTTP method, or ``other``."""
    return method if method in _METHODS else "other"


class AccessMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        context = getattr(scope["app"].state, "context", None)
        if context is not None:
            labels = (template, method_label(method), str(status))
            context.metrics.request_duration.labels(*labels).observe(seconds)
            context.metrics.requests.labels(*labels).inc()
        logger.info(
            "%s %s %d",
            method,
            template,
            status,
            extra={
                "method": method,
                "route": template,
                "status": status,
                "duration_s": round(seconds, 6),
                "images": scope.get("state", {}).get(_IMAGES_STATE_KEY, 0),
            },
        )
