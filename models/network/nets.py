"""Build an ImageNet-style backbone with a K-way head, by name.

Training and serving both build networks through :func:`build_network`, so a bundle only has to
record the architecture name and the class count to be rebuilt exactly.

Pretrained weights are a local file (``.pth``/``.pt`` state dict, or ``.safetensors``) or a
torchvision weight name (``"IMAGENET1K_V1"``, ``"DEFAULT"``), which :mod:`models.network.weights`
resolves to the published file, found on this machine when it is there (offline) and downloaded
only when it is not. Either way the 1000-way ImageNet classifier is dropped and a fresh K-way
head is attached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tv_models

from models.lookup import look_up
from models.network.weights import pretrained_file


@dataclass(frozen=True)
class _Architecture:
    """How to split one torchvision classifier into a feature extractor and its head."""

    factory: Callable[..., nn.Module]
    head_attr: str  # attribute holding the ImageNet classifier, replaced by nn.Identity
    feature_dim: int


ARCHITECTURES: dict[str, _Architecture] = {
    "resnet18": _Architecture(tv_models.resnet18, "fc", 512),
    "resnet34": _Architecture(tv_models.resnet34, "fc", 512),
    "resnet50": _Architecture(tv_models.resnet50, "fc", 2048),
    "mobilenet_v2": _Architecture(tv_models.mobilenet_v2, "classifier", 1280),
}


class Classifier(nn.Module):
    """A backbone producing penultimate features and a linear K-way head on top.

    ``forward`` returns logits ``(B, K)``; ``forward_features`` returns ``(logits, features)``
    with features ``(B, D)``, which feature-space detectors and analyses need.
    """

    def __init__(self, architecture: str, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.architecture = architecture
        self.num_classes = num_classes
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        return self.head(features), features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


Precision = Literal["fp32", "bf16"]


def default_precision(device: torch.device, bf16: bool = True) -> Precision:
    """bf16 autocast where it is fast (CUDA), fp32 elsewhere: the precision a new bundle is calibrated at."""
    return "bf16" if bf16 and device.type == "cuda" else "fp32"


@torch.inference_mode()
def deployed_logits(model: nn.Module, batch: Tensor, precision: Precision) -> Tensor:
    """Float32 CPU logits at ``precision`` (bf16 autocast or fp32), channels_last on CUDA.

    The one inference path shared by calibration/evaluation (training) and the service. A bundle
    records the precision its thresholds were calibrated at and always runs at it, whatever the
    device: bf16 and fp32 scores differ by more than the gaps between calibration scores.
    """
    return device_logits(model, batch, precision).cpu()


@torch.inference_mode()
def deployed_outputs(model: Classifier, batch: Tensor, precision: Precision) -> tuple[Tensor, Tensor]:
    """:func:`deployed_logits` and the penultimate features (B, D), both float32 on the CPU."""
    logits, features = device_outputs(model, batch, precision)
    return logits.cpu(), features.cpu()


@torch.inference_mode()
def device_logits(model: nn.Module, batch: Tensor, precision: Precision) -> Tensor:
    """:func:`deployed_logits` left on the model's device, without a synchronisation.

    Autocast's cache of cast weights is off: a forward pass casts each weight once anyway, and a
    cache filled while recording a CUDA graph (``models.network.graphs``) would outlive its memory.
    """
    return _at_precision(model, batch, precision, model)[0]


@torch.inference_mode()
def device_outputs(model: Classifier, batch: Tensor, precision: Precision) -> tuple[Tensor, Tensor]:
    """Float32 logits (B, K) and penultimate features (B, D) of one pass, on the model's device,
    as :func:`device_logits` computes them."""
    logits, features = _at_precision(model, batch, precision, model.forward_features)
    return logits, features


def _at_precision(
    model: nn.Module, batch: Tensor, precision: Precision, forward: Callable[[Tensor], Tensor | tuple[Tensor, ...]]
) -> tuple[Tensor, ...]:
    """``forward`` of ``batch`` on ``model``'s device at ``precision``, every output as float32."""
    device = next(model.parameters()).device
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
        inputs = batch.to(device=device, memory_format=memory_format, non_blocking=True)
        outputs = forward(inputs)
    return tuple(output.float() for output in (outputs if isinstance(outputs, tuple) else (outputs,)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error, not a silent CPU run.

    ``cuda`` means the process's own GPU (``local_rank`` under torchrun); ``cuda:N`` names one.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but no CUDA device is available")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    raise ValueError(f"Invalid device {name!r}. Only auto, cpu, cuda and cuda:N are supported.")


def get_architecture(name: str) -> _Architecture:
    """Look an architecture up by name; an unknown name lists the valid ones."""
    return look_up(ARCHITECTURES, name, "architecture")


def build_network(architecture: str, num_classes: int, pretrained: str | Path | None = None) -> Classifier:
    """Build ``architecture`` with a ``num_classes``-way head.

    ``pretrained`` is ``None`` (random init), a torchvision weight name, or a path to a local
    ImageNet state dict (:func:`models.network.weights.pretrained_file`). Weights that cannot be found
    are an error, never a silent random init.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    spec = get_architecture(architecture)
    network = spec.factory(weights=None)
    if pretrained is not None:
        network.load_state_dict(load_state_dict_file(pretrained_file(architecture, pretrained)))
    setattr(network, spec.head_attr, nn.Identity())
    return Classifier(architecture, network, spec.feature_dim, num_classes)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state
