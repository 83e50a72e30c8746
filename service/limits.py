"""Request-body size limit, answered with the service's own JSON 413 (``request_too_large``).

A pure ASGI middleware: a declared ``Content-Length`` over the limit is refused before a byte is
read; a body that turns out longer (chunked uploads) is cut off as soon as it passes the limit.
Whatever the app answers to the aborted read is discarded in favour of the 413. (Starlette's own
limiter would also work, but it replaces every answer with a plain-text body.)

:func:`parse_byte_count` reads byte counts from headers, here and for the Open Inference Protocol's
``Inference-Header-Content-Length``; :data:`INT64_MIN` and :data:`INT64_MAX` bound the integers
clients send in bodies, forms and query strings.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ErrorCode, count_bad_input, error_response

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Bounds of every integer a client sends (the Open Inference Protocol's int64), checked at validation:
an integer of thousands of digits is slow to multiply and fails to format past 4,300 digits."""

ClientInt = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
"""An integer form or query field: bounded on the type itself, so the OpenAPI schema states the bounds."""

_BYTE_COUNT = re.compile(r"[0-9]{1,18}")


def parse_byte_count(text: str) -> int | None:
    """The byte count a header such as ``Content-Length`` holds, or ``None`` when it holds anything else.

    Only ASCII digits, at most 18 of them: ``"²".isdigit()`` is true yet ``int("²")`` fails, and so does
    ``int()`` of a number past 4300 digits. A client's header must never become a 500.
    """
    return int(text) if _BYTE_COUNT.fullmatch(text) else None


class _BodyTooLarge(Exception):
    """Raised into the app's body read; never escapes this middleware."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = parse_byte_count(Headers(scope=scope).get("content-length", ""))
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def send_unless_exceeded(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                return  # the app's answer to the aborted read; the 413 below replaces it
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_unless_exceeded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        count_bad_input(scope["app"], ErrorCode.REQUEST_TOO_LARGE)
        response = error_response(413, ErrorCode.REQUEST_TOO_LARGE, f"request body exceeds {self.max_bytes} bytes")
        await response(scope, receive, send)
