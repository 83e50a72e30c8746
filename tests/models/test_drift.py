"""The drift martingale: its arithmetic by hand, Ville's bound as a statistic over many seeded
streams, its pathwise floor, and detection after a change."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from models.calibration.conformal import smoothed_p_values
from models.calibration.drift import DEFAULT_KAPPAS, PowerJumper, alarm_log10_level


def _jumper_by_hand(p_values: list[float], kappas: tuple[float, ...], jump: float) -> list[float]:
    """Vovk et al.'s Jumper, written as in the paper: capital per betting function, no logarithms."""
    exponents = [1.0, *kappas]
    capital = [1.0 / len(exponents)] * len(exponents)
    totals = []
    for p in p_values:
        total = sum(capital)
        capital = [
            ((1 - jump) * c + jump * total / len(exponents)) * k * p ** (k - 1)
            for c, k in zip(capital, exponents, strict=True)
        ]
        totals.append(math.log10(sum(capital)))
    return totals


def test_update_matches_the_jumper_computed_by_hand() -> None:
    p_values = list(np.random.default_rng(3).uniform(1e-3, 1.0, 60))
    martingale = PowerJumper(jump_rate=0.05)
    got = [float(martingale.update([p])[0]) for p in p_values]
    np.testing.assert_allclose(got, _jumper_by_hand(p_values, DEFAULT_KAPPAS, 0.05), rtol=1e-10, atol=1e-12)


def test_update_many_equals_one_update_per_p_value() -> None:
    p_values = np.random.default_rng(4).uniform(0.01, 1.0, 30)
    one_by_one = PowerJumper()
    path = [float(one_by_one.update([p])[0]) for p in p_values]
    np.testing.assert_allclose(PowerJumper().update_many(p_values), path, rtol=0, atol=1e-12)


def test_false_alarms_on_uniform_p_values_stay_within_delta() -> None:
    """Ville: P(sup M >= 1/delta) <= delta. 4 000 seeded streams of 1 500 uniform p-values; the
    number that ever reach 1/delta must not exceed the 1e-6 upper quantile of Binomial(4000, delta)."""
    runs, steps, delta = 4_000, 1_500, 0.2
    rng = np.random.default_rng(0)
    martingale = PowerJumper(runs, jump_rate=0.01)
    peak = np.full(runs, -np.inf)
    for _ in range(steps):
        peak = np.maximum(peak, martingale.update(1.0 - rng.random(runs)))
    alarms = int(np.sum(peak >= alarm_log10_level(delta)))
    assert alarms <= binom.ppf(1 - 1e-6, runs, delta)


def test_capital_never_falls_below_the_pathwise_floor() -> None:
    """Even p-values of 1, on which every power bet loses, leave at least the no-bet share."""
    n, jump = 20_000, 1e-4
    martingale = PowerJumper(jump_rate=jump)
    k = len(DEFAULT_KAPPAS) + 1
    floor = -math.log10(k) + n * math.log10(1 - jump * (k - 1) / k)
    assert martingale.update_many(np.ones(n))[-1] >= floor
    assert martingale.update_many(np.ones(1))[-1] < 0.0  # it did lose


def test_it_alarms_soon_after_a_change_even_after_a_long_in_distribution_stretch() -> None:
    """5 000 uniform p-values, then 20% of the inputs OOD (p-values below 0.01): of 200 streams,
    no more alarm (delta = 0.01) before the change than Binomial(200, 0.01) allows, and every one
    alarms within 1 000 inputs after it, half of them within 300."""
    runs, before, after, delta = 200, 5_000, 1_000, 0.01
    rng = np.random.default_rng(1)
    martingale = PowerJumper(runs)
    level = alarm_log10_level(delta)
    early = np.zeros(runs, dtype=bool)
    for _ in range(before):
        early |= martingale.update(1.0 - rng.random(runs)) >= level
    assert np.sum(early) <= binom.ppf(1 - 1e-6, runs, delta)
    first = np.full(runs, -1)
    for step in range(after):
        ood = rng.random(runs) < 0.2
        p = np.where(ood, 0.01 * (1.0 - rng.random(runs)), 1.0 - rng.random(runs))
        crossed = martingale.update(p) >= level
        first[(first < 0) & crossed] = step
    assert np.all(first >= 0), f"{np.sum(first < 0)} streams never alarmed"
    assert np.median(first) < 300


def test_reset_returns_to_capital_one() -> None:
    martingale = PowerJumper()
    martingale.update_many([1e-4] * 10)
    martingale.reset()
    assert martingale.log10_capital[0] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kappas": (0.5, 1.0)}, "exponents"), ({"jump_rate": 0.0}, "jump rate")],
)
def test_bad_parameters_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PowerJumper(**kwargs)


def test_p_values_outside_the_unit_interval_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        PowerJumper().update([0.0])


def test_alarm_level_splits_delta_between_workers() -> None:
    assert alarm_log10_level(0.01) == pytest.approx(2.0)
    assert alarm_log10_level(0.01, workers=4) == pytest.approx(math.log10(400))
    with pytest.raises(ValueError, match="delta"):
        alarm_log10_level(1.0)


def test_smoothed_p_values_are_uniform_even_with_ties() -> None:
    """Integer scores (many ties) against 9 calibration scores from the same distribution, fresh
    per draw: the smoothed p-value is exactly uniform, so each decile holds 1/10 of 200 000 draws
    (within 5 binomial standard deviations); the conservative p-value would pile up at 1."""
    draws, n = 200_000, 9
    rng = np.random.default_rng(2)
    calibration = np.sort(rng.integers(0, 4, (draws, n)), axis=1)
    scores = rng.integers(0, 4, draws)
    first = zip(scores[:2000], calibration[:2000], 1 - rng.random(2000), strict=True)
    p = np.array([smoothed_p_values(s, c, u) for s, c, u in first])
    assert np.all((p > 0) & (p <= 1))
    offsets = 10.0 * np.arange(draws)[:, None]  # one searchsorted over all draws: shift each draw apart
    p = smoothed_p_values(scores + offsets[:, 0], (calibration + offsets).ravel(), 1.0 - rng.random(draws))
    counts = np.histogram(p, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - draws / 10) < 5 * math.sqrt(draws * 0.1 * 0.9))
