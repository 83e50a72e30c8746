"""The batch function the micro-batcher runs in the inference thread: images in, verdicts out.

A batch mixes requests that asked for different operating points and top-k sizes, so the model
runs once and each image is then judged against its own threshold with the bundle's rule (accepted
when ``score <= threshold``; scores are higher for more OOD inputs, see ``models.scores``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from models.bundle import Bundle, OperatingPoint


@dataclass(frozen=True)
class ImageJob:
    """One image and what its request asked for.

    ``pixels`` is the resized, centre-cropped uint8 image (3, S, S); or, when the model process
    decodes JPEGs on its GPU, a plain JPEG's bytes, still to decode there (``service.model_process``)."""

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


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself (a full batch).

    The batch sizes a GPU model runs at. On an H200 a MobileNetV2 server that ran every size from
    1 to 32 stalled for 2 to 4 seconds whenever traffic produced a size it had not run yet (most
    likely cuDNN building plans for the new input shape). Padding to these few sizes, each run
    once at start, removed the stalls, at the cost of at most twice the rows in a batch and about
    10 s more start-up there."""
    sizes = {2**i for i in range(max_batch_size.bit_length()) if 2**i <= max_batch_size}
    return sorted(sizes | {max_batch_size})


def stack_on(device: torch.device, crops: list[Tensor]) -> Tensor:
    """Batch (B, 3, S, S) on ``device`` from crops that may live on different devices.

    On a GPU server a JPEG's crop is already on the GPU (nvjpeg) while a PNG's is on the CPU, and
    one batch can hold both. A batch wholly on the CPU (CPU decoding, or crops a worker handed to
    the model process) is stacked there and copied over once, not one small copy per image."""
    if all(crop.device.type == "cpu" for crop in crops):
        return torch.stack(crops).to(device, non_blocking=True)
    return torch.stack([crop.to(device, non_blocking=True) for crop in crops])


class ModelRunner:
    """Callable batch function over one loaded bundle; not thread-safe, run it in one thread.

    With ``padded_sizes`` (see :func:`padded_batch_sizes`), each batch is padded with blank images
    to the smallest of those sizes that holds it (a larger batch runs as it is), and the padding's
    rows are dropped from the answer; without, the model runs at whatever size the batcher formed
    (right on a CPU, where a new shape costs little and padding would cost compute)."""

    def __init__(self, bundle: Bundle, padded_sizes: list[int] | None = None):
        self._bundle = bundle
        self._class_names = bundle.manifest.class_names
        self._padded_sizes = sorted(padded_sizes or [])

    @classmethod
    def for_device(cls, bundle: Bundle, max_batch_size: int) -> ModelRunner:
        """The runner for ``bundle`` on its device: padded batches on a GPU, as they come elsewhere."""
        return cls(bundle, padded_batch_sizes(max_batch_size) if bundle.device.type == "cuda" else None)

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    def __call__(self, jobs: list[ImageJob]) -> list[ImageVerdict]:
        crops = [job.pixels for job in jobs]
        if not all(isinstance(crop, Tensor) for crop in crops):
            raise TypeError("an in-process model takes decoded crops; JPEG bytes are for the model process")
        return self.run(
            stack_on(self._bundle.device, cast(list[Tensor], crops)),
            [job.operating_point for job in jobs],
            [job.top_k for job in jobs],
        )

    def run(self, pixels: Tensor, points: Sequence[OperatingPoint], top_ks: Sequence[int]) -> list[ImageVerdict]:
        """Verdicts for a stacked uint8 batch (B, 3, S, S) on any device, row ``i`` judged at
        ``points[i]`` with ``top_ks[i]`` classes (the model process hands batches over stacked)."""
        rows = len(pixels)
        if not len(points) == len(top_ks) == rows:
            raise ValueError(f"{rows} images but {len(points)} operating points and {len(top_ks)} top-k sizes")
        predictions = self._bundle.predict(self._padded(pixels.to(self._bundle.device, non_blocking=True)))
        k = max(top_ks)
        top_probabilities, top_indices = predictions.probabilities[:rows].topk(k, dim=1)  # (B, k) each
        top_probabilities_rows = top_probabilities.tolist()
        top_indices_rows = top_indices.tolist()
        scores = predictions.scores[:rows].double().tolist()
        p_values = predictions.p_values[:rows].tolist()
        verdicts = []
        for row, (point, top_k) in enumerate(zip(points, top_ks, strict=True)):
            ranked = [
                (self._class_names[index], probability)
                for index, probability in zip(
                    top_indices_rows[row][:top_k], top_probabilities_rows[row][:top_k], strict=True
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

    def _padded(self, batch: Tensor) -> Tensor:
        size = next((size for size in self._padded_sizes if size >= len(batch)), len(batch))
        if size == len(batch):
            return batch
        return torch.cat([batch, batch.new_zeros((size - len(batch), *batch.shape[1:]))])

    @property
    def warm_up_sizes(self) -> list[int]:
        """The batch sizes :meth:`warm_up` runs: each padded size, or one image."""
        return self._padded_sizes or [1]

    def warm_up(self, sizes: Sequence[int] | None = None) -> None:
        """Throw-away batches of ``sizes`` (default :attr:`warm_up_sizes`), so that no request pays
        for lazy initialisation or a first shape.

        Run it in the thread that will serve: PyTorch caches cuDNN's execution plans per thread,
        so after a warm-up in another thread the serving thread built each plan again on its
        first batch of each size (2 to 3 s per size for MobileNetV2 on an H200, measured)."""
        size = self._bundle.manifest.preprocessing.input_size
        for rows in self.warm_up_sizes if sizes is None else sizes:
            self._bundle.predict(torch.zeros(rows, 3, size, size, dtype=torch.uint8))
