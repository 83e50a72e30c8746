"""Admission before work: once a worker holds its capacity of images, the next prediction request
is refused with 503 + Retry-After without its body being read, and nothing of it is decoded.

The admitted requests are held in decoding by a gate the test opens (an injected
``prepare_image``), so what is refused, and when, does not depend on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.admission import Admission
from service.api.errors import Overloaded
from service.app import create_app
import service.runtime.predictor
from service.settings import Settings
from tests.service.helpers import TinyModel, infer_json, role_files, serve_in_process

REQUEST_ID = "x-test-request"


class CountReceives:
    """Counts, per ``x-test-request`` header, how often the app read from the request body."""

    def __init__(self, app: ASGIApp, counts: Counter[str]):
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = dict(scope.get("headers", [])).get(REQUEST_ID.encode(), b"").decode()

        async def counted() -> Message:
            self.counts[name] += 1
            return await receive()

        await self.app(scope, counted, send)


class DecodeGate:
    """``prepare_image`` that counts its calls and waits for the test to open the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()
        self._real = service.runtime.predictor.prepare_image

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
        assert self.open.wait(30), "the test never opened the decoding gate"
        return self._real(*args, **kwargs)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[DecodeGate]:
    gate = DecodeGate()
    monkeypatch.setattr(service.runtime.predictor, "prepare_image", gate)
    yield gate
    gate.open.set()  # never leave a decoding thread waiting


def _held_app(make_settings: Callable[..., Settings], counts: Counter[str]) -> Any:
    # Capacity: queue_size + max_batch_size = 3 images per worker.
    app = create_app(make_settings(queue_size=2, max_batch_size=1, max_files=2, max_batch_delay_ms=0, retry_after_s=4))
    app.add_middleware(CountReceives, counts=counts)
    return app


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for a state the test has caused (not for time to pass): fail after 30 s."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never reached the expected state")


def _assert_refused(response: httpx.Response, retry_after: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == retry_after
    assert response.json()["code"] == "overloaded" and "overloaded" in response.json()["error"]


def test_a_full_worker_refuses_before_reading_and_serves_what_it_admitted(
    make_settings: Callable[..., Settings], tiny: TinyModel, gate: DecodeGate
) -> None:
    counts: Counter[str] = Counter()
    app = _held_app(make_settings, counts)

    async def scenario(client: httpx.AsyncClient) -> None:
        def post(name: str, path: str = "/predict", **body: Any) -> Any:
            body = body or {"files": role_files(tiny, "accepted")}
            return client.post(path, headers={REQUEST_ID: name}, **body)

        admitted = [asyncio.ensure_future(post(f"admitted{i}")) for i in range(3)]
        admission = app.state.context.admission
        await _until(lambda: admission.held == 3)
        refused = [await post(f"refused{i}") for i in range(4)]
        refused.append(await post("refused-oip", "/v2/models/tiny/infer", json=infer_json(tiny.images["accepted"])))
        for response in refused:
            _assert_refused(response, "4")
        assert not [name for name in counts if name.startswith("refused")]  # no refused body was read
        assert (await client.get("/v2/health/ready")).status_code == 200  # overloaded is not unhealthy
        gate.open.set()
        assert [(await request).status_code for request in admitted] == [200, 200, 200]
        assert admission.held == 0

    asyncio.run(serve_in_process(app, scenario))
    assert gate.calls == 3  # only the admitted images were ever decoded


def test_a_request_whose_extra_images_do_not_fit_is_refused_before_decoding(
    make_settings: Callable[..., Settings], tiny: TinyModel, gate: DecodeGate
) -> None:
    """Admitted on one image before its body is read, a two-image request holds its second once its
    form is parsed: with one place left that is a 503, and neither of its images is decoded."""
    counts: Counter[str] = Counter()
    app = _held_app(make_settings, counts)

    async def scenario(client: httpx.AsyncClient) -> None:
        single = role_files(tiny, "accepted")
        admitted = [asyncio.ensure_future(client.post("/predict", files=single)) for _ in range(2)]
        admission = app.state.context.admission
        await _until(lambda: admission.held == 2)
        pair = await client.post("/predict", files=role_files(tiny, "accepted", "rejected"), headers={REQUEST_ID: "pair"})
        _assert_refused(pair, "4")
        assert counts["pair"] > 0  # parsed: the image count is in the body
        assert gate.calls == 2
        gate.open.set()
        assert [(await request).status_code for request in admitted] == [200, 200]
        fits = await client.post("/predict", files=role_files(tiny, "accepted", "rejected"))
        assert fits.status_code == 200 and len(fits.json()["predictions"]) == 2

    asyncio.run(serve_in_process(app, scenario))


def test_admission_holds_places_until_released() -> None:
    admission = Admission(capacity=3, retry_after_s=2)
    first = admission.ticket()
    first.hold(2)
    second = admission.ticket()
    assert admission.held == 3
    with pytest.raises(Overloaded, match=r"1 more images do not fit \(0 of 3 places free\)") as refused:
        admission.ticket()
    assert refused.value.retry_after_s == 2
    with pytest.raises(Overloaded, match=r"2 more images do not fit"):
        second.hold(3)
    assert (admission.held, second.images) == (3, 1)  # a refused hold takes nothing
    first.release()
    second.hold(3)
    assert admission.held == 3
    second.release()
    assert admission.held == 0
