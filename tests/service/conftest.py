"""Fixtures: the tiny bundle (built once per session), settings for it, a running TestClient, and a
model process in threads of the test process."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from models.runtime import Bundle, Predictions, load_bundle
from service.app import create_app
from service.runtime.decoding import decode_image
from service.runtime.model_client import ADDRESS_VARIABLE, KEY_VARIABLE
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.batch_loop.model_process import _receive
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


@pytest.fixture
def model_process_in_threads(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[ModelHost]:
    """The model process's listener and loop as threads of this process, where faults can be
    injected; workers find it through the variables ``mixoe-serve`` sets."""
    host = ModelHost(torch.device("cpu"), make_settings().max_batch_size)
    address, key = str(tmp_path / "socket"), secrets.token_bytes(32)
    listener = Listener(address, family="AF_UNIX")
    stopping = threading.Event()

    def accept() -> None:
        while True:
            connection = listener.accept()
            if stopping.is_set():
                return
            threading.Thread(target=_receive, args=(connection, key, host), daemon=True).start()

    threads = [threading.Thread(target=accept, daemon=True), threading.Thread(target=host.serve_forever, daemon=True)]
    for thread in threads:
        thread.start()
    monkeypatch.setenv(ADDRESS_VARIABLE, address)
    monkeypatch.setenv(KEY_VARIABLE, key.hex())
    yield host
    stopping.set()
    host.stop()
    with socket.socket(socket.AF_UNIX) as wake:  # wakes the accepting thread
        wake.connect(address)
    for thread in threads:
        thread.join(10)
    listener.close()
