"""The upload page and the API doc pages load every asset from the service itself: they work offline.

Each page's ``src``/``href`` URLs (and the schema URL the doc pages read) must be served by the app,
and none may point at another host; the pages stay open when API keys are set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

PAGES = ("/", "/docs", "/redoc")
_SCHEMA_URL = re.compile(r"""url: '([^']+)'|spec-url="([^"]+)\"""")


class _AssetLinks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value and tag != "a"]


def asset_urls(page: str) -> list[str]:
    """Every URL the page loads: script sources, style sheets, icons, and the OpenAPI schema."""
    parser = _AssetLinks()
    parser.feed(page)
    schema = [next(group for group in match.groups() if group) for match in _SCHEMA_URL.finditer(page)]
    return parser.links + schema


@pytest.fixture(scope="module")
def keyed_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_keys="page-test-key"))) as client:
        yield client


def test_the_parser_finds_an_external_asset() -> None:
    page = '<link rel="stylesheet" href="https://cdn.example/x.css"><script src="a.js"></script><a href="docs">d</a>'
    assert asset_urls(page) == ["https://cdn.example/x.css", "a.js"]


@pytest.mark.parametrize("path", PAGES)
def test_every_asset_of_the_page_comes_from_the_service(keyed_client: TestClient, path: str) -> None:
    response = keyed_client.get(path)  # no API key: the pages are public
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = asset_urls(response.text)
    assert any(url.endswith(".js") for url in urls), urls
    if path != "/":
        assert "/openapi.json" in urls, urls
    for url in urls:
        if url.startswith("data:"):
            continue  # inline: nothing to fetch
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{path} loads {url} from elsewhere"
        asset = keyed_client.get(urljoin(f"http://testserver{path}", url))
        assert asset.status_code == 200 and asset.content, url


def test_the_model_menu_lists_the_loaded_models(keyed_client: TestClient) -> None:
    response = keyed_client.get("/ui/models")
    assert response.status_code == 200
    assert response.json() == {"models": ["tiny:1"], "default": "tiny:1"}


def test_the_page_and_its_helpers_are_not_in_the_api_schema(keyed_client: TestClient) -> None:
    paths = keyed_client.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/redoc", "/ui/models"} & set(paths)
    assert not any(path.startswith(("/static", "/docs-assets")) for path in paths)
