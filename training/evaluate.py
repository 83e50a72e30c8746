"""``mixoe evaluate``: ID accuracy and OOD-detection metrics for every score function.

Conventions (see DESIGN.md): OOD scores are higher for more OOD-looking inputs; for the metrics ID
is the positive class, so TNR@95TPR is the share of OOD rejected when 95% of ID test images are
accepted, and FPR@95TPR = 1 - TNR@95TPR is the share of OOD that leaks through.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from models.scores import SCORES
from training.config import TrainConfig
from training.metrics import accuracy, ood_metrics, paper_protocol_metrics
from training.report import markdown_table
from training.scoring import ID_TEST, ID_VAL, SetLogits, run_logits

EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"


def ood_set_names(logits: dict[str, SetLogits]) -> list[str]:
    return [name for name in logits if name not in (ID_VAL, ID_TEST)]


def scores_of(set_logits: SetLogits, score_name: str) -> Any:
    """OOD scores (numpy, float64) of one set under one score function at its default temperature."""
    return SCORES[score_name](torch.from_numpy(set_logits.logits)).double().numpy()


def evaluate(config: TrainConfig) -> dict[str, Any]:
    """Compute, save (JSON + Markdown) and return the run's evaluation."""
    logits = run_logits(config)
    if ID_TEST not in logits:
        raise ValueError("evaluation needs an ID test split: set data.test")
    test = logits[ID_TEST]
    result: dict[str, Any] = {
        "id_accuracy": accuracy(test.logits, test.labels),
        "num_images": {name: len(s.labels) for name, s in logits.items()},
        "conventions": "OOD score higher = more OOD; ID is the positive class; TPR = ID accepted",
        "scores": {},
    }
    for score_name in SCORES:
        id_scores = scores_of(test, score_name)
        per_set = {}
        for name in ood_set_names(logits):
            ood_scores = scores_of(logits[name], score_name)
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
    (run_dir / EVALUATION_JSON).write_text(json.dumps(result, indent=2))
    (run_dir / EVALUATION_MD).write_text(evaluation_markdown(result))
    return result


def evaluation_markdown(result: dict[str, Any]) -> str:
    rows = [
        {"score": score, "ood_set": name, **{k: v for k, v in metrics.items() if k != "paper_protocol"}}
        for score, per_set in result["scores"].items()
        for name, metrics in per_set.items()
    ]
    columns = ["score", "ood_set", "tnr_at_95tpr", "fpr_at_95tpr", "auroc", "aupr_in", "aupr_out"]
    return (
        f"ID top-1 accuracy: {result['id_accuracy']:.4f}\n\n"
        "OOD score higher = more OOD; ID is the positive class (TPR = share of ID accepted).\n\n"
        + markdown_table(rows, columns, percent=("tnr_at_95tpr", "fpr_at_95tpr"))
        + "\n"
    )
