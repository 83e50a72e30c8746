"""The embedded default model (models/repository/flowers17/2) is deployable as committed, and the
bundle it replaced (version 1) still loads for those who pin it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import models
from models.contract.bundle import sha256_file
from models.contract.index import find_bundles, latest_version
from models.runtime import load_bundle

REPOSITORY = Path(models.__file__).parent / "repository"


def test_the_default_bundle_loads_verifies_its_hash_and_classifies_generated_images() -> None:
    assert latest_version(REPOSITORY, "flowers17") == "2"
    path = REPOSITORY / "flowers17" / "2"
    bundle = load_bundle(path)
    assert bundle.manifest.weights_sha256 == sha256_file(path / "weights.safetensors")
    assert bundle.manifest.architecture == "mobilenet_v2" and bundle.manifest.num_classes == 12

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)) for _ in range(3)]
    images.append(Image.new("L", (64, 64), 128))  # greyscale too
    predictions = bundle.predict(bundle.preprocess(images))
    assert predictions.probabilities.shape == (4, 12)
    assert torch.allclose(predictions.probabilities.sum(dim=1), torch.ones(4), atol=1e-5)
    point = bundle.operating_point()
    assert torch.equal(predictions.accepted, predictions.scores <= point.threshold)


def test_the_default_bundle_ships_three_operating_points_with_measured_rates() -> None:
    manifest = load_bundle(REPOSITORY / "flowers17" / "2").manifest
    assert (manifest.training["method"]["name"], manifest.score.name) == ("energy-oe", "odin")
    calibration = manifest.calibration
    assert [p.target_id_acceptance for p in calibration.operating_points] == [0.9, 0.95, 0.99]
    assert calibration.default_target == 0.95
    for point in calibration.operating_points:
        assert point.n_calibration == len(calibration.scores) == 120  # 10 val images x 12 species
        assert point.measured_id_acceptance is not None
        # held-out species, full-resolution Caltech-101 photos, 64 px Tiny-ImageNet, validation outliers
        assert set(point.ood_acceptance) == {"fine", "caltech_coarse", "tinyimagenet_coarse", "val_outliers"}
    thresholds = [p.threshold for p in calibration.operating_points]
    assert thresholds == sorted(thresholds)  # accepting more ID needs a higher threshold


def test_the_repository_holds_only_valid_bundles() -> None:
    bundles = find_bundles(REPOSITORY)
    assert {(name, version) for name, version, _ in bundles} == {("flowers17", "1"), ("flowers17", "2")}
    for name, version, path in bundles:
        manifest = load_bundle(path).manifest
        assert (manifest.name, manifest.version) == (name, version)
