"""What FastAPI cannot see of the API for its OpenAPI schema: the infer body and the API keys.

The Open Inference Protocol infer routes read their body raw (JSON, or the binary tensor extension:
a JSON header followed by tensor bytes, :mod:`service.api.oip`), so FastAPI finds no body parameter to
document; :func:`infer_openapi` describes it. API keys are checked by
:class:`~service.api.auth.ProtectedRoute` before FastAPI reads the request, so no security dependency
documents them either: the protected operations name the schemes themselves, and
:func:`complete_openapi` publishes the schemes when keys are configured and drops those names when
not, so that the schema says what the running service does. FastAPI also documents a 422 with its
own body on every route with parameters; this service's validation errors have the one error body
(``service.api.errors``), and routes that can fail validation document that 422 themselves, so the
default one goes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.api.auth import API_KEY_SCHEMES
from service.api.oip import InferenceRequest

_SCHEMAS = "#/components/schemas/"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FASTAPI_VALIDATION_ERROR = {"$ref": f"{_SCHEMAS}HTTPValidationError"}


def infer_openapi(header_length: str) -> dict[str, Any]:
    """``openapi_extra`` of an infer route: its two body forms and the header the binary form needs."""
    return {
        "parameters": [
            {
                "name": header_length,
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "Binary tensor extension: length of the JSON header that starts the body.",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"{_SCHEMAS}{InferenceRequest.__name__}"}},
                "application/octet-stream": _BINARY,
            },
        },
    }


INFER_OK_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON outputs, or with binary outputs requested a JSON header and tensor bytes",
        "content": {"application/octet-stream": _BINARY},
    }
}
"""The infer routes' success answer beside the JSON one FastAPI documents."""


def complete_openapi(app: FastAPI, *, api_keys: bool) -> None:
    """Have ``app.openapi()`` add the infer request's schemas and, with ``api_keys``, the key schemes."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # caches its result in app.openapi_schema, completed here once
            components = schema.setdefault("components", {})
            request_schema = InferenceRequest.model_json_schema(ref_template=_SCHEMAS + "{model}")
            components.setdefault("schemas", {}).update(request_schema.pop("$defs", {}))
            components["schemas"][InferenceRequest.__name__] = request_schema
            if api_keys:
                components["securitySchemes"] = API_KEY_SCHEMES
            for path in schema["paths"].values():
                for operation in path.values():
                    if not api_keys:
                        operation.pop("security", None)
                    _drop_default_validation_error(operation)
            for unused in ("HTTPValidationError", "ValidationError"):
                components["schemas"].pop(unused, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_default_validation_error(operation: dict[str, Any]) -> None:
    content = operation.get("responses", {}).get("422", {}).get("content", {})
    if content.get("application/json", {}).get("schema") == _FASTAPI_VALIDATION_ERROR:
        del operation["responses"]["422"]
