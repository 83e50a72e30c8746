"""``mixoe calibrate``: accept/reject thresholds from held-out ID data (split conformal).

For each target ID acceptance 1 - alpha, the threshold is the k-th smallest of the n ID
validation scores, k = ceil((1 - alpha)(n + 1)) (:mod:`models.conformal`). Each operating point
also reports what it achieves on data it was not chosen on: the measured ID acceptance on the ID
test split and the OOD acceptance (leak) on each OOD set.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from models.bundle import Calibration, OperatingPoint
from models.conformal import conformal_threshold
from training.config import TrainConfig
from training.evaluate import ood_set_names, scores_of
from training.scoring import ID_TEST, ID_VAL, run_logits

CALIBRATION_JSON = "calibration.json"


def calibrate(config: TrainConfig) -> Calibration:
    """Compute, save and return the calibration of the run's deployed score."""
    logits = run_logits(config)
    score_name = config.deployed_score
    calibration_scores = np.sort(scores_of(logits[ID_VAL], score_name))
    test_scores = scores_of(logits[ID_TEST], score_name) if ID_TEST in logits else None
    ood_scores = {name: scores_of(logits[name], score_name) for name in ood_set_names(logits)}
    points = []
    for target in config.evaluation.calibration_targets:
        found = conformal_threshold(calibration_scores, target)
        points.append(
            OperatingPoint(
                target_id_acceptance=target,
                threshold=found.threshold,
                k=found.k,
                n_calibration=found.n_calibration,
                measured_id_acceptance=None if test_scores is None else float(np.mean(test_scores <= found.threshold)),
                ood_acceptance={name: float(np.mean(s <= found.threshold)) for name, s in ood_scores.items()},
            )
        )
    calibration = Calibration(
        scores=calibration_scores.tolist(), operating_points=points, default_target=config.evaluation.default_target
    )
    record: dict[str, Any] = {"score": score_name, **calibration.model_dump()}
    (config.output_dir / CALIBRATION_JSON).write_text(json.dumps(record, indent=2))
    return calibration


def load_calibration(config: TrainConfig) -> tuple[str, Calibration]:
    path = config.output_dir / CALIBRATION_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 'mixoe calibrate' first")
    record = json.loads(path.read_text())
    return record.pop("score"), Calibration.model_validate(record)
