"""POST /predict through TestClient: the answers are the bundle's own, per image and per operating point."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from fastapi.testclient import TestClient

from models.runtime import Predictions
from tests.service.helpers import CLASS_NAMES, TinyModel, encode, noise_image, role_files

ROLES = ("accepted", "borderline", "rejected")


def test_predictions_match_the_bundle(
    client: TestClient, tiny: TinyModel, predict_direct: Callable[[Sequence[bytes], float | None], Predictions]
) -> None:
    response = client.post("/predict", files=role_files(tiny, *ROLES))
    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["version"]) == ("tiny", "1")
    assert [p["filename"] for p in body["predictions"]] == [f"{role}.png" for role in ROLES]
    reference = predict_direct([tiny.images[role] for role in ROLES], None)
    for row, prediction in enumerate(body["predictions"]):
        index = int(reference.probabilities[row].argmax())
        assert prediction["class_index"] == index and prediction["label"] == CLASS_NAMES[index]
        assert prediction["probability"] == pytest.approx(float(reference.probabilities[row, index]), abs=1e-5)
        assert prediction["ood_score"] == {
            "name": "msp",
            "value": pytest.approx(float(reference.scores[row]), abs=1e-5),
        }
        assert prediction["p_value"] == pytest.approx(float(reference.p_values[row]))
        assert prediction["threshold"] == reference.operating_point.threshold
        assert prediction["operating_point"] == 0.95
        assert prediction["accepted"] is bool(reference.accepted[row])
    assert [p["accepted"] for p in body["predictions"]] == [True, True, False]


@pytest.mark.parametrize(
    ("operating_point", "expected"),
    [("0.9", [True, False, False]), ("0.95", [True, True, False]), ("0.99", [True, True, False])],
)
def test_the_operating_point_moves_the_threshold(
    client: TestClient, tiny: TinyModel, operating_point: str, expected: list[bool]
) -> None:
    as_form = client.post("/predict", files=role_files(tiny, *ROLES), data={"operating_point": operating_point})
    as_query = client.post(f"/predict?operating_point={operating_point}", files=role_files(tiny, *ROLES))
    for response in (as_form, as_query):
        assert response.status_code == 200
        predictions = response.json()["predictions"]
        assert [p["accepted"] for p in predictions] == expected
        assert {p["operating_point"] for p in predictions} == {float(operating_point)}
        assert all(p["accepted"] == (p["ood_score"]["value"] <= p["threshold"]) for p in predictions)


def test_top_k_lists_classes_by_probability(client: TestClient, tiny: TinyModel) -> None:
    default = client.post("/predict", files=role_files(tiny, "accepted")).json()["predictions"][0]
    assert len(default["top_k"]) == 3  # min(5, K)
    probabilities = [entry["probability"] for entry in default["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert default["top_k"][0] == {"label": default["label"], "probability": default["probability"]}
    one = client.post("/predict", files=role_files(tiny, "accepted"), data={"top_k": "1"}).json()["predictions"][0]
    assert one["top_k"] == default["top_k"][:1]


def test_model_can_be_named_with_its_version(client: TestClient, tiny: TinyModel) -> None:
    for reference in ("tiny", "tiny:1"):
        response = client.post("/predict", files=role_files(tiny, "accepted"), data={"model": reference})
        assert response.status_code == 200 and response.json()["version"] == "1"


def test_jpeg_uploads_decode_like_the_reference(
    client: TestClient, predict_direct: Callable[[Sequence[bytes], float | None], Predictions]
) -> None:
    jpeg = encode(noise_image(7, (120, 90)), "JPEG", quality=90)
    prediction = client.post("/predict", files=[("files", ("photo.jpg", jpeg, "image/jpeg"))]).json()["predictions"][0]
    assert prediction["ood_score"]["value"] == pytest.approx(float(predict_direct([jpeg], None).scores[0]), abs=1e-5)
