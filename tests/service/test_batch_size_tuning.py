"""Batch sizes chosen by measurement (``service.runtime.batch_loop.tuning``), with fake timings only.

Every timing here comes from a fake clock that a batch of ``n`` images advances by a price the
test sets, so the chosen limit is known in advance and no assertion depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from functools import partial

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import Tensor

import service.runtime.batch_loop.inference
from models.runtime import Bundle, Predictions
from service.app import create_app
from service.monitoring.logs import JsonFormatter
from service.monitoring.metrics import BatchMetrics
from service.runtime.batch_loop.inference import ModelRunner
from service.runtime.batch_loop.host_tasks import Task
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.protocol import Loaded, model_key
from service.runtime.batch_loop.tuning import BatchSizeTuning
from service.settings import Settings
from tests.service.helpers import TinyModel, encode, noise_image, sample_value, serve_in_process
from tests.service.test_model_process import ROLES, Inbox, batch_total, crops, load, run, verdicts_in

# Seconds per batch by size: 4 images per batch give the most images per second (20/s).
PRICES = {1: 0.1, 2: 0.15, 4: 0.2, 8: 0.8, 16: 2.0}


class FakeClock:
    """Seconds that pass only when :meth:`advance` says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_the_limit_is_the_size_with_the_most_images_per_second_from_the_fastest_run() -> None:
    """Runs slowed by something else (two of three at size 4, where a median would say 0.4 s and
    pick size 2) count for nothing: each size's time is its fastest run."""
    clock = FakeClock()
    tuning = BatchSizeTuning([4, 1, 2], clock=clock)
    durations = {1: [0.1, 0.12, 0.1], 2: [0.15, 9.0, 0.15], 4: [0.4, 0.19, 0.5]}
    for rows, seconds in durations.items():
        runs = iter(seconds)
        tuning.time(rows, lambda: clock.advance(next(runs)))
    assert tuning.seconds == pytest.approx({1: 0.1, 2: 0.15, 4: 0.19})
    assert tuning.complete and tuning.best == 4
    assert tuning.limit(32) == 4 and tuning.limit(3) == 3


def test_a_tie_goes_to_the_smaller_batch_and_nothing_timed_leaves_the_configured_limit() -> None:
    clock = FakeClock()
    tuning = BatchSizeTuning([1, 2, 4], clock=clock)
    assert tuning.best is None and tuning.limit(4) == 4 and not tuning.complete
    for rows in (1, 2, 4):
        tuning.time(rows, partial(clock.advance, rows * 0.5))  # 2 images/s at every size
    assert tuning.best == 1


class PricedBundle:
    """The bundle, each ``predict`` advancing ``clock`` by the price of its batch size; the first
    batch of each size costs 100 s more (lazy initialisation), which the warm-up must not count."""

    def __init__(self, bundle: Bundle, clock: FakeClock):
        self.bundle = bundle
        self.clock = clock
        self.batch_sizes: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.bundle, name)

    def predict(self, batch: Tensor, operating_point: float | None = None) -> Predictions:
        self.clock.advance(PRICES[len(batch)] + (100.0 if len(batch) not in self.batch_sizes else 0.0))
        self.batch_sizes.append(len(batch))
        return self.bundle.predict(batch, operating_point)


def test_the_warm_up_times_each_size_after_a_throw_away_run_and_logs_one_json_line(
    bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    priced = PricedBundle(bundle, clock)
    runner = ModelRunner(priced, tuning=BatchSizeTuning([1, 2, 4, 8, 16], clock=clock))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="mixoe.inference"):
        runner.warm_up()
    assert priced.batch_sizes == [size for size in (1, 2, 4, 8, 16) for _ in range(4)]  # 1 thrown away + 3 timed
    assert runner.batch_limit(16) == 4 and runner.batch_limit(2) == 2
    [record] = [record for record in caplog.records if record.getMessage().startswith("batch sizes timed")]
    line = json.loads(JsonFormatter().format(record))
    assert line["batch_size_limit"] == 4
    assert line["batch_seconds"] == {str(size): price for size, price in PRICES.items()}
    assert line["images_per_s"] == {"1": 10.0, "2": 13.33, "4": 20.0, "8": 10.0, "16": 8.0}


