"""Selective classification with risk control: a confidence threshold with a guaranteed error rate.

Given n labelled held-out ID images, each with a *confidence* (the max softmax probability at
temperature 1, what an answer reports as ``probability``) and whether the model misclassified it,
we look for a threshold ``lambda`` such that, for a fresh ID image exchangeable with them,

    R(lambda) = P(misclassified | confidence >= lambda) <= epsilon

holds with probability at least ``1 - delta`` over the draw of the calibration set. Images below
``lambda`` are abstained on (``uncertain``) rather than answered.

Method: Learn then Test (Angelopoulos, Bates, Candès, Jordan, Lei, "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control", 2021) with an exact binomial p-value,
which for this risk is also the bound of Geifman & El-Yaniv, "Selective Classification for Deep
Neural Networks" (NeurIPS 2017). For each candidate ``lambda`` the null hypothesis
``H(lambda): R(lambda) > epsilon`` is tested with

    p(lambda) = P(Binomial(n(lambda), epsilon) <= k(lambda)),

``n(lambda)`` the calibration images with confidence >= lambda and ``k(lambda)`` the misclassified
ones among them. Given ``n(lambda)``, those images are an i.i.d. sample of the images the threshold
accepts, so ``k(lambda)`` is ``Binomial(n(lambda), R(lambda))`` and ``p`` is a valid p-value.
Candidates are tested in a fixed sequence from the most to the least confident (fixed-sequence
testing controls the family-wise error at ``delta`` without any multiplicity correction); the
sequence stops at its first non-rejection, and the threshold is the last rejected candidate. With
probability >= 1 - delta every threshold the sequence passed, the chosen one included, keeps its
error rate <= epsilon.

Candidates are the distinct calibration confidences (an accepted set is then "the top j images",
whole tie groups at a time: float32 softmax saturates at exactly 1.0 for many confident images),
skipping those with fewer accepted images than any test could reject on: with ``n`` images and no
error the p-value is ``(1 - epsilon)^n``, so the sequence starts once ``(1 - epsilon)^n <= delta``.
The candidates depend on the calibration confidences, never on their labels.
``tests/models/test_selective.py`` checks the bound by simulation.

p-values are compared through *critical error counts* ``q(n) = max{k : P(Bin(n, eps) <= k) <= delta}``
(``-1`` where none), which depend on ``n`` only: one table serves every candidate and every
repetition of a simulation, so the whole procedure vectorises over a leading batch axis.

What is not guaranteed: anything about OOD inputs (the calibration images are ID), or about ID
inputs after a distribution shift (no longer exchangeable with the calibration set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Decision = Literal["accept", "uncertain", "reject"]


class UnsupportedRiskError(ValueError):
    """No confidence threshold keeps the error rate at or below epsilon on this calibration set."""


@dataclass(frozen=True)
class SelectiveThreshold:
    """A calibrated confidence threshold: accept when confidence >= ``threshold``."""

    max_risk: float  # epsilon
    delta: float
    threshold: float
    n_accepted: int  # calibration images with confidence >= threshold
    errors: int  # misclassified among them
    n_calibration: int

    @property
    def p_value(self) -> float:
        """``P(Bin(n_accepted, epsilon) <= errors)``: at most ``delta`` by construction."""
        return binomial_cdf(self.errors, self.n_accepted, self.max_risk)


def _check_levels(epsilon: float, delta: float) -> None:
    for name, value in (("epsilon (max risk)", epsilon), ("delta", delta)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def _log_factorials(n: int) -> NDArray[np.float64]:
    """``log(m!)`` for ``m = 0..n``."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _log_cdf(k: int, n: int, epsilon: float, log_factorials: NDArray[np.float64]) -> float:
    """``log P(Bin(n, epsilon) <= k)`` by summing the pmf in log space (no underflow at large n)."""
    if k < 0:
        return -math.inf
    if k >= n:
        return 0.0
    i = np.arange(k + 1)
    log_pmf = (
        log_factorials[n] - log_factorials[i] - log_factorials[n - i]
        + i * math.log(epsilon) + (n - i) * math.log1p(-epsilon)
    )
    top = float(log_pmf.max())
    return top + math.log(float(np.exp(log_pmf - top).sum()))


def binomial_cdf(k: int, n: int, epsilon: float) -> float:
    """``P(Binomial(n, epsilon) <= k)``, exactly (up to float rounding)."""
    return math.exp(_log_cdf(k, n, epsilon, _log_factorials(n)))


