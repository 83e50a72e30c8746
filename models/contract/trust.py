"""Trust in a bundle beyond its hash: where its files live, what it claims to be, who signed it.

The manifest's ``weights_sha256`` catches corruption, not tampering: whoever can write the weights
can rewrite the manifest too. So :func:`models.contract.bundle.read_bundle` also checks, always:

* :func:`check_contained` -- the ``<name>/<version>`` folders are real directories and no entry of
  the version folder resolves outside it (a symlink to weights elsewhere is refused);
* :func:`check_identity` -- the manifest names the folders it sits in (a folder ``2`` holding
  version 1's manifest is refused);

and, when the operator asks for it (:class:`BundleTrust`):

* an Ed25519 signature over the exact bytes of ``manifest.json`` (which records the weights'
  sha256), stored beside it as ``manifest.sig`` (64 raw bytes, as ``openssl pkeyutl -sign -rawin``
  writes them), by one of the operator's public keys;
* the sha256 of ``manifest.json`` pinned in the settings.

``cryptography`` is imported only where a key or signature is handled, so loading an unsigned
bundle needs nothing beyond the models core. What each check does and does not protect against:
``docs/security.md``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FILE = "manifest.sig"
_RAW_KEY_BYTES = 32


class TrustError(ValueError):
    """A bundle or key that fails a trust check; the message names the problem and the path."""


def check_contained(directory: Path) -> None:
    """Refuse a bundle folder that reaches outside itself.

    ``directory`` must be ``<repository>/<name>/<version>`` with both folders real directories
    (the repository itself may be reached through a symlink), and every entry in it must resolve
    inside it: a symlink to weights or a manifest elsewhere is refused.
    """
    folder = Path(os.path.abspath(directory))
    real = folder.resolve()
    if real != folder.parent.parent.resolve() / folder.parent.name / folder.name:
        raise TrustError(f"bundle folder {folder} is a symlink (to {real}): bundle folders must be real directories")
    for entry in sorted(real.iterdir()):
        target = entry.resolve()
        if not target.is_relative_to(real):
            raise TrustError(f"{entry} resolves to {target}, outside its bundle folder {folder}")


def check_identity(directory: Path, name: str, version: str) -> None:
    """Refuse a bundle whose manifest (``name``, ``version``) misnames its ``<name>/<version>`` folders."""
    folder = Path(os.path.abspath(directory))
    if (folder.parent.name, folder.name) != (name, version):
        raise TrustError(f"bundle folder {folder} must be <name>/<version> = {name}/{version}, as its manifest says")


@dataclass(frozen=True)
class BundleTrust:
    """What a bundle's manifest must satisfy to load: signed by one of ``keys`` (when any), and
    hashing to ``manifest_sha256`` (when set). The default trusts any manifest."""

    keys: tuple[Ed25519PublicKey, ...] = ()
    manifest_sha256: str | None = None

    def verify(self, directory: Path, manifest: bytes) -> None:
        """Raise :class:`TrustError` unless ``manifest`` (the bytes of ``directory``'s manifest) passes."""
        if self.manifest_sha256 is not None:
            digest = hashlib.sha256(manifest).hexdigest()
            if digest != self.manifest_sha256:
                raise TrustError(
                    f"manifest of bundle {directory} has sha256 {digest}, not the pinned {self.manifest_sha256}"
                )
        if self.keys:
            _verify_signature(directory, manifest, self.keys)


def _verify_signature(directory: Path, manifest: bytes, keys: Sequence[Ed25519PublicKey]) -> None:
    from cryptography.exceptions import InvalidSignature

    signature_path = directory / SIGNATURE_FILE
    if not signature_path.is_file():
        raise TrustError(f"bundle {directory} is unsigned ({SIGNATURE_FILE} missing) and trusted keys are set")
    signature = signature_path.read_bytes()
    for key in keys:
        try:
            key.verify(signature, manifest)
            return
        except InvalidSignature:
            continue
    raise TrustError(f"{signature_path} is not a valid signature of its manifest by any trusted key")


def load_public_keys(paths: Sequence[Path]) -> tuple[Ed25519PublicKey, ...]:
    """Ed25519 public keys from PEM files (``openssl pkey -pubout``) or 32-byte raw key files."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return tuple(
        _load_key(Path(path), "public", load_pem_public_key, Ed25519PublicKey.from_public_bytes, Ed25519PublicKey)
        for path in paths
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PEM file (``openssl genpkey -algorithm ed25519``)
    or a 32-byte raw key file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    def load_pem(data: bytes) -> object:
        return load_pem_private_key(data, password=None)

    return _load_key(Path(path), "private", load_pem, Ed25519PrivateKey.from_private_bytes, Ed25519PrivateKey)


def _load_key(
    path: Path, kind: str, load_pem: Callable[[bytes], object], load_raw: Callable[[bytes], Any], key_type: type
) -> Any:
    """One loader for both key kinds: PEM through ``load_pem``, else raw bytes; must be Ed25519."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TrustError(f"cannot read {kind} key {path}: {error.strerror}") from None
    pem = data.lstrip().startswith(b"-----BEGIN")
    if not pem and len(data) != _RAW_KEY_BYTES:
        raise TrustError(f"{path} is not an Ed25519 {kind} key: expected PEM or {_RAW_KEY_BYTES} raw bytes")
    try:
        key = load_pem(data) if pem else load_raw(data)
    except (ValueError, TypeError) as error:
        raise TrustError(f"{path} is not an Ed25519 {kind} key: {' '.join(str(error).split())}") from None
    if not isinstance(key, key_type):
        raise TrustError(f"{path} holds a {type(key).__name__}, not an Ed25519 {kind} key")
    return key


def generate_key(path: Path) -> Path:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600) and its public key to
    ``path.pub``; return the public key's path. Existing files are never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise TrustError(f"{existing} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public_path
