"""Requests built to hurt the server, replayed in-process: each is refused with a 4xx naming the
problem, before any work on its numbers, and the server keeps answering its probes.

The shape attacks once stalled a server for 39 s: ``math.prod`` over a thousand 4,000-digit
dimensions runs under the GIL, and formatting an integer past 4,300 digits raised a ``ValueError``
(a 500). They must now be refused when the request is validated, so ``math.prod`` never sees them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.uploads import MAX_FILENAME_BYTES
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import TinyModel, role_files

WALL_BOUND_S = 5.0
"""Far above what a refusal costs on a loaded machine, far below the 39 s the shape attack once took."""


@pytest.fixture(scope="module")
def server(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def _infer_body(field: str) -> bytes:
    """An infer request whose ``image`` tensor carries ``field`` (raw JSON text) beside its name."""
    return b'{"inputs":[{"name":"image","datatype":"BYTES","data":[],' + field.encode() + b"}]}"


def _shape(dimensions: int, digits: int) -> str:
    return '"shape":[' + ",".join(["9" * digits] * dimensions) + "]"


ATTACKS: list[tuple[str, bytes, str]] = [
    ("thousand-dimensions", _infer_body(_shape(1000, 4000)), "inputs.0.shape"),
    ("huge-dimensions", _infer_body(_shape(3, 2001)), "inputs.0.shape.0"),
    (
        "huge-binary-size",
        _infer_body('"shape":[1],"parameters":{"binary_data_size":' + "9" * 4000 + "}"),
        "binary_data_size",
    ),
    (
        "many-inputs",
        b'{"inputs":[' + b",".join([b'{"name":"x","shape":[1],"datatype":"BYTES"}'] * 100_000) + b"]}",
        "inputs",
    ),
]


@pytest.mark.parametrize(("body", "named"), [attack[1:] for attack in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_hostile_infer_requests_are_refused_at_validation(
    server: TestClient, monkeypatch: pytest.MonkeyPatch, body: bytes, named: str
) -> None:
    products: list[tuple[int, ...]] = []
    real_prod = math.prod

    def recording_prod(values: tuple[int, ...], **kwargs: int) -> int:
        products.append(tuple(values))
        return real_prod(values, **kwargs)

    monkeypatch.setattr(math, "prod", recording_prod)
    started = time.perf_counter()
    response = server.post("/v2/models/tiny/infer", content=body)
    elapsed = time.perf_counter() - started
    assert response.status_code in (400, 413, 422), response.text
    answer = response.json()
    assert answer["code"] == "invalid_request" and named in answer["error"]
    assert len(answer["error"]) < 1000, "the message must not echo the attack"
    assert products == [], "the shape was multiplied before it was bounded"
    assert elapsed < WALL_BOUND_S
    assert server.get("/v2/health/live").json() == {"live": True}


def test_a_bounded_shape_is_still_counted(server: TestClient) -> None:
    response = server.post("/v2/models/tiny/infer", content=_infer_body('"shape":[8,9]'))
    assert (response.status_code, response.json()["code"]) == (413, "too_many_files")
    assert "72 images" in response.json()["error"]


@pytest.mark.parametrize("digits", [4000, 5000])
@pytest.mark.parametrize("where", ["query", "form"])
def test_a_huge_top_k_is_refused_without_formatting_it(
    server: TestClient, tiny: TinyModel, where: str, digits: int
) -> None:
    huge = "9" * digits
    response = server.post(
        "/predict" + (f"?top_k={huge}" if where == "query" else ""),
        files=role_files(tiny, "accepted"),
        data={"top_k": huge} if where == "form" else {},
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] in ("invalid_top_k", "invalid_request") and "top_k" in response.json()["error"]
    assert huge not in response.text


@pytest.mark.parametrize("length", [300, 10_000], ids=["past-our-limit", "past-the-parser-limit"])
def test_a_long_filename_is_named_as_the_problem(server: TestClient, tiny: TinyModel, length: int) -> None:
    name = "a" * (length - 4) + ".png"
    response = server.post("/predict", files=[("files", (name, tiny.images["accepted"], "image/png"))])
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["code"] == "filename_too_long"
    assert "filename" in answer["error"] and str(MAX_FILENAME_BYTES) in answer["error"]
    assert name not in response.text
    assert server.get("/v2/health/live").json() == {"live": True}


def test_a_filename_at_the_limit_is_served(server: TestClient, tiny: TinyModel) -> None:
    name = "a" * (MAX_FILENAME_BYTES - 4) + ".png"
    response = server.post("/predict", files=[("files", (name, tiny.images["accepted"], "image/png"))])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["filename"] == name
