"""Online conformal p-values: the same numbers as ranking against a growing sorted bag, and, unlike
p-values against one fixed calibration set, a martingale on them keeps Ville's bound."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from models.calibration.conformal import smoothed_p_values
from models.calibration.drift import PowerJumper, alarm_log10_level
from models.calibration.online_conformal import OnlineConformal, score_bins


def test_bins_follow_the_order_of_scores() -> None:
    scores = np.array([-np.inf, -1e6, -2.5, -1e-3, -1e-9, -0.0, 0.0, 1e-3, 2.5, 1e6, np.inf])
    bins = score_bins(scores)
    assert np.all(np.diff(bins) >= 0)
    assert bins[4] == bins[5] == bins[6]  # -1e-9 rounds to -0 in float16, which is 0
    assert bins[2] < bins[3] < bins[6] < bins[7] < bins[8]


def test_p_values_equal_ranks_against_the_growing_bag() -> None:
    """Batches of 1 to 5 scores (with ties and signed zeros) for 3 streams, checked one by one
    against smoothed_p_values on a sorted list that every score joins after its turn."""
    rng = np.random.default_rng(0)
    calibration = np.round(rng.normal(size=(3, 40)), 1)
    online = OnlineConformal(calibration, runs=3)
    bags = [list(np.float16(row).astype(np.float64)) for row in calibration]
    for _ in range(60):
        batch = int(rng.integers(1, 6))
        scores, uniforms = np.round(rng.normal(size=(3, batch)), 0), 1.0 - rng.random((3, batch))
        got = online.p_values(scores, uniforms)
        for run in range(3):
            for j in range(batch):
                score = float(np.float16(scores[run, j]))
                want = smoothed_p_values(score, np.sort(bags[run]), uniforms[run, j])
                assert abs(got[run, j] - want) < 1e-12
                bags[run].append(score)


def _false_alarms(online: bool, runs: int = 150, steps: int = 600, n: int = 10, delta: float = 0.05) -> int:
    rng = np.random.default_rng(1)
    calibration = np.sort(rng.standard_normal((runs, n)), axis=1)
    bag = OnlineConformal(calibration, runs)
    martingale, peak = PowerJumper(runs, jump_rate=0.01), np.full(runs, -np.inf)
    for _ in range(steps):
        scores, uniforms = rng.standard_normal(runs), 1.0 - rng.random(runs)
        if online:
            p = bag.p_values(scores, uniforms)
        else:
            p = np.array([smoothed_p_values(s, c, u) for s, c, u in zip(scores, calibration, uniforms, strict=True)])
        peak = np.maximum(peak, martingale.update(p))
    return int(np.sum(peak >= alarm_log10_level(delta)))


def test_online_p_values_keep_villes_bound_where_a_fixed_calibration_set_breaks_it() -> None:
    """150 streams of 600 in-distribution scores, n = 10 calibration scores each: with online
    p-values no more streams alarm at delta = 0.05 than the 1e-6 upper quantile of Binomial(150, 0.05)
    allows; with p-values against the fixed set, more do (so the check can fail)."""
    bound = binom.ppf(1 - 1e-6, 150, 0.05)
    assert _false_alarms(online=True) <= bound
    assert _false_alarms(online=False) > bound


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e9 is float16's infinity
def test_the_first_and_last_bins_are_ranked_and_counted() -> None:
    """Scores at both ends of the order (infinities, beyond float16's range, its largest finite
    values), repeated within batches, against the sorted-bag oracle: the lowest and highest bins a
    score reaches, whose Fenwick paths run through the most levels."""
    rng = np.random.default_rng(2)
    ends = np.array([-np.inf, np.inf, -1e9, 1e9, 65504.0, -65504.0, 0.0])
    calibration = rng.choice(ends, 30)
    online = OnlineConformal(calibration)
    bag = list(np.float16(calibration).astype(np.float64))
    for _ in range(20):
        scores, uniforms = rng.choice(ends, 4), 1.0 - rng.random(4)
        got = online.p_values(scores, uniforms)
        for score, u, p in zip(np.float16(scores).astype(np.float64), uniforms, got, strict=True):
            assert abs(p - smoothed_p_values(score, np.sort(bag), u)) < 1e-12
            bag.append(score)
