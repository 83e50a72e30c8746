"""Byte counts read from headers: digits only, never an exception."""

from __future__ import annotations

import pytest

from service.limits import parse_byte_count


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
