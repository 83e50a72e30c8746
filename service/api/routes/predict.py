"""``POST /predict``: the human-friendly multipart route (one or more files in the field ``files``).

``model``, ``top_k``, ``operating_point`` and ``max_risk`` may come as form fields or query
parameters (the form wins). If any file is bad the whole request fails with a 4xx whose ``file`` names it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from pydantic.json_schema import SkipJsonSchema

from service.api.access import record_images
from service.api.deps import ContextDep
from service.api.errors import ERROR_RESPONSES, ErrorCode, InvalidInput
from service.api.limits import ClientInt
from service.api.routes.admitted import AdmittedRoute, admission_ticket
from service.api.schemas import ClassProbability, ImagePrediction, OODScore, PredictResponse
from service.api.uploads import FILENAME_TOO_LONG, MAX_FILENAME_BYTES
from service.runtime.predictor import Upload

router = APIRouter(route_class=AdmittedRoute, tags=["predict"])

@router.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)
async def predict(
    request: Request,
    context: ContextDep,
    files: Annotated[
        list[UploadFile], File(min_length=1, description="One or more image files (JPEG, PNG, GIF, BMP, TIFF, WebP).")
    ],
    # Optional, not nullable: a form or query value is text, and the text "null" is no number.
    model_form: Annotated[str | SkipJsonSchema[None], Form(alias="model")] = None,
    top_k_form: Annotated[ClientInt | SkipJsonSchema[None], Form(alias="top_k")] = None,
    operating_point_form: Annotated[float | SkipJsonSchema[None], Form(alias="operating_point")] = None,
    max_risk_form: Annotated[float | SkipJsonSchema[None], Form(alias="max_risk")] = None,
    model: Annotated[
        str | SkipJsonSchema[None], Query(description='"name" or "name:version"; default: the default model.')
    ] = None,
    top_k: Annotated[
        ClientInt | SkipJsonSchema[None], Query(description="How many classes to list (1..K); default min(5, K).")
    ] = None,
    operating_point: Annotated[
        float | SkipJsonSchema[None], Query(description="Target ID acceptance, e.g. 0.95.")
    ] = None,
    max_risk: Annotated[
        float | SkipJsonSchema[None],
        Query(description="Calibrated risk level, e.g. 0.05 (see /v2/models/{name}); default: the model's, if any."),
    ] = None,
) -> PredictResponse:
    """Classify each image and accept it (in-distribution) or reject it (OOD score above the threshold);
    with a risk level, an accepted image whose probability is too low to keep that risk is ``uncertain``."""
    record_images(request, len(files))
    loaded = context.registry.get(model_form or model)
    limit = context.settings.max_upload_bytes
    # Reading one byte past the limit is enough for the decoder to refuse the file as too large.
    uploads = [
        Upload(_filename(file, index), await file.read(limit + 1)) for index, file in enumerate(files)
    ]
    verdicts = await context.predictor.predict(
        loaded,
        uploads,
        operating_point=operating_point_form if operating_point_form is not None else operating_point,
        top_k=top_k_form if top_k_form is not None else top_k,
        ticket=admission_ticket(request),
        max_risk=max_risk_form if max_risk_form is not None else max_risk,
    )
    score_name = loaded.bundle.manifest.score.name
    return PredictResponse(
        model=loaded.name,
        version=loaded.version,
        predictions=[
            ImagePrediction(
                filename=upload.filename,
                label=verdict.label,
                class_index=verdict.class_index,
                probability=verdict.probability,
                top_k=[ClassProbability(label=label, probability=p) for label, p in verdict.top_k],
                ood_score=OODScore(name=score_name, value=verdict.score),
                threshold=verdict.threshold,
                operating_point=verdict.target_id_acceptance,
                p_value=verdict.p_value,
                accepted=verdict.accepted,
                decision=verdict.decision,
                max_risk=verdict.max_risk,
                confidence_threshold=verdict.confidence_threshold,
            )
            for upload, verdict in zip(uploads, verdicts, strict=True)
        ],
    )


def _filename(file: UploadFile, index: int) -> str:
    """The name the client gave the file (``file[i]`` when none); a 400 when it is too long to echo."""
    if not file.filename:
        return f"file[{index}]"
    size = len(file.filename.encode())
    if size > MAX_FILENAME_BYTES:
        raise InvalidInput(ErrorCode.FILENAME_TOO_LONG, f"file[{index}]: {FILENAME_TOO_LONG} (it has {size})")
    return file.filename
