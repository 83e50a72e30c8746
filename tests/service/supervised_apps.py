"""Apps for the supervisor's tests, imported by the worker processes it spawns (by import string)."""

from __future__ import annotations

import time
from typing import Any

BROKEN_FACTORY_MESSAGE = "this factory cannot build an app"


def broken_factory() -> Any:
    raise RuntimeError(BROKEN_FACTORY_MESSAGE)


def hanging_factory() -> Any:
    time.sleep(3600)


async def failing_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app whose lifespan start-up fails, as the service's does on a broken bundle."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no bundle"})


async def stuck_shutdown(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that starts, then never finishes its lifespan shutdown (its event loop blocked)."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        time.sleep(3600)
