"""Response bodies of the HTTP API, as pydantic models (they are also the OpenAPI documentation)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ClassProbability(BaseModel):
    label: str
    probability: float


class OODScore(BaseModel):
    name: str = Field(description="Score function (msp, maxlogit, energy, ...).")
    value: float = Field(description="Higher = more out-of-distribution; rejected when above the threshold.")


class ImagePrediction(BaseModel):
    """The verdict for one uploaded image."""

    filename: str
    label: str
    class_index: int
    probability: float = Field(description="Softmax probability of the predicted class.")
    top_k: list[ClassProbability]
    ood_score: OODScore
    threshold: float = Field(description="OOD-score threshold of the operating point used.")
    operating_point: float = Field(description="Target share of in-distribution images accepted, e.g. 0.95.")
    p_value: float = Field(description="Conformal p-value: share of calibration ID images at least as OOD-looking.")
    accepted: bool = Field(description="ood_score <= threshold: the image looks in-distribution.")
    decision: Literal["accept", "uncertain", "reject"] = Field(
        description="reject: OOD (not accepted); uncertain: looks in-distribution but its probability is below "
        "the risk level's confidence_threshold, so it is likely misclassified at max_risk; accept: otherwise. "
        "Without a risk level only accept or reject."
    )
    max_risk: float | None = Field(
        description="Risk level used: accepted answers are misclassified at most this often (docs/selective.md); "
        "null when none."
    )
    confidence_threshold: float | None = Field(
        description="Smallest probability accepted at max_risk; null when no risk level is used."
    )


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[ImagePrediction]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    versions: list[str]
    ready: bool


class ServerMetadata(BaseModel):
    """Open Inference Protocol server metadata."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OperatingPointInfo(BaseModel):
    target_id_acceptance: float
    threshold: float
    n_calibration: int


class RiskLevelInfo(BaseModel):
    max_risk: float
    confidence_threshold: float


class ModelParameters(BaseModel):
    """What a client needs beyond the tensors: classes, score convention, operating points, risk levels."""

    class_names: list[str]
    score: str
    default_operating_point: float
    operating_points: list[OperatingPointInfo]
    default_max_risk: float | None = Field(description="Risk level answers use unless a request sets max_risk.")
    risk_levels: list[RiskLevelInfo] = Field(description="Calibrated risk levels a request may pick as max_risk.")


class DriftStatus(BaseModel):
    """The drift alarm of one model version in the worker process that answered (docs/drift.md)."""

    log10_martingale: float = Field(description="log10 of the conformal test martingale since the last reset.")
    alarm: bool = Field(description="Whether the martingale has reached the alarm level since the last reset.")
    alarm_log10_level: float = Field(description="log10(workers / delta): the level that raises the alarm.")
    images: int = Field(description="Images this worker has bet on since the last reset.")
    delta: float = Field(description="Bound on the chance of any false alarm while inputs stay in distribution.")
    workers: int = Field(description="Worker processes, each with its own martingale and a share of delta.")


class ModelMetadata(BaseModel):
    """Open Inference Protocol model metadata (``parameters`` is this service's addition)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters
    drift: DriftStatus | None = Field(None, description="The drift alarm's state; null when it is switched off.")
