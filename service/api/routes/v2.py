"""Open Inference Protocol (KServe v2) routes: server and model metadata, model readiness, infer.

Health (``/v2/health/*``) lives in :mod:`service.api.routes.ops` with the other probe routes. Every
model route also exists under ``/versions/{version}``, as ``tritonclient`` calls it when given a
model version.
"""

from __future__ import annotations

import asyncio
from functools import partial
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from fastapi import APIRouter, Request, Response

from service.api.access import record_images
from service.api.deps import ContextDep
from service.api.errors import ERROR_RESPONSES, LOOKUP_RESPONSES, ErrorCode, InvalidInput
from service.api.limits import parse_byte_count
from service.api.oip import BINARY_EXTENSION, IMAGE_INPUT, OUTPUTS, encode_infer_response, parse_infer_request
from service.api.openapi import INFER_OK_RESPONSE, infer_openapi
from service.api.routes.admitted import AdmittedRoute, admission_ticket
from service.api.schemas import (
    ModelMetadata,
    ModelParameters,
    ModelReadiness,
    OperatingPointInfo,
    RiskLevelInfo,
    ServerMetadata,
    TensorMetadata,
)
from service.context import ServiceContext
from service.runtime.predictor import Upload
from service.runtime.registry import LoadedModel

SERVER_NAME = "mixoe-service"
HEADER_LENGTH = "Inference-Header-Content-Length"

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
infer_router = APIRouter(prefix="/v2", route_class=AdmittedRoute, tags=["open inference protocol"])


def _server_version() -> str:
    try:
        return package_version(SERVER_NAME)
    except PackageNotFoundError:
        return "unknown"


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=_server_version(), extensions=[BINARY_EXTENSION])


def _metadata(context: ServiceContext, name: str, version: str | None) -> ModelMetadata:
    loaded = context.registry.get_version(name, version)
    manifest = loaded.bundle.manifest
    calibration = manifest.calibration
    return ModelMetadata(
        name=loaded.name,
        versions=[version] if version else context.registry.versions(name),
        platform=f"pytorch_{manifest.architecture}",
        inputs=[TensorMetadata(name=IMAGE_INPUT, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=output, datatype=spec.datatype, shape=[-1]) for output, spec in OUTPUTS.items()],
        parameters=ModelParameters(
            class_names=manifest.class_names,
            score=manifest.score.name,
            default_operating_point=calibration.default_target,
            operating_points=[
                OperatingPointInfo(
                    target_id_acceptance=point.target_id_acceptance,
                    threshold=point.threshold,
                    n_calibration=point.n_calibration,
                )
                for point in calibration.operating_points
            ],
            default_max_risk=None if manifest.selective is None else manifest.selective.default_max_risk,
            risk_levels=[
                RiskLevelInfo(max_risk=level.max_risk, confidence_threshold=level.confidence_threshold)
                for level in (manifest.selective.risk_levels if manifest.selective is not None else [])
            ],
        ),
        drift=context.drift.status(loaded.name, loaded.version),
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=LOOKUP_RESPONSES)
async def model_metadata(context: ContextDep, name: str) -> ModelMetadata:
    return _metadata(context, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=LOOKUP_RESPONSES)
async def model_version_metadata(context: ContextDep, name: str, version: str) -> ModelMetadata:
    return _metadata(context, name, version)


def _readiness(context: ServiceContext, name: str, version: str | None) -> ModelReadiness:
    loaded = context.registry.get_version(name, version)
    return ModelReadiness(name=loaded.name, versions=[loaded.version], ready=loaded.queue.running)


@router.get("/models/{name}/ready", response_model=ModelReadiness, responses=LOOKUP_RESPONSES)
async def model_ready(context: ContextDep, name: str) -> ModelReadiness:
    return _readiness(context, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReadiness, responses=LOOKUP_RESPONSES)
async def model_version_ready(context: ContextDep, name: str, version: str) -> ModelReadiness:
    return _readiness(context, name, version)


async def _infer(request: Request, context: ServiceContext, loaded: LoadedModel) -> Response:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise InvalidInput(ErrorCode.INVALID_REQUEST, f"Content-Encoding {encoding!r} is not supported; send identity")
    header_text = request.headers.get(HEADER_LENGTH)
    header_length = None if header_text is None else parse_byte_count(header_text)
    if header_text is not None and header_length is None:
        raise InvalidInput(ErrorCode.INVALID_REQUEST, f"{HEADER_LENGTH} must be a byte count, got {header_text!r}")
    raw = await request.body()
    # Parsing the JSON and decoding base64 (up to max_request_bytes) is decoding work: off the event loop.
    call = await asyncio.get_running_loop().run_in_executor(
        context.decode_pool, partial(parse_infer_request, raw, header_length, max_images=context.settings.max_files)
    )
    record_images(request, len(call.images))
    uploads = [Upload(f"image[{index}]", data) for index, data in enumerate(call.images)]
    verdicts = await context.predictor.predict(
        loaded, uploads, operating_point=call.operating_point, top_k=1, ticket=admission_ticket(request),
        max_risk=call.max_risk,
    )
    point = loaded.operating_point(call.operating_point)
    risk = loaded.risk_level(call.max_risk)
    body, json_length = encode_infer_response(
        model_name=loaded.name,
        model_version=loaded.version,
        request_id=call.request_id,
        verdicts=verdicts,
        outputs=call.outputs,
        parameters={
            "operating_point": point.target_id_acceptance,
            "threshold": point.threshold,
            "score": loaded.bundle.manifest.score.name,
            **({} if risk is None else {"max_risk": risk.max_risk, "confidence_threshold": risk.confidence_threshold}),
        },
    )
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})


@infer_router.post(
    "/models/{name}/infer", responses=INFER_OK_RESPONSE | ERROR_RESPONSES, openapi_extra=infer_openapi(HEADER_LENGTH)
)
async def infer(request: Request, context: ContextDep, name: str) -> Response:
    """Classify a BYTES tensor of encoded images (JSON base64 or the binary tensor extension)."""
    return await _infer(request, context, context.registry.get_version(name, None))


@infer_router.post(
    "/models/{name}/versions/{version}/infer",
    responses=INFER_OK_RESPONSE | ERROR_RESPONSES,
    openapi_extra=infer_openapi(HEADER_LENGTH),
)
async def infer_version(request: Request, context: ContextDep, name: str, version: str) -> Response:
    return await _infer(request, context, context.registry.get_version(name, version))
