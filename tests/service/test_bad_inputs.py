"""Every kind of bad input gets its 4xx and JSON reason, is counted, and leaves the server ready."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.helpers.images import png_claiming
from tests.service.helpers import TinyModel, encode, noise_image, sample_value, solid

MAX_UPLOAD = 4_000
MAX_REQUEST = 20_000


@pytest.fixture(scope="module")
def strict(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(
        max_files=2, max_upload_bytes=MAX_UPLOAD, max_request_bytes=MAX_REQUEST, max_image_pixels=100_000
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def files(*entries: tuple[str, bytes]) -> dict[str, Any]:
    return {"files": [("files", (name, data, "application/octet-stream")) for name, data in entries]}


def _truncated_jpeg() -> bytes:
    data = encode(noise_image(3, (64, 48)), "JPEG")
    return data[: len(data) // 2]


GOOD = encode(solid((10, 200, 30)))
NOISY = encode(noise_image(4, (60, 60)))  # incompressible: over MAX_UPLOAD bytes
assert len(NOISY) > MAX_UPLOAD

CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("zero-bytes", files(("empty.png", b"")), 400, "empty_file", "empty.png"),
    ("not-an-image", files(("notes.txt", b"shopping list: eggs")), 400, "not_an_image", "notes.txt"),
    ("truncated-jpeg", files(("cut.jpg", _truncated_jpeg())), 400, "truncated_image", "cut.jpg"),
    ("bomb-header", files(("bomb.png", png_claiming(60_000, 60_000))), 413, "too_many_pixels", "bomb.png"),
    ("too-many-pixels", files(("big.png", encode(Image.new("RGB", (400, 400))))), 413, "too_many_pixels", "big.png"),
    ("elongated", files(("strip.png", encode(Image.new("RGB", (5000, 1))))), 413, "too_many_pixels", "strip.png"),
    ("file-too-large", files(("noise.png", NOISY)), 413, "file_too_large", "noise.png"),
    ("too-many-files", files(("a.png", GOOD), ("b.png", GOOD), ("c.png", GOOD)), 413, "too_many_files", None),
    ("request-too-large", files(*[(f"{i}.png", NOISY) for i in range(6)]), 413, "request_too_large", None),
    ("second-file-bad", files(("good.png", GOOD), ("bad.png", b"garbage")), 400, "not_an_image", "bad.png"),
    ("unknown-model", files(("good.png", GOOD)) | {"data": {"model": "cars"}}, 404, "unknown_model", None),
    ("unknown-version", files(("good.png", GOOD)) | {"data": {"model": "tiny:7"}}, 404, "unknown_model", None),
    ("top-k-zero", files(("good.png", GOOD)) | {"data": {"top_k": "0"}}, 422, "invalid_top_k", None),
    ("top-k-above-classes", files(("good.png", GOOD)) | {"data": {"top_k": "4"}}, 422, "invalid_top_k", None),
    ("top-k-not-a-number", files(("good.png", GOOD)) | {"data": {"top_k": "many"}}, 422, "invalid_request", None),
    (
        "unknown-operating-point",
        files(("good.png", GOOD)) | {"data": {"operating_point": "0.5"}},
        422,
        "unknown_operating_point",
        None,
    ),
    ("missing-files-field", {"data": {"model": "tiny"}}, 422, "invalid_request", None),
]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code", "file"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_bad_upload_is_a_4xx_naming_the_problem(
    strict: TestClient, request_kwargs: dict[str, Any], status: int, code: str, file: str | None
) -> None:
    before = sample_value(strict.get("/metrics").text, "mixoe_bad_inputs_total", {"reason": code})
    response = strict.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["file"] == file
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text
    after = sample_value(strict.get("/metrics").text, "mixoe_bad_inputs_total", {"reason": code})
    assert after == before + 1
    assert strict.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize(
    ("path", "payload", "status", "code"),
    [
        ("/v2/models/cars/infer", {"inputs": []}, 404, "unknown_model"),
        (
            "/v2/models/tiny/infer",
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
            400,
            "invalid_base64",
        ),
        (
            "/v2/models/tiny/infer",
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["\u00e9t\u00e9"]}]},
            400,
            "invalid_base64",
        ),
        (
            "/v2/models/tiny/infer",
            {
                "inputs": [
                    {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"").decode()]}
                ]
            },
            400,
            "empty_file",
        ),
        (
            "/v2/models/tiny/infer",
            {
                "inputs": [
                    {"name": "image", "shape": [3], "datatype": "BYTES", "data": [base64.b64encode(GOOD).decode()] * 3}
                ]
            },
            413,
            "too_many_files",
        ),
    ],
    ids=["unknown-model", "bad-base64", "non-ascii-base64", "empty-image", "too-many-images"],
)
def test_bad_infer_requests(strict: TestClient, path: str, payload: dict[str, Any], status: int, code: str) -> None:
    response = strict.post(path, json=payload)
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert strict.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("header_length", ["-1", "12a", "9" * 5000], ids=["negative", "text", "huge"])
def test_a_malformed_header_length_is_a_400(strict: TestClient, header_length: str) -> None:
    headers = {"Inference-Header-Content-Length": header_length}
    response = strict.post("/v2/models/tiny/infer", content=b"{}", headers=headers)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request"), response.text
    assert "byte count" in response.json()["error"]


def test_unknown_routes_and_methods_use_the_same_body(strict: TestClient) -> None:
    missing = strict.get("/no/such/route")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    wrong_method = strict.get("/predict")
    assert (wrong_method.status_code, wrong_method.json()["code"]) == (405, "method_not_allowed")


def test_the_server_still_predicts_after_all_that(strict: TestClient, tiny: TinyModel) -> None:
    response = strict.post("/predict", files=[("files", ("ok.png", tiny.images["accepted"], "image/png"))])
    assert response.status_code == 200 and response.json()["predictions"][0]["accepted"] is True


def test_an_unexpected_failure_is_a_json_500_without_traceback(
    make_settings: Callable[..., Settings], tiny: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as client:

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(client.app.state.context.predictor, "predict", broken)  # type: ignore[attr-defined]
        response = client.post("/predict", files=[("files", ("ok.png", tiny.images["accepted"], "image/png"))])
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error", "code": "internal_error", "file": None}
        assert "secret" not in response.text
        requests = sample_value(
            client.get("/metrics").text, "mixoe_requests_total", {"route": "/predict", "status": "500"}
        )
        assert requests == 1
        assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("path", ["/predict", "/v2/models/tiny/infer"])
def test_an_undeclared_oversized_body_is_cut_off(strict: TestClient, path: str) -> None:
    """Chunked uploads carry no Content-Length: the limit applies as the bytes arrive."""
    boundary = "limit-test"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'.encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(2 * MAX_REQUEST // 1000):
            yield b"\0" * 1000

    response = strict.post(
        path, content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert "content-length" not in response.request.headers
    assert (response.status_code, response.json()["code"]) == (413, "request_too_large")
    assert strict.get("/v2/health/ready").status_code == 200
