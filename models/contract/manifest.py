"""The bundle's contract between training and serving: its file layout and manifest schema.

A bundle lives at ``<repository>/<name>/<version>/`` and holds ``weights.safetensors`` (never a
pickle: loading one runs code), ``manifest.json`` (this module's :class:`Manifest`), for a
feature-space score ``score_state.safetensors`` (its fitted state, e.g. the KNN bank of training
features; hash in the manifest) and optionally ``report.md`` and plots. Training writes it and the
service reads it through :mod:`models.contract.bundle`; :mod:`models.contract.index` lists a repository of them and
:mod:`models.runtime` runs one on a device. This module imports none of them, so both sides share
the schema without pulling in the other's machinery.

Scores follow :mod:`models.scoring.scores` (higher = more OOD): an input is accepted when its score is at
most the operating point's conformal threshold (:mod:`models.calibration.conformal`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.calibration.conformal import conformal_threshold
from models.calibration.selective import binomial_cdf
from models.network.nets import Precision, get_architecture
from models.network.preprocess import Preprocessing
from models.scoring.scores import get_score

# Schema 2 added ScoreSpec.k and Manifest.score_state_sha256 (feature-space scores); schema 3
# added Manifest.selective (risk-controlled confidence thresholds). Each has a default that
# describes an older bundle, so those still load.
SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS = (1, 2, SCHEMA_VERSION)
WEIGHTS_FILE = "weights.safetensors"
SCORE_STATE_FILE = "score_state.safetensors"
MANIFEST_FILE = "manifest.json"

# Names and versions become directory names: no separators, no leading dot (temporary directories
# are hidden siblings, so they can never be mistaken for a version).
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


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


class RiskLevel(_Strict):
    """A confidence threshold certified for one maximum error rate (:mod:`models.calibration.selective`):
    among ID images with confidence >= ``confidence_threshold``, at most ``max_risk`` are
    misclassified, with probability >= 1 - delta over the calibration draw."""

    max_risk: float = Field(gt=0, lt=1)
    confidence_threshold: float = Field(ge=0, le=1)
    n_accepted: int = Field(ge=1, description="calibration images at or above the threshold")
    errors: int = Field(ge=0, description="misclassified calibration images among them")
    measured_coverage: float | None = Field(None, ge=0, le=1, description="share of ID test images accepted")
    measured_risk: float | None = Field(None, ge=0, le=1, description="error rate among the accepted ID test images")


class UnsupportedRisk(_Strict):
    """A requested maximum risk the calibration data could not certify, and why."""

    max_risk: float = Field(gt=0, lt=1)
    reason: str


class SelectiveCalibration(_Strict):
    """Risk-controlled abstention: confidence thresholds certified by Learn then Test on labelled
    ID calibration images. The confidence is the max softmax probability at temperature 1 (the
    ``probability`` an answer carries), whatever OOD score the bundle deploys."""

    confidence: Literal["max_softmax"] = "max_softmax"
    delta: float = Field(gt=0, lt=1, description="chance that a certified risk level does not hold")
    n_calibration: int = Field(ge=1)
    risk_levels: list[RiskLevel] = Field(default_factory=list)
    default_max_risk: float | None = None
    unsupported: list[UnsupportedRisk] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> SelectiveCalibration:
        risks = [level.max_risk for level in self.risk_levels]
        if len(set(risks)) != len(risks):
            raise ValueError(f"risk levels must be distinct, got {risks}")
        if self.default_max_risk is not None and self.default_max_risk not in risks:
            raise ValueError(f"default_max_risk {self.default_max_risk} is not one of the risk levels {risks}")
        for level in self.risk_levels:
            if not level.errors <= level.n_accepted <= self.n_calibration:
                raise ValueError(
                    f"risk level {level.max_risk}: need errors <= n_accepted <= n_calibration, got "
                    f"{level.errors}, {level.n_accepted}, {self.n_calibration}"
                )
            if binomial_cdf(level.errors, level.n_accepted, level.max_risk) > self.delta:
                raise ValueError(
                    f"risk level {level.max_risk}: {level.errors} errors in {level.n_accepted} images do not "
                    f"certify it at delta {self.delta}"
                )
        return self

    def level(self, max_risk: float) -> RiskLevel | None:
        """The risk level calibrated for ``max_risk`` (to 1e-9), or ``None``."""
        return next((level for level in self.risk_levels if abs(level.max_risk - max_risk) <= 1e-9), None)


class Manifest(_Strict):
    """Everything needed to rebuild, run and trust a model, stored as ``manifest.json``."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
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
    selective: SelectiveCalibration | None = Field(None, description="risk-controlled abstention; None before schema 3")

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
        if self.selective is not None and self.schema_version < 3:
            raise ValueError(f"selective needs schema_version 3 or later, got {self.schema_version}")
        return self
