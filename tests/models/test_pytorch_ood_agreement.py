"""The OOD scores of ``models.scoring.scores`` against pytorch-ood's detectors, on the same seeded logits.

Both libraries orient scores the same way (higher = more OOD), so the mapping is:

* ``msp``      = 1 + ``MaxSoftmax.score(z, t)``: pytorch-ood returns ``-max softmax``, in [-1, 0);
  the project shifts it into [0, 1) so that a score reads as "probability mass not on the top
  class". The shift is a constant, so thresholds move by 1 and every ranking metric is unchanged.
* ``odin``     = 1 + ``ODIN(model, eps=0, temperature=1000).predict(z)``: the project's ODIN is
  the temperature-scaled MSP without ODIN's input perturbation (as the MixOE paper's baseline), which
  is pytorch-ood's ODIN with ``eps = 0``; with ``nn.Identity`` as the model, its inputs are the
  logits themselves.
* ``maxlogit`` = ``MaxLogit.score(z)`` and ``energy`` = ``EnergyBased.score(z, t)``, identical.

The project computes scores in float32 whatever the input dtype, so both sides get the same float32
logits. A flipped sign, a dropped shift or a wrong temperature each moves the scores by far more
than the tolerance (checked against the spread of the scores below).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from pytorch_ood.detector import ODIN, EnergyBased, MaxLogit, MaxSoftmax
from torch import Tensor, nn

from models.scoring.scores import get_score
from tests.helpers.logits import synthetic_logits

ATOL = 1e-6  # float32 rounding of values of order 1-10; the score spreads are >= 1e-3
RTOL = 1e-6


def _logits() -> Tensor:
    data = synthetic_logits(600, 400, 10, seed=0, margin=5.0)
    return torch.cat([data.id_logits, data.ood_logits])


def _odin_without_perturbation(temperature: float) -> Callable[[Tensor], Tensor]:
    detector = ODIN(nn.Identity(), eps=0.0, temperature=temperature)
    return lambda logits: 1.0 + detector.predict(logits)


CASES = [
    pytest.param("msp", None, lambda z: 1.0 + MaxSoftmax.score(z), id="msp"),
    pytest.param("msp", 2.5, lambda z: 1.0 + MaxSoftmax.score(z, 2.5), id="msp-T2.5"),
    pytest.param("odin", None, _odin_without_perturbation(1000.0), id="odin"),
    pytest.param("odin", 100.0, _odin_without_perturbation(100.0), id="odin-T100"),
    pytest.param("maxlogit", None, MaxLogit.score, id="maxlogit"),
    pytest.param("energy", None, EnergyBased.score, id="energy"),
    pytest.param("energy", 2.5, lambda z: EnergyBased.score(z, 2.5), id="energy-T2.5"),
]


@pytest.mark.parametrize(("name", "temperature", "reference"), CASES)
def test_score_matches_pytorch_ood(name: str, temperature: float | None, reference: Callable[[Tensor], Tensor]) -> None:
    logits = _logits()
    ours = get_score(name)(logits, temperature)
    theirs = reference(logits)
    # The tolerance is tiny next to how much the scores vary, so agreement is not vacuous.
    assert float(ours.max() - ours.min()) > 100 * ATOL
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)

