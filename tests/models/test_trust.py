"""Tampering the sha256 check cannot see, and how containment, identity, signatures and pins refuse it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.torch import save_file

from models.contract.bundle import save_bundle, sha256_file
from models.contract.manifest import MANIFEST_FILE, WEIGHTS_FILE, BundleError
from models.contract.trust import SIGNATURE_FILE, BundleTrust, TrustError, load_public_keys
from models.network.nets import build_network
from models.runtime import load_bundle
from tests.models.test_bundle import calibrated  # noqa: F401  (a fixture: the tiny network and its manifest)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _sign(directory: Path, key: Ed25519PrivateKey = KEY) -> None:
    (directory / SIGNATURE_FILE).write_bytes(key.sign((directory / MANIFEST_FILE).read_bytes()))


def _manifest_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST_FILE).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def signed(calibrated: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A bundle saved with a signature by ``KEY``; tests that tamper with it work on a copy."""
    return save_bundle(tmp_path_factory.mktemp("repo") / "flowers" / "1", *calibrated, signer=KEY.sign)


@pytest.fixture
def copy(signed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(signed, tmp_path / "repo" / "flowers" / "1"))


def _edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((directory / MANIFEST_FILE).read_text())
    edit(raw)
    (directory / MANIFEST_FILE).write_text(json.dumps(raw))


def _swap_weights(directory: Path) -> None:
    """Other weights of the same architecture, with the manifest's sha256 updated to match."""
    torch.manual_seed(1)
    state = {key: value.contiguous() for key, value in build_network("resnet18", 3).state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    _edit_manifest(directory, lambda raw: raw.update(weights_sha256=sha256_file(directory / WEIGHTS_FILE)))


def _shift_thresholds(directory: Path) -> None:
    """Every calibration score and threshold raised by 100, so that everything is accepted: still consistent."""

    def shift(raw: dict[str, Any]) -> None:
        calibration = raw["calibration"]
        calibration["scores"] = [score + 100 for score in calibration["scores"]]
        for point in calibration["operating_points"]:
            point["threshold"] += 100

    _edit_manifest(directory, shift)


@pytest.mark.parametrize("tamper", [_swap_weights, _shift_thresholds], ids=["new-weights", "thresholds"])
def test_consistent_tampering_passes_the_hash_but_not_the_signature_or_the_pin(
    copy: Path, tamper: Callable[[Path], None]
) -> None:
    pinned = _manifest_sha256(copy)
    tamper(copy)
    assert load_bundle(copy).manifest.weights_sha256 == sha256_file(copy / WEIGHTS_FILE)  # the hash is fooled
    with pytest.raises(BundleError, match=f"^{copy / SIGNATURE_FILE} is not a valid signature .* by any trusted key$"):
        load_bundle(copy, trust=BundleTrust(keys=(KEY.public_key(),)))
    with pytest.raises(BundleError, match=f"^manifest of bundle {copy} has sha256 [0-9a-f]{{64}}, not the pinned {pinned}$"):
        load_bundle(copy, trust=BundleTrust(manifest_sha256=pinned))


def test_a_bundle_signed_by_a_trusted_key_and_matching_its_pin_loads(signed: Path) -> None:
    trust = BundleTrust(keys=(OTHER_KEY.public_key(), KEY.public_key()), manifest_sha256=_manifest_sha256(signed))
    assert load_bundle(signed, trust=trust).manifest.name == "flowers"


def test_unsigned_or_foreign_signed_bundles_are_refused_when_keys_are_trusted(copy: Path) -> None:
    trust = BundleTrust(keys=(KEY.public_key(),))
    _sign(copy, OTHER_KEY)
    with pytest.raises(BundleError, match="not a valid signature of its manifest by any trusted key"):
        load_bundle(copy, trust=trust)
    (copy / SIGNATURE_FILE).unlink()
    with pytest.raises(BundleError, match=f"^bundle {copy} is unsigned \\(manifest.sig missing\\)"):
        load_bundle(copy, trust=trust)


def _link_outside(copy: Path, file_name: str) -> None:
    outside = copy.parent.parent.parent / f"elsewhere-{file_name}"
    (copy / file_name).rename(outside)
    (copy / file_name).symlink_to(outside)


@pytest.mark.parametrize("file_name", [WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE])
def test_files_linked_from_outside_the_version_folder_are_refused_even_when_signed(copy: Path, file_name: str) -> None:
    _link_outside(copy, file_name)
    with pytest.raises(BundleError, match=f"^{copy / file_name} resolves to .*elsewhere-.*, outside its bundle folder"):
        load_bundle(copy, trust=BundleTrust(keys=(KEY.public_key(),)))


def test_a_symlink_inside_the_version_folder_is_allowed(copy: Path) -> None:
    (copy / WEIGHTS_FILE).rename(copy / "weights-v1.safetensors")
    (copy / WEIGHTS_FILE).symlink_to("weights-v1.safetensors")
    assert load_bundle(copy).version == "1"


@pytest.mark.parametrize("level", ["version", "name"])
def test_symlinked_bundle_folders_are_refused(signed: Path, tmp_path: Path, level: str) -> None:
    repository = tmp_path / "repo"
    if level == "version":
        (repository / "flowers").mkdir(parents=True)
        (repository / "flowers" / "1").symlink_to(signed)
    else:
        repository.mkdir()
        (repository / "flowers").symlink_to(signed.parent)
    with pytest.raises(BundleError, match="^bundle folder .* is a symlink .*: bundle folders must be real directories$"):
        load_bundle(repository / "flowers" / "1", trust=BundleTrust(keys=(KEY.public_key(),)))


def test_a_repository_reached_through_a_symlink_still_loads(signed: Path, tmp_path: Path) -> None:
    (tmp_path / "models").symlink_to(signed.parent.parent)
    assert load_bundle(tmp_path / "models" / "flowers" / "1").version == "1"


def test_a_folder_holding_another_versions_manifest_is_refused_even_when_signed(signed: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(signed, tmp_path / "repo" / "flowers" / "2"))
    with pytest.raises(BundleError, match="^bundle folder .*flowers/2 must be <name>/<version> = flowers/1, as its manifest"):
        load_bundle(folder, trust=BundleTrust(keys=(KEY.public_key(),)))
    renamed = Path(shutil.copytree(signed, tmp_path / "repo" / "roses" / "1"))
    with pytest.raises(BundleError, match="must be <name>/<version> = flowers/1"):
        load_bundle(renamed)


def test_public_keys_load_from_pem_and_raw_bytes_and_anything_else_is_named(tmp_path: Path) -> None:
    public = KEY.public_key()
    (tmp_path / "key.pem").write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "key.raw").write_bytes(public.public_bytes(Encoding.Raw, PublicFormat.Raw))
    (tmp_path / "short").write_bytes(b"\x01" * 31)
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    loaded = load_public_keys([tmp_path / "key.pem", tmp_path / "key.raw"])
    assert [key.public_bytes(Encoding.Raw, PublicFormat.Raw) for key in loaded] == [raw, raw]
    with pytest.raises(TrustError, match=f"^{tmp_path / 'short'} is not an Ed25519 public key: expected PEM or 32 raw"):
        load_public_keys([tmp_path / "short"])
    with pytest.raises(TrustError, match=f"^cannot read public key {tmp_path / 'missing'}: No such file"):
        load_public_keys([tmp_path / "missing"])
