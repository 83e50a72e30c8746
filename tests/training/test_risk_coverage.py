"""Risk-coverage curves and AURC (training.assess.metrics.risk_coverage) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from training.assess.evaluate import CURVE_POINTS, _curve_summary
from training.assess.metrics import risk_coverage


def test_without_ties_aurc_is_the_mean_risk_of_the_top_i_images() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=300)
    errors = rng.random(300) < 0.2
    ranked = errors[np.argsort(scores)]
    top_i_risk = np.cumsum(ranked) / np.arange(1, 301)
    curve = risk_coverage(scores, errors)
    np.testing.assert_allclose(curve.coverage, np.arange(1, 301) / 300)
    np.testing.assert_allclose(curve.risk, top_i_risk)
    assert curve.aurc == pytest.approx(float(np.mean(top_i_risk)))


def test_tied_scores_join_together_at_their_groups_rate() -> None:
    # scores 0, 1, 1, 2 with errors F, T, F, T: groups {0}, {1, 1}, {2}
    curve = risk_coverage([1.0, 0.0, 2.0, 1.0], [True, False, True, False])
    np.testing.assert_allclose(curve.coverage, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(curve.risk, [0.0, 1 / 3, 0.5])
    assert curve.aurc == pytest.approx((0.0 * 1 + (1 / 3) * 2 + 0.5 * 1) / 4)


def test_a_score_that_ranks_every_error_last_beats_one_that_ranks_them_first() -> None:
    errors = np.arange(100) >= 90  # ten errors
    good = risk_coverage(np.arange(100.0), errors).aurc  # errors have the highest scores: accepted last
    bad = risk_coverage(-np.arange(100.0), errors).aurc
    i = np.arange(1, 101)
    assert good == pytest.approx(np.sum(np.clip(i - 90, 0, None) / i) / 100)  # 0.0053: the floor at 90% accuracy
    assert bad == pytest.approx(np.sum(np.minimum(i, 10) / i) / 100)  # 0.326
    assert good < 0.01 < 0.3 < bad


def test_the_stored_curve_is_thinned_but_keeps_full_coverage() -> None:
    rng = np.random.default_rng(1)
    summary = _curve_summary(risk_coverage(rng.normal(size=1_000), rng.random(1_000) < 0.1))
    assert len(summary["coverage"]) == len(summary["risk"]) == CURVE_POINTS
    assert summary["coverage"][-1] == 1.0 and summary["coverage"] == sorted(summary["coverage"])
