"""A bundle deploying a feature-space score (KNN) serves /predict end to end with its calibrated thresholds."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from models.contract.manifest import SCORE_STATE_FILE
from models.runtime import load_bundle
from models.scoring.feature_scores import knn_distance
from service.app import create_app
from service.runtime.decoding import decode_image
from service.settings import Settings
from tests.service.helpers import TinyModel, build_tiny_bundle, role_files

ROLES = ("accepted", "borderline", "rejected")


@pytest.fixture(scope="module")
def knn_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("knn-repository"), score="knn")


@pytest.fixture(scope="module")
def knn_client(knn_model: TinyModel, make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(repository=knn_model.repository))) as client:
        yield client


def test_the_bundle_ships_its_bank_and_scores_with_it(knn_model: TinyModel) -> None:
    bundle = load_bundle(knn_model.path)
    assert (knn_model.path / SCORE_STATE_FILE).is_file()
    assert (bundle.manifest.score.name, bundle.manifest.score.k) == ("knn", 3)
    images = [decode_image(knn_model.images[role], max_bytes=10**8, max_pixels=10**8) for role in ROLES]
    batch = bundle.preprocess(images)
    predictions = bundle.predict(batch)
    with torch.inference_mode():
        _, features = bundle.model.forward_features(batch)
    bank = load_file(str(knn_model.path / SCORE_STATE_FILE))["bank"]
    assert bank.shape[0] == 12
    assert predictions.scores.tolist() == pytest.approx(knn_distance(features, bank, 3).tolist(), abs=1e-6)
    assert predictions.accepted.tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("operating_point", "expected"),
    [("0.9", [True, False, False]), ("0.95", [True, True, False]), ("0.99", [True, True, False])],
)
def test_predict_accepts_by_the_knn_thresholds(
    knn_client: TestClient, knn_model: TinyModel, operating_point: str, expected: list[bool]
) -> None:
    response = knn_client.post("/predict", files=role_files(knn_model, *ROLES), data={"operating_point": operating_point})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["ood_score"]["name"] for p in predictions] == ["knn"] * 3
    assert [p["accepted"] for p in predictions] == expected
    assert all(p["accepted"] == (p["ood_score"]["value"] <= p["threshold"]) for p in predictions)
    values = [p["ood_score"]["value"] for p in predictions]
    assert values == sorted(values) and values[0] > 0.0  # accepted nearest the bank, rejected farthest
