"""Save and load a deployable bundle: the contract between training and serving.

A bundle lives at ``<repository>/<name>/<version>/`` and holds ``weights.safetensors`` (never a
pickle: loading one runs code), ``manifest.json`` (this module's :class:`Manifest`), for a
feature-space score ``score_state.safetensors`` (its fitted state, e.g. the KNN bank of training
features; hash in the manifest) and optionally ``report.md`` and plots. Training writes it with :func:`save_bundle`; the service reads it with
:func:`load_bundle`, which checks the schema version, the manifest, the weights' sha256 and the
state-dict keys before returning anything, so a bundle either loads whole or not at all; and, as
:mod:`models.trust` says, that the bundle stays inside its folder, names it, and (when asked) is
signed by a trusted key or matches a pinned digest.

Scores follow :mod:`models.scores` (higher = more OOD): an input is accepted when its score is at
most the operating point's conformal threshold, and its p-value comes from the same calibration
scores (:mod:`models.conformal`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.conformal import conformal_p_values, conformal_threshold
from models.graphs import GraphedForward
from models.nets import Classifier, Precision, build_network, device_logits, device_outputs, get_architecture
from models.preprocess import EvalGeometry, Normalization, Preprocessing, preprocess_batch
from models.scores import get_score
from models.trust import SIGNATURE_FILE, BundleTrust, TrustError, check_contained, check_identity

# Schema 2 added ScoreSpec.k and Manifest.score_state_sha256 (feature-space scores); both have
# defaults that describe a schema-1 bundle, so those still load.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, SCHEMA_VERSION)
WEIGHTS_FILE = "weights.safetensors"
SCORE_STATE_FILE = "score_state.safetensors"
MANIFEST_FILE = "manifest.json"

# Names and versions become directory names: no separators, no leading dot (temporary directories
# are hidden siblings, so they can never be mistaken for a version).
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class BundleError(Exception):
    """Any problem loading/saving a bundle; the message names the problem and the path."""


class _Strict(BaseModel):
    """Unknown keys and non-finite floats are errors: a typo must not silently become a default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ScoreSpec(_Strict):
    """Which OOD score the thresholds were calibrated on, at what temperature (logit scores) and
    with how many neighbours ``k`` (``knn`` only)."""

    name: str
    temperature: float = Field(gt=0)
    k: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _known_score(cls, name: str) -> str:
        get_score(name)  # raises, listing the supported scores
        return name

    @model_validator(mode="after")
    def _k_where_used(self) -> ScoreSpec:
        takes_k = get_score(self.name).default_k is not None
        if takes_k and self.k is None:
            raise ValueError(f"score {self.name!r} needs k (neighbour count)")
        if not takes_k and self.k is not None:
            raise ValueError(f"score {self.name!r} takes no k")
        return self

    @classmethod
    def default(cls, name: str, k: int | None = None) -> ScoreSpec:
        """``name`` at its default temperature, and for a score that takes one, ``k`` (default its own)."""
        score = get_score(name)
        if score.default_k is None:
            return cls(name=name, temperature=score.default_temperature, k=k)
        return cls(name=name, temperature=score.default_temperature, k=score.default_k if k is None else k)


class OperatingPoint(_Strict):
    """A conformal threshold for one target ID acceptance, with what it measured on test data."""

    target_id_acceptance: float = Field(gt=0, lt=1)
    threshold: float
    k: int = Field(ge=1)
    n_calibration: int = Field(ge=1)
    measured_id_acceptance: float | None = Field(None, ge=0, le=1)
    ood_acceptance: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> OperatingPoint:
        if self.k > self.n_calibration:
            raise ValueError(f"k={self.k} exceeds n_calibration={self.n_calibration}")
        leaks = [name for name, rate in self.ood_acceptance.items() if not 0.0 <= rate <= 1.0]
        if leaks:
            raise ValueError(f"ood_acceptance must lie in [0, 1] for: {', '.join(leaks)}")
        return self

    @classmethod
    def calibrated(cls, sorted_scores: Sequence[float], target: float, **measured: Any) -> OperatingPoint:
        """The conformal operating point for ``target`` on ``sorted_scores``; ``measured`` adds
        ``measured_id_acceptance`` / ``ood_acceptance`` from test data."""
        found = conformal_threshold(sorted_scores, target)
        return cls(
            target_id_acceptance=target, threshold=found.threshold, k=found.k, n_calibration=found.n_calibration,
            **measured,
        )


