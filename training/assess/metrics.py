"""OOD-detection and classification metrics, in numpy only.

Conventions, fixed here and relied on everywhere:

* an **OOD score is higher for more out-of-distribution inputs**;
* an input is **accepted as ID when ``score <= threshold``** (rejected when it exceeds it);
* for the metrics, **ID is the positive class** (the MixOE paper's convention): TPR is the share
  of ID inputs accepted, FPR the share of OOD inputs accepted, TNR = 1 - FPR the share of OOD
  inputs rejected.

TNR@95TPR (the paper's headline) is the share of OOD rejected at the smallest threshold that
accepts at least 95% of ID; FPR@95TPR = 1 - TNR@95TPR is the OOD that leaks through there.
AUROC is the area under the (FPR, TPR) curve with ties credited one half, and AUPR-In / AUPR-Out
are step-wise average precision with ID (ranked by ``-score``) / OOD (ranked by ``score``) as the
positive class; all three are defined exactly as scikit-learn's ``roc_auc_score`` and
``average_precision_score`` define them, so numbers compare with published tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike, NDArray

HEADLINE_TPR = 0.95


@dataclass(frozen=True)
class OODMetrics:
    """Detection metrics for one (ID, OOD) pair; ID positive, higher score = more OOD."""

    tnr_at_95tpr: float
    fpr_at_95tpr: float
    auroc: float
    aupr_in: float
    aupr_out: float


@dataclass(frozen=True)
class ProtocolMetrics:
    """Mean and standard deviation (``ddof=0``) of :class:`OODMetrics` over balanced draws."""

    mean: OODMetrics
    std: OODMetrics
    draws: int
    sample_size: int


def _scores(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """Flatten to float64, refusing empty or non-finite input (NaN would corrupt every ranking)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite (found NaN or infinity)")
    return array


def _ranked_counts(
    positives: NDArray[np.float64], negatives: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Counts of positives and negatives with value >= v, for each distinct v in descending order.

    Here a higher value means "more positive". Grouping tied values into one threshold is what
    makes ties count the way scikit-learn counts them (a diagonal ROC segment, one PR step).
    """
    values = np.concatenate([positives, negatives])
    is_positive = np.concatenate([np.ones(positives.size, np.int64), np.zeros(negatives.size, np.int64)])
    order = np.argsort(values, kind="stable")[::-1]
    values, is_positive = values[order], is_positive[order]
    group_ends = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]
    true_positives = np.cumsum(is_positive)[group_ends]
    false_positives = group_ends + 1 - true_positives
    return true_positives, false_positives, values[group_ends]


def _average_precision(positives: NDArray[np.float64], negatives: NDArray[np.float64]) -> float:
    """Step-wise AP ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (higher = more positive)."""
    true_positives, false_positives, _ = _ranked_counts(positives, negatives)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positives.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def roc_curve_id_positive(
    id_scores: ArrayLike, ood_scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Exact ROC curve with ID positive: ``(fpr, tpr, thresholds)``, thresholds ascending.

    Point i accepts as ID every input with ``score <= thresholds[i]``: ``tpr`` is the ID share
    accepted, ``fpr`` the OOD share accepted. There is one point per distinct score (so ties move
    the curve diagonally), preceded by ``(0, 0)`` at threshold ``-inf``, which accepts nothing.
    """
    id_array, ood_array = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    accepted_id, accepted_ood, negated = _ranked_counts(-id_array, -ood_array)
    fpr = np.r_[0.0, accepted_ood / ood_array.size]
    tpr = np.r_[0.0, accepted_id / id_array.size]
    return fpr, tpr, np.r_[-np.inf, -negated]


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ID-positive ROC curve: P(ID score < OOD score) + P(tie) / 2."""
    fpr, tpr, _ = roc_curve_id_positive(id_scores, ood_scores)
    return float(np.trapezoid(tpr, fpr))


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as the positive class, ranked by ``-score`` (lower = more ID)."""
    return _average_precision(-_scores(id_scores, "id_scores"), -_scores(ood_scores, "ood_scores"))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with OOD as the positive class, ranked by ``score`` (higher = more OOD)."""
    return _average_precision(_scores(ood_scores, "ood_scores"), _scores(id_scores, "id_scores"))


def tpr_threshold(id_scores: ArrayLike, tpr: float = HEADLINE_TPR) -> float:
    """Smallest threshold t with ``mean(id_scores <= t) >= tpr`` (accepted as ID when score <= t).

    That is the k-th smallest ID score with ``k = ceil(tpr * n)``: a measured, in-sample operating
    point for reporting, unlike the conformal threshold, which guarantees acceptance on new data.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    ordered = np.sort(_scores(id_scores, "id_scores"))
    # 0.55 * 100 = 55.00000000000001 would round up to 56; rounding first keeps exact products exact.
    k = max(1, math.ceil(round(tpr * ordered.size, 9)))
    return float(ordered[k - 1])


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = HEADLINE_TPR) -> float:
    """Share of OOD accepted (``score <= t``) at the threshold t accepting ``tpr`` of ID (ID positive)."""
    threshold = tpr_threshold(id_scores, tpr)
    return float(np.mean(_scores(ood_scores, "ood_scores") <= threshold))


