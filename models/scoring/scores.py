"""OOD scores, by name. Convention everywhere: **higher = more out-of-distribution**.

:data:`SCORES` is the one registry of every score the project ships: the logit scores below and
the feature-space scores of :mod:`models.scoring.feature_scores` (``knn``, ``mahalanobis``). Every score
follows :class:`Score`: ``needs_features`` says whether it reads penultimate features, ``fit``
computes its state from training features (empty for logit scores), and ``apply`` scores a batch.
Logit scores are also callable on logits alone, ``get_score("msp")(logits)``. A request is
rejected when its score exceeds the calibrated threshold.

Logit scores map logits ``(B, K)`` to scores ``(B,)``:

* ``msp``      1 - max_k softmax(z / T)_k            (Hendrycks & Gimpel, 2017; T = 1)
* ``odin``     1 - max_k softmax(z / T)_k, T = 1000  (Liang et al., 2018, temperature scaling
                                                      only, without input perturbation, as the
                                                      MixOE paper's baseline)
* ``maxlogit`` -max_k z_k                            (Hendrycks et al., 2022)
* ``energy``   -T * logsumexp(z / T)                 (Liu et al., 2020; T = 1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from models.lookup import look_up
from models.scoring.feature_scores import FEATURE_SCORES, FitData


def msp(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """One minus the maximum softmax probability at ``temperature``."""
    return 1.0 - (logits.float() / temperature).softmax(dim=1).amax(dim=1)


def maxlogit(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative maximum logit; ``temperature`` is accepted for a uniform signature and ignored."""
    return -logits.float().amax(dim=1)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T * logsumexp(z / T)``: low (very negative) for confident ID inputs."""
    return -temperature * (logits.float() / temperature).logsumexp(dim=1)


class Score(Protocol):
    """What every registered score offers the rest of the code."""

    @property
    def name(self) -> str: ...

    @property
    def default_temperature(self) -> float: ...

    @property
    def default_k(self) -> int | None:
        """Neighbour count for scores that take one (``knn``), else ``None``."""

    @property
    def needs_features(self) -> bool:
        """Whether :meth:`apply` reads penultimate features (and a fitted state)."""

    def fit(self, data: FitData) -> dict[str, Tensor]:
        """The state :meth:`apply` needs, from training features; ``{}`` when it needs none."""

    def prepare(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state`` (as :meth:`fit` made it) with whatever :meth:`apply` can reuse across batches
        computed once, for a loaded bundle; :meth:`apply` also accepts ``state`` unprepared."""

    def apply(
        self, logits: Tensor, features: Tensor | None, state: Mapping[str, Tensor], temperature: float, k: int | None
    ) -> Tensor:
        """OOD scores (B,) of a batch's logits (B, K) and, where needed, features (B, D)."""


@dataclass(frozen=True)
class ScoreFunction:
    """A named logit score with its default temperature."""

    name: str
    function: Callable[[Tensor, float], Tensor]
    default_temperature: float
    default_k: int | None = None
    needs_features: bool = False

    def __call__(self, logits: Tensor, temperature: float | None = None) -> Tensor:
        t = self.default_temperature if temperature is None else temperature
        if t <= 0:
            raise ValueError(f"temperature must be positive, got {t}")
        return self.function(logits, t)

    def fit(self, data: FitData) -> dict[str, Tensor]:
        return {}

    def prepare(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(state)

    def apply(
        self, logits: Tensor, features: Tensor | None, state: Mapping[str, Tensor], temperature: float, k: int | None
    ) -> Tensor:
        return self(logits, temperature)


LOGIT_SCORES = (
    ScoreFunction("msp", msp, 1.0),
    ScoreFunction("odin", msp, 1000.0),
    ScoreFunction("maxlogit", maxlogit, 1.0),
    ScoreFunction("energy", energy, 1.0),
)
SCORES: dict[str, Score] = {score.name: score for score in (*LOGIT_SCORES, *FEATURE_SCORES)}


def get_score(name: str) -> Score:
    """Look a score up by name; an unknown name lists the valid ones."""
    return look_up(SCORES, name, "OOD score")
