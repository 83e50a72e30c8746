"""mixoe calibrate's risk levels (training.assess.calibrate.calibrate_selective) on synthetic labelled logits."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration.selective import binomial_cdf
from models.contract.manifest import Calibration, OperatingPoint, ScoreSpec
from tests.helpers.logits import synthetic_logits
from training.assess.calibrate import CalibrationRecord, calibrate_selective, calibration_markdown
from training.assess.scoring import SetLogits, confidences, misclassified
from training.config import EvaluationConfig


def _set(n: int, seed: int) -> SetLogits:
    data = synthetic_logits(n, 1, 5, seed=seed, margin=4.0)
    logits = data.id_logits.numpy()
    return SetLogits(logits, data.labels.numpy(), np.zeros((n, 1), np.float32))


def test_each_certifiable_risk_gets_a_threshold_and_the_rest_are_skipped_with_a_reason() -> None:
    validation, test = _set(400, seed=0), _set(400, seed=1)
    accuracy = 1.0 - float(misclassified(validation).mean())
    assert 0.75 < accuracy < 0.97  # errors exist, so 0.001 cannot be certified on 400 images
    config = EvaluationConfig(max_risks=[0.001, 0.05, 0.2], default_max_risk=0.001, risk_delta=0.1)
    selective = calibrate_selective(config, validation, test)
    assert selective is not None
    assert [level.max_risk for level in selective.risk_levels] == [0.05, 0.2]
    assert [skipped.max_risk for skipped in selective.unsupported] == [0.001]
    assert "max risk 0.001 cannot be certified" in selective.unsupported[0].reason
    assert selective.default_max_risk is None  # the requested default was not certified
    confidence, wrong = confidences(validation), misclassified(validation)
    for level in selective.risk_levels:
        accepted = confidence >= level.confidence_threshold
        assert (level.n_accepted, level.errors) == (int(accepted.sum()), int(wrong[accepted].sum()))
        assert binomial_cdf(level.errors, level.n_accepted, level.max_risk) <= 0.1
        test_accepted = confidences(test) >= level.confidence_threshold
        assert level.measured_coverage == pytest.approx(test_accepted.mean())
        assert level.measured_risk == pytest.approx(misclassified(test)[test_accepted].mean())
    strict, lenient = selective.risk_levels
    assert strict.confidence_threshold > lenient.confidence_threshold


def test_no_risks_asked_means_no_selective_calibration() -> None:
    assert calibrate_selective(EvaluationConfig(max_risks=[], default_max_risk=None), _set(50, 0), None) is None


def test_confidences_are_the_float32_softmax_the_service_reports() -> None:
    validation = _set(20, seed=2)
    expected = np.exp(validation.logits.astype(np.float64))
    expected = (expected / expected.sum(axis=1, keepdims=True)).max(axis=1)
    np.testing.assert_allclose(confidences(validation), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"max_risks": [0.05, 1.0]}, "max_risks must lie strictly between 0 and 1"),
        ({"max_risks": [0.01], "default_max_risk": 0.05}, "default_max_risk 0.05 is not one of"),
    ],
)
def test_impossible_risk_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvaluationConfig(**values)


def test_the_printed_calibration_tables_the_risk_levels_and_says_why_one_was_skipped() -> None:
    config = EvaluationConfig(max_risks=[0.001, 0.05], default_max_risk=0.05)
    selective = calibrate_selective(config, _set(400, seed=0), _set(400, seed=1))
    scores = np.linspace(0.0, 1.0, 100)
    calibration = Calibration(
        scores=scores.tolist(), operating_points=[OperatingPoint.calibrated(scores, 0.9)], default_target=0.9
    )
    record = CalibrationRecord(ScoreSpec.default("msp"), "fp32", "0" * 64, calibration, selective=selective)
    text = calibration_markdown(record)
    (level,) = selective.risk_levels
    row = next(line for line in text.splitlines() if line.startswith("| 5.00% |"))
    assert f"| {level.errors} of {level.n_accepted} |" in row and f"{level.confidence_threshold:.4g}" in row
    assert "skipped: max risk 0.001 cannot be certified" in text
