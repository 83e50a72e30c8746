"""A worker with a model process forms no batches: every request is in flight at once, and the
model process, the one batching point, merges them (``service.runtime.hosted``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.runtime import Bundle
from service.api.errors import NotReady
from service.app import create_app
from service.runtime.hosted import HostedModel
from service.runtime.batch_loop.inference import ModelRunner
from service.runtime.verdicts import ImageJob, ImageVerdict
from service.runtime.model_client import HostClient
from service.runtime.batch_loop.host_tasks import Task
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.protocol import Judged, Loaded, ModelKey, Run
from service.settings import Settings
from tests.service.helpers import TinyModel, role_files
from tests.service.test_model_process import ROLES, assert_same_verdict, crops
from tests.service.test_model_process_faults import BOUND_S, Hang


class QueueDepth:
    """The observer's view: images waiting on the model process, after each change."""

    def __init__(self) -> None:
        self.depths = [0]

    def queue_changed(self, delta: int) -> None:
        self.depths.append(self.depths[-1] + delta)

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        raise AssertionError("a worker with a model process forms no batches")

    def batch_finished(self, seconds: float) -> None:
        raise AssertionError("a worker with a model process forms no batches")


def jobs(bundle: Bundle, tiny: TinyModel, roles: tuple[str, ...], target: float = 0.95) -> list[ImageJob]:
    point = bundle.operating_point(target)
    return [ImageJob(torch.from_numpy(crop), point, 2) for crop in crops(bundle, tiny, roles)]


def test_a_workers_requests_are_all_in_flight_and_merge_in_the_model_process(
    tiny: TinyModel, bundle: Bundle, model_process_in_threads: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the model process runs one request's batch, the worker's next three requests reach
    it without waiting for that answer, and run together as one batch."""
    batches: list[int] = []
    real_start = ModelRunner.start
    monkeypatch.setattr(ModelRunner, "start", lambda runner, pixels: batches.append(len(pixels)) or real_start(runner, pixels))
    runs_arrived = asyncio.Queue[None]()
    real_submit = model_process_in_threads.submit

    def counting_submit(task: Task) -> None:
        real_submit(task)
        if isinstance(task.message, Run):
            loop.call_soon_threadsafe(runs_arrived.put_nowait, None)

    monkeypatch.setattr(model_process_in_threads, "submit", counting_submit)
    observer = QueueDepth()

    async def requests() -> list[list[ImageVerdict | None]]:
        client = HostClient.from_environment(timeout_s=BOUND_S)
        hosted = HostedModel(client, bundle, observer)
        await hosted.warm_up()
        await hosted.start()
        hang = Hang(monkeypatch)
        first = asyncio.create_task(hosted.submit(jobs(bundle, tiny, ROLES[:1])))
        assert await asyncio.to_thread(hang.entered.wait, BOUND_S)
        others = [asyncio.create_task(hosted.submit(jobs(bundle, tiny, (role,), 0.9))) for role in ROLES]
        for _ in range(4):
            await asyncio.wait_for(runs_arrived.get(), BOUND_S)
        hang.release()
        answers = await asyncio.gather(first, *others)
        await hosted.stop()
        await client.close()
        return answers

    loop = asyncio.new_event_loop()
    try:
        answers = loop.run_until_complete(requests())
    finally:
        loop.close()
    assert batches == [1, 3]
    reference = ModelRunner(bundle)
    for answer, expected in zip(
        answers, [reference(jobs(bundle, tiny, ROLES[:1]))] + [reference(jobs(bundle, tiny, (r,), 0.9)) for r in ROLES],
        strict=True,
    ):
        [got], [want] = answer, expected
        assert got is not None
        assert_same_verdict(got, want)
    assert max(observer.depths) == 4 and observer.depths[-1] == 0


class RecordingClient:
    """Stands in for the model process: a batch limit of 2, and each verdict says which image it
    judged (a crop by its fill value, a JPEG by its bytes)."""

    timeout_s = BOUND_S

    def __init__(self) -> None:
        self.runs: list[Run] = []

    async def load(self, model: ModelKey) -> Loaded:
        return Loaded(decodes_jpeg=True, batch_limit=2)

    async def call(self, run: Run, expected: type, timeout_s: float) -> Judged:
        self.runs.append(run)
        judged: list[Any] = [f"crop {int(crop[0, 0, 0])}" for crop in run.crops] + [jpeg.decode() for jpeg in run.jpegs]
        return Judged(judged)


def test_a_request_is_cut_at_the_batch_limit_and_its_verdicts_come_back_in_upload_order(bundle: Bundle) -> None:
    size = bundle.manifest.preprocessing.input_size
    point, other_point = bundle.operating_point(0.95), bundle.operating_point(0.9)

    def crop(value: int) -> torch.Tensor:
        return torch.full((3, size, size), value, dtype=torch.uint8)

    uploads = [
        ImageJob(b"jpeg 0", point, 2), ImageJob(crop(1), point, 2), ImageJob(b"jpeg 2", point, 2),
        ImageJob(crop(3), point, 2), ImageJob(crop(4), point, 2), ImageJob(crop(5), other_point, 2),
    ]
    client = RecordingClient()

    async def submit() -> list[ImageVerdict | None]:
        hosted = HostedModel(client, bundle, QueueDepth())  # type: ignore[arg-type]
        await hosted.warm_up()
        await hosted.start()
        return await hosted.submit(uploads)

    verdicts = asyncio.run(submit())
    assert verdicts == ["jpeg 0", "crop 1", "jpeg 2", "crop 3", "crop 4", "crop 5"]  # type: ignore[comparison-overlap]
    # At most 2 images per run, one operating point per run; each run's crops in one array.
    assert [(run.images, run.point.target_id_acceptance) for run in client.runs] == [
        (2, 0.95), (2, 0.95), (1, 0.95), (1, 0.9)
    ]
    assert all(isinstance(run.crops, np.ndarray) and run.crops.ndim == 4 for run in client.runs)
    assert [len(run.jpegs) for run in client.runs] == [1, 1, 0, 0]


def test_a_stopped_model_refuses_new_requests_with_a_503(bundle: Bundle) -> None:
    async def submit_after_stop() -> None:
        hosted = HostedModel(RecordingClient(), bundle, QueueDepth())  # type: ignore[arg-type]
        await hosted.warm_up()
        await hosted.start()
        await hosted.stop()
        await hosted.submit([ImageJob(b"jpeg", bundle.operating_point(None), 1)])

    with pytest.raises(NotReady, match="not accepting"):
        asyncio.run(submit_after_stop())


class LoopBroke(BaseException):
    """Escapes a step of the batch loop, as only a bug could (a step answers its own errors)."""


def test_a_batch_loop_that_dies_fails_its_request_with_a_503_and_turns_readiness_and_liveness_false(
    tiny: TinyModel, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(host: ModelHost) -> None:
        raise LoopBroke("the loop broke")

    with TestClient(create_app(make_settings())) as client:
        monkeypatch.setattr(ModelHost, "_answer_in_flight", broken)
        response = client.post("/predict", files=role_files(tiny, "accepted"))
        assert response.status_code == 503 and response.json()["code"] == "not_ready", response.text
        for probe in ("/v2/health/ready", "/v2/health/live"):
            answer = client.get(probe)
            assert answer.status_code == 503 and "the batch loop stopped" in answer.json()["error"], probe
        again = client.post("/predict", files=role_files(tiny, "accepted"))
        assert again.status_code == 503 and "the batch loop stopped" in again.json()["error"]