def test_without_tuning_a_runner_times_nothing_and_keeps_the_configured_limit(bundle: Bundle) -> None:
    runner = ModelRunner.for_device(bundle, 16, tune=False)
    assert runner.warm_up_sizes == [1] and runner.batch_limit(16) == 16
    assert ModelRunner.for_device(bundle, 16, tune=True).warm_up_sizes == [1, 2, 4, 8, 16]


@pytest.fixture
def warmed_up(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every model priced at :data:`PRICES` on a fake clock, for the tuning that
    ``ModelRunner.for_device`` builds; the batch sizes ``Bundle.predict`` ran (the warm-ups': serving
    runs ``Bundle.start``)."""
    clock = FakeClock()
    predicted: list[int] = []
    real_predict = Bundle.predict

    def priced_predict(bundle: Bundle, batch: Tensor, operating_point: float | None = None) -> Predictions:
        clock.advance(PRICES[len(batch)])
        predicted.append(len(batch))
        return real_predict(bundle, batch, operating_point)

    monkeypatch.setattr(Bundle, "predict", priced_predict)
    monkeypatch.setattr(service.runtime.batch_loop.inference, "BatchSizeTuning", partial(BatchSizeTuning, clock=clock))
    return predicted


def _metrics_after_one_request(make_settings: Callable[..., Settings], **settings: object) -> str:
    """/metrics after one request of 16 images. Its images are queued at once, so the batcher
    forms as many batches as its limit requires, whatever the timing."""
    app = create_app(make_settings(max_batch_size=16, max_batch_delay_ms=1000, **settings))
    images = [encode(noise_image(200 + i, (36, 30))) for i in range(16)]

    async def scenario(client: httpx.AsyncClient) -> str:
        files = [("files", (f"img{i}.png", image, "image/png")) for i, image in enumerate(images)]
        response = await client.post("/predict", files=files)
        assert response.status_code == 200 and len(response.json()["predictions"]) == 16
        return (await client.get("/metrics")).text

    return asyncio.run(serve_in_process(app, scenario))


def test_the_batcher_never_forms_a_batch_above_the_measured_limit(
    make_settings: Callable[..., Settings], warmed_up: list[int]
) -> None:
    metrics = _metrics_after_one_request(make_settings, batch_size_tuning=True)
    assert sample_value(metrics, "mixoe_batch_size_sum") == 16
    assert sample_value(metrics, "mixoe_batch_size_count") == 4
    assert sample_value(metrics, "mixoe_batch_size_bucket", {"le": "4.0"}) == 4  # every batch at most 4


def test_batch_size_tuning_false_keeps_max_batch_size(
    make_settings: Callable[..., Settings], warmed_up: list[int]
) -> None:
    metrics = _metrics_after_one_request(make_settings, batch_size_tuning=False)
    assert warmed_up == [1]  # the CPU warm-up alone: nothing timed
    assert (sample_value(metrics, "mixoe_batch_size_count"), sample_value(metrics, "mixoe_batch_size_sum")) == (1, 16)


def test_the_model_process_merges_runs_up_to_the_measured_limit_and_tells_the_workers(
    tiny: TinyModel, bundle: Bundle, warmed_up: list[int]
) -> None:
    batches = BatchMetrics(16, CollectorRegistry())
    host = ModelHost(torch.device("cpu"), 16, batches, batch_size_tuning=True)
    worker = Inbox()
    load(host, model_key(bundle), worker)
    assert worker.replies.pop() == Loaded(decodes_jpeg=False, batch_limit=4)
    for _ in range(3):  # 2 + 2 images merge; the third run would make 6
        host.submit(Task(worker, run(bundle, crops(bundle, tiny, ROLES[:2]))))
    while len(worker.replies) < 3:
        host.step()
    assert [len(verdicts) for verdicts in verdicts_in(worker)] == [2, 2, 2]
    assert (batch_total(batches.batch_size), batch_total(batches.batch_size, "_sum")) == (2, 6)


def test_the_setting_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch, tiny: TinyModel) -> None:
    assert Settings(model_repository=tiny.repository).batch_size_tuning is True
    monkeypatch.setenv("MIXOE_BATCH_SIZE_TUNING", "false")
    assert Settings(model_repository=tiny.repository).batch_size_tuning is False
