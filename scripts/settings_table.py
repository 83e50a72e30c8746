"""Write the README's table of service settings from :class:`service.settings.Settings`.

The table lives between two markers in README.md; ``tests/service/test_settings_table.py`` fails
when it differs from what this script generates, so a new or changed setting cannot go
undocumented. Run ``python scripts/settings_table.py`` to rewrite it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.settings import EMBEDDED_REPOSITORY, Settings

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "none" if value == [] else "see meaning"
    value = field.default
    if value is PydanticUndefined or value is None:
        return "none"
    if value == EMBEDDED_REPOSITORY:
        return "the embedded `models/repository`"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def settings_table() -> str:
    """One Markdown row per setting: environment variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `MIXOE_{name.upper()}` | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def with_table(readme: str) -> str:
    """``readme`` with the text between the markers replaced by the current table."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"


def main() -> int:
    README.write_text(with_table(README.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
