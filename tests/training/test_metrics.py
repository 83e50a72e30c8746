"""Metrics against scikit-learn and brute force. ID positive; higher score = more OOD; accepted when score <= t."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from training.assess.metrics import (
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    ood_metrics,
    paper_protocol_metrics,
    roc_curve_id_positive,
    tnr_at_tpr,
    tpr_threshold,
)


def _random_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, 257), rng.normal(1.0, 1.5, 131)


def _tied_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 5, 300).astype(float), rng.integers(1, 5, 170).astype(float)


def _labelled(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ID = 1 and the concatenated OOD scores, in scikit-learn's layout."""
    labels = np.r_[np.ones(id_scores.size), np.zeros(ood_scores.size)]
    return labels, np.r_[id_scores, ood_scores]


def _brute_force_fpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float) -> float:
    """Smallest candidate threshold accepting >= tpr of ID, then the share of OOD it accepts."""
    for threshold in np.sort(np.unique(np.r_[id_scores, ood_scores])):
        if np.mean(id_scores <= threshold) >= tpr:
            return float(np.mean(ood_scores <= threshold))
    raise AssertionError("no threshold accepts enough ID")


SCORE_SETS = [_random_scores(0), _random_scores(1), _tied_scores(2), _tied_scores(3)]


@pytest.mark.parametrize(("id_scores", "ood_scores"), SCORE_SETS)
def test_areas_match_scikit_learn(id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    labels, scores = _labelled(id_scores, ood_scores)
    assert auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(labels, -scores), abs=1e-10)
    assert aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(labels, -scores), abs=1e-10)
    assert aupr_out(id_scores, ood_scores) == pytest.approx(average_precision_score(1 - labels, scores), abs=1e-10)


@pytest.mark.parametrize(("id_scores", "ood_scores"), SCORE_SETS)
def test_roc_curve_matches_scikit_learn_point_for_point(id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    labels, scores = _labelled(id_scores, ood_scores)
    ref_fpr, ref_tpr, ref_thresholds = roc_curve(labels, -scores, drop_intermediate=False)
    fpr, tpr, thresholds = roc_curve_id_positive(id_scores, ood_scores)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds[1:], -ref_thresholds[1:])
    assert thresholds[0] == -np.inf and np.all(np.diff(thresholds) > 0)


def test_ties_are_credited_one_half() -> None:
    assert auroc([1.0, 2.0], [2.0, 3.0]) == pytest.approx((1.0 + 1.0 + 0.5 + 1.0) / 4)


@pytest.mark.parametrize(("id_scores", "ood_scores"), SCORE_SETS)
@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.5, 1.0])
def test_fpr_and_tnr_at_tpr_match_brute_force(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float) -> None:
    expected = _brute_force_fpr(id_scores, ood_scores, tpr)
    assert fpr_at_tpr(id_scores, ood_scores, tpr) == expected
    assert tnr_at_tpr(id_scores, ood_scores, tpr) == pytest.approx(1.0 - expected, abs=1e-15)


def test_tpr_threshold_is_the_smallest_accepting_enough_id() -> None:
    id_scores = np.arange(100.0)  # 95 of them are <= 94
    assert tpr_threshold(id_scores, 0.95) == 94.0
    assert tpr_threshold(id_scores[:20], 0.95) == 18.0  # 0.95 * 20 = 19: the 19th smallest
    assert tpr_threshold(np.arange(100.0), 0.55) == 54.0  # 0.55 * 100 is 55.00000000000001 in floats


def test_ood_metrics_bundle_the_individual_metrics() -> None:
    id_scores, ood_scores = _tied_scores(4)
    metrics = ood_metrics(id_scores, ood_scores)
    assert metrics.fpr_at_95tpr == fpr_at_tpr(id_scores, ood_scores)
    assert metrics.tnr_at_95tpr == pytest.approx(1.0 - metrics.fpr_at_95tpr)
    assert (metrics.auroc, metrics.aupr_in, metrics.aupr_out) == (
        auroc(id_scores, ood_scores),
        aupr_in(id_scores, ood_scores),
        aupr_out(id_scores, ood_scores),
    )


def test_perfect_separation() -> None:
    rng = np.random.default_rng(5)
    metrics = ood_metrics(rng.uniform(0, 1, 50), rng.uniform(2, 3, 70))
    assert metrics.auroc == 1.0 and metrics.tnr_at_95tpr == 1.0 and metrics.fpr_at_95tpr == 0.0
    assert metrics.aupr_in == 1.0 and metrics.aupr_out == 1.0


def test_reversed_scores_give_auroc_zero() -> None:
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert tnr_at_tpr([2.0, 3.0], [0.0, 1.0]) == 0.0


def test_non_finite_or_empty_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        auroc([0.0, np.nan], [1.0])
    with pytest.raises(ValueError, match="empty"):
        ood_metrics([], [1.0])


def test_paper_protocol_reproduces_with_seed_and_varies_across_seeds() -> None:
    id_scores, ood_scores = _random_scores(6)  # 257 ID vs 131 OOD: draws subsample the ID set
    first = paper_protocol_metrics(id_scores, ood_scores, draws=10, seed=3)
    again = paper_protocol_metrics(id_scores, ood_scores, draws=10, seed=3)
    other = paper_protocol_metrics(id_scores, ood_scores, draws=10, seed=4)
    assert first == again
    assert first.mean != other.mean
    assert first.draws == 10 and first.sample_size == 131
    assert first.std.auroc > 0.0
    assert abs(first.mean.auroc - auroc(id_scores, ood_scores)) < 3 * first.std.auroc + 0.02


def test_paper_protocol_on_equal_sizes_equals_full_set_metrics() -> None:
    rng = np.random.default_rng(7)
    id_scores, ood_scores = rng.normal(0, 1, 200), rng.normal(1, 1, 200)  # 95% of 200 is reachable
    result = paper_protocol_metrics(id_scores, ood_scores, draws=10, seed=0)
    full = ood_metrics(id_scores, ood_scores)
    assert result.std.auroc == pytest.approx(0.0, abs=1e-15) and result.std.tnr_at_95tpr == 0.0
    assert result.mean.auroc == pytest.approx(full.auroc, abs=1e-12)
    assert result.mean.aupr_out == pytest.approx(full.aupr_out, abs=1e-12)
    assert result.mean.tnr_at_95tpr == pytest.approx(full.tnr_at_95tpr, abs=1e-12)


def test_paper_protocol_picks_the_tpr_closest_to_95_percent() -> None:
    # ID accepted: 0.25, 0.5, 0.75, 1.0 -> closest to 0.95 is 1.0 at t = 3, where 2 of 4 OOD pass.
    result = paper_protocol_metrics([0.0, 1.0, 2.0, 3.0], [2.5, 3.0, 9.0, 9.5], draws=2, seed=0)
    assert result.mean.fpr_at_95tpr == pytest.approx(0.5)
    assert result.mean.tnr_at_95tpr == pytest.approx(0.5)


def test_accuracy_from_logits_and_from_predictions() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([0, 1, 2, 2]), labels) == 0.5
    with pytest.raises(ValueError, match="as many labels"):
        accuracy(logits, labels[:3])
