"""Open Inference Protocol codec, checked against tritonclient's own request writer and result reader."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

from service.api.errors import ErrorCode, InvalidInput, InvalidParameter, PayloadTooLarge
from service.api.oip import OUTPUTS, encode_infer_response, parse_infer_request
from service.runtime.verdicts import ImageVerdict
from tests.service.helpers import triton_input

IMAGES = [b"\x89PNG first", b"\xff\xd8 second \x00 with a zero byte"]


def triton_body(binary: bool, parameters: dict[str, object] | None = None) -> tuple[bytes, int | None]:
    return InferenceServerClient.generate_request_body([triton_input(IMAGES, binary)], parameters=parameters)


@pytest.mark.parametrize("binary", [True, False], ids=["binary-extension", "json-base64"])
def test_reads_what_tritonclient_writes(binary: bool) -> None:
    body, header_length = triton_body(binary, {"operating_point": 0.99})
    assert (header_length is not None) is binary
    call = parse_infer_request(body, header_length, max_images=8)
    assert call.images == IMAGES
    assert call.operating_point == 0.99
    # No outputs named: tritonclient asks for every output in binary form.
    assert call.outputs == [(name, True) for name in OUTPUTS]


def _verdict(label: str, score: float, accepted: bool) -> ImageVerdict:
    return ImageVerdict(
        class_index=2,
        label=label,
        probability=0.75,
        top_k=[(label, 0.75)],
        score=score,
        p_value=0.125,
        threshold=0.5,
        target_id_acceptance=0.95,
        accepted=accepted,
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_reads_what_we_write(binary: bool) -> None:
    verdicts = [_verdict("daisy", 0.25, True), _verdict("iris", 0.875, False)]
    outputs = [(name, binary) for name in OUTPUTS]
    body, header_length = encode_infer_response(
        model_name="tiny", model_version="1", request_id="r-1", verdicts=verdicts, outputs=outputs, parameters={}
    )
    result = InferenceServerClient.parse_response_body(body, header_length=header_length)
    labels = [value.decode() if isinstance(value, bytes) else value for value in result.as_numpy("label")]
    assert labels == ["daisy", "iris"]
    assert result.as_numpy("class_index").tolist() == [2, 2]
    assert result.as_numpy("ood_score").tolist() == [0.25, 0.875]
    assert result.as_numpy("probability").dtype == np.float32
    assert result.as_numpy("accepted").tolist() == [True, False]
    assert result.as_numpy("p_value").tolist() == [0.125, 0.125]
    assert result.get_response()["id"] == "r-1"


def test_requested_outputs_are_returned_alone_and_in_their_form() -> None:
    tensor = InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    outputs = [InferRequestedOutput("accepted", binary_data=False), InferRequestedOutput("label", binary_data=True)]
    body, header_length = InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    assert parse_infer_request(body, header_length, max_images=8).outputs == [("accepted", False), ("label", True)]


def _json_request(inputs: list[dict[str, object]], **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


GOOD_INPUT = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"img").decode()]}


@pytest.mark.parametrize(
    ("body", "header_length", "error", "code"),
    [
        (b"not json", None, InvalidInput, ErrorCode.INVALID_REQUEST),
        (_json_request([{**GOOD_INPUT, "name": "pixels"}]), None, InvalidInput, ErrorCode.INVALID_TENSOR),
        (_json_request([GOOD_INPUT, GOOD_INPUT]), None, InvalidInput, ErrorCode.INVALID_TENSOR),
        (_json_request([{**GOOD_INPUT, "datatype": "FP32"}]), None, InvalidInput, ErrorCode.INVALID_TENSOR),
        (_json_request([{**GOOD_INPUT, "shape": [2]}]), None, InvalidInput, ErrorCode.INVALID_TENSOR),
        (_json_request([{**GOOD_INPUT, "shape": [0], "data": []}]), None, InvalidInput, ErrorCode.NO_FILES),
        (
            _json_request([{**GOOD_INPUT, "shape": [9], "data": ["aW1n"] * 9}]),
            None,
            PayloadTooLarge,
            ErrorCode.TOO_MANY_FILES,
        ),
        (_json_request([{**GOOD_INPUT, "data": ["not base64!"]}]), None, InvalidInput, ErrorCode.INVALID_BASE64),
        (_json_request([{**GOOD_INPUT, "data": [7]}]), None, InvalidInput, ErrorCode.INVALID_BASE64),
        (_json_request([{**GOOD_INPUT, "data": ["aW1n\u00e9"]}]), None, InvalidInput, ErrorCode.INVALID_BASE64),
        (
            _json_request([{"name": "image", "shape": [1], "datatype": "BYTES"}]),
            None,
            InvalidInput,
            ErrorCode.INVALID_TENSOR,
        ),
        (_json_request([GOOD_INPUT], outputs=[{"name": "logits"}]), None, InvalidParameter, ErrorCode.UNKNOWN_OUTPUT),
        (
            _json_request([GOOD_INPUT], parameters={"operating_point": "high"}),
            None,
            InvalidParameter,
            ErrorCode.INVALID_REQUEST,
        ),
        (
            _json_request([GOOD_INPUT])[:-1] + b', "parameters": {"operating_point": ' + b"9" * 400 + b"}}",
            None,
            InvalidInput,
            ErrorCode.INVALID_REQUEST,
        ),
        (b"{}", 99, InvalidInput, ErrorCode.INVALID_REQUEST),
    ],
    ids=[
        "not-json",
        "wrong-name",
        "two-inputs",
        "wrong-datatype",
        "shape-mismatch",
        "empty",
        "too-many",
        "bad-base64",
        "non-string",
        "non-ascii-base64",
        "no-data",
        "unknown-output",
        "bad-operating-point",
        "operating-point-beyond-float",
        "header-length-too-big",
    ],
)
def test_malformed_requests_name_the_problem(
    body: bytes, header_length: int | None, error: type, code: ErrorCode
) -> None:
    with pytest.raises(error) as raised:
        parse_infer_request(body, header_length, max_images=8)
    assert raised.value.code is code


def _binary_request(binary_data_size: int, tail: bytes) -> tuple[bytes, int]:
    header = _json_request(
        [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": binary_data_size}}]
    )
    return header + tail, len(header)


@pytest.mark.parametrize(
    ("size", "tail"),
    [
        (8, b"\x05\x00\x00\x00abc"),  # declared size runs past the body
        (5, b"\x05\x00\x00\x00a"),  # element shorter than its length prefix
        (2, b"\x05\x00"),  # cut inside the length prefix
        (5, b"\x01\x00\x00\x00a" + b"extra"),  # bytes that belong to no input
    ],
    ids=["size-past-end", "short-element", "cut-prefix", "trailing-bytes"],
)
def test_malformed_binary_tensors_are_refused(size: int, tail: bytes) -> None:
    body, header_length = _binary_request(size, tail)
    with pytest.raises(InvalidInput) as raised:
        parse_infer_request(body, header_length, max_images=8)
    assert raised.value.code is ErrorCode.INVALID_TENSOR