class Calibration(_Strict):
    """Sorted ID calibration scores (for p-values) and the thresholds derived from them.

    Every operating point must be the k-th smallest of exactly these scores, so that the accept
    flag and the p-value of a request can never disagree about which data they came from.
    """

    scores: list[float] = Field(min_length=1)
    operating_points: list[OperatingPoint] = Field(min_length=1)
    default_target: float = 0.95

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        if any(a > b for a, b in zip(self.scores, self.scores[1:])):
            raise ValueError("calibration scores must be sorted in ascending order")
        targets = [point.target_id_acceptance for point in self.operating_points]
        if len(set(targets)) != len(targets):
            raise ValueError(f"operating point targets must be distinct, got {targets}")
        if self.default_target not in targets:
            raise ValueError(f"default_target {self.default_target} is not one of the operating points {targets}")
        n = len(self.scores)
        for point in self.operating_points:
            if point.n_calibration != n:
                raise ValueError(
                    f"operating point {point.target_id_acceptance} has n_calibration={point.n_calibration} "
                    f"but {n} calibration scores are stored"
                )
            if point.threshold != self.scores[point.k - 1]:
                raise ValueError(
                    f"operating point {point.target_id_acceptance}: threshold {point.threshold} is not "
                    f"the k={point.k}-th smallest calibration score {self.scores[point.k - 1]}"
                )
        return self


