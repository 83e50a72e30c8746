"""Optional API-key protection for the prediction routes.

When ``MIXOE_API_KEYS`` is set, ``/predict``, ``/v2/models/*/infer`` and the drift alarm's reset
(``/v2/models/*/drift/reset``) need ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``;
health, metadata and metrics stay open for probes and Prometheus. The check runs in
:class:`ProtectedRoute` (and its subclass for the prediction routes,
:class:`service.api.routes.admitted.AdmittedRoute`), *before* FastAPI reads the request body, so an
unauthenticated client can neither make the server parse a large multipart upload nor take an
admission place.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import SecretStr
from starlette.datastructures import Headers

from service.api.errors import ErrorCode, Unauthorized


RouteHandler = Callable[[Request], Coroutine[Any, Any, Response]]


def presented_key(headers: Headers) -> str | None:
    """The key a request carries, from ``X-API-Key`` or a Bearer ``Authorization`` header."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def check_api_key(headers: Headers, keys: Sequence[SecretStr]) -> None:
    """Pass when no keys are configured or the request carries one of them; else 401."""
    if not keys:
        return
    key = presented_key(headers)
    if key is None:
        raise Unauthorized(
            ErrorCode.UNAUTHORIZED, "missing API key: send X-API-Key: <key> or Authorization: Bearer <key>"
        )
    # compare_digest against every key: the time taken does not reveal which key nearly matched.
    matches = [hmac.compare_digest(key.encode(), known.get_secret_value().encode()) for known in keys]
    if not any(matches):
        raise Unauthorized(ErrorCode.UNAUTHORIZED, "invalid API key")


API_KEY_SCHEMES: dict[str, dict[str, str]] = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "BearerKey": {"type": "http", "scheme": "bearer", "description": "The same API key as a Bearer token."},
}
"""The OpenAPI security schemes of the two ways to present a key (``service.api.openapi`` publishes them)."""


class ProtectedRoute(APIRoute):
    """An APIRoute that checks the API key (``app.state.settings.api_keys``) before anything else.

    Its OpenAPI operation names :data:`API_KEY_SCHEMES` (either one will do);
    ``service.api.openapi.complete_openapi`` drops that again when no keys are configured."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.openapi_extra = (self.openapi_extra or {}) | {"security": [{name: []} for name in API_KEY_SCHEMES]}

    def get_route_handler(self) -> RouteHandler:
        handler = super().get_route_handler()

        async def protected(request: Request) -> Response:
            check_api_key(request.headers, request.app.state.settings.api_keys)
            return await self.handle_authorised(handler, request)

        return protected

    async def handle_authorised(self, handler: RouteHandler, request: Request) -> Response:
        """Answer a request whose key passed; subclasses add what must also come before the body."""
        return await handler(request)
