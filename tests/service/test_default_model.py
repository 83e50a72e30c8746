"""With no configuration at all, the service serves the embedded default model."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import EMBEDDED_REPOSITORY, Settings, is_setting_variable


def test_an_unconfigured_service_loads_flowers17_version_2_and_answers_predict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [key for key in os.environ if is_setting_variable(key)]:
        monkeypatch.delenv(name)
    settings = Settings(device="cpu")
    assert settings.model_repository == EMBEDDED_REPOSITORY
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/flowers17").json()["versions"] == ["2"]
        answer = client.post("/predict", files=[("files", ("noise.jpg", buffer.getvalue(), "image/jpeg"))])
    assert answer.status_code == 200
    body = answer.json()
    assert (body["model"], body["version"]) == ("flowers17", "2")
    prediction = body["predictions"][0]
    assert prediction["operating_point"] == 0.95
    assert prediction["accepted"] == (prediction["ood_score"]["value"] <= prediction["threshold"])
