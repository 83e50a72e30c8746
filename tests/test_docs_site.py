"""The documentation site builds with ``mkdocs build --strict``, and its generated page is current.

Strict mode fails on a link between pages (or to an anchor) that does not resolve; links to files
outside ``docs/`` are written from the repository root (``/benchmarks/RESULTS.md``), which mkdocs
leaves alone, so these tests check that each such link names a real file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_ROOT_LINK = re.compile(r"\]\((/[^)\s#]*)")


def build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of the project at ``project``; output kept for the failure message."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    for page in ("concepts", "config-reference", "default-model"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    assert (tmp_path / "site" / "images" / "flowers17-hist-fine.png").is_file()


@pytest.mark.parametrize(
    ("link", "complaint"),
    [
        ("[x](no-such-page.md)", "not found among documentation files"),
        ("[x](../README.md)", "not found among documentation files"),  # out of docs/: write /README.md
        ("[x](serving.md#no-such-section)", "does not contain an anchor '#no-such-section'"),
    ],
)
def test_a_broken_link_fails_the_build(tmp_path: Path, link: str, complaint: str) -> None:
    project = tmp_path / "project"
    shutil.copytree(DOCS, project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project)
    with (project / "docs" / "concepts.md").open("a") as page:
        page.write(f"\n{link}\n")
    result = build(project, tmp_path / "site")
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def root_links(markdown: str) -> list[str]:
    """The repository-root paths ``markdown`` links to, without their anchors."""
    return _ROOT_LINK.findall(markdown)


def test_root_links_are_found() -> None:
    text = "see [a](/benchmarks/RESULTS.md#top), [b](serving.md), ![c](/x/y.png) and [d](https://h/z)"
    assert root_links(text) == ["/benchmarks/RESULTS.md", "/x/y.png"]


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda path: path.name)
def test_every_root_link_names_a_file_outside_docs(page: Path) -> None:
    for link in root_links(page.read_text()):
        target = ROOT / link.lstrip("/")
        assert target.is_file(), f"{page.name} links to {link}, which is no file of the repository"
        assert DOCS not in target.parents, f"{page.name}: link {link} relatively, so that mkdocs checks it"


def test_the_copied_histogram_is_the_default_bundles() -> None:
    copy = DOCS / "images" / "flowers17-hist-fine.png"
    bundle = ROOT / "models" / "repository" / "flowers17" / "1" / "hist_fine.png"
    assert copy.read_bytes() == bundle.read_bytes(), f"copy {bundle} to {copy} again"


def test_the_config_reference_is_current() -> None:
    reference = load_script("config_reference")
    assert (DOCS / "config-reference.md").read_text() == reference.reference(), (
        "docs/config-reference.md is stale: run .venv/bin/python scripts/config_reference.py"
    )


def test_every_config_key_and_section_is_described() -> None:
    reference = load_script("config_reference")
    root = reference.Section("", reference.TrainConfig, None)
    for section in reference.sections(root):
        assert section.model.__doc__, f"section {section.key or 'top level'} has no docstring"
        for name, field in section.model.model_fields.items():
            assert reference.description(field), f"config key {section.key}.{name} has no description"


def test_the_reference_takes_defaults_from_the_parent_section() -> None:
    page = load_script("config_reference").reference()
    assert "| `optimizer.lr` | number, > 0 | `0.001` |" in page
    assert "| `baseline.optimizer.lr` | number, > 0 | `0.01` |" in page  # BaselineStageConfig's default
    assert "| `data.root` | path | required |" in page


def test_an_unknown_config_type_is_refused() -> None:
    with pytest.raises(TypeError, match="no name for the config type"):
        load_script("config_reference").type_name(complex)
