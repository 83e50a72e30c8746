"""Learn-then-Test selective thresholds (models.calibration.selective), checked by simulation and against scipy.

Simulation: a confidence ``c ~ Uniform(0, 1)`` is wrong with probability ``(1 - c)^2``, so the
error rate among images with ``c >= lambda`` is ``R(lambda) = (1 - lambda)^2 / 3`` exactly; at
epsilon = 0.05 the largest safe accepted share is ``1 - lambda* = sqrt(0.15) = 0.387``. Each
repetition calibrates on its own 1,000 images; a repetition fails when the true risk of its
threshold exceeds epsilon. The guarantee says at most ``delta`` of them fail; with 2,000
repetitions, the count of failures is at most Binomial(2000, delta), so its 1 - 1e-6 quantile
bounds it for any seed while a procedure that failed at twice delta would exceed it.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from models.calibration.selective import (
    UnsupportedRiskError,
    accepted_counts,
    binomial_cdf,
    critical_errors,
    decide,
    minimum_accepted,
    selective_threshold,
)

EPSILON, DELTA = 0.05, 0.1
REPETITIONS, N = 2_000, 1_000


def _true_risk(threshold: np.ndarray) -> np.ndarray:
    return (1.0 - threshold) ** 2 / 3.0


def _simulate(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    confidences = rng.random((REPETITIONS, N))
    errors = rng.random((REPETITIONS, N)) < (1.0 - confidences) ** 2
    return confidences, errors


def _thresholds(confidences: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ``counts``-th largest confidence per row (1.0, accepting nothing, where counts is 0)."""
    ranked = -np.sort(-confidences, axis=1)
    return np.where(counts > 0, ranked[np.arange(len(counts)), np.maximum(counts, 1) - 1], 1.0)


def test_the_threshold_keeps_the_risk_below_epsilon_in_all_but_delta_of_calibration_sets() -> None:
    confidences, errors = _simulate(seed=0)
    counts = accepted_counts(confidences, errors, EPSILON, DELTA)
    risks = _true_risk(_thresholds(confidences, counts))
    failures = int(np.sum(risks > EPSILON))
    assert failures <= binom.ppf(1 - 1e-6, REPETITIONS, DELTA)
    # Not vacuous: a threshold is certified unless one of the 45 most confident images (where the
    # sequence starts, 0.95^45 <= 0.1) is wrong, about 3% of sets; it accepts most of the safe 38.7%.
    assert np.mean(counts > 0) > 0.95
    assert np.median(counts / N) > 0.25


def test_the_plug_in_threshold_without_a_bound_fails_far_more_often() -> None:
    """The simulation can see a violation: the largest accepted set whose *empirical* risk is at
    most epsilon (no binomial bound) exceeds the true risk in about half of the repetitions."""
    confidences, errors = _simulate(seed=1)
    order = np.argsort(-confidences, axis=1)
    wrong = np.take_along_axis(errors, order, axis=1)
    empirical = np.cumsum(wrong, axis=1) / np.arange(1, N + 1)
    counts = np.max(np.where(empirical <= EPSILON, np.arange(1, N + 1), 0), axis=1)
    failures = int(np.sum(_true_risk(_thresholds(confidences, counts)) > EPSILON))
    assert failures > binom.ppf(1 - 1e-6, REPETITIONS, DELTA)


@pytest.mark.parametrize("epsilon,delta", [(0.05, 0.1), (0.01, 0.05), (0.2, 0.01)])
def test_critical_error_counts_match_scipy(epsilon: float, delta: float) -> None:
    table = critical_errors(3_000, epsilon, delta)
    for n in (1, 10, 45, 46, 300, 1_000, 2_999, 3_000):
        cdf = binom.cdf(np.arange(n + 1), n, epsilon)
        expected = int(np.max(np.where(cdf <= delta, np.arange(n + 1), -1)))
        assert table[n] == expected, n
    assert binomial_cdf(7, 300, epsilon) == pytest.approx(binom.cdf(7, 300, epsilon), rel=1e-9)


def test_the_sequence_starts_where_a_flawless_set_could_be_certified() -> None:
    needed = minimum_accepted(0.05, 0.1)  # (0.95)^45 = 0.0994 <= 0.1 < (0.95)^44 = 0.1046
    assert needed == 45
    assert critical_errors(45, 0.05, 0.1)[44:].tolist() == [-1, 0]


def test_ties_are_accepted_as_whole_groups() -> None:
    """Sixty images at confidence exactly 1.0 (float32 softmax saturates) form one candidate."""
    confidences = np.concatenate([np.ones(60), np.linspace(0.9, 0.5, 40)])
    errors = np.zeros(100, bool)
    errors[60:] = True  # every image below 1.0 is wrong: only the tie group is safe
    found = selective_threshold(confidences, errors, EPSILON, DELTA)
    assert (found.threshold, found.n_accepted, found.errors) == (1.0, 60, 0)
    assert found.p_value == pytest.approx(0.95**60)


def test_an_epsilon_the_data_cannot_support_is_refused() -> None:
    confidences = np.linspace(1.0, 0.0, 200)
    with pytest.raises(UnsupportedRiskError, match=r"max risk 0.01 .* at least 230 accepted images"):
        selective_threshold(confidences, np.zeros(200, bool), 0.01, DELTA)  # 0.99^229 > 0.1
    assert selective_threshold(confidences, np.zeros(200, bool), 0.05, DELTA).n_accepted == 200


def test_a_fixed_sequence_stops_at_its_first_failure() -> None:
    """Errors clustered among the most confident images end the sequence even though the set as a
    whole would pass: a later candidate is never reached."""
    confidences = np.linspace(1.0, 0.0, 1_000)
    errors = np.zeros(1_000, bool)
    errors[45:55] = True  # 10 errors right after the first candidate (j = 45)
    assert int(accepted_counts(confidences, errors, EPSILON, DELTA)) == 45
    assert binomial_cdf(10, 1_000, EPSILON) < DELTA  # the full set alone would have passed


@pytest.mark.parametrize(
    "accepted,confidence,threshold,decision",
    [(False, 0.99, 0.5, "reject"), (True, 0.4, 0.5, "uncertain"), (True, 0.5, 0.5, "accept"), (True, 0.1, None, "accept")],
)
def test_decide(accepted: bool, confidence: float, threshold: float | None, decision: str) -> None:
    assert decide(accepted, confidence, threshold) == decision
