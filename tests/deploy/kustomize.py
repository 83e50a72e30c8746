"""A small, offline kustomize: renders the kustomizations under deploy/kubernetes for the tests.

It implements only what those kustomizations use, and refuses anything else rather than
rendering it wrongly: ``resources`` (YAML files and kustomization directories), ``patches``
given by ``path`` (strategic-merge patches that name their target by kind and name) and
``images`` (``newName`` / ``newTag``). As in kustomize, a patch file must lie in or below its
kustomization's directory. ``tests/deploy/test_kustomize.py`` checks that it renders the same
objects as ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

_FIELDS = frozenset({"apiVersion", "kind", "resources", "patches", "images"})
# Strategic merge: lists merged item by item on this key (the Kubernetes API's patchMergeKey for
# the fields the patches touch); every other list is replaced whole, as in kustomize.
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name"}


class KustomizeError(ValueError):
    """A kustomization this renderer does not support, or that kustomize itself would refuse."""


def object_id(manifest: dict) -> tuple[str, str]:
    """``(kind, name)``: how patches find their target (the kustomizations set no namespace)."""
    return manifest["kind"], manifest["metadata"]["name"]


def load_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of ``path``."""
    return [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document is not None]


def render(directory: Path) -> list[dict]:
    """The objects the kustomization in ``directory`` produces, in resource order."""
    directory = directory.resolve()
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - _FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    ids = [object_id(manifest) for manifest in objects]
    duplicates = sorted({identity for identity in ids if ids.count(identity) > 1})
    if duplicates:
        raise KustomizeError(f"{directory}: objects defined more than once: {duplicates}")
    for patch in kustomization.get("patches", []):
        objects = _apply_patch_file(directory, patch, objects)
    for image in kustomization.get("images", []):
        objects = [_set_image(manifest, image) for manifest in objects]
    return objects


def _apply_patch_file(directory: Path, patch: dict, objects: list[dict]) -> list[dict]:
    if set(patch) != {"path"}:
        raise KustomizeError(f"{directory}: only patches given by path are supported, got {sorted(patch)}")
    path = (directory / patch["path"]).resolve()
    if not path.is_relative_to(directory):
        raise KustomizeError(f"{directory}: patch {patch['path']} is not in or below the kustomization")
    for document in load_documents(path):
        target = object_id(document)
        if target not in {object_id(manifest) for manifest in objects}:
            raise KustomizeError(f"{path}: no {target[0]} named {target[1]} to patch")
        objects = [
            strategic_merge(manifest, document) if object_id(manifest) == target else manifest for manifest in objects
        ]
    return objects


def strategic_merge(original: Any, patch: Any, field: str | None = None) -> Any:
    """``patch`` merged into a copy of ``original``: maps key by key (``null`` deletes a key),
    lists of :data:`_MERGE_KEYS` fields item by item, anything else replaced."""
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(merged[key], value, key) if key in merged else copy.deepcopy(value)
        return merged
    if isinstance(original, list) and isinstance(patch, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        merged = copy.deepcopy(original)
        for item in patch:
            positions = [index for index, existing in enumerate(merged) if existing.get(key) == item[key]]
            if positions:
                merged[positions[0]] = strategic_merge(merged[positions[0]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def split_image(reference: str) -> tuple[str, str | None]:
    """``"registry:5000/app:1.2" -> ("registry:5000/app", "1.2")``; no tag: ``None``."""
    name, _, digest = reference.partition("@")
    if digest:
        return name, None
    repository, colon, tag = name.rpartition(":")
    if colon and "/" not in tag:
        return repository, tag
    return name, None


def _set_image(value: Any, image: dict) -> Any:
    """Every ``containers`` / ``initContainers`` image named ``image["name"]``, renamed and retagged."""
    unknown = set(image) - {"name", "newName", "newTag"}
    if unknown:
        raise KustomizeError(f"unsupported images fields {sorted(unknown)}")
    if isinstance(value, list):
        return [_set_image(item, image) for item in value]
    if not isinstance(value, dict):
        return value
    result = {key: _set_image(item, image) for key, item in value.items()}
    for field in ("containers", "initContainers"):
        for container in result.get(field, []) if isinstance(result.get(field), list) else []:
            name, tag = split_image(container.get("image", ""))
            if name == image["name"]:
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")
    return result
