"""Open Inference Protocol (KServe v2) tensors: read an infer request, write an infer response.

The service has one input, ``image``: a BYTES tensor of N encoded image files (shape ``[N]``). It
arrives in one of the two forms ``tritonclient.http`` sends:

* JSON: ``"data"`` holds one base64 string per image (JSON cannot carry raw bytes);
* the binary tensor extension: the JSON header (its length in the ``Inference-Header-Content-Length``
  header) is followed by raw tensor data, the input's ``parameters.binary_data_size`` saying how
  many bytes are its own; a BYTES tensor is serialised as a 4-byte little-endian length followed by
  the bytes, per element.

Outputs (one value per image, shape ``[N]``) go back as JSON ``data`` or, when the request asks
for it (``binary_data_output``, or ``binary_data`` on a requested output), as binary data after the
JSON header, in the same encoding; ``tritonclient``'s ``as_numpy`` reads both.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, PlainValidator, StrictInt, ValidationError

from service.api.errors import ErrorCode, InvalidInput, InvalidParameter, PayloadTooLarge
from service.api.limits import INT64_MAX, INT64_MIN
from service.runtime.verdicts import ImageVerdict

IMAGE_INPUT = "image"
BINARY_EXTENSION = "binary_tensor_data"


@dataclass(frozen=True)
class OutputSpec:
    datatype: str
    value: Callable[[ImageVerdict], Any]


OUTPUTS: dict[str, OutputSpec] = {
    "label": OutputSpec("BYTES", lambda verdict: verdict.label),
    "class_index": OutputSpec("INT64", lambda verdict: verdict.class_index),
    "probability": OutputSpec("FP32", lambda verdict: verdict.probability),
    "ood_score": OutputSpec("FP32", lambda verdict: verdict.score),
    "p_value": OutputSpec("FP32", lambda verdict: verdict.p_value),
    "accepted": OutputSpec("BOOL", lambda verdict: verdict.accepted),
    "decision": OutputSpec("BYTES", lambda verdict: verdict.decision),
}

_NUMPY_TYPES = {"INT64": "<i8", "FP32": "<f4", "BOOL": "?"}


MAX_DIMENSIONS = 8
"""Most dimensions an input shape may have; the image tensor is ``[N]`` (tritonclient), rarely ``[1, N]``."""
MAX_TENSORS = 32
"""Most inputs, and most requested outputs, in one request (the model has one input and seven outputs)."""
MAX_PARAMETERS = 32
MAX_NAME_LENGTH = 256
MAX_PARAMETER_LENGTH = 1024

# Every number and list a client sends is bounded here, at validation, before any arithmetic or
# formatting touches it: ``math.prod`` of a thousand 4,000-digit dimensions runs for tens of seconds
# under the GIL, and formatting an integer past 4,300 digits raises ``ValueError``. (The JSON parser
# itself refuses integers past about 4,300 digits, and the request-size limit bounds their count.)
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
Name = Annotated[str, Field(max_length=MAX_NAME_LENGTH)]


def _parameter_value(value: Any) -> bool | int | float | str:
    """A protocol parameter value (a boolean, an int64, a finite number or a short string), or a
    ``ValueError`` that quotes none of it. Only comparisons touch it, cheap at any size."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError("integers must fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_PARAMETER_LENGTH:
            raise ValueError(f"strings may hold at most {MAX_PARAMETER_LENGTH} characters")
        return value
    raise ValueError("parameter values are booleans, numbers or strings")


Parameters = Annotated[
    dict[Name, Annotated[bool | int | float | str, PlainValidator(_parameter_value)]], Field(max_length=MAX_PARAMETERS)
]


class RequestInput(BaseModel):
    name: Name
    shape: Annotated[list[Int64], Field(max_length=MAX_DIMENSIONS)]
    datatype: Name
    parameters: Parameters = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: Name
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: Annotated[list[RequestInput], Field(max_length=MAX_TENSORS)]
    outputs: Annotated[list[RequestOutput] | None, Field(max_length=MAX_TENSORS)] = None


@dataclass(frozen=True)
class InferCall:
    """What an infer request asks for, decoded and checked."""

    request_id: str | None
    images: list[bytes]
    operating_point: float | None
    outputs: list[tuple[str, bool]]  # (output name, send as binary)
    max_risk: float | None = None


