"""Which bundles the service serves, and how a request's model reference finds one.

References are ``"name"`` or ``"name:version"``, in settings and in requests alike. A bare name
means that name's *default version*: the version its (last) entry in ``MIXOE_MODELS`` selected, or
the latest one in the repository when every bundle is loaded. Unknown names and versions fail
with the list of what is available, never a bare ``KeyError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.contract.index import find_bundles, latest_version
from models.contract.manifest import BundleError, OperatingPoint, RiskLevel
from models.runtime import Bundle
from service.api.errors import ErrorCode, InvalidParameter, ModelNotFound
from service.runtime.hosted import HostedModel
from service.settings import split_pin


def parse_reference(reference: str) -> tuple[str, str | None]:
    """``"name:version" -> ("name", "version")``; ``"name" -> ("name", None)``."""
    name, _, version = reference.partition(":")
    return name, version or None


def select_bundles(repository: Path, references: Sequence[str]) -> list[tuple[str, str, Path]]:
    """``(name, version, path)`` of the bundles to load; empty ``references`` = every name's latest.
    A reference's pin (``@sha256:...``) plays no part here: ``load_bundle`` checks it.

    Raises :class:`BundleError` naming what is available when a reference matches nothing: a
    service that cannot load what it was told to load must not start.
    """
    available = find_bundles(repository)
    if not available:
        raise BundleError(f"no bundles in model repository {repository}")
    paths = {(name, version): path for name, version, path in available}
    if not references:
        references = sorted({name for name, _, _ in available})
    selected: dict[tuple[str, str], Path] = {}
    for reference in references:
        name, version = parse_reference(split_pin(reference)[0])
        version = version or latest_version(repository, name)
        if (name, version) not in paths:
            listing = ", ".join(f"{n}:{v}" for n, v, _ in available)
            raise BundleError(f"bundle {name}:{version} not found in {repository}; available: {listing}")
        selected[(name, version)] = paths[(name, version)]
    return [(name, version, path) for (name, version), path in selected.items()]


@dataclass
class LoadedModel:
    """A bundle in memory and the batch loop's model its requests' images go to.

    ``sends_jpeg``: plain JPEGs go to the model process undecoded, for its GPU to decode; a verdict
    is then ``None`` where that decoder refused the file (``service.runtime.batch_loop.model_process``)."""

    bundle: Bundle
    queue: HostedModel
    sends_jpeg: bool = False

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def class_names(self) -> list[str]:
        return self.bundle.manifest.class_names

    def operating_point(self, target: float | None) -> OperatingPoint:
        """The operating point for ``target`` (``None``: the bundle's default), or a 422 listing them."""
        if target is None:
            return self.bundle.operating_point(None)
        points = self.bundle.manifest.calibration.operating_points
        for point in points:
            if math.isclose(point.target_id_acceptance, target, rel_tol=0.0, abs_tol=1e-9):
                return point
        available = ", ".join(f"{point.target_id_acceptance:g}" for point in points)
        raise InvalidParameter(
            ErrorCode.UNKNOWN_OPERATING_POINT,
            f"model {self.name}:{self.version} has no operating point {target:g}; available: {available}",
        )


    def risk_level(self, max_risk: float | None) -> RiskLevel | None:
        """The risk level for ``max_risk`` (``None``: the bundle's default, if it has one), or a
        422 listing the calibrated ones."""
        selective = self.bundle.manifest.selective
        if max_risk is None:
            return None if selective is None or selective.default_max_risk is None else selective.level(
                selective.default_max_risk
            )
        level = None if selective is None else selective.level(max_risk)
        if level is None:
            calibrated = ", ".join(f"{level.max_risk:g}" for level in selective.risk_levels) if selective else ""
            raise InvalidParameter(
                ErrorCode.UNKNOWN_MAX_RISK,
                f"model {self.name}:{self.version} has no risk level {max_risk:g}; calibrated: {calibrated or 'none'}",
            )
        return level


class ModelRegistry:
    """Loaded models by ``(name, version)``, each name's default version, and the default model."""

    def __init__(self, models: Sequence[LoadedModel], default_reference: str | None = None):
        if not models:
            raise ValueError("a registry needs at least one model")
        self._models = {(model.name, model.version): model for model in models}
        self._default_versions = {model.name: model.version for model in models}  # the last entry wins
        reference = default_reference or models[0].name
        try:
            self._default = self.get(reference)
        except ModelNotFound as error:
            raise ValueError(f"default model: {error.message}") from None

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    @property
    def default(self) -> LoadedModel:
        return self._default

    def versions(self, name: str) -> list[str]:
        """Loaded versions of ``name``; an unknown name is a 404 listing the loaded models."""
        self._check_name(name)
        return [version for model_name, version in self._models if model_name == name]

    def get(self, reference: str | None) -> LoadedModel:
        """Resolve ``"name"``, ``"name:version"`` or ``None`` (the default model)."""
        if not reference:
            return self._default
        name, version = parse_reference(reference)
        return self.get_version(name, version)

    def get_version(self, name: str, version: str | None) -> LoadedModel:
        """Resolve a name and an optional version (``None``: the name's default version)."""
        self._check_name(name)
        key = (name, version or self._default_versions[name])
        if key not in self._models:
            raise ModelNotFound(
                ErrorCode.UNKNOWN_MODEL, f"model {name!r} has no loaded version {version!r}; loaded: {self._listing()}"
            )
        return self._models[key]

    def _check_name(self, name: str) -> None:
        if name not in self._default_versions:
            raise ModelNotFound(ErrorCode.UNKNOWN_MODEL, f"no model named {name!r}; loaded: {self._listing()}")

    def _listing(self) -> str:
        return ", ".join(f"{name}:{version}" for name, version in self._models)
