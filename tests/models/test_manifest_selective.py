"""Manifest.selective (schema 3): risk levels must be certified, and older bundles load without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from models.contract.bundle import read_bundle
from models.contract.manifest import MANIFEST_FILE, BundleError, RiskLevel, SelectiveCalibration
from models.runtime import load_bundle
from tests.service.helpers import TinyModel, build_tiny_bundle

REPOSITORY = Path(__file__).resolve().parents[2] / "models" / "repository"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("repo"))


def _copy_with(tiny: TinyModel, tmp_path: Path, **changes: object) -> Path:
    copy = Path(shutil.copytree(tiny.path, tmp_path / "tiny" / "1"))
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    raw.update(changes)
    (copy / MANIFEST_FILE).write_text(json.dumps({key: value for key, value in raw.items() if value is not ...}))
    return copy


def test_a_schema_2_bundle_without_risk_levels_still_loads(tiny: TinyModel, tmp_path: Path) -> None:
    bundle = load_bundle(_copy_with(tiny, tmp_path, schema_version=2, selective=...))
    assert (bundle.manifest.schema_version, bundle.manifest.selective) == (2, None)


def test_risk_levels_in_an_older_schema_are_refused(tiny: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="selective needs schema_version 3 or later, got 2"):
        read_bundle(_copy_with(tiny, tmp_path, schema_version=2))


def test_the_embedded_default_bundle_predates_risk_levels_and_loads() -> None:
    manifest = read_bundle(REPOSITORY / "flowers17" / "1").manifest
    assert manifest.schema_version < 3 and manifest.selective is None


def test_a_risk_level_its_counts_do_not_certify_is_refused() -> None:
    # P(Bin(100, 0.05) <= 2) = 0.118 > 0.1: two errors in 100 do not certify 5% at delta 0.1.
    level = RiskLevel(max_risk=0.05, confidence_threshold=0.9, n_accepted=100, errors=2)
    with pytest.raises(ValidationError, match="do not certify it at delta 0.1"):
        SelectiveCalibration(delta=0.1, n_calibration=200, risk_levels=[level])
    assert SelectiveCalibration(delta=0.2, n_calibration=200, risk_levels=[level]).level(0.05) == level


def test_the_default_risk_must_be_a_calibrated_level() -> None:
    level = RiskLevel(max_risk=0.05, confidence_threshold=0.9, n_accepted=100, errors=1)
    with pytest.raises(ValidationError, match="default_max_risk 0.01 is not one of the risk levels"):
        SelectiveCalibration(delta=0.1, n_calibration=200, risk_levels=[level], default_max_risk=0.01)
