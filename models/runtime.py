"""A loaded bundle on its device: preprocessing, forward pass, OOD scores and accept/reject.

:func:`load_bundle` puts the files :func:`models.contract.bundle.read_bundle` verified onto a device as a
:class:`Bundle`; :meth:`Bundle.start` launches a batch (replaying a CUDA graph where one was
captured) and :meth:`Bundle.finish` turns its :class:`PendingLogits` into :class:`Predictions`.
Only the service runs models this way; training imports :mod:`models.contract.manifest` and
:mod:`models.contract.bundle`, never this module.

Scores follow :mod:`models.scoring.scores` (higher = more OOD): an input is accepted when its score is at
most the operating point's conformal threshold, and its p-value comes from the same calibration
scores (:mod:`models.calibration.conformal`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.calibration.conformal import conformal_p_values
from models.contract.bundle import read_bundle
from models.contract.manifest import BundleError, Manifest, OperatingPoint
from models.contract.trust import BundleTrust
from models.network.graphs import GraphedForward
from models.network.nets import Classifier, device_logits, device_outputs
from models.network.preprocess import EvalGeometry, Normalization, preprocess_batch
from models.scoring.scores import get_score


@dataclass(frozen=True)
class Predictions:
    """One batch's outputs, all on CPU. ``scores`` are OOD scores (higher = more OOD)."""

    logits: Tensor  # (B, K) float32
    probabilities: Tensor  # (B, K) float32, softmax of the logits at temperature 1
    scores: Tensor  # (B,) float32
    p_values: Tensor  # (B,) float64, conformal p-values against the calibration scores
    accepted: Tensor  # (B,) bool, scores <= operating_point.threshold
    operating_point: OperatingPoint


