"""The model repository's index: which bundles ``<repository>/<name>/<version>/`` holds, in order.

Listing reads folder names only (a bundle is any folder with a ``manifest.json``); loading and
verifying one is :mod:`models.contract.bundle`'s job.
"""

from __future__ import annotations

import re
from pathlib import Path

from models.contract.manifest import MANIFEST_FILE, NAME_PATTERN, VERSION_PATTERN, BundleError


def find_bundles(repository: Path) -> list[tuple[str, str, Path]]:
    """Every ``(name, version, path)`` under ``repository`` that has a manifest, by name then version.

    Versions compare naturally (``2 < 10``, ``1.9 < 1.10``); hidden temporary directories and
    entries whose names are not valid bundle names or versions are skipped.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise BundleError(f"model repository not found: {repository}")
    found = []
    for manifest_path in repository.glob(f"*/*/{MANIFEST_FILE}"):
        version_dir = manifest_path.parent
        name, version = version_dir.parent.name, version_dir.name
        if re.fullmatch(NAME_PATTERN, name) and re.fullmatch(VERSION_PATTERN, version):
            found.append((name, version, version_dir))
    return sorted(found, key=lambda entry: (entry[0], _version_key(entry[1])))


def latest_version(repository: Path, name: str) -> str:
    """The highest version of bundle ``name`` in ``repository``."""
    bundles = find_bundles(repository)
    versions = [version for bundle_name, version, _ in bundles if bundle_name == name]
    if not versions:
        names = sorted({bundle_name for bundle_name, _, _ in bundles})
        raise BundleError(
            f"no bundle named {name!r} in {repository}; available: {', '.join(names) if names else 'none'}"
        )
    return versions[-1]


def _version_key(version: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Natural sort key: digit runs compare as numbers, the raw string breaks ties (``2`` vs ``02``)."""
    parts = tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version))
    return parts, version
