"""The OpenAPI schema matches the routes: a bounded, deterministic schemathesis run finds no failure.

Every check schemathesis has runs, on schema-valid and schema-violating requests for every
operation. One needs the service's view: a schema-valid request may still be refused for what no
schema can say (upload bytes that are no image: 400; an operating point or ``top_k`` the model
lacks: 422; a model that is not loaded: 404), so those statuses count as accepted by
``positive_data_acceptance``; but a refusal by the route's own request validation (422
``invalid_request``) means the schema promised something the route does not take, and fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup

from service.api.errors import ErrorCode
from service.app import create_app
from service.settings import Settings

API_KEY = "schema-test-key"
EXAMPLES = 25


def _validation_accepts_schema_valid_requests(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 422:
        return
    body = response.json()
    if body.get("code") == ErrorCode.INVALID_REQUEST:
        raise AssertionError(f"the route's validation refused a schema-valid request: {body['error']}")


def _failures(schema: Any) -> list[str]:
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(
                    headers={"X-API-Key": API_KEY}, additional_checks=[_validation_accepts_schema_valid_requests]
                )

            try:
                check()
            except (Failure, FailureGroup, AssertionError) as error:
                failures.append(f"{operation.label} ({mode.value}): {error}")
            except Unsatisfiable:  # an operation without inputs has no schema-violating request
                assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid request could be generated"
    return failures


def test_the_api_answers_as_its_schema_says(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(api_keys=API_KEY))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.checks.update(included_check_names=["all"])
    schema.config.checks.positive_data_acceptance.expected_statuses = ["2xx", "400", "401", "404", "413", "422"]
    failures = _failures(schema)
    assert not failures, "\n\n".join(failures)


def _openapi(make_settings: Callable[..., Settings], **overrides: Any) -> dict[str, Any]:
    return create_app(make_settings(**overrides)).openapi()


def test_infer_routes_document_both_body_forms(make_settings: Callable[..., Settings]) -> None:
    paths = _openapi(make_settings)["paths"]
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/InferenceRequest"}
        assert body["content"]["application/octet-stream"]["schema"]["format"] == "binary"
        assert "Inference-Header-Content-Length" in [parameter["name"] for parameter in paths[path]["post"]["parameters"]]


def test_predict_needs_a_file_and_no_optional_field_is_nullable(make_settings: Callable[..., Settings]) -> None:
    schema = _openapi(make_settings)
    form = schema["components"]["schemas"]["Body_predict_predict_post"]["properties"]
    assert form["files"]["minItems"] == 1
    query = {parameter["name"]: parameter["schema"] for parameter in schema["paths"]["/predict"]["post"]["parameters"]}
    # A form or query value is text: "null" would be the word, which no number parses.
    for name in ("model", "top_k", "operating_point"):
        assert "anyOf" not in form[name] and "anyOf" not in query[name], name


def test_read_only_routes_document_only_what_they_can_answer(make_settings: Callable[..., Settings]) -> None:
    for path, operations in _openapi(make_settings)["paths"].items():
        if "get" in operations:
            assert set(operations["get"]["responses"]) <= {"200", "404", "503"}, path


def test_api_key_schemes_are_documented_exactly_when_keys_are_set(make_settings: Callable[..., Settings]) -> None:
    protected = {
        "/predict",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/models/{name}/drift/reset",
        "/v2/models/{name}/versions/{version}/drift/reset",
    }
    with_keys, without = _openapi(make_settings, api_keys=API_KEY), _openapi(make_settings)
    assert with_keys["components"]["securitySchemes"]["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert with_keys["components"]["securitySchemes"]["BearerKey"]["scheme"] == "bearer"
    secured = {path for path, operations in with_keys["paths"].items() for op in operations.values() if "security" in op}
    assert secured == protected
    assert "securitySchemes" not in without["components"]
    assert not any("security" in op for operations in without["paths"].values() for op in operations.values())