def critical_errors(n_max: int, epsilon: float, delta: float) -> NDArray[np.int64]:
    """``q[n]`` for ``n = 0..n_max``: the most errors among ``n`` accepted images for which
    ``P(Bin(n, epsilon) <= errors) <= delta`` (the hypothesis "risk > epsilon" is rejected), or
    ``-1`` where even none would not do. Non-decreasing in ``n`` (the binomial CDF at a fixed ``k``
    falls as ``n`` grows), which the walk below relies on."""
    _check_levels(epsilon, delta)
    log_factorials = _log_factorials(n_max)
    log_delta = math.log(delta)
    table = np.full(n_max + 1, -1, dtype=np.int64)
    q = -1
    for n in range(1, n_max + 1):
        while q + 1 < n and _log_cdf(q + 1, n, epsilon, log_factorials) <= log_delta:
            q += 1
        table[n] = q
    return table


def minimum_accepted(epsilon: float, delta: float) -> int:
    """The fewest accepted images on which the risk can be certified at all: with no error the
    p-value is ``(1 - epsilon)^n``, at most ``delta`` once ``n >= log(delta) / log(1 - epsilon)``."""
    _check_levels(epsilon, delta)
    return math.ceil(round(math.log(delta) / math.log1p(-epsilon), 9))


def ranked_errors(confidences: NDArray[np.float64], errors: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """For thresholds from the most to the least confident image of each row (shape ``(..., n)``):
    the errors among the top ``j`` images, and whether a threshold at the ``j``-th largest
    confidence accepts exactly those ``j`` (it ends a tie group, which is accepted whole)."""
    order = np.argsort(-confidences, axis=-1, kind="stable")
    ranked = np.take_along_axis(confidences, order, axis=-1)  # descending
    cumulative_errors = np.cumsum(np.take_along_axis(errors, order, axis=-1), axis=-1)
    ends_group = np.concatenate([ranked[..., :-1] > ranked[..., 1:], np.ones((*ranked.shape[:-1], 1), bool)], axis=-1)
    return cumulative_errors, ends_group


def accepted_counts(confidences: ArrayLike, errors: ArrayLike, epsilon: float, delta: float) -> NDArray[np.int64]:
    """How many calibration images the Learn-then-Test threshold accepts, per row.

    ``confidences`` and ``errors`` (bool: misclassified) have shape ``(..., n)``; the result has
    shape ``(...)``: ``0`` where no threshold is certified, else ``j`` such that the threshold is the
    ``j``-th largest confidence of the row. Vectorised so that simulations run many calibration
    sets at once.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    wrong = np.asarray(errors, dtype=bool)
    if conf.shape != wrong.shape or conf.ndim == 0 or conf.shape[-1] == 0:
        raise ValueError(f"confidences {conf.shape} and errors {wrong.shape} must share a non-empty shape (..., n)")
    if not np.all(np.isfinite(conf)):
        raise ValueError("confidences must be finite")
    n = conf.shape[-1]
    cumulative_errors, ends_group = ranked_errors(conf, wrong)
    accepted = np.arange(1, n + 1)  # (n,): the top j images
    candidate = ends_group & (accepted >= minimum_accepted(epsilon, delta))
    passes = cumulative_errors <= critical_errors(n, epsilon, delta)[accepted]
    failed = candidate & ~passes
    first_failure = np.where(failed.any(axis=-1), failed.argmax(axis=-1), n)  # index into the sequence
    before_failure = candidate & (np.arange(n) < first_failure[..., None])
    # The last passed candidate: the largest j among candidates before the first failure (0: none).
    return np.max(np.where(before_failure, accepted, 0), axis=-1)


def selective_threshold(
    confidences: ArrayLike, errors: ArrayLike, epsilon: float, delta: float
) -> SelectiveThreshold:
    """The Learn-then-Test confidence threshold for one calibration set (1-D ``confidences`` and
    ``errors``), or :class:`UnsupportedRiskError` saying why none is certified."""
    conf = np.asarray(confidences, dtype=np.float64).ravel()
    wrong = np.asarray(errors, dtype=bool).ravel()
    count = int(accepted_counts(conf, wrong, epsilon, delta))
    n = conf.size
    if count == 0:
        needed = minimum_accepted(epsilon, delta)
        raise UnsupportedRiskError(
            f"max risk {epsilon:g} cannot be certified with probability {1 - delta:g} on {n} calibration images: "
            f"even the most confident images make too many errors (certifying it takes at least {needed} "
            f"accepted images, and more as errors occur)"
        )
    order = np.argsort(-conf, kind="stable")
    return SelectiveThreshold(
        max_risk=epsilon, delta=delta, threshold=float(conf[order[count - 1]]), n_accepted=count,
        errors=int(wrong[order[:count]].sum()), n_calibration=n,
    )


def decide(accepted: bool, confidence: float, threshold: float | None) -> Decision:
    """``reject`` when the OOD score rejected the image; else ``uncertain`` when a risk level is in
    force (``threshold`` not ``None``) and the confidence falls below its threshold; else ``accept``."""
    if not accepted:
        return "reject"
    if threshold is not None and confidence < threshold:
        return "uncertain"
    return "accept"
