"""The README's settings table is generated from ``Settings`` and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings
from tests.helpers.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _settings_table_module():
    return load_script("settings_table")


def test_readme_table_matches_the_settings_class():
    readme = (ROOT / "README.md").read_text()
    assert _settings_table_module().with_table(readme) == readme, (
        "README.md's settings table is stale: run .venv/bin/python scripts/settings_table.py"
    )


def test_every_setting_is_described_in_the_table():
    table = _settings_table_module().settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
        assert f"`MIXOE_{name.upper()}`" in table


def test_a_readme_without_markers_is_refused():
    with pytest.raises(ValueError, match="lacks the markers"):
        _settings_table_module().with_table("# no table here\n")