class Manifest(_Strict):
    """Everything needed to rebuild, run and trust a model, stored as ``manifest.json``."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(pattern=_VERSION_PATTERN)
    created_at: str
    architecture: str
    num_classes: int = Field(ge=1)
    class_names: list[str]
    preprocessing: Preprocessing
    score: ScoreSpec
    calibration: Calibration
    precision: Precision = Field("fp32", description="inference precision the thresholds were calibrated at")
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    data_fingerprints: dict[str, str] = Field(default_factory=dict)
    weights_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    score_state_sha256: str = Field(
        "", pattern=r"^([0-9a-f]{64})?$", description=f"sha256 of {SCORE_STATE_FILE}; empty for logit scores"
    )

    @field_validator("created_at")
    @classmethod
    def _iso_utc(cls, value: str) -> str:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"created_at {value!r} is not an ISO 8601 timestamp") from None
        if moment.utcoffset() != timedelta(0):
            raise ValueError(f"created_at {value!r} must be in UTC (offset +00:00 or Z)")
        return value

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        get_architecture(name)  # raises, listing the supported architectures
        return name

    @model_validator(mode="after")
    def _classes_match(self) -> Manifest:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} but {len(self.class_names)} class_names")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be distinct")
        return self


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
        # float32 once here (the values calibration computed with), not a cast of the bank per batch
        self._score_state = {key: value.to(device, torch.float32) for key, value in (score_state or {}).items()}
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
        which :meth:`predict` then replays for such batches (see ``models.graphs``)."""
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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large weights never sit in memory twice."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_bundle(
    directory: Path,
    model: torch.nn.Module,
    manifest: Manifest,
    extra_files: Mapping[str, Path] | None = None,
    signer: Callable[[bytes], bytes] | None = None,
    score_state: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write a bundle to ``directory`` (``<repository>/<name>/<version>``) atomically; return it.

    ``score_state`` is the fitted state of a feature-space score (``Score.fit``), required for
    such a score and refused for a logit score; it goes to ``score_state.safetensors``, stored
    exactly as given (the thresholds were calibrated on it), its sha256 into the manifest.

    Everything goes into a hidden temporary sibling first and is moved into place with one
    ``os.replace``, so readers never see a half-written bundle. ``extra_files`` maps file names in
    the bundle (``report.md``, plots) to the files to copy. ``signer`` (an Ed25519 private key's
    ``sign``) turns the manifest's bytes into ``manifest.sig`` (:mod:`models.trust`). The state dict is checked against
    ``build_network(architecture, num_classes)`` first: a bundle that cannot load is never written.
    """
    directory = Path(directory)
    if (directory.parent.name, directory.name) != (manifest.name, manifest.version):
        raise BundleError(
            f"bundle directory {directory} must end in <name>/<version> = {manifest.name}/{manifest.version}"
        )
    if directory.exists():
        raise BundleError(f"bundle {manifest.name}/{manifest.version} already exists at {directory}")
    extras = dict(extra_files or {})
    for file_name, source in extras.items():
        if file_name in (WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE, SCORE_STATE_FILE) or (
            Path(file_name).name != file_name or file_name.startswith(".")
        ):
            raise BundleError(f"extra file name {file_name!r} for {directory} must be a plain, non-reserved file name")
        if not Path(source).is_file():
            raise BundleError(f"extra file {source} for {directory} does not exist")
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    _load_strict(build_network(manifest.architecture, manifest.num_classes), state, manifest, directory)
    fitted = {key: tensor.detach().cpu().contiguous() for key, tensor in (score_state or {}).items()}
    _check_score_state(manifest, bool(fitted), directory)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        hashes = {"weights_sha256": sha256_file(staging / WEIGHTS_FILE), "score_state_sha256": ""}
        if fitted:
            save_file(fitted, str(staging / SCORE_STATE_FILE))
            hashes["score_state_sha256"] = sha256_file(staging / SCORE_STATE_FILE)
        final = manifest.model_copy(update=hashes)
        manifest_bytes = (final.model_dump_json(indent=2) + "\n").encode("utf-8")
        (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
        if signer is not None:
            (staging / SIGNATURE_FILE).write_bytes(signer(manifest_bytes))
        for file_name, source in extras.items():
            shutil.copyfile(source, staging / file_name)
        # mkdtemp creates 0700 and safetensors writes 0600; a bundle is meant to be read by the
        # serving user too (the container runs as a non-root user).
        staging.chmod(0o755)
        for written in staging.iterdir():
            written.chmod(0o644)
        if directory.exists():  # created by someone else while we were writing
            raise BundleError(f"bundle {manifest.name}/{manifest.version} already exists at {directory}")
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_bundle(path: Path, device: str | torch.device = "cpu", trust: BundleTrust | None = None) -> Bundle:
    """Load and verify the bundle at ``path``; any problem raises :class:`BundleError`.

    Checks, in order: the directory (no entry resolving outside it), ``manifest.json`` (present,
    signed or pinned as ``trust`` asks, JSON, known schema version, valid, naming its folders),
    ``weights.safetensors`` (present, sha256 as recorded), then the state dict against the
    architecture and class count, and for a feature-space score ``score_state.safetensors``
    (present, sha256 as recorded: a signed or pinned manifest covers it too). Nothing is returned
    unless every check passes.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    try:
        check_contained(path)
        manifest = _read_manifest(path, trust or BundleTrust())
        check_identity(path, manifest.name, manifest.version)
    except TrustError as error:
        raise BundleError(str(error)) from None
    if not manifest.weights_sha256:
        raise BundleError(f"manifest in {path} records no weights_sha256, so the weights cannot be verified")
    state = _read_verified(path / WEIGHTS_FILE, manifest.weights_sha256)
    model = build_network(manifest.architecture, manifest.num_classes)
    _load_strict(model, state, manifest, path)
    _check_score_state(manifest, bool(manifest.score_state_sha256), path)
    score_state = None
    if manifest.score_state_sha256:
        score_state = _read_verified(path / SCORE_STATE_FILE, manifest.score_state_sha256)
    return Bundle(path, manifest, model, torch.device(device), score_state)


