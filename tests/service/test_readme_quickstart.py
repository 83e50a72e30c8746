"""The quick start of README.md and docs/index.md runs as printed.

Its ``curl`` command is read from the page (not copied here), sent to the embedded default model
in-process, and the answer printed under it must be the real one: verdicts, labels and names
exactly, numbers to the digits shown (the page abridges the answer: keys it leaves out are not
checked, but every prediction it shows is).
"""

from __future__ import annotations

import json
import mimetypes
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import EMBEDDED_REPOSITORY, Settings

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "docs" / "index.md"]
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class QuickStart:
    """What a page's quick start sends and the answer it prints."""

    uploads: list[tuple[str, Path]]  # (form field, file), in the command's order
    target: str  # path and query of the request
    answer: dict[str, Any]


def quick_start(markdown: str) -> QuickStart:
    """The ``curl`` request and printed JSON answer of the ``## Quick start`` section."""
    section = markdown.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = {language: body for language, body in _BLOCK.findall(section)}
    [command] = [line for line in blocks["bash"].splitlines() if line.startswith("curl ")]
    words = shlex.split(command, comments=True)
    uploads = []
    for flag, value in zip(words, words[1:]):
        if flag == "-F":
            field, path = value.split("=@", 1)
            uploads.append((field, ROOT / path))
    [url] = [word for word in words[1:] if "/predict" in word]
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return QuickStart(uploads, f"{parts.path}?{parts.query}", json.loads(blocks["json"], parse_float=Decimal))


def mismatches(shown: Any, real: Any, where: str = "answer") -> list[str]:
    """Where the printed ``shown`` disagrees with the ``real`` answer: dictionaries on the keys
    shown, lists item by item, a printed number (a ``Decimal``, as parsed) against ``real`` rounded
    to as many decimals as were printed, anything else exactly."""
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            return [f"{where}: shown an object, got {real!r}"]
        problems = []
        for key, value in shown.items():
            if key not in real:
                problems.append(f"{where}.{key}: not in the answer")
            else:
                problems += mismatches(value, real[key], f"{where}.{key}")
        return problems
    if isinstance(shown, list):
        if not isinstance(real, list) or len(real) != len(shown):
            return [f"{where}: shown {len(shown)} items, got {real!r}"]
        return [
            problem for index, pair in enumerate(zip(shown, real)) for problem in mismatches(*pair, f"{where}[{index}]")
        ]
    if isinstance(shown, Decimal) and isinstance(real, float):
        half_unit = Decimal(1).scaleb(shown.as_tuple().exponent) / 2
        return [] if abs(Decimal(real) - shown) <= half_unit else [f"{where}: shown {shown}, got {real}"]
    return [] if shown == real and type(shown) is type(real) else [f"{where}: shown {shown!r}, got {real!r}"]


@pytest.fixture(scope="module")
def default_model() -> Iterator[TestClient]:
    settings = Settings(model_repository=EMBEDDED_REPOSITORY, device="cpu", decode_workers=2)
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_quick_start_is_read_from_the_readme() -> None:
    example = quick_start((ROOT / "README.md").read_text())
    assert [field for field, _ in example.uploads] == ["files"] * len(example.uploads)
    assert {path.parent for _, path in example.uploads} == {ROOT / "examples"}
    assert example.target.startswith("/predict?")
    assert example.answer["predictions"]


def test_a_wrong_printed_answer_is_caught() -> None:
    real = {"predictions": [{"label": "daisy", "probability": 0.87896, "accepted": True}]}
    printed = {"predictions": [{"label": "daisy", "probability": Decimal("0.879"), "accepted": True}]}
    assert mismatches(printed, real) == []
    assert mismatches({"predictions": [{"probability": Decimal("0.88")}]}, real) == []
    for wrong, complaint in [
        ({"label": "tulip"}, "answer.predictions[0].label: shown 'tulip', got 'daisy'"),
        ({"probability": Decimal("0.8791")}, "answer.predictions[0].probability: shown 0.8791, got 0.87896"),
        ({"probability": Decimal("0.880")}, "answer.predictions[0].probability: shown 0.880, got 0.87896"),
        ({"accepted": False}, "answer.predictions[0].accepted: shown False, got True"),
        ({"decision": "accept"}, "answer.predictions[0].decision: not in the answer"),
    ]:
        assert mismatches({"predictions": [wrong]}, real) == [complaint]
    assert mismatches({"predictions": [{}, {}]}, real)[0].startswith("answer.predictions: shown 2 items")


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_the_printed_answer_is_the_default_models(page: Path, default_model: TestClient) -> None:
    example = quick_start(page.read_text())
    # As curl sends them: the file's name, its bytes, the type its extension implies.
    files = [
        (field, (path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0]))
        for field, path in example.uploads
    ]
    response = default_model.post(example.target, files=files)
    assert response.status_code == 200, response.text
    assert mismatches(example.answer, response.json()) == []


def test_every_example_image_has_its_licence_entry() -> None:
    notes = (ROOT / "examples" / "README.md").read_text()
    images = sorted(path.name for path in (ROOT / "examples").iterdir() if path.suffix != ".md")
    assert images, "examples/ holds no image"
    for name in images:
        assert f"`{name}`" in notes, f"examples/README.md does not credit {name}"
