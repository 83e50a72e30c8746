"""The split-conformal guarantee, checked by simulation.

Scores are OOD scores (higher = more OOD); a fresh input is accepted as ID when score <= threshold.
With n exchangeable calibration scores and k = ceil(target * (n + 1)), a fresh ID score is accepted
with probability k / (n + 1) exactly for continuous scores: 96 / 101 = 0.95050 for n = 100 and a
0.95 target, only 0.0005 above the target. The simulation error of the mean acceptance over R
repetitions is about 0.0215 / sqrt(R) (the spread of a Beta(96, 5) coverage), so 2,000 repetitions
(error 0.0005) cannot tell "at least 0.95" from chance; 40,000 (error 0.00012) put the target four
standard errors below the expected value, which makes the assertion meaningful for any seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from models.calibration.conformal import UnsupportedTargetError, conformal_p_values, conformal_threshold

N_CALIBRATION = 100
TARGET = 0.95


def _mean_acceptance(repetitions: int, fresh_per_repetition: int, seed: int) -> tuple[float, int]:
    """Mean share of fresh ID scores accepted by thresholds calibrated on independent ID sets."""
    rng = np.random.default_rng(seed)
    calibration = rng.standard_normal((repetitions, N_CALIBRATION))
    fresh = rng.standard_normal((repetitions, fresh_per_repetition))
    calibrated = [conformal_threshold(scores, TARGET) for scores in calibration]
    thresholds = np.array([c.threshold for c in calibrated])
    return float(np.mean(fresh <= thresholds[:, None])), calibrated[0].k


def test_mean_acceptance_is_at_least_the_target_and_close_to_k_over_n_plus_one() -> None:
    acceptance, k = _mean_acceptance(repetitions=40_000, fresh_per_repetition=100, seed=0)
    assert k == 96
    assert acceptance >= TARGET
    assert abs(acceptance - k / (N_CALIBRATION + 1)) < 0.005


def test_two_thousand_repetitions_land_within_0_005_of_k_over_n_plus_one() -> None:
    acceptance, k = _mean_acceptance(repetitions=2_000, fresh_per_repetition=1_000, seed=1)
    assert abs(acceptance - k / (N_CALIBRATION + 1)) < 0.005


def test_too_few_calibration_scores_for_the_target_is_refused() -> None:
    with pytest.raises(UnsupportedTargetError, match="at least 19"):
        conformal_threshold(np.arange(10.0), TARGET)  # k = ceil(0.95 * 11) = 11 > 10
    at_boundary = conformal_threshold(np.arange(19.0), TARGET)  # k = ceil(0.95 * 20) = 19 = n
    assert (at_boundary.k, at_boundary.threshold) == (19, 18.0)


def _id_p_values(draw: Callable[[np.random.Generator, tuple[int, int]], np.ndarray], repetitions: int, seed: int) -> np.ndarray:
    """One fresh ID p-value per repetition, each against its own calibration set (independent)."""
    rng = np.random.default_rng(seed)
    calibration = np.sort(draw(rng, (repetitions, N_CALIBRATION)), axis=1)
    fresh = draw(rng, (repetitions, 1))
    return np.concatenate([conformal_p_values(s, cal) for s, cal in zip(fresh, calibration)])


LEVELS = np.linspace(0.05, 1.0, 20)
TOLERANCE = 0.015  # about four standard errors of an empirical CDF over 20,000 draws


def test_id_p_values_are_uniform_for_continuous_scores() -> None:
    p_values = _id_p_values(lambda rng, size: rng.standard_normal(size), repetitions=20_000, seed=2)
    grid = np.arange(1, N_CALIBRATION + 2) / (N_CALIBRATION + 1)
    assert set(np.unique(p_values)) <= set(grid)
    empirical = np.array([np.mean(p_values <= level) for level in LEVELS])
    exact = np.floor(LEVELS * (N_CALIBRATION + 1) + 1e-9) / (N_CALIBRATION + 1)  # P(p <= a) on the grid
    np.testing.assert_allclose(empirical, exact, atol=TOLERANCE)


def test_id_p_values_are_super_uniform_with_heavy_ties() -> None:
    # Integer scores 0..4: a tie-breaking error (counting cal > s instead of cal >= s) would put
    # the 20% of inputs scoring 4 at p = 1/101 and break P(p <= a) <= a badly.
    p_values = _id_p_values(lambda rng, size: rng.integers(0, 5, size).astype(float), repetitions=20_000, seed=3)
    empirical = np.array([np.mean(p_values <= level) for level in LEVELS])
    assert np.all(empirical <= LEVELS + TOLERANCE)
    assert np.mean(p_values <= 0.05) < 0.01  # nothing sits below the top score's share (about 0.2)


def test_p_values_are_small_for_scores_beyond_the_calibration_set() -> None:
    calibration = np.sort(np.random.default_rng(4).standard_normal(N_CALIBRATION))
    p_values = conformal_p_values(np.array([calibration[-1] + 1.0, calibration[0] - 1.0]), calibration)
    np.testing.assert_allclose(p_values, [1 / (N_CALIBRATION + 1), 1.0])


def test_an_unsupported_target_names_the_smallest_calibration_set_that_would_do() -> None:
    with pytest.raises(UnsupportedTargetError, match="needs at least 9 calibration images, got 8"):
        conformal_threshold(np.arange(8.0), 0.90)
    assert conformal_threshold(np.arange(9.0), 0.90).k == 9
