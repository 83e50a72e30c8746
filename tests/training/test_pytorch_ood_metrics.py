"""``training.assess.metrics`` against pytorch-ood's metrics, on scores of the same seeded logits.

Both libraries take scores with higher = more OOD, but they label and count differently:

* **Labels.** pytorch-ood marks OOD samples with a negative target (here ``-1``) and ID samples
  with their class (``>= 0``); the project takes the ID and OOD scores as two arrays.
* **Positive class.** pytorch-ood makes OOD the positive class; the project makes ID positive.
  AUROC is the same number either way (P(OOD score > ID score), ties counting half), so it is
  compared directly.
* **FPR@95TPR** is a different quantity. pytorch-ood's ``FPR95TPR`` is the share of ID flagged as
  OOD at the threshold that flags 95% of OOD; the project's is the share of OOD accepted at the
  threshold that accepts 95% of ID. Swapping the classes and negating the scores turns one into the
  other, in both libraries: pytorch-ood with labels ``ID -> -1, OOD -> 0`` on ``-scores`` gives the
  project's number, and the project's ``fpr_at_tpr(-ood, -id)`` gives pytorch-ood's. Both pick the
  first threshold whose TPR reaches the target, without interpolation. TNR@95TPR is ``1 - FPR``.
* **AUPR.** Both libraries build the same precision-recall curve (one point per distinct score).
  pytorch-ood integrates it with the trapezoidal rule (``sklearn.metrics.auc``); the project takes
  the step-wise average precision ``sum_n (R_n - R_{n-1}) P_n`` (``average_precision_score``). So
  the project's AUPR-In / AUPR-Out equal the step-wise sum over pytorch-ood's curve, and
  pytorch-ood's equal the trapezoid over it.

The score sets include many ties (max logit of integer logits), where the two libraries would
part ways first if they counted ties differently. Each set separates ID from OOD well but not
perfectly, so a flipped sign or swapped classes changes every number compared here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from pytorch_ood.metrics import FPRAtTPR, OODMetrics
from pytorch_ood.metrics.functional import pr_curve

from models.scoring.scores import get_score
from tests.helpers.logits import synthetic_logits
from training.assess.metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics

ScoreSet = tuple[NDArray[np.float64], NDArray[np.float64], torch.Tensor]


def _score_set(score: str, n_id: int, seed: int, integer_logits: bool = False) -> ScoreSet:
    """ID scores, OOD scores and the ID class labels, from seeded logits."""
    data = synthetic_logits(n_id, 400, 10, seed=seed, margin=4.0)
    id_logits, ood_logits = data.id_logits, data.ood_logits
    if integer_logits:
        id_logits, ood_logits = id_logits.round(), ood_logits.round()
    scoring = get_score(score)
    return scoring(id_logits).double().numpy(), scoring(ood_logits).double().numpy(), data.labels


SCORE_SETS = {
    "energy": _score_set("energy", 600, seed=1),
    "msp-257-id": _score_set("msp", 257, seed=2),  # 95% of 257 ID is not a whole number
    "maxlogit-ties": _score_set("maxlogit", 500, seed=3, integer_logits=True),
}


def _pytorch_ood_inputs(
    id_scores: NDArray[np.float64], ood_scores: NDArray[np.float64], id_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-ood's layout: one score tensor, ID rows labelled by class, OOD rows by ``-1``."""
    scores = torch.from_numpy(np.concatenate([id_scores, ood_scores]))
    labels = torch.cat([id_labels, torch.full((ood_scores.size,), -1)])
    return scores, labels


def _with_classes_swapped(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ID becomes pytorch-ood's positive (OOD-labelled) class and ranks by ``-score``."""
    return -scores, torch.where(labels < 0, 0, -1)


@pytest.fixture(params=list(SCORE_SETS), ids=list(SCORE_SETS))
def score_set(request: pytest.FixtureRequest) -> ScoreSet:
    id_scores, ood_scores, labels = SCORE_SETS[request.param]
    assert 0.6 < auroc(id_scores, ood_scores) < 0.99  # informative: neither random nor perfect
    return id_scores, ood_scores, labels


def test_auroc_is_the_same_number(score_set: ScoreSet) -> None:
    id_scores, ood_scores, labels = score_set
    theirs = OODMetrics().update(*_pytorch_ood_inputs(id_scores, ood_scores, labels)).compute()
    assert auroc(id_scores, ood_scores) == pytest.approx(theirs["AUROC"], abs=1e-12)


def _step_and_trapezoid(precision: torch.Tensor, recall: torch.Tensor) -> tuple[float, float]:
    """Areas under a PR curve given with decreasing recall: step-wise AP and trapezoidal rule."""
    p, r = precision.numpy(), recall.numpy()
    return float(-np.sum(np.diff(r) * p[:-1])), float(-np.trapezoid(p, r))


def test_aupr_in_and_out_are_step_and_trapezoid_areas_of_one_curve(score_set: ScoreSet) -> None:
    id_scores, ood_scores, labels = score_set
    scores, targets = _pytorch_ood_inputs(id_scores, ood_scores, labels)
    theirs = OODMetrics().update(scores, targets).compute()
    ours = {"id": aupr_in(id_scores, ood_scores), "ood": aupr_out(id_scores, ood_scores)}
    for positive, key in [("id", "AUPR-IN"), ("ood", "AUPR-OUT")]:
        precision, recall, _ = pr_curve(scores, targets, positive=positive)
        step, trapezoid = _step_and_trapezoid(precision, recall)
        assert ours[positive] == pytest.approx(step, abs=1e-12), positive
        assert theirs[key] == pytest.approx(trapezoid, abs=1e-12), positive


@pytest.mark.parametrize("tpr", [0.8, 0.9, 0.95, 0.99])
def test_fpr_at_tpr_maps_by_swapping_classes_and_negating_scores(score_set: ScoreSet, tpr: float) -> None:
    id_scores, ood_scores, labels = score_set
    scores, targets = _pytorch_ood_inputs(id_scores, ood_scores, labels)
    metric = FPRAtTPR(tpr)
    (key,) = metric.keys
    id_positive = FPRAtTPR(tpr).update(*_with_classes_swapped(scores, targets)).compute()[key]
    ood_positive = metric.update(scores, targets).compute()[key]
    # The two conventions measure different things on these sets, so matching the wrong one fails.
    assert abs(id_positive - ood_positive) > 0.01
    assert fpr_at_tpr(id_scores, ood_scores, tpr) == pytest.approx(id_positive, abs=1e-12)
    assert fpr_at_tpr(-ood_scores, -id_scores, tpr) == pytest.approx(ood_positive, abs=1e-12)


def test_headline_tnr_and_fpr_match_pytorch_ood_with_id_positive(score_set: ScoreSet) -> None:
    id_scores, ood_scores, labels = score_set
    scores, targets = _pytorch_ood_inputs(id_scores, ood_scores, labels)
    swapped = OODMetrics(fpr_at=0.95).update(*_with_classes_swapped(scores, targets)).compute()
    ours = ood_metrics(id_scores, ood_scores)
    assert ours.fpr_at_95tpr == pytest.approx(swapped["FPR95TPR"], abs=1e-12)
    assert ours.tnr_at_95tpr == pytest.approx(1.0 - swapped["FPR95TPR"], abs=1e-12)
