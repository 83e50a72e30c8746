"""A start-up that fails on a bundle is one clear error line; the traceback is for debug level.

The lifespan is driven as uvicorn drives it: whatever text the app sends with
``lifespan.startup.failed``, uvicorn logs at error level (it once sent a 60-line traceback).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.contract.manifest import BundleError
from service.app import create_app
from service.context import ServiceContext
from service.settings import Settings
from tests.service.helpers import TinyModel


def start(app: Any, sent: list[dict[str, Any]]) -> None:
    """Run the app's lifespan start-up; what it sends back to the server goes to ``sent``."""

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))


@pytest.fixture
def tampered(tiny: TinyModel, tmp_path: Path) -> Path:
    """A copy of the tiny repository whose weights fail their hash check."""
    shutil.copytree(tiny.repository, tmp_path / "repository")
    weights = tmp_path / "repository" / "tiny" / "1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    return tmp_path / "repository"


def test_a_bundle_error_is_one_line_and_its_traceback_debug_only(
    tampered: Path, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent: list[dict[str, Any]] = []
    with pytest.raises(BundleError, match="sha256 mismatch"):
        start(create_app(make_settings(tampered)), sent)
    assert sent == [{"type": "lifespan.startup.failed", "message": ""}]
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "sha256 mismatch" in errors[0].getMessage() and "\n" not in errors[0].getMessage()
    assert [record.levelno for record in caplog.records if record.exc_info] == [logging.DEBUG]


def test_an_unexpected_start_up_failure_keeps_its_traceback(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(settings: Settings) -> ServiceContext:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ServiceContext, "start", broken)
    sent: list[dict[str, Any]] = []
    with pytest.raises(RuntimeError, match="a bug"):
        start(create_app(make_settings()), sent)
    assert sent == [{"type": "lifespan.startup.failed", "message": ""}]
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