def _read_verified(file: Path, recorded_sha256: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file whose sha256 is ``recorded_sha256``."""
    if not file.is_file():
        raise BundleError(f"{file.name} missing in bundle {file.parent}")
    digest = sha256_file(file)
    if digest != recorded_sha256:
        raise BundleError(
            f"sha256 mismatch for {file}: manifest records {recorded_sha256}, file has {digest} "
            "(corrupted or tampered with)"
        )
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise BundleError(f"cannot read {file}: {error}") from None


def _check_score_state(manifest: Manifest, has_state: bool, path: Path) -> None:
    """A feature-space score needs its fitted state; a logit score has none."""
    needs = get_score(manifest.score.name).needs_features
    if needs and not has_state:
        raise BundleError(f"score {manifest.score.name!r} of bundle {path} needs its fitted state ({SCORE_STATE_FILE})")
    if has_state and not needs:
        raise BundleError(f"score {manifest.score.name!r} of bundle {path} reads logits only but a fitted state was given")


def _read_manifest(path: Path, trust: BundleTrust) -> Manifest:
    """The manifest, parsed from the very bytes ``trust`` verified."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{MANIFEST_FILE} missing in bundle {path}")
    data = manifest_path.read_bytes()
    trust.verify(path, data)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object, got {type(raw).__name__}")
    schema_version = raw.get("schema_version")
    if schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        raise BundleError(
            f"{manifest_path} has unsupported schema_version {schema_version!r}; this code reads version(s) {supported}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        raise BundleError(f"invalid manifest {manifest_path}: {error}") from None


def _load_strict(model: Classifier, state: Mapping[str, Tensor], manifest: Manifest, path: Path) -> None:
    """Load ``state`` into ``model`` requiring exactly its keys and shapes."""
    head = state.get("head.weight")
    if head is not None and head.shape[0] != manifest.num_classes:
        raise BundleError(
            f"class count mismatch in {path}: the weights' head has {head.shape[0]} outputs "
            f"but the manifest declares num_classes={manifest.num_classes}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BundleError(
            f"weights in {path} do not fit architecture {manifest.architecture!r} "
            f"with {manifest.num_classes} classes: {error}"
        ) from None


def find_bundles(repository: Path) -> list[tuple[str, str, Path]]:
    """Every ``(name, version, path)`` under ``repository`` that has a manifest, by name then version.

    Versions compare naturally (``2 < 10``, ``1.9 < 1.10``); hidden temporary directories and
    entries whose names are not valid bundle names or versions are skipped.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise BundleError(f"model repository not found: {repository}")
    found = []
    for manifest_path in repository.glob(f"*/*/{MANIFEST_FILE}"):
        version_dir = manifest_path.parent
        name, version = version_dir.parent.name, version_dir.name
        if re.fullmatch(_NAME_PATTERN, name) and re.fullmatch(_VERSION_PATTERN, version):
            found.append((name, version, version_dir))
    return sorted(found, key=lambda entry: (entry[0], _version_key(entry[1])))


def latest_version(repository: Path, name: str) -> str:
    """The highest version of bundle ``name`` in ``repository``."""
    bundles = find_bundles(repository)
    versions = [version for bundle_name, version, _ in bundles if bundle_name == name]
    if not versions:
        names = sorted({bundle_name for bundle_name, _, _ in bundles})
        raise BundleError(
            f"no bundle named {name!r} in {repository}; available: {', '.join(names) if names else 'none'}"
        )
    return versions[-1]


def _version_key(version: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Natural sort key: digit runs compare as numbers, the raw string breaks ties (``2`` vs ``02``)."""
    parts = tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version))
    return parts, version
