"""``mixoe calibrate``: accept/reject thresholds from held-out ID data (split conformal).

For each target ID acceptance 1 - alpha, the threshold is the k-th smallest of the n ID
validation scores, k = ceil((1 - alpha)(n + 1)) (:mod:`models.calibration.conformal`). Each operating point
also reports what it achieves on data it was not chosen on: the measured ID acceptance on the ID
test split and the OOD acceptance (leak) on each OOD set.

The ID validation split also picks the best epoch, by accuracy; that choice looks at labels, not
at OOD scores, so it bends the exchangeability behind the guarantee only slightly. Hold out a
separate calibration split when the guarantee must be exact.

A feature-space score (``knn``, ``mahalanobis``) is fitted on the ID training features first;
its state is saved beside ``calibration.json`` as ``score_state.safetensors`` (its sha256 and
what it was fitted on, ``score_fit``, in the JSON), and ``mixoe export`` ships exactly that state
with the thresholds calibrated on it.

Labelled ID validation images also certify confidence thresholds for selective classification
(:mod:`models.calibration.selective`, Learn then Test): for each maximum risk epsilon, answers whose max
softmax probability falls below the threshold are marked ``uncertain``, so that the error rate
among the rest stays <= epsilon with probability >= 1 - ``risk_delta``. A risk the data cannot
certify is skipped, with its reason stored in the calibration (and a warning logged).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.calibration.selective import UnsupportedRiskError, selective_threshold
from models.contract.bundle import sha256_file
from models.contract.manifest import (
    SCORE_STATE_FILE,
    Calibration,
    OperatingPoint,
    RiskLevel,
    ScoreSpec,
    SelectiveCalibration,
    UnsupportedRisk,
)
from models.network.nets import Precision
from training.assess.report import markdown_table
from training.assess.scoring import ID_TEST, ID_TRAIN, ID_VAL, SetLogits, confidences, fit_score, misclassified, run_logits
from training.config import EvaluationConfig, TrainConfig
from training.fit.checkpoint import BEST_WEIGHTS, atomic_write

CALIBRATION_JSON = "calibration.json"
logger = logging.getLogger("mixoe.calibrate")


@dataclass(frozen=True)
class CalibrationRecord:
    """A run's calibration and what it holds for: the score, the weights and the precision."""

    score: ScoreSpec
    precision: Precision
    weights_sha256: str
    calibration: Calibration
    state: dict[str, Tensor] = field(default_factory=dict)  # the score's fitted state; {} for logit scores
    score_fit: dict[str, int | None] | None = None  # what the state was fitted on; None for logit scores
    selective: SelectiveCalibration | None = None  # risk-controlled confidence thresholds; None when none asked


def acceptance(scores: np.ndarray, threshold: float) -> float:
    """Share of ``scores`` accepted as ID at ``threshold`` (accepted when score <= threshold)."""
    return float(np.mean(scores <= threshold))


def calibrate_selective(
    evaluation: EvaluationConfig, validation: SetLogits, test: SetLogits | None
) -> SelectiveCalibration | None:
    """Confidence thresholds certified on ``validation`` for each of ``evaluation.max_risks``, with
    their coverage and error rate measured on ``test``; ``None`` when no risk is asked for."""
    if not evaluation.max_risks:
        return None
    confidence, wrong = confidences(validation), misclassified(validation)
    levels, unsupported = [], []
    for risk in evaluation.max_risks:
        try:
            found = selective_threshold(confidence, wrong, risk, evaluation.risk_delta)
        except UnsupportedRiskError as error:
            logger.warning("skipping max risk %g: %s", risk, error)
            unsupported.append(UnsupportedRisk(max_risk=risk, reason=str(error)))
            continue
        measured: dict[str, float | None] = {"measured_coverage": None, "measured_risk": None}
        if test is not None:
            accepted = confidences(test) >= found.threshold
            measured["measured_coverage"] = float(accepted.mean())
            measured["measured_risk"] = float(misclassified(test)[accepted].mean()) if accepted.any() else None
        levels.append(
            RiskLevel(
                max_risk=risk, confidence_threshold=found.threshold, n_accepted=found.n_accepted,
                errors=found.errors, **measured,
            )
        )
    certified = [level.max_risk for level in levels]
    default = evaluation.default_max_risk if evaluation.default_max_risk in certified else None
    if evaluation.default_max_risk is not None and default is None:
        logger.warning("default max risk %g was not certified: the bundle has no default risk level",
                       evaluation.default_max_risk)
    return SelectiveCalibration(
        delta=evaluation.risk_delta, n_calibration=len(confidence), risk_levels=levels,
        default_max_risk=default, unsupported=unsupported,
    )


