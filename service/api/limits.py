"""Request-body size and time limits, answered with the service's own JSON errors.

A pure ASGI middleware. Size: a declared ``Content-Length`` over the limit is refused (413,
``request_too_large``) before a byte is read; a body that turns out longer (chunked uploads) is
cut off as soon as it passes the limit. Time: a body not complete ``timeout_s`` after its headers
is cut off with 408 (``request_timeout``) and the connection is closed, so a client trickling its
upload holds neither the connection nor a place in admission. Whatever the app answers to the
aborted read is discarded in favour of the error. (Starlette's own limiter would also work for
size, but it replaces every answer with a plain-text body.) The header deadline, before the app
is called, is the connection's (:mod:`service.api.connections`); this middleware tells the connection
when a request starts and ends.

:func:`parse_byte_count` reads byte counts from headers, here and for the Open Inference Protocol's
``Inference-Header-Content-Length``; :data:`INT64_MIN` and :data:`INT64_MAX` bound the integers
clients send in bodies, forms and query strings.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.connections import request_in_progress
from service.api.errors import ErrorCode, count_bad_input, error_response

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


@dataclass(frozen=True)
class _Refusal:
    status: int
    code: ErrorCode
    message: str
    headers: dict[str, str] | None = None


class _BodyRefused(Exception):
    """Raised into the app's body read; never escapes this middleware."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request_in_progress(scope):
            await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        too_large = _Refusal(413, ErrorCode.REQUEST_TOO_LARGE, f"request body exceeds {self.max_bytes} bytes")
        declared = parse_byte_count(Headers(scope=scope).get("content-length", ""))
        if declared is not None and declared > self.max_bytes:
            await self._refuse(too_large, scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        received = 0
        complete = False
        refusal: _Refusal | None = None
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, complete, refusal
            if complete:
                return await receive()  # only a disconnect can come now; the app may wait for it
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                refusal = _Refusal(
                    408,
                    ErrorCode.REQUEST_TIMEOUT,
                    f"the request body did not arrive within {self.timeout_s:g} s",
                    headers={"Connection": "close"},
                )
                raise _BodyRefused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    refusal = too_large
                    raise _BodyRefused
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal response_started
            if refusal is not None:
                return  # the app's answer to the aborted read; the refusal below replaces it
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_unless_refused)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not response_started:
            await self._refuse(refusal, scope, receive, send)

    @staticmethod
    async def _refuse(refusal: _Refusal, scope: Scope, receive: Receive, send: Send) -> None:
        count_bad_input(scope["app"], refusal.code)
        response = error_response(refusal.status, refusal.code, refusal.message, headers=refusal.headers)
        await response(scope, receive, send)
