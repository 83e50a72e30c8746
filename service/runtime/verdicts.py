"""What one image asks of the model and what it answers: shared by the request path, the
protocol between a worker and the model process, and the batch loop.

The risk level (``models.calibration.selective``) needs only a verdict's ``probability``, so the
request path applies it to the finished verdicts (:meth:`ImageVerdict.at_risk`): batches, and the
model process, never carry it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import Tensor

from models.calibration.selective import Decision, decide
from models.contract.manifest import OperatingPoint, RiskLevel


@dataclass(frozen=True)
class ImageJob:
    """One image and what its request asked for.

    ``pixels`` is the resized, centre-cropped uint8 image (3, S, S); or, when the model process
    decodes JPEGs on its GPU, a plain JPEG's bytes, still to decode there (``service.runtime.batch_loop.model_process``)."""

    pixels: Tensor | bytes
    operating_point: OperatingPoint
    top_k: int


@dataclass(frozen=True)
class ImageVerdict:
    """The model's answer for one image."""

    class_index: int
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    score: float
    p_value: float
    threshold: float
    target_id_acceptance: float
    accepted: bool
    max_risk: float | None = None  # the risk level judged at (at_risk); None: accept/reject only
    confidence_threshold: float | None = None

    def at_risk(self, level: RiskLevel | None) -> ImageVerdict:
        """This verdict judged at risk level ``level`` (``None``: none, accept or reject only)."""
        if level is None:
            return replace(self, max_risk=None, confidence_threshold=None)
        return replace(self, max_risk=level.max_risk, confidence_threshold=level.confidence_threshold)

    @property
    def decision(self) -> Decision:
        """``reject`` (OOD), ``uncertain`` (looks ID, but below the risk level's confidence) or ``accept``."""
        return decide(self.accepted, self.probability, self.confidence_threshold)

    @property
    def finite(self) -> bool:
        """Whether every number the model produced for this image is finite: JSON has no NaN."""
        numbers = [self.probability, self.score, self.p_value, *(p for _, p in self.top_k)]
        return all(math.isfinite(number) for number in numbers)
