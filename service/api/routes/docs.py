"""``/docs`` (Swagger UI) and ``/redoc`` from files installed with the service, never a CDN.

FastAPI's own doc pages load their scripts from a CDN, so they are blank on a machine without
internet. The same pages are built here with FastAPI's HTML helpers, pointed at the Swagger UI and
ReDoc bundles that the ``fastapi-offline`` package ships (mounted at :data:`ASSETS_URL`); Swagger UI
5 is needed, as 4 cannot read the OpenAPI 3.1 that FastAPI writes. The ``fastapi-offline`` pin is
exact because the location of those files in it is not its API.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
_ASSETS_DIRECTORY = Path(str(files("fastapi_offline") / "static"))

router = APIRouter(include_in_schema=False)


def assets() -> StaticFiles:
    """The doc pages' scripts, style sheet and icon, to mount at :data:`ASSETS_URL`."""
    return StaticFiles(directory=_ASSETS_DIRECTORY)


def _urls(request: Request) -> tuple[str, str]:
    """The schema's URL and the assets' URL prefix, both under the app's root path (behind a proxy)."""
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{root}{request.app.openapi_url}", f"{root}{ASSETS_URL}"


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    openapi_url, assets_url = _urls(request)
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{assets_url}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets_url}/swagger-ui.css",
        swagger_favicon_url=f"{assets_url}/favicon.png",
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    openapi_url, assets_url = _urls(request)
    return get_redoc_html(
        openapi_url=openapi_url,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{assets_url}/redoc.standalone.js",
        redoc_favicon_url=f"{assets_url}/favicon.png",
        with_google_fonts=False,
    )
