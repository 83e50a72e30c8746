"""Write and read a bundle's files: the contract of :mod:`models.contract.manifest`, on disk.

Training writes a bundle with :func:`save_bundle`; :func:`read_bundle` checks the schema version,
the manifest, the weights' sha256 and the state-dict keys before returning anything, so a bundle
either loads whole or not at all; and, as :mod:`models.contract.trust` says, that the bundle stays inside
its folder, names it, and (when asked) is signed by a trusted key or matches a pinned digest.
:func:`models.runtime.load_bundle` puts what it returns on a device. This module never imports
the runtime, so training (which only writes) carries none of the serving code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.contract.manifest import (
    MANIFEST_FILE,
    SCORE_STATE_FILE,
    SUPPORTED_SCHEMA_VERSIONS,
    WEIGHTS_FILE,
    BundleError,
    Manifest,
)
from models.contract.trust import SIGNATURE_FILE, BundleTrust, TrustError, check_contained, check_identity
from models.network.nets import Classifier, build_network
from models.scoring.scores import get_score


@dataclass(frozen=True)
class StoredBundle:
    """A bundle's verified contents, on the CPU: what :func:`read_bundle` returns."""

    path: Path
    manifest: Manifest
    model: Classifier  # weights loaded, strict
    score_state: dict[str, Tensor] | None  # a feature-space score's fitted state, else None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large weights never sit in memory twice."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_bundle(
    directory: Path,
    model: torch.nn.Module,
    manifest: Manifest,
    extra_files: Mapping[str, Path] | None = None,
    signer: Callable[[bytes], bytes] | None = None,
    score_state: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write a bundle to ``directory`` (``<repository>/<name>/<version>``) atomically; return it.

    ``score_state`` is the fitted state of a feature-space score (``Score.fit``), required for
    such a score and refused for a logit score; it goes to ``score_state.safetensors``, stored
    exactly as given (the thresholds were calibrated on it), its sha256 into the manifest.

    Everything goes into a hidden temporary sibling first and is moved into place with one
    ``os.replace``, so readers never see a half-written bundle. ``extra_files`` maps file names in
    the bundle (``report.md``, plots) to the files to copy. ``signer`` (an Ed25519 private key's
    ``sign``) turns the manifest's bytes into ``manifest.sig`` (:mod:`models.contract.trust`). The state dict is checked against
    ``build_network(architecture, num_classes)`` first: a bundle that cannot load is never written.
    """
    directory = Path(directory)
    if (directory.parent.name, directory.name) != (manifest.name, manifest.version):
        raise BundleError(
            f"bundle directory {directory} must end in <name>/<version> = {manifest.name}/{manifest.version}"
        )
    if directory.exists():
        raise BundleError(f"bundle {manifest.name}/{manifest.version} already exists at {directory}")
    extras = dict(extra_files or {})
    for file_name, source in extras.items():
        if file_name in (WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE, SCORE_STATE_FILE) or (
            Path(file_name).name != file_name or file_name.startswith(".")
        ):
            raise BundleError(f"extra file name {file_name!r} for {directory} must be a plain, non-reserved file name")
        if not Path(source).is_file():
            raise BundleError(f"extra file {source} for {directory} does not exist")
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    _load_strict(build_network(manifest.architecture, manifest.num_classes), state, manifest, directory)
    fitted = {key: tensor.detach().cpu().contiguous() for key, tensor in (score_state or {}).items()}
    _check_score_state(manifest, bool(fitted), directory)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        hashes = {"weights_sha256": sha256_file(staging / WEIGHTS_FILE), "score_state_sha256": ""}
        if fitted:
            save_file(fitted, str(staging / SCORE_STATE_FILE))
            hashes["score_state_sha256"] = sha256_file(staging / SCORE_STATE_FILE)
        final = manifest.model_copy(update=hashes)
        manifest_bytes = (final.model_dump_json(indent=2) + "\n").encode("utf-8")
        (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
        if signer is not None:
            (staging / SIGNATURE_FILE).write_bytes(signer(manifest_bytes))
        for file_name, source in extras.items():
            shutil.copyfile(source, staging / file_name)
        # mkdtemp creates 0700 and safetensors writes 0600; a bundle is meant to be read by the
        # serving user too (the container runs as a non-root user).
        staging.chmod(0o755)
        for written in staging.iterdir():
            written.chmod(0o644)
        if directory.exists():  # created by someone else while we were writing
            raise BundleError(f"bundle {manifest.name}/{manifest.version} already exists at {directory}")
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_bundle(path: Path, trust: BundleTrust | None = None) -> StoredBundle:
    """Read and verify the bundle at ``path``; any problem raises :class:`BundleError`.

    Checks, in order: the directory (no entry resolving outside it), ``manifest.json`` (present,
    signed or pinned as ``trust`` asks, JSON, known schema version, valid, naming its folders),
    ``weights.safetensors`` (present, sha256 as recorded), then the state dict against the
    architecture and class count, and for a feature-space score ``score_state.safetensors``
    (present, sha256 as recorded: a signed or pinned manifest covers it too). Nothing is returned
    unless every check passes.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    try:
        check_contained(path)
        manifest = _read_manifest(path, trust or BundleTrust())
        check_identity(path, manifest.name, manifest.version)
    except TrustError as error:
        raise BundleError(str(error)) from None
    if not manifest.weights_sha256:
        raise BundleError(f"manifest in {path} records no weights_sha256, so the weights cannot be verified")
    state = _read_verified(path / WEIGHTS_FILE, manifest.weights_sha256)
    model = build_network(manifest.architecture, manifest.num_classes)
    _load_strict(model, state, manifest, path)
    _check_score_state(manifest, bool(manifest.score_state_sha256), path)
    score_state = None
    if manifest.score_state_sha256:
        score_state = _read_verified(path / SCORE_STATE_FILE, manifest.score_state_sha256)
    return StoredBundle(path, manifest, model, score_state)


