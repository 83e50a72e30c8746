"""Domain errors, mapped to HTTP in one place, with one JSON body shape for every failure.

Code below raises what went wrong (``InvalidInput``, ``Overloaded``...); only this module knows
which status code that is. Every error answer, ours or the framework's, has the body::

    {"error": "<human-readable message>", "code": "<stable machine code>", "file": "<name>" | null}

``error`` is a plain string because the Open Inference Protocol (and so ``tritonclient``) reads
``{"error": "<message>"}``; ``code`` is the stable key clients and dashboards switch on; ``file``
names the offending upload when there is one. No request ever receives a traceback.
"""

from __future__ import annotations

from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.uploads import FILENAME_TOO_LONG, is_header_too_long, parser_refusal


class ErrorCode(StrEnum):
    """Every ``code`` the service answers with; input-problem codes double as metric reasons."""

    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    FILE_TOO_LARGE = "file_too_large"
    TOO_MANY_FILES = "too_many_files"
    NO_FILES = "no_files"
    REQUEST_TOO_LARGE = "request_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    INVALID_TENSOR = "invalid_tensor"
    INVALID_BASE64 = "invalid_base64"
    INVALID_REQUEST = "invalid_request"
    INVALID_TOP_K = "invalid_top_k"
    UNKNOWN_OPERATING_POINT = "unknown_operating_point"
    UNKNOWN_MAX_RISK = "unknown_max_risk"
    UNKNOWN_OUTPUT = "unknown_output"
    UNKNOWN_MODEL = "unknown_model"
    FILENAME_TOO_LONG = "filename_too_long"
    DRIFT_ALARM_OFF = "drift_alarm_off"
    UNAUTHORIZED = "unauthorized"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    MODEL_TIMEOUT = "model_timeout"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BAD_REQUEST = "bad_request"
    NON_FINITE_OUTPUT = "non_finite_output"
    INTERNAL_ERROR = "internal_error"


class ErrorBody(BaseModel):
    """The JSON body of every error answer (documented in the OpenAPI schema)."""

    error: str
    code: ErrorCode
    file: str | None = None


class ServiceError(Exception):
    """Base of the domain errors: a stable code, a message for humans, optionally the file."""

    def __init__(self, code: ErrorCode, message: str, *, file: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.file = file


class InvalidInput(ServiceError):
    """The request's content cannot be used (bad bytes, bad tensor): the client's fault."""


class PayloadTooLarge(InvalidInput):
    """Too many bytes, pixels or files."""


class InvalidParameter(InvalidInput):
    """A well-formed request asking for something this model does not have (top_k, operating point,
    risk level)."""


class ModelNotFound(ServiceError):
    """The named model or version is not loaded."""


class Unauthorized(ServiceError):
    """A protected route was called without a valid API key."""


class Overloaded(ServiceError):
    """The batching queue is full: come back after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(ErrorCode.OVERLOADED, message)
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    """Models are not loaded yet, or the server is shutting down."""


class DeadlineExceeded(ServiceError):
    """The model did not answer within its deadline (the model process is stalled or swamped)."""


class ModelFailure(ServiceError):
    """The model answered with something unusable (NaN or infinite outputs): the server's fault."""


_STATUS: dict[type[ServiceError], int] = {
    PayloadTooLarge: 413,
    InvalidParameter: 422,
    InvalidInput: 400,
    ModelNotFound: 404,
    Unauthorized: 401,
    Overloaded: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
    ModelFailure: 500,
}

def _documented(*statuses: int) -> dict[int | str, dict[str, object]]:
    return {status: {"model": ErrorBody} for status in statuses}


ERROR_RESPONSES = _documented(400, 401, 404, 413, 422, 503, 504)
"""The error answers of the prediction routes, for their OpenAPI ``responses``."""
LOOKUP_RESPONSES = _documented(404, 503)
"""The error answers of the model metadata and readiness routes: an unknown model, or not ready."""

_HTTP_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
}


def http_status(error: ServiceError) -> int:
    """The status code for ``error``: the entry of its nearest class in the mapping."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def counts_as_bad_input(error: ServiceError) -> bool:
    """Client mistakes about content or parameters feed ``mixoe_bad_inputs_total``; auth and load do not."""
    return isinstance(error, (InvalidInput, ModelNotFound))


def error_response(
    status: int, code: ErrorCode, message: str, *, file: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one place an error body is built."""
    body = ErrorBody(error=message, code=code, file=file).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def count_bad_input(app: Starlette, code: ErrorCode) -> None:
    """Feed ``mixoe_bad_inputs_total{reason=code}`` (once models are loaded; before, there is no registry)."""
    context = getattr(app.state, "context", None)
    if context is not None:
        context.metrics.bad_inputs.labels(reason=code.value).inc()


async def _service_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    headers: dict[str, str] = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="mixoe"'
    if counts_as_bad_input(error):
        count_bad_input(request.app, error.code)
    return error_response(http_status(error), error.code, error.message, file=error.file, headers=headers)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()
    )
    count_bad_input(request.app, ErrorCode.INVALID_REQUEST)
    return error_response(422, ErrorCode.INVALID_REQUEST, f"invalid request: {problems}")


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    refusal = parser_refusal(error)
    if refusal is not None:  # Starlette's bare "Invalid multipart data.": say what the parser found
        code = ErrorCode.FILENAME_TOO_LONG if is_header_too_long(refusal) else ErrorCode.INVALID_REQUEST
        message = (
            f"{FILENAME_TOO_LONG} (a part's headers outgrew the multipart parser's limit)"
            if code is ErrorCode.FILENAME_TOO_LONG
            else f"invalid multipart body: {refusal}"
        )
        count_bad_input(request.app, code)
        return error_response(400, code, message)
    code = _HTTP_CODES.get(
        error.status_code, ErrorCode.BAD_REQUEST if error.status_code < 500 else ErrorCode.INTERNAL_ERROR
    )
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    return error_response(error.status_code, code, message, headers=dict(error.headers or {}))


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises the error after this answer, so the server logs its traceback once.
    return error_response(500, ErrorCode.INTERNAL_ERROR, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure, expected or not, through the one body shape above."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
