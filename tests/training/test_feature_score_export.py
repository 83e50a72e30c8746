"""calibrate / evaluate / export with a feature-space score: the bundle serves the thresholds it was calibrated on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from models.contract.manifest import SCORE_STATE_FILE
from models.runtime import load_bundle
from models.scoring.scores import SCORES
from tests.helpers.images import make_image_folder
from tests.helpers.runs import tiny_config
from training.cli import main
from training.config import save_config
from training.fit import trainer

CLASSES = ["amber", "blue", "crimson"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def run_dir(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = data_root
    make_image_folder(root / "id" / "train", CLASSES, per_class=8, seed=1)
    make_image_folder(root / "id" / "val", CLASSES, per_class=5, seed=2)
    make_image_folder(root / "id" / "test", CLASSES, per_class=5, seed=3)
    make_image_folder(root / "outliers", ["o"], per_class=8, seed=4)
    make_image_folder(root / "far", ["x"], per_class=6, seed=5)
    run = tmp_path_factory.mktemp("runs") / "run"
    config = tiny_config(root, run, epochs=1)
    trainer.train(config)
    save_config(config, run / "config.yaml")
    return run


def test_evaluate_reports_every_registered_score(run_dir: Path) -> None:
    assert main(["evaluate", str(run_dir)]) == 0
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert set(evaluation["scores"]) == set(SCORES) >= {"knn", "mahalanobis", "msp"}
    assert all(0.0 <= evaluation["scores"][name]["coarse"]["auroc"] <= 1.0 for name in SCORES)
    with np.load(run_dir / "logits.npz") as cached:
        assert cached["id_train.features"].shape == (24, 512)


def test_an_exported_knn_bundle_reproduces_its_calibration_scores(run_dir: Path, data_root: Path, tmp_path: Path) -> None:
    assert main(["calibrate", str(run_dir), "--score", "knn", "--set", "evaluation.knn_bank_size=16",
                 "--set", "evaluation.knn_k=4"]) == 0
    assert main(["evaluate", str(run_dir)]) == 0
    # export ships the state calibrate fitted, whatever the config says now
    assert main(["export", str(run_dir), "--repository", str(tmp_path), "--name", "knn", "--version", "1"]) == 0
    bundle = load_bundle(tmp_path / "knn" / "1")
    manifest = bundle.manifest
    assert (manifest.score.name, manifest.score.k) == ("knn", 4)
    assert load_file(str(tmp_path / "knn" / "1" / SCORE_STATE_FILE))["bank"].shape == (16, 512)
    assert manifest.training["score_fit"] == {"train_images": 24, "knn_bank_size": 16, "seed": 7}
    # The service path on the calibration images gives back the calibration scores.
    val = sorted(path for path in (data_root / "id" / "val").rglob("*") if path.is_file())
    assert len(val) == len(manifest.calibration.scores) == 15
    served = bundle.predict(bundle.preprocess([Image.open(path) for path in val])).scores.double().numpy()
    np.testing.assert_allclose(np.sort(served), manifest.calibration.scores, rtol=0, atol=1e-5)


def test_calibrating_an_unknown_score_is_one_line_listing_the_registered_ones(run_dir: Path, capsys) -> None:
    assert main(["calibrate", str(run_dir), "--score", "gram"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Unknown OOD score 'gram'" in err[0] and "knn, mahalanobis" in err[0]
