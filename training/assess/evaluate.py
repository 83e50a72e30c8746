"""``mixoe evaluate``: ID accuracy and OOD-detection metrics for every registered score (logit
and feature-space scores, :data:`models.scoring.scores.SCORES`).

Conventions (see DESIGN.md): OOD scores are higher for more OOD-looking inputs; for the metrics ID
is the positive class, so TNR@95TPR is the share of OOD rejected when 95% of ID test images are
accepted, and FPR@95TPR = 1 - TNR@95TPR is the share of OOD that leaks through.

Each score also ranks the labelled ID test images for selective classification: ``risk_coverage``
holds its AURC and its risk-coverage curve (at most :data:`CURVE_POINTS` points, for the report's
plot), computed by :func:`training.assess.metrics.risk_coverage`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from models.scoring.scores import SCORES
from training.assess.metrics import RiskCoverage, accuracy, ood_metrics, paper_protocol_metrics, risk_coverage
from training.assess.report import markdown_table
from training.assess.scoring import ID_TEST, fit_score, misclassified, run_logits
from training.config import TrainConfig
from training.fit.checkpoint import atomic_write

EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
CURVE_POINTS = 100


def _curve_summary(curve: RiskCoverage) -> dict[str, Any]:
    """AURC, and the curve thinned to at most :data:`CURVE_POINTS` points (the last, full coverage, kept)."""
    points = min(CURVE_POINTS, curve.coverage.size)
    keep = np.unique(np.linspace(0, curve.coverage.size - 1, points).round().astype(int))
    return {
        "aurc": curve.aurc,
        "coverage": [round(float(c), 6) for c in curve.coverage[keep]],
        "risk": [round(float(r), 6) for r in curve.risk[keep]],
    }


def evaluate(config: TrainConfig) -> dict[str, Any]:
    """Compute, save (JSON + Markdown) and return the run's evaluation."""
    run = run_logits(config)
    logits = run.sets
    if ID_TEST not in logits:
        raise ValueError("evaluation needs an ID test split: set data.test")
    test = logits[ID_TEST]
    result: dict[str, Any] = {
        "weights_sha256": run.weights_sha256,
        "precision": run.precision,
        "id_accuracy": accuracy(test.logits, test.labels),
        "num_images": {name: len(s.labels) for name, s in logits.items()},
        "conventions": "OOD score higher = more OOD; ID is the positive class; TPR = ID accepted",
        "scores": {},
        "risk_coverage": {},
    }
    errors = misclassified(test)
    for score_name in SCORES:
        score = fit_score(config, run, score_name)
        id_scores = score(test)
        result["risk_coverage"][score_name] = _curve_summary(risk_coverage(id_scores, errors))
        per_set = {}
        for name in run.ood_set_names():
            ood_scores = score(logits[name])
            per_set[name] = dataclasses.asdict(ood_metrics(id_scores, ood_scores))
            if config.evaluation.paper_protocol:
                protocol = paper_protocol_metrics(id_scores, ood_scores)
                per_set[name]["paper_protocol"] = {
                    "mean": dataclasses.asdict(protocol.mean),
                    "std": dataclasses.asdict(protocol.std),
                    "draws": protocol.draws,
                    "sample_size": protocol.sample_size,
                }
        result["scores"][score_name] = per_set
    run_dir = config.output_dir
    atomic_write(run_dir / EVALUATION_JSON, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(run_dir / EVALUATION_MD, lambda tmp: tmp.write_text(evaluation_markdown(result)))
    return result


def evaluation_markdown(result: dict[str, Any]) -> str:
    rows = [
        {"score": score, "ood_set": name, **{k: v for k, v in metrics.items() if k != "paper_protocol"}}
        for score, per_set in result["scores"].items()
        for name, metrics in per_set.items()
    ]
    columns = ["score", "ood_set", "tnr_at_95tpr", "fpr_at_95tpr", "auroc", "aupr_in", "aupr_out"]
    aurc = [{"score": score, "aurc": curve["aurc"]} for score, curve in result.get("risk_coverage", {}).items()]
    return (
        f"ID top-1 accuracy: {result['id_accuracy']:.4f}\n\n"
        "OOD score higher = more OOD; ID is the positive class (TPR = share of ID accepted).\n\n"
        + markdown_table(rows, columns, percent=("tnr_at_95tpr", "fpr_at_95tpr"))
        + "\n\nSelective classification on the ID test images (AURC: lower is better):\n\n"
        + markdown_table(aurc, ["score", "aurc"])
        + "\n"
    )
