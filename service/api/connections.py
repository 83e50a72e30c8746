"""Slow-client limits at the connection: a deadline on request headers and a cap on open connections.

uvicorn reads a request's headers for as long as the client takes: a connection that sends
nothing, or one header line every few seconds, stays open for good, and a few hundred of them
hold as many sockets and file descriptors. (Its keep-alive timeout does not help: any byte
received cancels it.) :class:`GuardedHttpProtocol` wraps uvicorn's own HTTP protocol (the one
``http="auto"`` picks) and adds, per worker:

* a header deadline: from a connection's opening, and from the end of each answer on it, the next
  request's headers must all arrive within ``header_timeout_s``, else the connection is closed;
* a cap: beyond ``max_connections`` open connections, a new one is answered 503 (the service's
  JSON error, ``Retry-After``) and closed before a byte of it is read.

The body has its own deadline, enforced where the body is read (:mod:`service.api.limits`).

The wrapper needs no HTTP parsing of its own: the app tells it when a request's headers are
complete (the app is called) and when its answer is done (the app returns), through
:func:`request_in_progress`. It finds the app's settings, and the app finds the connection,
in the ASGI lifespan state (``scope["state"]``), which uvicorn hands to each protocol it makes;
uvicorn is given the class through its public ``http`` option.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from starlette.types import Scope
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.api.errors import ErrorCode, error_response
from service.settings import Settings

LIMITS_STATE_KEY = "mixoe.connection_limits"
_CONNECTION_STATE_KEY = "mixoe.connection"


class ConnectionLimits:
    """One worker's limits, and how many connections it has open."""

    def __init__(self, header_timeout_s: float, max_connections: int, retry_after_s: int):
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = 0
        response = error_response(
            503,
            ErrorCode.OVERLOADED,
            f"the server has {max_connections} connections open; retry in {retry_after_s}s",
            headers={"Retry-After": str(retry_after_s), "Connection": "close"},
        )
        head = b"".join(name + b": " + value + b"\r\n" for name, value in response.raw_headers)
        self.refusal = b"HTTP/1.1 503 Service Unavailable\r\n" + head + b"\r\n" + bytes(response.body)


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(settings.header_timeout_s, settings.max_connections, settings.retry_after_s)


class GuardedHttpProtocol(asyncio.Protocol):
    """uvicorn's HTTP protocol for one connection, under :class:`ConnectionLimits`.

    Built by uvicorn with the keyword arguments it gives every ``http`` protocol class."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None):
        self._limits: ConnectionLimits = app_state[LIMITS_STATE_KEY]
        self._arguments = {
            "config": config,
            "server_state": server_state,
            "app_state": {**app_state, _CONNECTION_STATE_KEY: self},
            "_loop": _loop,
        }
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclasses of asyncio.Transport, yet have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if self._limits.open >= self._limits.max_connections:
            transport.write(self._limits.refusal)
            transport.close()
            return
        self._limits.open += 1
        self._inner = AutoHTTPProtocol(**self._arguments)
        self._inner.connection_made(transport)
        self.answer_finished()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._inner is not None:
            self._limits.open -= 1
            self._inner.connection_lost(exc)
            self._inner = None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def headers_received(self) -> None:
        """A request's headers are complete: its body and answer have deadlines of their own."""
        self._disarm()

    def answer_finished(self) -> None:
        """The connection waits for the next request's headers: start the header deadline."""
        self._disarm()
        if self._transport is not None and not self._transport.is_closing():
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._limits.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        """Close now; a client that does not read its last answer loses what is left of it."""
        self._deadline = None
        assert self._transport is not None
        if self._transport.get_write_buffer_size():
            self._transport.abort()
        else:
            self._transport.close()


@contextmanager
def request_in_progress(scope: Scope) -> Iterator[None]:
    """Around the app's handling of one request: no header deadline while it runs, a fresh one after.

    Does nothing for a request that did not come through :class:`GuardedHttpProtocol` (tests'
    in-process clients, another server)."""
    connection: GuardedHttpProtocol | None = scope.get("state", {}).get(_CONNECTION_STATE_KEY)
    if connection is None:
        yield
        return
    connection.headers_received()
    try:
        yield
    finally:
        connection.answer_finished()
