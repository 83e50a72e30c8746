"""OOD score functions, by name. Convention everywhere: **higher = more out-of-distribution**.

Each function maps logits ``(B, K)`` to scores ``(B,)``. A request is rejected when its score
exceeds the calibrated threshold.

* ``msp``      1 - max_k softmax(z / T)_k            (Hendrycks & Gimpel, 2017; T = 1)
* ``odin``     1 - max_k softmax(z / T)_k, T = 1000  (Liang et al., 2018, temperature scaling
                                                      only, without input perturbation, as the
                                                      MixOE paper's baseline)
* ``maxlogit`` -max_k z_k                            (Hendrycks et al., 2022)
* ``energy``   -T * logsumexp(z / T)                 (Liu et al., 2020; T = 1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


def msp(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """One minus the maximum softmax probability at ``temperature``."""
    return 1.0 - (logits.float() / temperature).softmax(dim=1).amax(dim=1)


def maxlogit(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative maximum logit; ``temperature`` is accepted for a uniform signature and ignored."""
    return -logits.float().amax(dim=1)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T * logsumexp(z / T)``: low (very negative) for confident ID inputs."""
    return -temperature * (logits.float() / temperature).logsumexp(dim=1)


@dataclass(frozen=True)
class ScoreFunction:
    """A named score with its default temperature."""

    name: str
    function: Callable[[Tensor, float], Tensor]
    default_temperature: float

    def __call__(self, logits: Tensor, temperature: float | None = None) -> Tensor:
        t = self.default_temperature if temperature is None else temperature
        if t <= 0:
            raise ValueError(f"temperature must be positive, got {t}")
        return self.function(logits, t)


SCORES: dict[str, ScoreFunction] = {
    "msp": ScoreFunction("msp", msp, 1.0),
    "odin": ScoreFunction("odin", msp, 1000.0),
    "maxlogit": ScoreFunction("maxlogit", maxlogit, 1.0),
    "energy": ScoreFunction("energy", energy, 1.0),
}


def get_score(name: str) -> ScoreFunction:
    """Look a score up by name; an unknown name lists the valid ones."""
    try:
        return SCORES[name]
    except KeyError:
        valid = ", ".join(sorted(SCORES))
        raise ValueError(f"Unknown OOD score {name!r}. Supported: {valid}.") from None
