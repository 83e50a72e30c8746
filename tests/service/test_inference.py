"""The batch function: padded batch shapes give the same verdicts as unpadded ones."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
import torch
from torch import Tensor

from models.runtime import Bundle, PendingLogits, Predictions
from service.runtime.batch_loop.inference import ModelRunner, graphs_note, padded_batch_sizes
from service.runtime.verdicts import ImageJob


class ShapeRecorder:
    """The bundle, noting the batch size of every ``predict`` and ``start`` call."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.batch_sizes: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.bundle, name)

    def predict(self, batch: Tensor, operating_point: float | None = None) -> Predictions:
        self.batch_sizes.append(len(batch))
        return self.bundle.predict(batch, operating_point)

    def start(self, batch: Tensor) -> PendingLogits:
        self.batch_sizes.append(len(batch))
        return self.bundle.start(batch)


def test_padded_batch_sizes_are_powers_of_two_and_the_full_batch() -> None:
    assert padded_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert padded_batch_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert padded_batch_sizes(1) == [1]


def random_jobs(bundle: Bundle, count: int) -> list[ImageJob]:
    """``count`` random images asking for different operating points and top-k sizes."""
    size = bundle.manifest.preprocessing.input_size
    points = bundle.manifest.calibration.operating_points
    generator = torch.Generator().manual_seed(count)
    return [
        ImageJob(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator), points[i % len(points)],
                 top_k=1 + i % 3)
        for i in range(count)
    ]


def test_a_padded_batch_answers_exactly_its_own_images(bundle: Bundle) -> None:
    jobs = random_jobs(bundle, 5)
    padded, plain = ShapeRecorder(bundle), ShapeRecorder(bundle)

    padded_verdicts = ModelRunner(cast(Bundle, padded), padded_batch_sizes(8))(jobs)
    plain_verdicts = ModelRunner(cast(Bundle, plain))(jobs)

    assert padded.batch_sizes == [8] and plain.batch_sizes == [5]
    assert len(padded_verdicts) == 5
    for got, want in zip(padded_verdicts, plain_verdicts, strict=True):
        assert (got.label, got.accepted, got.threshold, len(got.top_k)) == (
            want.label, want.accepted, want.threshold, len(want.top_k)
        )
        assert got.score == pytest.approx(want.score, rel=1e-5, abs=1e-6)
        assert [p for _, p in got.top_k] == pytest.approx([p for _, p in want.top_k], rel=1e-5, abs=1e-6)


def test_a_batch_above_every_padded_size_runs_as_it_is(bundle: Bundle) -> None:
    recorder = ShapeRecorder(bundle)
    verdicts = ModelRunner(cast(Bundle, recorder), padded_batch_sizes(4))(random_jobs(bundle, 6))
    assert recorder.batch_sizes == [6] and len(verdicts) == 6


def test_warm_up_runs_every_padded_size_once(bundle: Bundle) -> None:
    padded, plain = ShapeRecorder(bundle), ShapeRecorder(bundle)
    ModelRunner(cast(Bundle, padded), padded_batch_sizes(16)).warm_up()
    ModelRunner(cast(Bundle, plain)).warm_up()
    assert padded.batch_sizes == [1, 2, 4, 8, 16]
    assert plain.batch_sizes == [1]


def test_warm_up_records_a_cuda_graph_per_padded_size_and_runs_each(bundle: Bundle) -> None:
    recorded: list[int] = []
    recorder = ShapeRecorder(bundle)
    recorder.capture_graph = recorded.append  # type: ignore[attr-defined]  # no GPU here: note the sizes
    ModelRunner(cast(Bundle, recorder), padded_batch_sizes(4), cuda_graphs=True).warm_up()
    assert recorded == [1, 2, 4] and recorder.batch_sizes == [1, 2, 4]


def test_a_size_the_gpu_refuses_to_record_runs_eagerly(bundle: Bundle, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(rows: int) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    recorder = ShapeRecorder(bundle)
    recorder.capture_graph = refuse  # type: ignore[attr-defined]
    runner = ModelRunner(cast(Bundle, recorder), padded_batch_sizes(2), cuda_graphs=True)
    runner.warm_up()
    assert recorder.batch_sizes == [1, 2]
    assert sum("runs eagerly" in record.getMessage() for record in caplog.records) == 2
    assert len(runner(random_jobs(bundle, 2))) == 2


def test_a_cpu_runner_neither_pads_nor_records_graphs(bundle: Bundle) -> None:
    runner = ModelRunner.for_device(bundle, 32, cuda_graphs=True)
    runner.warm_up()
    assert runner.warm_up_sizes == [1] and bundle.graphed_batch_sizes == []


def test_the_log_line_names_the_recorded_graphs_and_only_those(bundle: Bundle) -> None:
    recorded = SimpleNamespace(graphed_batch_sizes=[1, 2, 4])
    assert graphs_note(cast(Bundle, recorded)) == ", CUDA graphs for batch sizes 1, 2, 4"
    assert graphs_note(bundle) == ""
