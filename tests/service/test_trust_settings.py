"""MIXOE_TRUSTED_KEYS and pinned MIXOE_MODELS entries: parsed, checked together, enforced at start-up."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient
from pydantic import ValidationError

from models.contract.manifest import MANIFEST_FILE, BundleError
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import TinyModel


def _pin(tiny: TinyModel) -> str:
    return hashlib.sha256((tiny.path / MANIFEST_FILE).read_bytes()).hexdigest()


def test_a_pinned_reference_selects_its_bundle_and_records_its_digest(
    make_settings: Callable[..., Settings], tiny: TinyModel
) -> None:
    settings = make_settings(models=f"tiny:1@sha256:{_pin(tiny)}")
    assert settings.pinned_digests == {("tiny", "1"): _pin(tiny)}
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "versions": ["1"], "ready": True}


def test_a_pin_that_does_not_match_stops_the_start(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(models="tiny:1@sha256:" + "0" * 64)
    with pytest.raises(BundleError, match="has sha256 [0-9a-f]{64}, not the pinned 0{64}$"):
        with TestClient(create_app(settings)):
            pass


def test_trusted_keys_refuse_an_unsigned_bundle_at_start(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    public = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "trusted.pem").write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    settings = make_settings(trusted_keys=str(tmp_path / "trusted.pem"))
    assert settings.trusted_keys == [tmp_path / "trusted.pem"]
    assert settings.environment()["MIXOE_TRUSTED_KEYS"] == str(tmp_path / "trusted.pem")
    with pytest.raises(BundleError, match=r"is unsigned \(manifest.sig missing\) and trusted keys are set$"):
        with TestClient(create_app(settings)):
            pass


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"models": "tiny@sha256:" + "0" * 64}, 'must look like "name", "name:version" or "name:version@sha256'),
        ({"models": "tiny:1@sha256:abc"}, 'must look like "name", "name:version" or "name:version@sha256'),
        ({"models": f"tiny:1@sha256:{'0' * 64},other:2"}, "pins .* but not every entry: pin them all, or set trusted_keys"),
        ({"trusted_keys": "/nonexistent/key.pem"}, "cannot read public key /nonexistent/key.pem"),
    ],
    ids=["pin-without-version", "short-digest", "partly-pinned", "missing-key"],
)
def test_bad_trust_settings_are_refused_naming_the_problem(
    make_settings: Callable[..., Settings], overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(**overrides)
