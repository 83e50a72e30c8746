"""What the batch loop (``service.runtime.batch_loop.model_host``) runs on each batch: images in, verdicts out.

A batch mixes requests that asked for different operating points and top-k sizes, so the model
runs once and each image is then judged against its own threshold with the bundle's rule (accepted
when ``score <= threshold``; scores are higher for more OOD inputs, see ``models.scoring.scores``).

Jobs and verdicts, which the request path shares, are :mod:`service.runtime.verdicts`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import cast

import torch
from torch import Tensor

from models.contract.manifest import BundleError, OperatingPoint
from models.runtime import Bundle, PendingLogits
from service.runtime.batch_loop.tuning import BatchSizeTuning
from service.runtime.jpeg import decode_plain_jpegs
from service.runtime.protocol import Run
from service.runtime.verdicts import ImageJob, ImageVerdict

logger = logging.getLogger("mixoe.inference")


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself (a full batch).

    The batch sizes a GPU model runs at. On an H200 a MobileNetV2 server that ran every size from
    1 to 32 stalled for 2 to 4 seconds whenever traffic produced a size it had not run yet (most
    likely cuDNN building plans for the new input shape). Padding to these few sizes, each run
    once at start, removed the stalls, at the cost of at most twice the rows in a batch and about
    10 s more start-up there."""
    sizes = {2**i for i in range(max_batch_size.bit_length()) if 2**i <= max_batch_size}
    return sorted(sizes | {max_batch_size})


def graphs_note(bundle: Bundle) -> str:
    """``", CUDA graphs for batch sizes 1, 2, 4"`` for a model's log line; empty where none was
    recorded (a CPU, ``MIXOE_CUDA_GRAPHS=false``, or a worker whose models live in the model process)."""
    sizes = bundle.graphed_batch_sizes
    return f", CUDA graphs for batch sizes {', '.join(map(str, sizes))}" if sizes else ""


def stack_on(device: torch.device, crops: list[Tensor]) -> Tensor:
    """Batch (B, 3, S, S) on ``device`` from crops that may live on different devices.

    On a GPU server a JPEG's crop is already on the GPU (nvjpeg) while a PNG's is on the CPU, and
    one batch can hold both. A batch wholly on the CPU (CPU decoding, or crops a worker handed to
    the model process) is stacked there and copied over once, not one small copy per image.

    For a GPU it is stacked straight into pinned memory: a copy from pageable memory makes the CPU
    wait until every kernel already queued on the stream has run, which would undo the model
    process's pipeline (launching batch n+1 while batch n computes). PyTorch's pinned-memory
    cache keeps the buffer until its copy has completed."""
    if all(crop.device.type == "cpu" for crop in crops):
        if device.type != "cuda":
            return torch.stack(crops).to(device)
        staged = torch.empty((len(crops), *crops[0].shape), dtype=crops[0].dtype, pin_memory=True)
        return torch.stack(crops, out=staged).to(device, non_blocking=True)
    return torch.stack([crop.to(device, non_blocking=True) for crop in crops])