def tnr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = HEADLINE_TPR) -> float:
    """Share of OOD rejected (``score > t``) when ``tpr`` of ID is accepted: ``1 - fpr_at_tpr``."""
    return 1.0 - fpr_at_tpr(id_scores, ood_scores, tpr)


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike) -> OODMetrics:
    """All detection metrics on the full sets; ID positive, higher score = more OOD."""
    fpr = fpr_at_tpr(id_scores, ood_scores)
    return OODMetrics(
        tnr_at_95tpr=1.0 - fpr,
        fpr_at_95tpr=fpr,
        auroc=auroc(id_scores, ood_scores),
        aupr_in=aupr_in(id_scores, ood_scores),
        aupr_out=aupr_out(id_scores, ood_scores),
    )


def _closest_to_headline_tpr(id_scores: NDArray[np.float64], ood_scores: NDArray[np.float64]) -> float:
    """FPR at the ROC point whose TPR is closest to 95% (the lowest threshold among equals)."""
    fpr, tpr, _ = roc_curve_id_positive(id_scores, ood_scores)
    return float(fpr[np.argmin(np.abs(tpr - HEADLINE_TPR))])


def paper_protocol_metrics(
    id_scores: ArrayLike, ood_scores: ArrayLike, draws: int = 10, seed: int = 0
) -> ProtocolMetrics:
    """The MixOE paper's evaluation: metrics averaged over ``draws`` balanced subsamples.

    Each draw takes ``min(n_id, n_ood)`` scores from each set without replacement (seeded numpy
    Generator, so results reproduce), picks the ROC point whose TPR is closest to 95% for
    TNR/FPR (rather than the smallest threshold reaching 95%, as :func:`ood_metrics` does), and
    computes AUROC / AUPR-In / AUPR-Out on the balanced pair. ID positive, higher = more OOD.
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    id_array, ood_array = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    size = min(id_array.size, ood_array.size)
    rng = np.random.default_rng(seed)
    per_draw = []
    for _ in range(draws):
        id_sample = rng.choice(id_array, size, replace=False)
        ood_sample = rng.choice(ood_array, size, replace=False)
        fpr = _closest_to_headline_tpr(id_sample, ood_sample)
        per_draw.append(
            [
                1.0 - fpr,
                fpr,
                auroc(id_sample, ood_sample),
                aupr_in(id_sample, ood_sample),
                aupr_out(id_sample, ood_sample),
            ]
        )
    table = np.asarray(per_draw)
    names = [field.name for field in fields(OODMetrics)]
    mean = OODMetrics(**dict(zip(names, map(float, table.mean(axis=0)))))
    std = OODMetrics(**dict(zip(names, map(float, table.std(axis=0)))))
    return ProtocolMetrics(mean=mean, std=std, draws=draws, sample_size=size)


def accuracy(logits_or_predictions: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy from ``(N, K)`` logits/probabilities (arg-max taken) or ``(N,)`` class ids."""
    values = np.asarray(logits_or_predictions)
    if values.ndim == 2:
        predictions = values.argmax(axis=1)
    elif values.ndim == 1:
        predictions = values
    else:
        raise ValueError(f"expected (N, K) logits or (N,) predictions, got shape {values.shape}")
    targets = np.asarray(labels).ravel()
    if predictions.shape[0] != targets.size or targets.size == 0:
        raise ValueError(f"need as many labels as predictions (and at least one): {predictions.shape[0]} vs {targets.size}")
    return float(np.mean(predictions == targets))


@dataclass(frozen=True)
class RiskCoverage:
    """Selective-classification curve of one score on labelled ID images: accepting those with
    ``score <= t`` for each distinct score ``t`` (lowest first), the share accepted (``coverage``,
    ascending) and the error rate among them (``risk``); ``aurc`` is the area under it."""

    coverage: NDArray[np.float64]
    risk: NDArray[np.float64]
    aurc: float


def risk_coverage(scores: ArrayLike, errors: ArrayLike) -> RiskCoverage:
    """The risk-coverage curve and its area, AURC (Geifman, Uziel, El-Yaniv, "Bias-Reduced
    Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019): the mean, over the images in
    order of acceptance, of the error rate of the accepted set once that image joins it; tied
    scores join together, each at their group's rate. Lower is better; its floor is set by the
    accuracy, so compare scores on the same model. ``scores`` follow the OOD convention (higher =
    less trusted), ``errors`` are the misclassified flags."""
    score = _scores(scores, "scores")
    wrong = np.asarray(errors, dtype=bool).ravel()
    if wrong.size != score.size:
        raise ValueError(f"need one error flag per score: {wrong.size} vs {score.size}")
    order = np.argsort(score, kind="stable")
    ranked = score[order]
    group_ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # last index of each tie group
    accepted = group_ends + 1
    risk = np.cumsum(wrong[order])[group_ends] / accepted
    group_sizes = np.diff(np.concatenate([[0], accepted]))
    return RiskCoverage(accepted / score.size, risk, float(np.sum(risk * group_sizes) / score.size))
