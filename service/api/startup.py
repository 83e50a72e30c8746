"""A failed start-up, logged by the service itself rather than as the framework's traceback.

Starlette reports an exception raised while the app starts (``lifespan``) with the whole traceback
text, which uvicorn logs at error level: sixty lines of framework frames before the one line that
says the bundle's weights fail their hash check. This ASGI middleware logs the failure through
:func:`service.monitoring.logs.log_failure` (one line for a :class:`~models.contract.manifest.BundleError`, its traceback
at debug level) and tells the server that start-up failed with no text of its own to log.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.monitoring.logs import log_failure

logger = logging.getLogger("mixoe.service")


class StartupFailureMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            # Starlette sends this, then raises the error: the message waits for the error.
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_startup_failure)
        except Exception as error:
            if held:
                log_failure(logger, "the service could not start", error)
                held[:] = [{"type": "lifespan.startup.failed", "message": ""}]
            raise
        finally:
            for message in held:
                await send(message)
