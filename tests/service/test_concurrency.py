"""Many concurrent clients: batches form, each client gets its own images' verdicts; a full queue is a 503."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest

from models.runtime import Predictions
from service.app import create_app
from service.runtime.batch_loop.inference import ModelRunner
from service.settings import Settings
from tests.service.helpers import encode, noise_image, sample_value, serve_in_process


def test_concurrent_clients_get_their_own_results_in_shared_batches(
    make_settings: Callable[..., Settings], predict_direct: Callable[[Sequence[bytes], float | None], Predictions]
) -> None:
    images = [encode(noise_image(100 + i, (40 + i, 30))) for i in range(32)]
    app = create_app(make_settings(max_batch_size=16, max_batch_delay_ms=50))

    async def scenario(client: httpx.AsyncClient) -> tuple[list[httpx.Response], str]:
        async def one(index: int) -> httpx.Response:
            return await client.post("/predict", files=[("files", (f"img{index}.png", images[index], "image/png"))])

        responses = await asyncio.gather(*(one(i) for i in range(len(images))))
        return list(responses), (await client.get("/metrics")).text

    responses, metrics = asyncio.run(serve_in_process(app, scenario))
    expected = predict_direct(images, None)
    for index, response in enumerate(responses):
        assert response.status_code == 200
        prediction = response.json()["predictions"][0]
        assert prediction["filename"] == f"img{index}.png"
        assert prediction["ood_score"]["value"] == pytest.approx(float(expected.scores[index]), abs=1e-5)
        assert prediction["class_index"] == int(expected.probabilities[index].argmax())
    batches = sample_value(metrics, "mixoe_batch_size_count")
    assert sample_value(metrics, "mixoe_batch_size_sum") == 32
    assert batches < 32  # at least one batch held more than one image
    assert sample_value(metrics, "mixoe_batch_size_bucket", {"le": "1.0"}) < batches


def test_a_full_queue_answers_503_with_retry_after(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = encode(noise_image(5))
    app = create_app(make_settings(max_files=1, queue_size=1, max_batch_size=1, max_batch_delay_ms=0, retry_after_s=7))

    async def scenario(client: httpx.AsyncClient) -> None:
        gate = threading.Event()
        real_start = ModelRunner.start

        def held_start(runner: ModelRunner, pixels: Any) -> Any:  # holds the batch loop until the gate opens
            assert gate.wait(30), "the test never opened the gate"
            return real_start(runner, pixels)

        monkeypatch.setattr(ModelRunner, "start", held_start)

        def post() -> asyncio.Task[httpx.Response]:
            return asyncio.ensure_future(client.post("/predict", files=[("files", ("x.png", image, "image/png"))]))

        async def metric(name: str) -> float:
            return sample_value((await client.get("/metrics")).text, name)

        async def wait_for(name: str, value: float) -> None:
            for _ in range(500):
                if await metric(name) == value:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{name} never reached {value}")

        first = post()
        await wait_for("mixoe_batch_size_count", 1)  # the loop took it into a batch, held by the gate
        second = post()
        await wait_for("mixoe_queue_depth", 2)  # the queue (size 1) behind the batch is now full
        refused = await client.post("/predict", files=[("files", ("x.png", image, "image/png"))])
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "7"
        assert refused.json()["code"] == "overloaded"
        assert (await client.get("/v2/health/ready")).status_code == 200  # overloaded is not unhealthy
        gate.set()
        assert (await first).status_code == 200 and (await second).status_code == 200

    asyncio.run(serve_in_process(app, scenario))
