"""Intra-op thread counts: one per decoding thread, the model's own for the batch loop, each holding
whatever another thread sets afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.cpu_threads import pin_intra_op_threads
from service.settings import Settings
from tests.service.helpers import TinyModel, role_files


@pytest.fixture
def three_threads() -> Iterator[None]:
    """The test thread (and the process default) at three intra-op threads, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_a_pinned_count_holds_after_another_thread_pins_a_different_one(three_threads: None) -> None:
    """The first thread pins 2 and waits; the second pins 1 (which also sets the process default);
    the first still runs on 2. A plain ``torch.set_num_threads(2)`` would have read the default of 1
    at its first parallel operation."""
    pinned, other_done = threading.Event(), threading.Event()
    seen: list[int] = []

    def first() -> None:
        pin_intra_op_threads(2)
        pinned.set()
        other_done.wait(timeout=60)
        seen.append(torch.get_num_threads())
        torch.ones(64, 64).sum()  # a parallel operation: the count it runs under is the one read back
        seen.append(torch.get_num_threads())

    def second() -> None:
        pinned.wait(timeout=60)
        pin_intra_op_threads(1)
        seen.append(torch.get_num_threads())
        other_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == [1, 2, 2]


def test_a_cpu_server_decodes_on_one_thread_each_and_runs_the_model_on_the_process_count(
    make_settings: Callable[..., Settings], tiny: TinyModel, three_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_threads: list[int] = []
    serve_forever = ModelHost.serve_forever

    def counted(host: ModelHost) -> None:
        loop_threads.append(torch.get_num_threads())
        serve_forever(host)

    monkeypatch.setattr(ModelHost, "serve_forever", counted)
    with TestClient(create_app(make_settings())) as client:
        assert client.post("/predict", files=role_files(tiny, "accepted")).status_code == 200
        decode_pool = client.app.state.context.decode_pool  # type: ignore[attr-defined]
        decoding = {decode_pool.submit(torch.get_num_threads).result() for _ in range(8)}
    assert loop_threads == [3]
    assert decoding == {1}
