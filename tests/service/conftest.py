"""Fixtures: the tiny bundle (built once per session), settings for it, and a running TestClient."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.runtime import Bundle, Predictions, load_bundle
from service.app import create_app
from service.runtime.decoding import decode_image
from service.settings import Settings, is_setting_variable
from tests.service.helpers import TinyModel, build_tiny_bundle


@pytest.fixture(scope="session", autouse=True)
def _no_mixoe_environment() -> Iterator[None]:
    """A developer's MIXOE_* variables (matched case-blind, as settings read them) must not leak
    into the settings the tests build."""
    saved = {key: os.environ.pop(key) for key in list(os.environ) if is_setting_variable(key)}
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="session")
def bundle(tiny: TinyModel) -> Bundle:
    return load_bundle(tiny.path)


@pytest.fixture(scope="session")
def make_settings(tiny: TinyModel) -> Callable[..., Settings]:
    def make(repository: Path | None = None, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_repository": repository or tiny.repository,
            "device": "cpu",
            "decode_workers": 2,
            # Batches as the tests configure them, not as timings on a loaded machine would cap them
            # (test_batch_size_tuning.py turns it on, with fake timings).
            "batch_size_tuning": False,
        }
        return Settings(**(values | overrides))

    return make


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def predict_direct(bundle: Bundle) -> Callable[[Sequence[bytes], float | None], Predictions]:
    """The reference answer: the bundle's own predict on the decoded images, no service in between."""

    def predict(files: Sequence[bytes], target: float | None = None) -> Predictions:
        images = [decode_image(data, max_bytes=10**8, max_pixels=10**8) for data in files]
        return bundle.predict(bundle.preprocess(images), target)

    return predict
