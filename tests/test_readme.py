"""The README stays a user's page: short, and opening with the two set-up commands."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_LINES = 200  # longer stories belong in docs/ and benchmarks/RESULTS.md


def test_the_readme_is_at_most_200_lines() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_the_readme_opens_with_the_serve_and_test_commands() -> None:
    opening = "\n".join(README.read_text(encoding="utf-8").splitlines()[:8])
    assert "./scripts/bootstrap.sh && .venv/bin/mixoe-serve" in opening
    assert "./scripts/bootstrap.sh && .venv/bin/python -m pytest" in opening