def _read_verified(file: Path, recorded_sha256: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file whose sha256 is ``recorded_sha256``."""
    if not file.is_file():
        raise BundleError(f"{file.name} missing in bundle {file.parent}")
    digest = sha256_file(file)
    if digest != recorded_sha256:
        raise BundleError(
            f"sha256 mismatch for {file}: manifest records {recorded_sha256}, file has {digest} "
            "(corrupted or tampered with)"
        )
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise BundleError(f"cannot read {file}: {error}") from None


def _check_score_state(manifest: Manifest, has_state: bool, path: Path) -> None:
    """A feature-space score needs its fitted state; a logit score has none."""
    needs = get_score(manifest.score.name).needs_features
    if needs and not has_state:
        raise BundleError(f"score {manifest.score.name!r} of bundle {path} needs its fitted state ({SCORE_STATE_FILE})")
    if has_state and not needs:
        raise BundleError(f"score {manifest.score.name!r} of bundle {path} reads logits only but a fitted state was given")


def _read_manifest(path: Path, trust: BundleTrust) -> Manifest:
    """The manifest, parsed from the very bytes ``trust`` verified."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{MANIFEST_FILE} missing in bundle {path}")
    data = manifest_path.read_bytes()
    trust.verify(path, data)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object, got {type(raw).__name__}")
    schema_version = raw.get("schema_version")
    if schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        raise BundleError(
            f"{manifest_path} has unsupported schema_version {schema_version!r}; this code reads version(s) {supported}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        raise BundleError(f"invalid manifest {manifest_path}: {error}") from None


def _load_strict(model: Classifier, state: Mapping[str, Tensor], manifest: Manifest, path: Path) -> None:
    """Load ``state`` into ``model`` requiring exactly its keys and shapes."""
    head = state.get("head.weight")
    if head is not None and head.shape[0] != manifest.num_classes:
        raise BundleError(
            f"class count mismatch in {path}: the weights' head has {head.shape[0]} outputs "
            f"but the manifest declares num_classes={manifest.num_classes}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BundleError(
            f"weights in {path} do not fit architecture {manifest.architecture!r} "
            f"with {manifest.num_classes} classes: {error}"
        ) from None
