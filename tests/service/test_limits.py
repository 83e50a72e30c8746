"""Byte counts read from headers: digits only, never an exception."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from service.api.limits import BodyLimitMiddleware, parse_byte_count


@pytest.mark.parametrize(("text", "expected"), [("0", 0), ("1024", 1024), ("007", 7), ("9" * 18, 10**18 - 1)])
def test_byte_counts_read_as_numbers(text: str, expected: int) -> None:
    assert parse_byte_count(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "-1", "+1", " 1", "1.0", "1e3", "\u00b2", "\u0663", "9" * 19, "9" * 5000],
    ids=["empty", "negative", "plus", "space", "decimal", "exponent", "superscript", "arabic", "19-digits", "huge"],
)
def test_anything_else_is_none(text: str) -> None:
    assert parse_byte_count(text) is None


@pytest.mark.parametrize("declared", ["\u00b2", "9" * 5000], ids=["superscript", "huge"])
def test_an_unreadable_content_length_leaves_the_limit_to_the_bytes_received(declared: str) -> None:
    """Servers normally refuse such headers first; if one passes, the middleware must not crash on it."""
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"small", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-length", declared.encode("latin-1"))]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=100, timeout_s=30)(scope, receive, send))
    assert sent[0]["status"] == 204
