"""/metrics after known traffic: every counter moves by exactly what was sent."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from models.runtime import Bundle
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import TinyModel, infer_json, role_files, sample_value

MODEL = {"model": "tiny", "version": "1"}


@pytest.fixture
def fresh(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def test_predictions_are_counted_by_decision_and_operating_point(
    fresh: TestClient, tiny: TinyModel, bundle: Bundle
) -> None:
    assert fresh.post("/predict", files=role_files(tiny, "accepted", "borderline", "rejected")).status_code == 200
    rejected_at_09 = role_files(tiny, "borderline", "rejected")
    assert fresh.post("/predict?operating_point=0.9", files=rejected_at_09).status_code == 200
    assert fresh.post("/v2/models/tiny/infer", json=infer_json(tiny.images["accepted"])).status_code == 200
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


def test_methods_are_labelled_from_a_fixed_set(fresh: TestClient) -> None:
    """The method is any token a client sends: unknown ones share the label ``other``."""
    for method in ("FOOBAR", "SCAN1", "SCAN2"):
        assert fresh.request(method, "/predict").status_code == 405
    text = fresh.get("/metrics").text
    assert sample_value(text, "mixoe_requests_total", {"route": "/predict", "method": "other", "status": "405"}) == 3
    assert "FOOBAR" not in text and "SCAN" not in text
