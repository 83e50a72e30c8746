"""The drift alarm's admin route: reset a model version's martingale (``docs/drift.md``).

Protected like the prediction routes (``MIXOE_API_KEYS``): a reset silences the alarm, so it is
not open to anyone who can reach the port. Its state is read in the model metadata
(``GET /v2/models/{name}``, field ``drift``) and in ``/metrics``.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.auth import ProtectedRoute
from service.api.deps import ContextDep
from service.api.errors import ERROR_RESPONSES
from service.api.schemas import DriftStatus

router = APIRouter(prefix="/v2", route_class=ProtectedRoute, tags=["drift alarm"])


@router.post("/models/{name}/drift/reset", response_model=DriftStatus, responses=ERROR_RESPONSES)
async def reset_drift(context: ContextDep, name: str) -> DriftStatus:
    """Restart the drift martingale of the model's default version at capital 1, alarm cleared."""
    loaded = context.registry.get_version(name, None)
    return context.drift.reset(loaded.name, loaded.version)


@router.post("/models/{name}/versions/{version}/drift/reset", response_model=DriftStatus, responses=ERROR_RESPONSES)
async def reset_version_drift(context: ContextDep, name: str, version: str) -> DriftStatus:
    loaded = context.registry.get_version(name, version)
    return context.drift.reset(loaded.name, loaded.version)
