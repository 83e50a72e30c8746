"""Per-request observability: the request metrics and one JSON access-log line per request.

A pure ASGI middleware (outermost), so it times the whole request and sees the final status of
every answer, error answers included. The ``route`` label is the matched route's template
(``/v2/models/{name}/infer``), never the raw path: raw paths would give one time series per model
name or scanner URL. Requests matching no route are labelled ``unmatched``.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("mixoe.access")

IMAGES_STATE_KEY = "images"
"""Routes store the number of images a request carried in ``request.state.images``."""


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
            labels = (template, method, str(status))
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
                "images": scope.get("state", {}).get(IMAGES_STATE_KEY, 0),
            },
        )
