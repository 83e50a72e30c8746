"""/metrics after known traffic: every counter moves by exactly what was sent."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from models.bundle import Bundle
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import TinyModel, sample_value

MODEL = {"model": "tiny", "version": "1"}


@pytest.fixture
def fresh(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def _files(tiny: TinyModel, *roles: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{role}.png", tiny.images[role], "image/png")) for role in roles]


def test_predictions_are_counted_by_decision_and_operating_point(
    fresh: TestClient, tiny: TinyModel, bundle: Bundle
) -> None:
    assert fresh.post("/predict", files=_files(tiny, "accepted", "borderline", "rejected")).status_code == 200
    assert fresh.post("/predict?operating_point=0.9", files=_files(tiny, "borderline", "rejected")).status_code == 200
    infer = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(tiny.images["accepted"]).decode()],
            }
        ]
    }
    assert fresh.post("/v2/models/tiny/infer", json=infer).status_code == 200
    text = fresh.get("/metrics").text

    def predictions(point: str, decision: str) -> float:
        return sample_value(text, "mixoe_predictions_total", MODEL | {"operating_point": point, "decision": decision})

    assert (predictions("0.95", "accepted"), predictions("0.95", "rejected")) == (3, 1)
    assert (predictions("0.9", "accepted"), predictions("0.9", "rejected")) == (0, 2)

    assert sample_value(text, "mixoe_ood_score_count", MODEL) == 6
    threshold_95 = bundle.operating_point(0.95).threshold
    # The bucket bounded by a threshold counts exactly the scores that threshold accepts.
    assert (
        sample_value(text, "mixoe_ood_score_bucket", MODEL | {"le": repr(threshold_95)}) == 4
    )  # accepted x2, borderline x2
    assert sample_value(text, "mixoe_threshold", MODEL | {"operating_point": "0.95"}) == threshold_95
    assert sample_value(text, "mixoe_expected_rejection_ratio", MODEL | {"operating_point": "0.99"}) == pytest.approx(
        0.01
    )
    assert sample_value(text, "mixoe_model_info", MODEL | {"architecture": "resnet18", "score": "msp"}) == 1

    assert sample_value(text, "mixoe_requests_total", {"route": "/predict", "method": "POST", "status": "200"}) == 2
    assert sample_value(text, "mixoe_requests_total", {"route": "/v2/models/{name}/infer", "status": "200"}) == 1
    assert sample_value(text, "mixoe_request_duration_seconds_count", {"route": "/predict", "status": "200"}) == 2
    assert sample_value(text, "mixoe_batch_size_sum") == 6  # every image went through a batch once
    assert sample_value(text, "mixoe_queue_wait_seconds_count") == 6
    assert sample_value(text, "mixoe_inference_seconds_count") == sample_value(text, "mixoe_batch_size_count") >= 3
    assert sample_value(text, "mixoe_queue_depth") == 0


def test_routes_are_labelled_by_template_never_by_raw_path(fresh: TestClient) -> None:
    fresh.get("/v2/models/tiny")
    fresh.get("/v2/models/some-scanner-probe")
    fresh.get("/wp-admin/login.php")
    text = fresh.get("/metrics").text
    assert sample_value(text, "mixoe_requests_total", {"route": "/v2/models/{name}", "status": "200"}) == 1
    assert sample_value(text, "mixoe_requests_total", {"route": "/v2/models/{name}", "status": "404"}) == 1
    assert sample_value(text, "mixoe_requests_total", {"route": "unmatched", "status": "404"}) == 1
    assert "some-scanner-probe" not in text and "wp-admin" not in text
