"""The request path ``/predict`` and ``/v2/models/{name}/infer`` share: check, decode, batch, count.

Cheap checks run first (file count, operating point, top-k), then the request holds a place for
each image in its worker's admission (``service.api.admission``: 503 when they do not fit, before
anything is decoded), then every file is decoded and
preprocessed in the decoding thread pool (PIL and torchvision release the GIL; the event loop
never decodes): plain JPEGs by torchvision, on the model's GPU when it has one (``service.runtime.jpeg``),
everything else by PIL. With a model process on a GPU, plain JPEGs pass the checks only and go to
it undecoded; the few its decoder refuses come back and are decoded here, once, by PIL alone.
Then the images go to the batch loop (``service.runtime.hosted``). A request with one bad file fails as a whole with a 4xx naming that
file: a client sending a batch gets all verdicts or a precise reason, never a partial answer to
reconcile.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import cast

import torch
from PIL import Image
from torch import Tensor

from models.runtime import Bundle
from service.api.admission import Ticket
from service.api.errors import ErrorCode, InvalidInput, InvalidParameter, ModelFailure, PayloadTooLarge
from service.monitoring.drift import DriftAlarms
from service.monitoring.metrics import ServiceMetrics
from service.runtime.decoding import load_image, open_image
from service.runtime.verdicts import ImageJob, ImageVerdict
from service.runtime.jpeg import decode_plain_jpeg, is_plain_jpeg
from service.runtime.registry import LoadedModel
from service.settings import Settings

DEFAULT_TOP_K = 5

logger = logging.getLogger("mixoe.predictor")


class Jpeg(Enum):
    """What :func:`prepare_image` does with a plain JPEG (``service.runtime.jpeg``)."""

    DECODE = "decode"
    """torchvision's decoder (on the model's GPU when allowed), PIL where it refuses the file."""
    SEND = "send"
    """Nothing: its bytes go to the model process, whose GPU decodes them."""
    PIL = "pil"
    """PIL alone: the model process's decoder refused the file; PIL, the reference decoder,
    decodes it or words the client's error."""


@dataclass(frozen=True)
class Upload:
    """One image file as received: the name the client gave it and its bytes."""

    filename: str
    data: bytes


class Predictor:
    """Turns uploads into verdicts for one request, recording the prediction metrics."""

    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, decode_pool: Executor, drift: DriftAlarms | None = None
    ):
        self._settings = settings
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._drift = drift

    async def predict(
        self,
        model: LoadedModel,
        uploads: Sequence[Upload],
        *,
        operating_point: float | None,
        top_k: int | None,
        ticket: Ticket,
        max_risk: float | None = None,
    ) -> list[ImageVerdict]:
        """Verdicts for ``uploads``, in order, judged at risk level ``max_risk`` (``None``: the
        model's default, if any); ``ticket`` (the request's admission) holds every image before any
        is decoded."""
        if not uploads:
            raise InvalidInput(ErrorCode.NO_FILES, "the request holds no images")
        if len(uploads) > self._settings.max_files:
            raise PayloadTooLarge(
                ErrorCode.TOO_MANY_FILES,
                f"{len(uploads)} images in one request; the limit is {self._settings.max_files}",
            )
        point = model.operating_point(operating_point)
        risk = model.risk_level(max_risk)
        k = resolve_top_k(top_k, len(model.class_names))
        ticket.hold(len(uploads))
        images = await self._prepare(model, uploads, Jpeg.SEND if model.sends_jpeg else Jpeg.DECODE)
        verdicts = await model.queue.submit([ImageJob(image, point, k) for image in images])
        refused = [row for row, verdict in enumerate(verdicts) if verdict is None]
        if refused:
            # The model process's JPEG decoder refused these files: PIL decodes them here, and their
            # crops (never the same bytes again) go to the model.
            crops = await self._prepare(model, [uploads[row] for row in refused], Jpeg.PIL)
            again = await model.queue.submit([ImageJob(crop, point, k) for crop in crops])
            for row, verdict in zip(refused, again, strict=True):
                verdicts[row] = verdict
        decided = [verdict.at_risk(risk) for verdict in cast(list[ImageVerdict], verdicts)]
        _check_finite(model, uploads, decided)
        for verdict in decided:
            self._metrics.record_prediction(
                model.name, model.version, verdict.target_id_acceptance, verdict.score, verdict.decision
            )
        if self._drift is not None:
            self._drift.observe(model.name, model.version, [verdict.score for verdict in decided])
        return decided

    async def _prepare(self, model: LoadedModel, uploads: Sequence[Upload], jpeg: Jpeg) -> list[Tensor | bytes]:
        """Every upload through :func:`prepare_image` in the decoding pool; the first bad file, in
        upload order, fails the request."""
        loop = asyncio.get_running_loop()
        prepare = partial(prepare_image, bundle=model.bundle, settings=self._settings, jpeg=jpeg)
        outcomes = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, prepare, upload) for upload in uploads), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return cast(list[Tensor | bytes], outcomes)


