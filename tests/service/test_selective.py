"""decision (accept / uncertain / reject) at a requested max_risk, on /predict, infer and /metrics.

The tiny bundle's risk levels sit between its anchors' probabilities (tests/service/helpers.py):
at max risk 0.05 the ``borderline`` image is accepted as in-distribution but ``uncertain``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.helpers import (
    LENIENT_RISK,
    STRICT_RISK,
    TinyModel,
    build_tiny_bundle,
    infer_json,
    role_files,
    sample_value,
)

ROLES = ("accepted", "borderline", "rejected")


def _predict(client: TestClient, tiny: TinyModel, query: str = "", data: dict[str, str] | None = None) -> list[dict]:
    response = client.post(f"/predict{query}", files=role_files(tiny, *ROLES), data=data)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


@pytest.mark.parametrize(
    "query,data,risk,decisions",
    [
        (f"?max_risk={STRICT_RISK}", None, STRICT_RISK, ["accept", "uncertain", "reject"]),
        ("", {"max_risk": str(STRICT_RISK)}, STRICT_RISK, ["accept", "uncertain", "reject"]),
        (f"?max_risk={LENIENT_RISK}", None, LENIENT_RISK, ["accept", "accept", "reject"]),
        ("", None, None, ["accept", "accept", "reject"]),  # no default risk level: accept or reject only
    ],
    ids=["strict-query", "strict-form", "lenient", "none"],
)
def test_predict_answers_a_decision_per_image(
    client: TestClient, tiny: TinyModel, query: str, data: dict[str, str] | None, risk: float | None,
    decisions: list[str],
) -> None:
    predictions = _predict(client, tiny, query, data)
    assert [p["decision"] for p in predictions] == decisions
    assert [p["accepted"] for p in predictions] == [True, True, False]  # accepted keeps its meaning
    for prediction in predictions:
        if prediction["max_risk"] is None:
            assert prediction["confidence_threshold"] is None
        elif prediction["accepted"]:
            confident = prediction["probability"] >= prediction["confidence_threshold"]
            assert prediction["decision"] == ("accept" if confident else "uncertain")
    assert {p["max_risk"] for p in predictions} == {risk}


@pytest.mark.parametrize("value", ["0.1", "0.5"])
def test_an_uncalibrated_max_risk_is_refused_naming_the_calibrated_ones(
    client: TestClient, tiny: TinyModel, value: str
) -> None:
    response = client.post(f"/predict?max_risk={value}", files=role_files(tiny, "accepted"))
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "unknown_max_risk"
    assert body["error"] == f"model tiny:1 has no risk level {float(value):g}; calibrated: 0.05, 0.2"


def test_a_max_risk_that_is_no_number_is_refused(client: TestClient, tiny: TinyModel) -> None:
    response = client.post("/predict?max_risk=low", files=role_files(tiny, "accepted"))
    assert response.status_code == 422 and "max_risk" in response.text


def test_infer_answers_the_decision_tensor_and_the_risk_level(client: TestClient, tiny: TinyModel) -> None:
    body = infer_json(*(tiny.images[role] for role in ROLES)) | {"parameters": {"max_risk": STRICT_RISK}}
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    outputs = {tensor["name"]: tensor["data"] for tensor in answer["outputs"]}
    assert outputs["decision"] == ["accept", "uncertain", "reject"]
    assert answer["parameters"]["max_risk"] == STRICT_RISK
    assert outputs["probability"][1] < answer["parameters"]["confidence_threshold"] <= outputs["probability"][0]


@pytest.mark.parametrize(
    "value,code", [(0.3, "unknown_max_risk"), ("high", "invalid_request")], ids=["uncalibrated", "not-a-number"]
)
def test_infer_refuses_a_bad_max_risk(client: TestClient, tiny: TinyModel, value: object, code: str) -> None:
    body = infer_json(tiny.images["accepted"]) | {"parameters": {"max_risk": value}}
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 422
    assert response.json()["code"] == code
    assert ("no risk level 0.3" if code == "unknown_max_risk" else "parameter max_risk must be a number") in (
        response.json()["error"]
    )


def test_uncertain_is_counted_as_its_own_decision(make_settings: Callable[..., Settings], tiny: TinyModel) -> None:
    with TestClient(create_app(make_settings())) as fresh:
        _predict(fresh, tiny, f"?max_risk={STRICT_RISK}")
        _predict(fresh, tiny)
        text = fresh.get("/metrics").text
    labels = {"model": "tiny", "version": "1", "operating_point": "0.95"}
    counts = {
        decision: sample_value(text, "mixoe_predictions_total", labels | {"decision": decision})
        for decision in ("accepted", "uncertain", "rejected")
    }
    assert counts == {"accepted": 3, "uncertain": 1, "rejected": 2}


def test_the_bundle_default_risk_level_applies_without_max_risk(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    tiny = build_tiny_bundle(tmp_path, default_max_risk=STRICT_RISK)
    with TestClient(create_app(make_settings(repository=tmp_path))) as client:
        assert [p["decision"] for p in _predict(client, tiny)] == ["accept", "uncertain", "reject"]
        assert [p["decision"] for p in _predict(client, tiny, f"?max_risk={LENIENT_RISK}")] == [
            "accept", "accept", "reject"
        ]
        assert client.get("/v2/models/tiny").json()["parameters"]["default_max_risk"] == STRICT_RISK
