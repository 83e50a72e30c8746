"""An online drift alarm with a guaranteed false-alarm rate: a conformal test martingale.

Each served input gets a smoothed conformal p-value in the online mode
(:class:`models.calibration.online_conformal.OnlineConformal`). While the inputs are exchangeable with the
calibration data those p-values are i.i.d. uniform on (0, 1], and any product of *betting
functions* ``f`` with ``integral_0^1 f = 1`` applied to them is a test martingale: a non-negative
martingale starting at 1 (Vovk, Nouretdinov, Gammerman, "Testing exchangeability on-line",
ICML 2003). Ville's inequality (Ville, *Etude critique de la notion de collectif*, 1939) then
bounds the chance that it *ever* reaches ``1 / delta`` by ``delta``: an alarm at
``M >= 1 / delta`` has false-alarm probability at most ``delta`` over the whole, unbounded stream.

Out-of-distribution inputs have small p-values, so the betting functions are the power functions
``f_kappa(p) = kappa * p ** (kappa - 1)`` with ``0 < kappa < 1`` (ibid.), which pay most on small
p-values, plus ``f = 1`` (no bet). A plain power martingale loses steadily on in-distribution data
and, after a long in-distribution stretch, takes as long to climb back as the stretch lasted.
The Jumper construction (Vovk, Petej, Nouretdinov, Ahlberg, Carlsson, Gammerman, "Retrain or not
retrain: conformal test martingales for change-point detection", COPA 2021: the Simple Jumper;
here with power betting functions) avoids that: the capital is split between the betting
functions, and before each input a share ``J`` (the jump rate) of the total is spread evenly
over all of them. Redistribution keeps the total, so the total is still a test martingale; but a
betting function that suits the new data always gets fresh capital, and the total can never fall
below what staying with "no bet" would give, a pathwise floor::

    log10 M_n >= -log10 K - n * J * (K - 1) / K / ln 10      (K betting functions)

(for the defaults, K = 6 and J = 1e-4: 0.78 decades plus 0.36 per 10 000 inputs). After a change
the alarm needs about ``log(K / J) + log(1 / delta)`` of growth, at the rate the best betting
function earns on the new data.

With ``W`` worker processes each running its own martingale on its own share of the traffic, an
alarm when any of them reaches ``W / delta`` has false-alarm probability at most ``delta`` by the
union bound (:func:`alarm_log10_level`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

DEFAULT_KAPPAS = (0.9, 0.8, 0.6, 0.4, 0.2)
"""Exponents of the power betting functions: near 1 for a small OOD share, small for a large one."""
DEFAULT_JUMP_RATE = 1e-4
"""Share of the capital redistributed before each input (``benchmarks/drift.py`` compares rates)."""


def alarm_log10_level(delta: float, workers: int = 1) -> float:
    """``log10(workers / delta)``: each of ``workers`` martingales alarming there keeps the
    chance of any false alarm, over the whole stream, at most ``delta``."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie strictly between 0 and 1, got {delta}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return math.log10(workers / delta)


class PowerJumper:
    """Jumper test martingales over power betting functions, for ``runs`` independent streams at once.

    ``update`` takes one p-value per stream and returns each stream's ``log10`` capital. The state is
    the total capital (kept as its logarithm, so that it neither under- nor overflows) and its split
    between the betting functions (``weights``, summing to 1 per stream)."""

    def __init__(
        self, runs: int = 1, kappas: Sequence[float] = DEFAULT_KAPPAS, jump_rate: float = DEFAULT_JUMP_RATE
    ):
        if not all(0.0 < kappa < 1.0 for kappa in kappas):
            raise ValueError(f"power betting exponents must lie strictly between 0 and 1, got {list(kappas)}")
        if not 0.0 < jump_rate <= 1.0:
            raise ValueError(f"jump rate must lie in (0, 1], got {jump_rate}")
        self._exponents = np.array([1.0, *kappas])  # kappa = 1 is f = 1: no bet
        self._jump_rate = jump_rate
        self._runs = runs
        self.reset()

    def reset(self) -> None:
        """Back to capital 1, split evenly."""
        self._weights = np.full((self._runs, self._exponents.size), 1.0 / self._exponents.size)
        self._log_capital = np.zeros(self._runs)

    @property
    def log10_capital(self) -> NDArray[np.float64]:
        """``log10 M`` per stream (shape ``(runs,)``)."""
        return self._log_capital / math.log(10.0)

    def update(self, p_values: ArrayLike) -> NDArray[np.float64]:
        """Bet on one p-value per stream (each in (0, 1]); returns the new ``log10 M`` per stream."""
        self._log_capital += np.log(self._bet(self._payoffs(np.reshape(p_values, self._runs))))
        return self.log10_capital

    def update_many(self, p_values: ArrayLike) -> NDArray[np.float64]:
        """Feed a single stream (``runs == 1``) several p-values in order; returns ``log10 M`` after
        each of them, so that a caller can tell whether the stream crossed a level on the way.

        The same arithmetic as one :meth:`update` per p-value, with the payoffs and logarithms
        computed for all of them at once: only the redistribution has to go one by one."""
        if self._runs != 1:
            raise ValueError("update_many feeds a single stream")
        payoffs = self._payoffs(p_values)  # (B, K)
        growth = np.array([self._bet(row[None, :])[0] for row in payoffs])
        path = np.cumsum(np.concatenate((self._log_capital, np.log(growth))))[1:]  # summed in order, as update does
        if path.size:
            self._log_capital[0] = path[-1]
        return path / math.log(10.0)

    def _payoffs(self, p_values: ArrayLike) -> NDArray[np.float64]:
        """``f_kappa(p)`` for every p-value (rows) and betting function (columns)."""
        p = np.asarray(p_values, dtype=np.float64).reshape(-1, 1)
        if not np.all((p > 0.0) & (p <= 1.0)):
            raise ValueError("p-values must lie in (0, 1]")
        k = self._exponents
        return k * p ** (k - 1.0)

    def _bet(self, payoffs: NDArray[np.float64]) -> NDArray[np.float64]:
        """One step per stream (``payoffs``: (runs, K)): redistribute, bet, keep the new split;
        returns each stream's capital growth factor."""
        weights = (1.0 - self._jump_rate) * self._weights + self._jump_rate / self._exponents.size
        weights *= payoffs
        growth = weights.sum(axis=1)
        self._weights = weights / growth[:, None]
        return growth
