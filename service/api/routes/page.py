"""The upload page at ``/``: a browser form over ``POST /predict`` (``service/static/``).

The page and its script are public, like the metadata routes it reads: the API key, when the service
has keys, travels with the page's ``/predict`` call, which checks it. None of this is in the OpenAPI
schema: it is a user interface, not API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.staticfiles import StaticFiles

from service.api.deps import ContextDep

STATIC_URL = "/static"
_STATIC_DIRECTORY = Path(__file__).resolve().parents[2] / "static"

router = APIRouter(include_in_schema=False)


class PageModels(BaseModel):
    """The model references the page offers (``name:version``), and the one a request naming none gets."""

    models: list[str]
    default: str


def static_files() -> StaticFiles:
    """The page's script and style sheet, to mount at :data:`STATIC_URL`."""
    return StaticFiles(directory=_STATIC_DIRECTORY)


@router.get("/")
async def upload_page() -> FileResponse:
    return FileResponse(_STATIC_DIRECTORY / "index.html")


@router.get("/ui/models", response_model=PageModels)
async def page_models(context: ContextDep) -> PageModels:
    """What the page's model menu lists; each model's operating points come from its metadata route."""
    default = context.registry.default
    return PageModels(
        models=[f"{loaded.name}:{loaded.version}" for loaded in context.registry],
        default=f"{default.name}:{default.version}",
    )