def _check_finite(model: LoadedModel, uploads: Sequence[Upload], verdicts: Sequence[ImageVerdict]) -> None:
    """A 500 naming the model when it answered NaN or infinity for an image (JSON cannot carry them)."""
    for upload, verdict in zip(uploads, verdicts, strict=True):
        if not verdict.finite:
            logger.error("model %s:%s gave non-finite outputs for an image", model.name, model.version)
            raise ModelFailure(
                ErrorCode.NON_FINITE_OUTPUT,
                f"model {model.name}:{model.version} produced NaN or infinity for {upload.filename!r}",
                file=upload.filename,
            )


def prepare_image(upload: Upload, bundle: Bundle, settings: Settings, jpeg: Jpeg = Jpeg.DECODE) -> Tensor | bytes:
    """Bytes -> the uint8 (3, S, S) crop the model was calibrated on; runs in the decoding pool.

    Normalisation happens batched on the model's device (:meth:`Bundle.predict`). A plain JPEG
    is decoded as ``jpeg`` says; with :attr:`Jpeg.SEND` it passes every check here and stays
    undecoded, for the model process's GPU (``service.runtime.batch_loop.model_process``)."""
    image = open_image(
        upload.data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels, filename=upload.filename
    )
    _check_resizable(image, bundle.manifest.preprocessing.resize, settings.max_image_pixels, upload.filename)
    if jpeg is not Jpeg.PIL and is_plain_jpeg(image):
        if jpeg is Jpeg.SEND:
            return upload.data
        on_gpu = bundle.device.type == "cuda" and settings.gpu_jpeg_decode
        pixels = decode_plain_jpeg(upload.data, bundle.device if on_gpu else torch.device("cpu"))
        if pixels is not None:
            return bundle.pixels(pixels)
    return bundle.pixels(load_image(image, upload.filename))


def _check_resizable(image: Image.Image, resize: int, max_pixels: int, filename: str) -> None:
    """Preprocessing scales the shorter side to ``resize``: a 1 x 40000 strip passes the pixel limit
    but would become a 256 x 10 million intermediate. Bound that size as well."""
    short, long = sorted(image.size)
    if resize * math.ceil(long * resize / short) > max_pixels:
        raise PayloadTooLarge(
            ErrorCode.TOO_MANY_PIXELS,
            f"{filename!r} is {image.width}x{image.height}: too elongated to resize its shorter side to "
            f"{resize} within {max_pixels} pixels",
            file=filename,
        )


def resolve_top_k(top_k: int | None, num_classes: int) -> int:
    """``None`` means ``min(5, K)``; anything outside ``1..K`` is a 422 saying the valid range."""
    if top_k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if not 1 <= top_k <= num_classes:
        raise InvalidParameter(ErrorCode.INVALID_TOP_K, f"top_k must lie between 1 and {num_classes}, got {top_k}")
    return top_k
