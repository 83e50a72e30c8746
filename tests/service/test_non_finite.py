"""A model whose outputs are NaN or infinite never reaches the wire: refused at warm-up when a
blank image shows it, else each affected request is a JSON 500 naming the model.

JSON has no NaN: ``/predict`` once answered ``"probability": null`` and ``/v2`` a bare ``NaN``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.contract.bundle import save_bundle
from models.contract.manifest import BundleError
from models.runtime import Bundle
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import encode, infer_json, solid

BLACK = encode(solid((0, 0, 0)))  # what warm-up runs: a blank (all-zero) image
WHITE = encode(solid((255, 255, 255)))
FLOAT32_MAX = torch.finfo(torch.float32).max


def _save_copy(bundle: Bundle, repository: Path, model: torch.nn.Module) -> Path:
    manifest = bundle.manifest.model_copy(update={"name": "broken"})
    return save_bundle(repository / "broken" / manifest.version, model, manifest)


def nan_weights(bundle: Bundle, repository: Path) -> Path:
    """The tiny bundle with a NaN head: every output is NaN."""
    model = copy.deepcopy(bundle.model)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    return _save_copy(bundle, repository, model)


def overflows_on_white(bundle: Bundle, repository: Path) -> Path:
    """The tiny bundle with class 0's logit a huge multiple of the features a white image lights up
    far more than a black one: finite on black, past float32's range on white (an infinite logit:
    NaN probabilities and msp scores). Features are non-negative, so no partial sum overflows on black."""
    model = copy.deepcopy(bundle.model)
    with torch.no_grad():
        _, features = model.forward_features(bundle.preprocess([solid((0, 0, 0)), solid((255, 255, 255))]))
        black, white = features.double()
        lit = white > 4 * black
        on_black, on_white = black[lit].sum().item(), white[lit].sum().item()
        assert on_white > 4 * on_black > 0, "no features separate black from white"
        scale = FLOAT32_MAX / (on_black * on_white) ** 0.5  # on_black * scale < FLOAT32_MAX / 2 < on_white * scale / 2
        model.head.weight[0] = torch.where(lit, scale, 0.0)
        model.head.bias[0] = 0.0
    return _save_copy(bundle, repository, model)


def test_nan_weights_are_refused_at_warm_up(
    bundle: Bundle, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    nan_weights(bundle, tmp_path)
    with pytest.raises(BundleError, match=r"^model broken:1 .*non-finite") as raised:
        with TestClient(create_app(make_settings(tmp_path))):
            pass
    assert "\n" not in str(raised.value)


def test_a_request_with_non_finite_outputs_is_a_json_500_naming_the_model(
    bundle: Bundle, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    overflows_on_white(bundle, tmp_path)
    with TestClient(create_app(make_settings(tmp_path)), raise_server_exceptions=False) as client:
        for response in (
            client.post("/predict", files=[("files", ("white.png", WHITE, "image/png"))]),
            client.post("/v2/models/broken/infer", json=infer_json(WHITE)),
        ):
            assert response.status_code == 500, response.text
            answer = json.loads(response.text)  # strict JSON: a bare NaN would not parse
            assert answer["code"] == "non_finite_output"
            assert "broken:1" in answer["error"] and "NaN or infinity" in answer["error"]
        # The model's finite answers still go out, as valid JSON with real numbers.
        fine = client.post("/predict", files=[("files", ("black.png", BLACK, "image/png"))])
        assert fine.status_code == 200, fine.text
        assert isinstance(fine.json()["predictions"][0]["probability"], float)
        infer = client.post("/v2/models/broken/infer", json=infer_json(BLACK))
        assert infer.status_code == 200 and "NaN" not in infer.text
        assert client.get("/v2/health/ready").json() == {"ready": True}