class Bundle:
    """A loaded model ready to predict: network, preprocessing, score and calibrated thresholds.

    The network is put in eval mode on ``device`` once here; on CUDA it also switches to
    channels_last, which bf16 convolutions prefer. A feature-space score's fitted state
    (``score_state``) moves to the device too: its score is computed there, in the same pass as the
    logits (and in the same CUDA graph), so only (B,) scores come back to the CPU.
    """

    def __init__(
        self, path: Path, manifest: Manifest, model: Classifier, device: torch.device,
        score_state: Mapping[str, Tensor] | None = None,
    ):
        self.path = path
        self.manifest = manifest
        self.device = device
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format).eval()
        self._score = get_score(manifest.score.name)
        # float32 once here (the values calibration computed with), not a cast of the bank per batch;
        # then what the score reuses across batches (the KNN bank's norms), computed once too
        self._score_state = self._score.prepare(
            {key: value.to(device, torch.float32) for key, value in (score_state or {}).items()}
        )
        self._geometry = EvalGeometry(manifest.preprocessing)
        self._normalize = Normalization(manifest.preprocessing)
        self._calibration_scores = np.asarray(manifest.calibration.scores, dtype=np.float64)
        self._graphs: GraphedForward | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def operating_point(self, target: float | None = None) -> OperatingPoint:
        """The operating point for ``target`` ID acceptance; ``None`` means the bundle's default."""
        calibration = self.manifest.calibration
        wanted = calibration.default_target if target is None else target
        for point in calibration.operating_points:
            if point.target_id_acceptance == wanted:
                return point
        available = ", ".join(str(p.target_id_acceptance) for p in calibration.operating_points)
        raise BundleError(
            f"no operating point for target ID acceptance {wanted} in bundle {self.name}/{self.version} "
            f"({self.path}); available: {available}"
        )

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images (any mode) -> the normalised batch (B, 3, S, S) the thresholds were calibrated on."""
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        return preprocess_batch(rgb, self.manifest.preprocessing)

    def pixels(self, image: Image.Image | Tensor) -> Tensor:
        """Image -> resized, centre-cropped uint8 tensor (3, S, S), not normalised.

        ``image`` is a PIL image (any mode) or a uint8 RGB tensor (3, H, W) on any device, as a
        JPEG decoder returns it; the crop stays on that device. The service batches these and
        :meth:`predict` normalises on the model's device: a quarter of the bytes to stack and
        copy, and no float work on the CPU. The result equals :meth:`preprocess` bit for bit,
        because both apply the same ops.
        """
        if isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a uint8 RGB tensor (3, H, W), got {image.dtype} {tuple(image.shape)}")
            return self._geometry(image)
        return self._geometry(image if image.mode == "RGB" else image.convert("RGB"))

    def capture_graph(self, batch_size: int) -> None:
        """Record the forward pass of uint8 batches of ``batch_size`` as a CUDA graph (CUDA only),
        which :meth:`predict` then replays for such batches (see ``models.network.graphs``)."""
        if self._graphs is None:
            self._graphs = GraphedForward(self._device_pixels, self.device)
        size = self.manifest.preprocessing.input_size
        self._graphs.capture(torch.zeros(batch_size, 3, size, size, dtype=torch.uint8, device=self.device))

    @property
    def graphed_batch_sizes(self) -> list[int]:
        return sorted(shape[0] for shape in self._graphs.shapes) if self._graphs is not None else []

    def predict(self, batch: Tensor, operating_point: float | None = None) -> Predictions:
        """Classify a batch (B, 3, S, S), normalised float or uint8 :meth:`pixels`; accept or reject each."""
        point = self.operating_point(operating_point)
        return self.finish(self.start(batch), point)

    def start(self, batch: Tensor) -> PendingLogits:
        """Launch :meth:`predict`'s forward pass without waiting for it; :meth:`finish` judges it.

        On a GPU the logits come back to the CPU asynchronously, so the caller can prepare its
        next batch while the GPU runs this one (the model process does). A uint8 batch whose
        shape was recorded (:meth:`capture_graph`) is replayed from its CUDA graph."""
        size = self.manifest.preprocessing.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size) or not (
            batch.is_floating_point() or batch.dtype == torch.uint8
        ):
            raise ValueError(
                f"expected a float or uint8 batch of shape (B, 3, {size}, {size}), got {batch.dtype} {tuple(batch.shape)}"
            )
        if batch.dtype != torch.uint8:
            return PendingLogits.of(*self._device_outputs(batch))
        pixels = batch.to(self.device, non_blocking=True)
        replayed = self._graphs(pixels) if self._graphs is not None else None
        # A replay's output is overwritten by the next replay: copied out here, before any other.
        return PendingLogits.of(*(self._device_pixels(pixels) if replayed is None else replayed))

    @torch.inference_mode()
    def finish(self, pending: PendingLogits, point: OperatingPoint | None = None) -> Predictions:
        """The predictions of a batch :meth:`start` launched, judged at ``point`` (default: the bundle's)."""
        point = self.operating_point() if point is None else point
        logits, device_scores = pending.wait()
        if device_scores is None:
            scores = self._score.apply(logits, None, {}, self.manifest.score.temperature, None)
        else:
            scores = device_scores
        p_values = torch.from_numpy(conformal_p_values(scores.numpy(), self._calibration_scores))
        return Predictions(
            logits=logits,
            probabilities=logits.softmax(dim=1),
            scores=scores,
            p_values=p_values,
            accepted=scores.double() <= point.threshold,
            operating_point=point,
        )

    @torch.inference_mode()
    def _device_pixels(self, pixels: Tensor) -> tuple[Tensor, ...]:
        return self._device_outputs(self._normalize(pixels))

    @torch.inference_mode()
    def _device_outputs(self, batch: Tensor) -> tuple[Tensor, ...]:
        """``(logits,)`` for a logit score, whose score the CPU computes in :meth:`finish` from the
        float32 logits exactly as calibration did; ``(logits, scores)`` for a feature score, scored
        on the device from the features of the same pass."""
        if not self._score.needs_features:
            return (device_logits(self.model, batch, self.manifest.precision),)
        logits, features = device_outputs(self.model, batch, self.manifest.precision)
        spec = self.manifest.score
        return logits, self._score.apply(logits, features, self._score_state, spec.temperature, spec.k)


class PendingLogits:
    """A batch's float32 logits (and device-computed scores, if any) on their way to CPU memory:
    :meth:`wait` for them.

    From a GPU they are copied into pinned memory without blocking, behind the forward pass on
    the same stream, and an event marks their arrival; elsewhere they are there already."""

    def __init__(self, logits: Tensor, scores: Tensor | None = None, arrived: torch.cuda.Event | None = None):
        self._logits = logits
        self._scores = scores
        self._arrived = arrived

    @classmethod
    @torch.inference_mode()
    def of(cls, logits: Tensor, scores: Tensor | None = None) -> PendingLogits:
        """Start copying ``logits`` and ``scores`` (on any device) to the CPU."""
        if logits.device.type != "cuda":
            return cls(logits, scores)
        host = [_pinned_copy(logits), None if scores is None else _pinned_copy(scores)]
        arrived = torch.cuda.Event()
        arrived.record()
        return cls(host[0], host[1], arrived)

    def wait(self) -> tuple[Tensor, Tensor | None]:
        """``(logits, scores)``; ``scores`` is ``None`` unless the device computed them."""
        if self._arrived is not None:
            self._arrived.synchronize()
        return self._logits, self._scores


def _pinned_copy(tensor: Tensor) -> Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def load_bundle(path: Path, device: str | torch.device = "cpu", trust: BundleTrust | None = None) -> Bundle:
    """The bundle at ``path``, verified by :func:`models.contract.bundle.read_bundle` (any problem raises
    :class:`~models.contract.manifest.BundleError` before anything is built), ready to predict on ``device``."""
    stored = read_bundle(path, trust)
    return Bundle(stored.path, stored.manifest, stored.model, torch.device(device), stored.score_state)
