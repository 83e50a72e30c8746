"""Names looked up in the package's registries (architectures, OOD scores)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def look_up(registry: Mapping[str, T], name: str, kind: str) -> T:
    """``registry[name]``; an unknown name is a :class:`ValueError` that lists the valid ones, so
    that a config or manifest error names its fix."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"Unknown {kind} {name!r}. Supported: {', '.join(sorted(registry))}.") from None
