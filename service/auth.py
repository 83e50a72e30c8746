"""Optional API-key protection for the prediction routes.

When ``MIXOE_API_KEYS`` is set, ``/predict`` and ``/v2/models/*/infer`` need ``X-API-Key: <key>``
or ``Authorization: Bearer <key>``; health, metadata and metrics stay open for probes and
Prometheus. The check runs in the prediction routes' route class
(:class:`service.routes.admitted.AdmittedRoute`), *before* FastAPI reads the request body, so an
unauthenticated client cannot make the server parse a large multipart upload.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.datastructures import Headers

from service.errors import ErrorCode, Unauthorized


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