def calibrate(config: TrainConfig) -> CalibrationRecord:
    """Compute, save and return the calibration of the run's deployed score."""
    run = run_logits(config)
    logits = run.sets
    fitted = fit_score(config, run, config.deployed_score)
    score = fitted.spec
    calibration_scores = np.sort(fitted(logits[ID_VAL]))
    test_scores = fitted(logits[ID_TEST]) if ID_TEST in logits else None
    ood_scores = {name: fitted(logits[name]) for name in run.ood_set_names()}
    points = []
    for target in config.evaluation.calibration_targets:
        point = OperatingPoint.calibrated(calibration_scores, target)
        measured = {
            "measured_id_acceptance": None if test_scores is None else acceptance(test_scores, point.threshold),
            "ood_acceptance": {name: acceptance(s, point.threshold) for name, s in ood_scores.items()},
        }
        points.append(point.model_copy(update=measured))
    calibration = Calibration(
        scores=calibration_scores.tolist(), operating_points=points, default_target=config.evaluation.default_target
    )
    score_fit = None
    if fitted.state:
        score_fit = {
            "train_images": len(logits[ID_TRAIN].labels),
            "knn_bank_size": config.evaluation.knn_bank_size,
            "seed": config.seed,
        }
    selective = calibrate_selective(config.evaluation, logits[ID_VAL], logits.get(ID_TEST))
    record = CalibrationRecord(
        score, run.precision, run.weights_sha256, calibration, fitted.state, score_fit, selective
    )
    state_path = config.output_dir / SCORE_STATE_FILE
    state_sha256 = ""
    if fitted.state:
        atomic_write(state_path, lambda tmp: save_file(fitted.state, str(tmp)))
        state_sha256 = sha256_file(state_path)
    else:  # a state left by an earlier calibration of another score must not look current
        state_path.unlink(missing_ok=True)
    text = json.dumps(
        {
            "score": score.model_dump(),
            "precision": record.precision,
            "weights_sha256": record.weights_sha256,
            "score_state_sha256": state_sha256,
            "score_fit": score_fit,
            "calibration": calibration.model_dump(),
            "selective": None if selective is None else selective.model_dump(),
        },
        indent=2,
    )
    atomic_write(config.output_dir / CALIBRATION_JSON, lambda tmp: tmp.write_text(text))
    return record


def calibration_markdown(record: CalibrationRecord) -> str:
    """The operating points as a table: acceptances as percentages, the threshold to 4 digits."""
    rows = []
    for point in record.calibration.operating_points:
        row = {
            "target": point.target_id_acceptance, "threshold": point.threshold,
            "k of n": f"{point.k} of {point.n_calibration}", "ID test accepted": point.measured_id_acceptance,
        }
        row.update({f"{name} accepted": share for name, share in point.ood_acceptance.items()})
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    percent = [column for column in columns if column == "target" or column.endswith("accepted")]
    text = f"score: {record.score.name}\n\n" + markdown_table(rows, columns, percent=percent)
    selective = record.selective
    if selective is None:
        return text
    levels = [
        {
            "max risk": level.max_risk, "confidence threshold": level.confidence_threshold,
            "errors of accepted": f"{level.errors} of {level.n_accepted}", "ID test coverage": level.measured_coverage,
            "ID test risk": level.measured_risk,
        }
        for level in selective.risk_levels
    ]
    text += f"\n\nrisk levels (max softmax probability, delta {selective.delta:g}):\n\n" + markdown_table(
        levels, ["max risk", "confidence threshold", "errors of accepted", "ID test coverage", "ID test risk"],
        percent=("max risk", "ID test coverage", "ID test risk"),
    )
    for skipped in selective.unsupported:
        text += f"\n\nskipped: {skipped.reason}"
    return text


def load_calibration(config: TrainConfig) -> CalibrationRecord:
    """The saved calibration; refused if the run's weights changed since (its thresholds would be stale)."""
    path = config.output_dir / CALIBRATION_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 'mixoe calibrate' first")
    raw = json.loads(path.read_text())
    state: dict[str, Tensor] = {}
    if raw.get("score_state_sha256"):
        state_path = config.output_dir / SCORE_STATE_FILE
        if not state_path.is_file() or sha256_file(state_path) != raw["score_state_sha256"]:
            raise ValueError(f"{state_path} is missing or not the one calibrated on: run 'mixoe calibrate' again")
        state = load_file(str(state_path))
    record = CalibrationRecord(
        score=ScoreSpec.model_validate(raw["score"]),
        precision=raw["precision"],
        weights_sha256=raw["weights_sha256"],
        calibration=Calibration.model_validate(raw["calibration"]),
        state=state,
        score_fit=raw.get("score_fit"),
        selective=None if raw.get("selective") is None else SelectiveCalibration.model_validate(raw["selective"]),
    )
    require_current_weights(config, record.weights_sha256, "calibration")
    return record


def require_current_weights(config: TrainConfig, weights_sha256: str, what: str) -> None:
    """Refuse results computed on other weights than the run's current best ones."""
    if weights_sha256 != sha256_file(config.output_dir / BEST_WEIGHTS):
        raise ValueError(
            f"the {what} in {config.output_dir} was computed on other weights than the current "
            f"{BEST_WEIGHTS}: run 'mixoe {'calibrate' if what == 'calibration' else 'evaluate'}' again"
        )
