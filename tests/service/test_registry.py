"""Which bundles load, and how model references resolve."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.contract.manifest import MANIFEST_FILE, BundleError
from models.runtime import Bundle, load_bundle
from service.api.errors import InvalidParameter, ModelNotFound
from service.app import create_app
from service.runtime.hosted import HostedModel
from service.runtime.model_client import Channel, HostClient
from service.runtime.registry import LoadedModel, ModelRegistry, select_bundles
from service.settings import Settings
from tests.service.helpers import Recorder, TinyModel


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModel) -> Path:
    """Versions 1, 2 and 10 of the tiny bundle (copies that differ in their manifest's version)."""
    repository = tmp_path_factory.mktemp("versions")
    for version in ("1", "10", "2"):
        copy = shutil.copytree(tiny.path, repository / "tiny" / version)
        manifest = json.loads((copy / MANIFEST_FILE).read_text())
        (copy / MANIFEST_FILE).write_text(json.dumps(manifest | {"version": version}))
    return repository


def test_no_references_select_the_latest_version(two_versions: Path) -> None:
    assert [(name, version) for name, version, _ in select_bundles(two_versions, [])] == [("tiny", "10")]


def test_explicit_references(two_versions: Path) -> None:
    selected = select_bundles(two_versions, ["tiny:2", "tiny"])
    assert [(name, version) for name, version, _ in selected] == [("tiny", "2"), ("tiny", "10")]
    assert selected[0][2] == two_versions / "tiny" / "2"


@pytest.mark.parametrize("reference", ["tiny:3", "cars"])
def test_unknown_references_list_what_exists(two_versions: Path, reference: str) -> None:
    with pytest.raises(BundleError, match="available"):
        select_bundles(two_versions, [reference])


def test_an_empty_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no bundles"):
        select_bundles(tmp_path, [])


async def _no_batch_loop() -> Channel:
    raise OSError("these tests look models up; they judge no image")


def _loaded(bundle: Bundle) -> LoadedModel:
    return LoadedModel(bundle, HostedModel(HostClient(_no_batch_loop, 1.0), bundle, Recorder()))


def test_references_resolve_to_loaded_models(two_versions: Path) -> None:
    models = [_loaded(load_bundle(two_versions / "tiny" / version)) for version in ("2", "10")]
    registry = ModelRegistry(models)
    assert registry.default.version == "10"  # a bare name means its last-listed version
    assert registry.get(None) is registry.default
    assert registry.get("tiny:2") is models[0]
    assert registry.versions("tiny") == ["2", "10"]
    with pytest.raises(ModelNotFound, match="loaded: tiny:2, tiny:10"):
        registry.get("tiny:1")
    with pytest.raises(ModelNotFound, match="no model named 'cars'"):
        registry.get("cars")
    with pytest.raises(ValueError, match="default model"):
        ModelRegistry(models, default_reference="cars")
    assert ModelRegistry(models, default_reference="tiny:2").default is models[0]


def test_operating_points_resolve_or_list_the_available_ones(bundle: Bundle) -> None:
    model = _loaded(bundle)
    assert model.operating_point(None).target_id_acceptance == 0.95
    assert model.operating_point(0.99).target_id_acceptance == 0.99
    with pytest.raises(InvalidParameter, match="available: 0.9, 0.95, 0.99"):
        model.operating_point(0.8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"default_model": "cars"}, "default model"), ({"models": ["tiny:9"]}, "not found")],
    ids=["unknown-default", "unknown-version"],
)
def test_a_misconfigured_service_refuses_to_start(
    make_settings: Callable[..., Settings], overrides: dict[str, object], message: str
) -> None:
    app = create_app(make_settings(**overrides))
    with pytest.raises((ValueError, BundleError), match=message), TestClient(app):
        pass
