"""The batch function the micro-batcher runs in the inference thread: images in, verdicts out.

A batch mixes requests that asked for different operating points and top-k sizes, so the model
runs once and each image is then judged against its own threshold with the bundle's rule (accepted
when ``score <= threshold``; scores are higher for more OOD inputs, see ``models.scores``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.bundle import Bundle, OperatingPoint


@dataclass(frozen=True)
class ImageJob:
    """One resized, centre-cropped uint8 image (3, S, S) and what its request asked for."""

    pixels: Tensor
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


def stack_on(device: torch.device, crops: list[Tensor]) -> Tensor:
    """Batch (B, 3, S, S) on ``device`` from crops that may live on different devices.

    On a GPU server a JPEG's crop is already on the GPU (nvjpeg) while a PNG's is on the CPU, and
    one batch can hold both."""
    return torch.stack([crop.to(device, non_blocking=True) for crop in crops])


class ModelRunner:
    """Callable batch function over one loaded bundle; not thread-safe, run it in one thread."""

    def __init__(self, bundle: Bundle):
        self._bundle = bundle
        self._class_names = bundle.manifest.class_names

    def __call__(self, jobs: list[ImageJob]) -> list[ImageVerdict]:
        predictions = self._bundle.predict(stack_on(self._bundle.device, [job.pixels for job in jobs]))
        k = max(job.top_k for job in jobs)
        top_probabilities, top_indices = predictions.probabilities.topk(k, dim=1)  # (B, k) each
        top_probabilities_rows = top_probabilities.tolist()
        top_indices_rows = top_indices.tolist()
        scores = predictions.scores.double().tolist()
        p_values = predictions.p_values.tolist()
        verdicts = []
        for row, job in enumerate(jobs):
            point = job.operating_point
            ranked = [
                (self._class_names[index], probability)
                for index, probability in zip(
                    top_indices_rows[row][: job.top_k], top_probabilities_rows[row][: job.top_k], strict=True
                )
            ]
            verdicts.append(
                ImageVerdict(
                    class_index=top_indices_rows[row][0],
                    label=ranked[0][0],
                    probability=ranked[0][1],
                    top_k=ranked,
                    score=scores[row],
                    p_value=p_values[row],
                    threshold=point.threshold,
                    target_id_acceptance=point.target_id_acceptance,
                    accepted=scores[row] <= point.threshold,
                )
            )
        return verdicts

    def warm_up(self) -> None:
        """One throw-away batch, so the first request does not pay for lazy initialisation."""
        size = self._bundle.manifest.preprocessing.input_size
        self._bundle.predict(torch.zeros(1, 3, size, size, dtype=torch.uint8))
