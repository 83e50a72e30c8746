"""A tiny bundle whose thresholds separate known images, and the request builders the service tests share.

The network is an untrained ResNet-18 (fixed seed, 32 px input): its OOD scores on three solid
colour images are distinct, and the operating points are placed *between* those scores, so every
test knows which image each operating point accepts:

* ``accepted``   - score below every threshold: accepted at 0.9, 0.95 and 0.99;
* ``borderline`` - between the 0.9 and 0.95 thresholds: rejected at 0.9, accepted at 0.95 and 0.99;
* ``rejected``   - above every threshold: rejected everywhere.

The same holds for a feature-space score (``build_tiny_bundle(..., score="knn")``): its state is
fitted on the features of a few noise images, and the thresholds sit between the anchors' scores.

Risk levels (``Manifest.selective``) are placed the same way, between the anchors' max softmax
probabilities. For the msp bundle (score = 1 - probability, so ``accepted`` is the more confident):

* at max risk 0.05 (``STRICT_RISK``) ``accepted`` is ``accept``, ``borderline`` is ``uncertain``;
* at max risk 0.2 (``LENIENT_RISK``) both are ``accept``;
* ``rejected`` is ``reject`` at every operating point and risk level.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.http import InferInput

from models.contract.bundle import save_bundle
from models.contract.manifest import Calibration, Manifest, OperatingPoint, RiskLevel, ScoreSpec, SelectiveCalibration
from models.network.nets import Classifier, build_network
from models.network.preprocess import Preprocessing, preprocess_batch
from models.scoring.feature_scores import FitData
from models.scoring.scores import get_score

CLASS_NAMES = ["red", "green", "blue"]
PREPROCESSING = Preprocessing(input_size=32, resize=36)
TARGETS = (0.9, 0.95, 0.99)
N_CALIBRATION = 200
STRICT_RISK, LENIENT_RISK = 0.05, 0.2
T = TypeVar("T")
_ANCHOR_COLOURS = [(0, 255, 0), (0, 0, 255), (128, 128, 128)]


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


def noise_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@dataclass(frozen=True)
class TinyModel:
    """Where the tiny bundle lives and the PNG bytes of its three reference images, by role."""

    repository: Path
    path: Path
    images: dict[str, bytes]


def _calibration_scores(t90: float, t95: float, t99: float) -> np.ndarray:
    """200 sorted scores whose conformal thresholds at 0.9 / 0.95 / 0.99 are exactly t90 / t95 / t99."""
    # k = ceil(target * 201): 181, 191, 199 -> sorted indices 180, 190, 198.
    return np.interp(np.arange(N_CALIBRATION), [0, 180, 190, 198, 199], [t90 - 0.3, t90, t95, t99, t99 + 0.01])


def _fitted_state(network: Classifier, spec: ScoreSpec) -> dict[str, torch.Tensor]:
    """The score's state fitted on 12 noise images labelled round-robin ({} for a logit score)."""
    images = [noise_image(seed) for seed in range(100, 112)]
    with torch.inference_mode():
        _, features = network.forward_features(preprocess_batch(images, PREPROCESSING))
    labels = torch.arange(len(images)) % len(CLASS_NAMES)
    return get_score(spec.name).fit(FitData(features, labels, len(CLASS_NAMES)))


def _selective(confidence: dict[str, float], default_max_risk: float | None) -> SelectiveCalibration:
    """Risk levels whose confidence thresholds sit between the ``accepted`` and ``borderline``
    anchors' probabilities (strict) and below both (lenient); their counts certify them at delta 0.1."""
    low, high = sorted((confidence["accepted"], confidence["borderline"]))
    assert high - low > 1e-4, f"reference probabilities too close to separate: {confidence}"
    levels = [
        RiskLevel(max_risk=STRICT_RISK, confidence_threshold=(low + high) / 2, n_accepted=100, errors=1),
        RiskLevel(max_risk=LENIENT_RISK, confidence_threshold=low / 2, n_accepted=150, errors=20),
    ]
    return SelectiveCalibration(
        delta=0.1, n_calibration=N_CALIBRATION, risk_levels=levels, default_max_risk=default_max_risk
    )


