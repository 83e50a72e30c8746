"""Service configuration: one pydantic-settings class, read from ``MIXOE_*`` environment variables.

Everything a deployment tunes lives here, validated once at start-up, so that a typo or an
impossible combination (a queue smaller than one request) stops the process with a clear message
instead of surfacing as odd behaviour under load.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import models
from models.contract.trust import load_public_keys
from models.network.images import MAX_IMAGE_PIXELS

EMBEDDED_REPOSITORY = Path(models.__file__).resolve().parent / "repository"
"""The model repository shipped inside the ``models`` package (``models/repository``)."""

_ENV_PREFIX = "MIXOE_"
_MODEL_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*(@sha256:[0-9a-f]{64})?)?$")
_PIN = "@sha256:"
_MIB = 1024 * 1024


def is_setting_variable(name: str) -> bool:
    """Whether environment variable ``name`` sets a ``Settings`` field: pydantic-settings reads
    ``MIXOE_*`` names case-blind, so ``mixoe_workers`` counts too."""
    return name.upper().startswith(_ENV_PREFIX)


def split_pin(reference: str) -> tuple[str, str | None]:
    """``"name:version@sha256:<hex>" -> ("name:version", "<hex>")``; an unpinned reference has ``None``."""
    bare, _, digest = reference.partition(_PIN)
    return bare, digest or None


def _split_list(value: object) -> object:
    """Environment variables hold lists as comma-separated text: ``a,b:2``."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """How the service loads models, batches work, limits uploads and authenticates callers."""

    model_config = SettingsConfigDict(env_prefix=_ENV_PREFIX, protected_namespaces=(), extra="forbid")

    model_repository: Path = Field(EMBEDDED_REPOSITORY, description="Directory of <name>/<version>/ bundles.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Bundles to load, "name" (its latest version) or "name:version"; empty: every '
        'bundle\'s latest version. "name:version@sha256:<hex>" pins the sha256 of that bundle\'s manifest.json: '
        "any other manifest (and so any other weights) is refused at load (docs/security.md).",
    )
    trusted_keys: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Ed25519 public key files (PEM or 32 raw bytes); when set, every bundle must carry a "
        "manifest.sig by one of them (mixoe export --sign) or it is refused at load (docs/security.md).",
    )
    default_model: str | None = Field(
        None,
        description="Model used when a request names none; default: the first name in models (at that name's "
        "default version), else the first name in the repository.",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = cuda when available.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes sharing the device, each with its own event loop (and, without a model "
        "process, its own batch loop and copy of the models); more than one when one Python process cannot keep a GPU "
        "busy.",
    )
    model_process: Literal["auto"] | bool = Field(
        "auto",
        description="Hold the models in one more process, the one batching point for every worker: one copy of "
        "the weights on the device and larger batches. Workers then check and decode on the CPU and send it each "
        "request's images at once, every request in flight. "
        "auto: on when several workers share a CUDA device (on an H200, 8 workers served 2.6 times as many images per "
        "second with it as with a model each; see benchmarks/RESULTS.md). Worth turning on for a small CPU too: with "
        "one worker on 2 cores it served MobileNetV2 1.1-1.8 times the images per second of one process.",
    )
    worker_timeout_s: int = Field(
        30,
        ge=1,
        description="Under the supervisor (several workers, or a model process): a worker not serving this long after "
        "it was started (at start, replacing one that died, or in a SIGHUP roll-over) has failed to start and is "
        "killed. A worker that dies is noticed at once and replaced.",
    )
    model_process_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="The deadline of each request's images at the batch loop, in the server or in the model "
        "process (past it the request gets 504 and the worker reports not ready until the loop answers again); with "
        "a model process also how long it may fail to answer a heartbeat before the service stops with exit status 1 "
        "for the orchestrator to restart it (a hang is noticed within this plus 1 s). Must exceed the longest wait "
        "for a batch, and a warm-up batch.",
    )

    max_batch_size: int = Field(32, ge=1, le=4096, description="Most images per model batch.")
    batch_size_tuning: bool = Field(
        True,
        description="At start, time each model at batch sizes 1, 2, 4, ... up to max_batch_size (three runs "
        "each, the fastest) and never form a batch larger than the size with the most images per second on this "
        "device, which on a CPU can be far below max_batch_size (service/runtime/batch_loop/tuning.py); false: batches of up "
        "to max_batch_size.",
    )
    max_batch_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="How long the batch loop, when no batch is running, waits for more images to fill one "
        "(a running batch is never held up).",
    )
    model_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="PyTorch intra-op threads the batch loop runs the model on when the device is a CPU (unset: "
        "PyTorch's own count, one per core; leave it unset rather than naming that count, which ran slower). The "
        "forward pass shares the cores with decoding and HTTP: when they, not the model, limit the service, fewer "
        "threads leave them the cores. On 2 cores with a model process, 1 instead of unset served a small model "
        "1.4-1.7 times the images per second at 0.52-0.67 times the CPU per image (most runs), but MobileNetV2 "
        "0.63-1.01 times the images (benchmarks/RESULTS.md, \"The model's threads\").",
    )
    queue_size: int = Field(
        1024,
        ge=1,
        description="Images a worker holds waiting, beyond one full batch: a request that would exceed that gets "
        "503 + Retry-After before its body is read (service/api/admission.py).",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503 answers.")
    decode_workers: int = Field(
        default_factory=lambda: min(8, os.cpu_count() or 1),
        ge=1,
        description="Threads decoding images (default: the CPU count, at most 8).",
    )
    gpu_jpeg_decode: bool = Field(
        False,
        description="When the model runs on CUDA, decode plain JPEGs with nvjpeg and resize them on the GPU, "
        "saving CPU time; off by default because nvjpeg's pixels differ from the calibration pipeline's (on an "
        "H200 3 of 400 Flowers images changed class) while the throughput was the same (benchmarks/RESULTS.md).",
    )
    cuda_graphs: bool = Field(
        True,
        description="When the model runs on CUDA, record its forward pass at each padded batch size as a CUDA "
        "graph at start and replay it: the same kernels, without the CPU launching them one by one.",
    )

    max_upload_bytes: int = Field(20 * _MIB, ge=1, description="Largest accepted image file.")
    max_request_bytes: int = Field(100 * _MIB, ge=1, description="Largest accepted request body.")
    max_files: int = Field(64, ge=1, le=1000, description="Most images in one request.")
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, description="Most pixels (width x height) in one image; training applies the default."
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="When set, /predict, /v2/models/*/infer and /v2/models/*/drift/reset need X-API-Key or "
        "Authorization: Bearer. "
        "Prefer the environment: command-line arguments are visible to other users.",
    )

    drift_alarm: bool = Field(
        True,
        description="Watch every model version's OOD scores with a conformal test martingale and raise "
        "mixoe_drift_alarm when they stop looking like the calibration data (docs/drift.md).",
    )
    drift_delta: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Drift alarm's false-alarm budget: while images stay exchangeable with the calibration data, "
        "the chance of ever raising the alarm before a reset or restart is at most this, split evenly between "
        "the workers (docs/drift.md).",
    )

    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection is closed when the headers of its next request have not all arrived this long "
        "after it opened or after its previous answer: slow or silent clients (service/api/connections.py).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request whose body has not all arrived this long after its headers gets 408 and its "
        "connection is closed; an admitted request holds its admission places meanwhile.",
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="Open connections per worker; one more is answered 503 and closed before a byte of it is read.",
    )

    host: str = Field("127.0.0.1", description="Listen address; containers set 0.0.0.0.")
    port: int = Field(8000, ge=0, le=65535, description="Listen port (0: any free port).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Least severe log level written (JSON lines on stderr)."
    )
    shutdown_timeout_s: float = Field(30.0, gt=0, description="How long SIGTERM waits for queued work.")

    _split_lists = field_validator("models", "api_keys", "trusted_keys", mode="before")(_split_list)

    @field_validator("models")
    @classmethod
    def _references(cls, references: list[str]) -> list[str]:
        bad = [reference for reference in references if not _MODEL_REFERENCE.match(reference)]
        if bad:
            raise ValueError(
                f'model references must look like "name", "name:version" or "name:version@sha256:<64 hex digits>", '
                f"got {bad}"
            )
        return references

    @field_validator("trusted_keys")
    @classmethod
    def _readable_keys(cls, paths: list[Path]) -> list[Path]:
        load_public_keys(paths)  # a bad key stops the start, naming the file
        return paths

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.queue_size < self.max_files:
            raise ValueError(
                f"queue_size ({self.queue_size}) must hold at least one full request (max_files={self.max_files})"
            )
        pinned = [reference for reference in self.models if split_pin(reference)[1]]
        if pinned and len(pinned) < len(self.models) and not self.trusted_keys:
            raise ValueError(
                f"models pins {pinned} but not every entry: pin them all, or set trusted_keys to verify the others"
            )
        if self.max_request_bytes < self.max_upload_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) is below max_upload_bytes ({self.max_upload_bytes})"
            )
        return self

    @property
    def uses_model_process(self) -> bool:
        """``model_process``, or for ``auto``, whether several workers share a CUDA device."""
        if isinstance(self.model_process, bool):
            return self.model_process
        on_cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        return self.workers > 1 and on_cuda

    @property
    def pinned_digests(self) -> dict[tuple[str, str], str]:
        """``(name, version) -> manifest sha256`` for each pinned entry of ``models``."""
        pins = {}
        for reference in self.models:
            bare, digest = split_pin(reference)
            if digest is not None:
                name, _, version = bare.partition(":")
                pins[(name, version)] = digest
        return pins

    @property
    def admission_capacity(self) -> int:
        """Images a worker holds at once (parsed, decoding, queued or in a batch): the queue and one batch."""
        return self.queue_size + self.max_batch_size

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0

    def environment(self) -> dict[str, str]:
        """``MIXOE_*`` variables from which ``Settings()`` reads these same settings back.

        Worker processes are started fresh (``python -m service --workers N``): this is how the
        values the parent parsed from flags and environment reach them."""
        values: dict[str, str] = {}
        for name, value in self:
            if value is None:
                continue
            if isinstance(value, list):
                text = ",".join(item.get_secret_value() if isinstance(item, SecretStr) else str(item) for item in value)
            elif isinstance(value, bool):
                text = str(value).lower()
            else:
                text = str(value)
            values[f"{_ENV_PREFIX}{name.upper()}"] = text
        return values