class ModelRunner:
    """Callable batch function over one loaded bundle; not thread-safe, run it in one thread.

    With ``padded_sizes`` (see :func:`padded_batch_sizes`), each batch is padded with blank images
    to the smallest of those sizes that holds it (a larger batch runs as it is), and the padding's
    rows are dropped from the answer; without, the model runs at whatever size the batch loop formed
    (right on a CPU, where a new shape costs little and padding would cost compute). With
    ``cuda_graphs`` as well, :meth:`warm_up` records the forward pass at each padded size as a
    CUDA graph, which every batch then replays (``models.network.graphs``). With ``tuning``,
    :meth:`warm_up` also times each of its sizes, and :meth:`batch_limit` caps batches at the
    fastest per image (``service.runtime.batch_loop.tuning``)."""

    def __init__(
        self,
        bundle: Bundle,
        padded_sizes: list[int] | None = None,
        cuda_graphs: bool = False,
        tuning: BatchSizeTuning | None = None,
    ):
        self._bundle = bundle
        self._class_names = bundle.manifest.class_names
        self._padded_sizes = sorted(padded_sizes or [])
        self._cuda_graphs = cuda_graphs and bool(self._padded_sizes)
        self._tuning = tuning

    @classmethod
    def for_device(
        cls, bundle: Bundle, max_batch_size: int, cuda_graphs: bool = True, tune: bool = False
    ) -> ModelRunner:
        """The runner for ``bundle`` on its device: padded batches on a GPU (replayed from CUDA
        graphs unless ``cuda_graphs`` is false), as they come elsewhere; with ``tune``, each
        padded size (on any device) timed at warm-up."""
        tuning = BatchSizeTuning(padded_batch_sizes(max_batch_size)) if tune else None
        if bundle.device.type != "cuda":
            return cls(bundle, tuning=tuning)
        return cls(bundle, padded_batch_sizes(max_batch_size), cuda_graphs, tuning)

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    def __call__(self, jobs: list[ImageJob]) -> list[ImageVerdict]:
        """Verdicts for ``jobs`` (decoded crops) as one batch, in this thread: what the batch loop
        does in two steps (:meth:`start`, then :meth:`judge`), for callers that need no pipeline."""
        crops = [job.pixels for job in jobs]
        if not all(isinstance(crop, Tensor) for crop in crops):
            raise TypeError("a runner takes decoded crops; JPEG bytes are for the model process to decode")
        pending = self.start(stack_on(self._bundle.device, cast(list[Tensor], crops)))
        return self.judge(pending, [job.operating_point for job in jobs], [job.top_k for job in jobs])

    def start(self, pixels: Tensor) -> PendingLogits:
        """Launch the model on a stacked uint8 batch without waiting for it (``Bundle.start``);
        :meth:`judge` gives its verdicts. The padding's rows come last."""
        return self._bundle.start(self._padded(pixels.to(self._bundle.device, non_blocking=True)))

    def judge(
        self, pending: PendingLogits, points: Sequence[OperatingPoint], top_ks: Sequence[int]
    ) -> list[ImageVerdict]:
        """The verdicts of the batch :meth:`start` launched, row ``i`` judged at ``points[i]`` with
        ``top_ks[i]`` classes: one per image given to :meth:`start` (the padding has none)."""
        predictions = self._bundle.finish(pending)
        rows = len(points)
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
        """The batch sizes :meth:`warm_up` runs: each padded size and each size to time, or one image."""
        timed = self._tuning.sizes if self._tuning is not None else []
        return sorted(set(self._padded_sizes) | set(timed)) or [1]

    def batch_limit(self, configured: int) -> int:
        """The most images a batch should hold: ``configured``, or less where the warm-up timed a
        smaller batch size that gives more images per second."""
        return configured if self._tuning is None else self._tuning.limit(configured)

    def warm_up(self, sizes: Sequence[int] | None = None) -> None:
        """Throw-away batches of ``sizes`` (default :attr:`warm_up_sizes`), so that no request pays
        for lazy initialisation or a first shape; a model whose outputs are NaN or infinite on a
        blank image is refused here (:class:`BundleError`), before it serves. A size to time is then
        timed (:class:`~service.runtime.batch_loop.tuning.BatchSizeTuning`); the table is logged once complete.

        Run it in the thread that will serve: PyTorch caches cuDNN's execution plans per thread,
        so after a warm-up in another thread the serving thread built each plan again on its
        first batch of each size (2 to 3 s per size for MobileNetV2 on an H200, measured)."""
        size = self._bundle.manifest.preprocessing.input_size
        bundle, tuning = self._bundle, self._tuning
        for rows in self.warm_up_sizes if sizes is None else sizes:
            if self._cuda_graphs:
                self._capture_graph(rows)
            blank = torch.zeros(rows, 3, size, size, dtype=torch.uint8)
            predictions = bundle.predict(blank)
            if not (predictions.logits.isfinite().all() and predictions.scores.isfinite().all()):
                raise BundleError(
                    f"model {bundle.name}:{bundle.version} ({bundle.path}) gives non-finite logits or OOD scores "
                    "(NaN or infinity) on a blank image; its weights are unusable"
                )
            if tuning is not None and rows in tuning.sizes:
                tuning.time(rows, partial(bundle.predict, blank))
                if tuning.complete:
                    tuning.log(logger, f"{bundle.name}:{bundle.version}")

    def _capture_graph(self, rows: int) -> None:
        """Record batches of ``rows`` as a CUDA graph; if the GPU refuses, they run eagerly."""
        try:
            self._bundle.capture_graph(rows)
        except RuntimeError:
            logger.warning(
                "could not record %s:%s at batch size %d as a CUDA graph; it runs eagerly",
                self._bundle.name, self._bundle.version, rows, exc_info=True,
            )


def run_crops(bundle: Bundle, run: Run, device: torch.device) -> list[Tensor | None]:
    """A run's images as the model's uint8 crops, in its verdicts' order: the worker's crops as
    they came (views of its one array), then its JPEGs, decoded in one call and resized on
    ``device``; ``None`` for a JPEG the decoder refused."""
    decoded = decode_plain_jpegs(run.jpegs, device) if run.jpegs else []
    jpegs = [None if pixels is None else _crop(bundle, pixels) for pixels in decoded]
    return [*torch.from_numpy(run.crops).unbind(0), *jpegs]


def _crop(bundle: Bundle, pixels: Tensor) -> Tensor | None:
    """A decoded JPEG as the model's crop; ``None`` if that fails, so that one odd file fails its
    own request (the worker retries it on the CPU) and not a batch of every worker's."""
    try:
        return bundle.pixels(pixels)
    except Exception:
        logger.exception("batch loop could not crop a decoded JPEG of shape %s", tuple(pixels.shape))
        return None