def build_tiny_bundle(
    repository: Path, version: str = "1", seed: int = 0, score: str = "msp", default_max_risk: float | None = None
) -> TinyModel:
    """The tiny bundle, deploying ``score`` (any registered score; ``knn`` at k=3), with the risk
    levels of :func:`_selective` (``default_max_risk``: the one answers use unless asked)."""
    torch.manual_seed(seed)
    network = build_network("resnet18", len(CLASS_NAMES)).eval()
    anchors = [solid(colour) for colour in _ANCHOR_COLOURS]
    spec = ScoreSpec.default(score, k=3 if get_score(score).default_k is not None else None)
    state = _fitted_state(network, spec)
    with torch.inference_mode():
        logits, features = network.forward_features(preprocess_batch(anchors, PREPROCESSING))
        scores = get_score(score).apply(logits, features, state, spec.temperature, spec.k).double().tolist()
        probabilities = logits.softmax(dim=1).amax(dim=1).tolist()
    order = np.argsort(scores)
    low, middle, high = (scores[i] for i in order)
    assert middle - low > 1e-3 and high - middle > 1e-3, f"reference scores too close to separate: {scores}"
    t90, t95 = (low + middle) / 2, (middle + high) / 2
    t99 = (t95 + high) / 2
    calibration = _calibration_scores(t90, t95, t99)
    points = [OperatingPoint.calibrated(calibration, target) for target in TARGETS]
    assert [point.threshold for point in points] == [t90, t95, t99]
    manifest = Manifest(
        name="tiny",
        version=version,
        created_at="2024-01-01T00:00:00+00:00",
        architecture="resnet18",
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        preprocessing=PREPROCESSING,
        score=spec,
        calibration=Calibration(scores=calibration.tolist(), operating_points=points, default_target=0.95),
        selective=_selective(
            dict(zip(("accepted", "borderline"), (probabilities[i] for i in order[:2]), strict=True)), default_max_risk
        ),
    )
    path = save_bundle(repository / "tiny" / version, network, manifest, score_state=state or None)
    roles = dict(zip(("accepted", "borderline", "rejected"), (encode(anchors[i]) for i in order), strict=True))
    return TinyModel(repository, path, roles)


async def serve_in_process(app: FastAPI, scenario: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    """Run ``scenario`` against ``app`` in-process, with its lifespan (models, batch loop) running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await scenario(client)


def sample_value(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a /metrics exposition (0 when absent: an untouched labelled counter)."""
    wanted = labels or {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in wanted.items()):
                return sample.value
    return 0.0


def role_files(tiny: TinyModel, *roles: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart ``files`` of a /predict request carrying the reference images ``roles``, as ``<role>.png``."""
    return [("files", (f"{role}.png", tiny.images[role], "image/png")) for role in roles]


def infer_json(*images: bytes) -> dict[str, Any]:
    """An Open Inference Protocol JSON request body: ``images`` as one base64 BYTES tensor."""
    data = [base64.b64encode(image).decode() for image in images]
    return {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}]}


def triton_input(images: Sequence[bytes], binary: bool) -> InferInput:
    """The ``image`` tensor as ``tritonclient`` sends it: raw binary data, or base64 text (JSON carries no bytes)."""
    tensor = InferInput("image", [len(images)], "BYTES")
    elements = list(images) if binary else [base64.b64encode(image) for image in images]
    return tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)


class Recorder:
    """A BatchObserver that remembers what it was told."""

    def __init__(self) -> None:
        self.depth = 0
        self.batch_sizes: list[int] = []
        self.finished = 0

    def queue_changed(self, delta: int) -> None:
        self.depth += delta

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        assert all(wait >= 0 for wait in queue_waits)
        self.batch_sizes.append(len(queue_waits))

    def batch_finished(self, seconds: float) -> None:
        self.finished += 1
