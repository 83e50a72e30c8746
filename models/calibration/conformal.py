"""Split-conformal thresholds and p-values on OOD scores (higher = more OOD).

Given n held-out ID calibration scores, the threshold for a target ID acceptance ``1 - alpha`` is
the k-th smallest calibration score with ``k = ceil((1 - alpha) * (n + 1))``. A fresh ID input,
exchangeable with the calibration set, then has ``P(score <= threshold) >= 1 - alpha`` (and, with
continuous scores, ``<= 1 - alpha + 1/(n+1)``). When ``k > n`` no calibration score is large
enough to support the target: we refuse rather than return an unfounded threshold.

The same scores give each input a conformal p-value ``(1 + #{cal >= s}) / (n + 1)``: the share
of ID data at least as OOD-looking as ``s``. Small p-values mean "unlike the ID data".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


class UnsupportedTargetError(ValueError):
    """The calibration set is too small for the requested ID acceptance."""


@dataclass(frozen=True)
class ConformalThreshold:
    target_id_acceptance: float
    threshold: float
    k: int
    n_calibration: int


def conformal_rank(target_id_acceptance: float, n: int) -> int:
    """``k = ceil((1 - alpha) * (n + 1))``, computed with a guard against float round-up."""
    if not 0.0 < target_id_acceptance < 1.0:
        raise ValueError(f"target ID acceptance must lie strictly between 0 and 1, got {target_id_acceptance}")
    # 0.95 * 101 = 95.95000000000002 in floats; rounding first keeps exact products exact.
    return math.ceil(round(target_id_acceptance * (n + 1), 9))


def conformal_threshold(calibration_scores: ArrayLike, target_id_acceptance: float) -> ConformalThreshold:
    """Threshold accepting at least ``target_id_acceptance`` of exchangeable ID inputs."""
    scores = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    n = scores.size
    if n == 0:
        raise UnsupportedTargetError("no calibration scores")
    k = conformal_rank(target_id_acceptance, n)
    if k > n:
        needed = next(m for m in itertools.count(n + 1) if conformal_rank(target_id_acceptance, m) <= m)
        raise UnsupportedTargetError(
            f"target ID acceptance {target_id_acceptance} needs at least {needed} calibration images, got {n}"
        )
    return ConformalThreshold(target_id_acceptance, float(scores[k - 1]), k, n)


def conformal_p_values(scores: ArrayLike, sorted_calibration_scores: NDArray[np.floating]) -> NDArray[np.float64]:
    """``(1 + #{cal >= s}) / (n + 1)`` for each score; ``sorted_calibration_scores`` ascending."""
    cal = np.asarray(sorted_calibration_scores, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    at_least = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (cal.size + 1.0)


def smoothed_p_values(
    scores: ArrayLike, sorted_calibration_scores: NDArray[np.floating], uniforms: ArrayLike
) -> NDArray[np.float64]:
    """Randomised (smoothed) conformal p-values ``(#{cal > s} + u * (#{cal == s} + 1)) / (n + 1)``.

    ``u`` is a fresh uniform draw on (0, 1] per score (never 0, so neither is ``p``). Where :func:`conformal_p_values` is
    conservative (``P(p <= a) <= a``), these are exactly uniform for an input exchangeable with the
    calibration set (Vovk, Gammerman, Shafer, *Algorithmic Learning in a Random World*, 2005,
    section 2.4): what a test martingale needs, since a conservative p-value makes a power
    betting function lose even on in-distribution data."""
    cal = np.asarray(sorted_calibration_scores, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    above = cal.size - np.searchsorted(cal, s, side="right")
    ties = np.searchsorted(cal, s, side="right") - np.searchsorted(cal, s, side="left")
    return (above + np.asarray(uniforms, dtype=np.float64) * (ties + 1.0)) / (cal.size + 1.0)