def parse_infer_request(body: bytes, header_length: int | None, *, max_images: int) -> InferCall:
    """Decode an infer request body; every malformation is a 4xx naming the problem."""
    header, tail = _split(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        raise InvalidInput(ErrorCode.INVALID_REQUEST, f"invalid inference request: {_problems(error)}") from None
    if len(request.inputs) != 1 or request.inputs[0].name != IMAGE_INPUT:
        names = [tensor.name for tensor in request.inputs]
        raise InvalidInput(ErrorCode.INVALID_TENSOR, f"expected exactly one input named {IMAGE_INPUT!r}, got {names}")
    images, used = _read_images(request.inputs[0], tail, max_images)
    if used != len(tail):
        raise InvalidInput(
            ErrorCode.INVALID_TENSOR, f"{len(tail) - used} bytes of binary data after the tensors belong to no input"
        )
    return InferCall(
        request.id, images, _number_parameter(request.parameters, "operating_point", "0.95"),
        _requested_outputs(request), _number_parameter(request.parameters, "max_risk", "0.05"),
    )


def _problems(error: ValidationError, shown: int = 3) -> str:
    """The first few validation problems: a hostile request can hold thousands of them."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    text = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'body'}: {p['msg']}" for p in problems[:shown])
    return text if len(problems) <= shown else f"{text}; and {len(problems) - shown} more"


def _split(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not 0 <= header_length <= len(body):
        raise InvalidInput(
            ErrorCode.INVALID_REQUEST,
            f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes",
        )
    return body[:header_length], body[header_length:]


def _read_images(tensor: RequestInput, tail: bytes, max_images: int) -> tuple[list[bytes], int]:
    """The tensor's elements and how many bytes of ``tail`` they used."""
    if tensor.datatype != "BYTES":
        raise InvalidInput(ErrorCode.INVALID_TENSOR, f"input {IMAGE_INPUT!r} must be BYTES, got {tensor.datatype}")
    if any(dimension < 0 for dimension in tensor.shape):
        raise InvalidInput(ErrorCode.INVALID_TENSOR, f"input shape {tensor.shape} has a negative dimension")
    count = math.prod(tensor.shape)
    if count == 0:
        raise InvalidInput(ErrorCode.NO_FILES, f"input {IMAGE_INPUT!r} holds no images (shape {tensor.shape})")
    if count > max_images:
        raise PayloadTooLarge(ErrorCode.TOO_MANY_FILES, f"{count} images in one request; the limit is {max_images}")
    if _uses_shared_memory(tensor.parameters):
        raise InvalidInput(ErrorCode.INVALID_TENSOR, "shared-memory tensors are not supported over HTTP here")
    if "binary_data_size" in tensor.parameters:
        size = tensor.parameters["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(tail):
            raise InvalidInput(
                ErrorCode.INVALID_TENSOR, f"binary_data_size {size!r} does not fit the {len(tail)} bytes of binary data"
            )
        images = _deserialize_bytes(tail[:size])
        used = size
    elif tensor.data is not None:
        images = [_from_base64(element, index) for index, element in enumerate(_flatten(tensor.data))]
        used = 0
    else:
        raise InvalidInput(ErrorCode.INVALID_TENSOR, f"input {IMAGE_INPUT!r} has neither data nor binary_data_size")
    if len(images) != count:
        raise InvalidInput(
            ErrorCode.INVALID_TENSOR,
            f"input shape {tensor.shape} promises {count} images, the data holds {len(images)}",
        )
    return images, used


def _uses_shared_memory(parameters: dict[str, Any]) -> bool:
    return any(key.startswith("shared_memory") for key in parameters)


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(ErrorCode.INVALID_TENSOR, "BYTES tensor data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(ErrorCode.INVALID_TENSOR, f"BYTES element {len(elements)} is cut short")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for element in data:
        flat.extend(_flatten(element) if isinstance(element, list) else [element])
    return flat


def _from_base64(element: Any, index: int) -> bytes:
    if not isinstance(element, str):
        raise InvalidInput(
            ErrorCode.INVALID_BASE64, f"image[{index}]: JSON BYTES data must be base64 strings", file=f"image[{index}]"
        )
    try:
        return base64.b64decode(element, validate=True)
    except ValueError as error:  # binascii.Error, or a non-ASCII string
        raise InvalidInput(
            ErrorCode.INVALID_BASE64, f"image[{index}] is not valid base64: {error}", file=f"image[{index}]"
        ) from None


def _number_parameter(parameters: dict[str, Any], name: str, example: str) -> float | None:
    """Request parameter ``name`` as a number (``None`` when absent), or a 422 showing ``example``."""
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:  # "high"
            pass
    raise InvalidParameter(
        ErrorCode.INVALID_REQUEST, f"parameter {name} must be a number such as {example}, got {value!r}"
    )


def _requested_outputs(request: InferenceRequest) -> list[tuple[str, bool]]:
    binary_default = request.parameters.get("binary_data_output", False) is True
    if request.outputs is None:
        return [(name, binary_default) for name in OUTPUTS]
    unknown = [output.name for output in request.outputs if output.name not in OUTPUTS]
    if unknown:
        raise InvalidParameter(
            ErrorCode.UNKNOWN_OUTPUT, f"unknown outputs {unknown}; this model has {', '.join(OUTPUTS)}"
        )
    for output in request.outputs:
        if "classification" in output.parameters or _uses_shared_memory(output.parameters):
            raise InvalidParameter(
                ErrorCode.INVALID_REQUEST,
                f"output {output.name!r}: classification and shared-memory outputs are not supported",
            )
    return [(output.name, output.parameters.get("binary_data", binary_default) is True) for output in request.outputs]


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    verdicts: list[ImageVerdict],
    outputs: list[tuple[str, bool]],
    parameters: dict[str, Any],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it (else ``None``)."""
    tensors, binary_parts = [], []
    for name, binary in outputs:
        spec = OUTPUTS[name]
        values = [spec.value(verdict) for verdict in verdicts]
        tensor: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": [len(values)]}
        if binary:
            raw = _serialize(spec.datatype, values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            binary_parts.append(raw)
        else:
            tensor["data"] = values
        tensors.append(tensor)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "parameters": parameters,
        "outputs": tensors,
    }
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not binary_parts:
        return header, None
    return header + b"".join(binary_parts), len(header)


def _serialize(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        encoded = [value.encode() for value in values]
        return b"".join(struct.pack("<I", len(element)) + element for element in encoded)
    return np.asarray(values, dtype=_NUMPY_TYPES[datatype]).tobytes()
