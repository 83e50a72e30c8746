"""Intra-op thread counts: one per decoding thread, the model's own (or ``model_threads``) for the
batch loop, each holding whatever another thread sets afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from models.runtime import Bundle, PendingLogits
from service.app import create_app
from service.runtime.cpu_threads import batch_loop_threads, pin_intra_op_threads
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


@pytest.mark.parametrize(("model_threads", "expected"), [(None, 3), (2, 2)])
def test_a_cpu_server_decodes_on_one_thread_each_and_runs_the_model_on_its_count(
    make_settings: Callable[..., Settings],
    tiny: TinyModel,
    three_threads: None,
    monkeypatch: pytest.MonkeyPatch,
    model_threads: int | None,
    expected: int,
) -> None:
    """Every batch the loop runs (warm-up, then requests after the decoding threads pinned theirs to
    one) runs on ``model_threads``, by default the process's count of three."""
    counts: list[int] = []
    start = Bundle.start

    def counted(bundle: Bundle, batch: torch.Tensor) -> PendingLogits:
        counts.append(torch.get_num_threads())
        return start(bundle, batch)

    monkeypatch.setattr(Bundle, "start", counted)
    with TestClient(create_app(make_settings(model_threads=model_threads))) as client:
        served_before = len(counts)
        for _ in range(3):
            assert client.post("/predict", files=role_files(tiny, "accepted")).status_code == 200
        decode_pool = client.app.state.context.decode_pool  # type: ignore[attr-defined]
        decoding = {decode_pool.submit(torch.get_num_threads).result() for _ in range(8)}
    assert len(counts) > served_before  # the requests' batches were counted, not only warm-up's
    assert set(counts) == {expected}
    assert decoding == {1}


def test_model_threads_apply_on_a_cpu_and_a_cuda_loop_runs_on_one() -> None:
    """On CUDA the loop only feeds the GPU: one thread whatever model_threads says."""
    assert batch_loop_threads(torch.device("cpu"), None) is None
    assert batch_loop_threads(torch.device("cpu"), 2) == 2
    assert batch_loop_threads(torch.device("cuda"), None) == 1
    assert batch_loop_threads(torch.device("cuda", 1), 4) == 1
