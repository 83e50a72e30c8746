"""Bundles of feature-space scores: the fitted state travels hash-checked, schema-1 bundles still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from models.contract.bundle import save_bundle, sha256_file
from models.contract.manifest import MANIFEST_FILE, SCHEMA_VERSION, SCORE_STATE_FILE, BundleError, ScoreSpec
from models.runtime import load_bundle
from models.scoring import feature_scores
from models.scoring.feature_scores import knn_distance
from tests.service.helpers import TinyModel, build_tiny_bundle, noise_image


@pytest.fixture(scope="module")
def knn(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("repo"), score="knn")


@pytest.fixture(scope="module")
def msp(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("repo"), score="msp")


@pytest.fixture
def knn_copy(knn: TinyModel, tmp_path: Path) -> Path:
    return Path(shutil.copytree(knn.path, tmp_path / "tiny" / "1"))


def _edit_manifest(path: Path, **changes: object) -> None:
    raw = json.loads((path / MANIFEST_FILE).read_text())
    raw.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(raw))


def test_the_state_is_stored_as_given_and_covered_by_the_manifest(knn: TinyModel) -> None:
    manifest = json.loads((knn.path / MANIFEST_FILE).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION == 3
    assert manifest["score"] == {"name": "knn", "temperature": 1.0, "k": 3}
    assert manifest["score_state_sha256"] == sha256_file(knn.path / SCORE_STATE_FILE)
    bank = load_file(str(knn.path / SCORE_STATE_FILE))["bank"]
    assert bank.dtype == torch.float16 and bank.shape == (12, 512)


def test_start_and_finish_score_on_the_device_path_like_the_pure_function(knn: TinyModel) -> None:
    bundle = load_bundle(knn.path)
    images = [noise_image(seed) for seed in (1, 2, 3, 4)]
    pixels = torch.stack([bundle.pixels(image) for image in images])
    normalised = bundle.preprocess(images)
    with torch.inference_mode():
        _, features = bundle.model.forward_features(normalised)
    expected = knn_distance(features, load_file(str(knn.path / SCORE_STATE_FILE))["bank"], 3)
    for batch in (pixels, normalised):
        pending = bundle.start(batch)
        bundle.start(torch.zeros_like(batch))  # another batch launched meanwhile changes nothing
        finished = bundle.finish(pending)
        torch.testing.assert_close(finished.scores, expected, rtol=0, atol=1e-5)
        assert finished.accepted.tolist() == (finished.scores.double() <= finished.operating_point.threshold).tolist()


def test_a_loaded_bundle_computes_the_bank_norms_once_not_per_batch(
    knn: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: list[int] = []
    real = feature_scores.squared_norms

    def counted(bank: torch.Tensor) -> torch.Tensor:
        computed.append(len(bank))
        return real(bank)

    monkeypatch.setattr(feature_scores, "squared_norms", counted)
    bundle = load_bundle(knn.path)
    assert computed == [12]  # at load, for the bank's 12 rows
    pixels = torch.stack([bundle.pixels(noise_image(seed)) for seed in (1, 2)])
    first, second = bundle.predict(pixels), bundle.predict(pixels)
    assert computed == [12]
    torch.testing.assert_close(first.scores, second.scores, rtol=0, atol=0)


def test_a_tampered_or_missing_state_is_refused(knn_copy: Path) -> None:
    data = bytearray((knn_copy / SCORE_STATE_FILE).read_bytes())
    data[-1] ^= 0x01
    (knn_copy / SCORE_STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"sha256 mismatch for {knn_copy / SCORE_STATE_FILE}"):
        load_bundle(knn_copy)
    (knn_copy / SCORE_STATE_FILE).unlink()
    with pytest.raises(BundleError, match=f"{SCORE_STATE_FILE} missing in bundle {knn_copy}"):
        load_bundle(knn_copy)


def test_a_feature_score_without_a_recorded_state_is_refused(knn_copy: Path) -> None:
    _edit_manifest(knn_copy, score_state_sha256="")
    with pytest.raises(BundleError, match="score 'knn' of bundle .* needs its fitted state"):
        load_bundle(knn_copy)


def test_saving_refuses_a_missing_state_and_a_state_for_a_logit_score(knn: TinyModel, msp: TinyModel, tmp_path: Path) -> None:
    knn_bundle, msp_bundle = load_bundle(knn.path), load_bundle(msp.path)
    with pytest.raises(BundleError, match="score 'knn' .* needs its fitted state"):
        save_bundle(tmp_path / "tiny" / "1", knn_bundle.model, knn_bundle.manifest)
    with pytest.raises(BundleError, match="score 'msp' .* reads logits only"):
        save_bundle(tmp_path / "tiny" / "1", msp_bundle.model, msp_bundle.manifest, score_state={"bank": torch.ones(2, 2)})
    assert not (tmp_path / "tiny" / "1").exists()


def test_k_is_required_by_knn_and_refused_elsewhere() -> None:
    with pytest.raises(ValidationError, match="score 'knn' needs k"):
        ScoreSpec(name="knn", temperature=1.0)
    with pytest.raises(ValidationError, match="score 'msp' takes no k"):
        ScoreSpec(name="msp", temperature=1.0, k=5)
    assert ScoreSpec.default("knn").k == 10 and ScoreSpec.default("mahalanobis").k is None


def test_a_schema_1_manifest_still_loads(msp: TinyModel, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(msp.path, tmp_path / "tiny" / "1"))
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    del raw["score_state_sha256"], raw["selective"]
    (copy / MANIFEST_FILE).write_text(json.dumps({**raw, "schema_version": 1}))
    bundle = load_bundle(copy)
    assert (bundle.manifest.schema_version, bundle.manifest.score.k) == (1, None)
    assert bundle.predict(bundle.preprocess([noise_image(5)])).scores.shape == (1,)
