"""Evaluation-time preprocessing, shared by training's evaluation and the service.

One definition keeps calibration honest: the service must feed the network exactly what the
thresholds were calibrated on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator
from torch import Tensor
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocessing(BaseModel):
    """Resize the shorter side to ``resize``, centre-crop ``input_size``, normalise.

    Strict, because it is part of the bundle contract: an unknown key, a zero std or a crop larger
    than the resized image (which would silently pad with zeros) is a broken bundle.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input_size: int = Field(224, ge=8)
    resize: int = Field(256, ge=8)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD

    @model_validator(mode="after")
    def _crop_fits(self) -> "Preprocessing":
        if self.resize < self.input_size:
            raise ValueError(f"resize ({self.resize}) must be at least input_size ({self.input_size})")
        return self


class EvalGeometry:
    """RGB image -> uint8 tensor (3, input_size, input_size): resize shorter side, centre crop.

    The image is a PIL image or a uint8 RGB tensor (3, H, W) on any device (a JPEG decoder's
    output); either way the resize runs on the tensor, so both give the same pixels. This is
    ``v2.Compose([ToImage(), Resize(resize, antialias=True), CenterCrop(input_size)])`` calling
    torchvision's tensor kernels directly: the same ops without the Compose's per-call dispatch,
    which costs more than the resize itself on a GPU, where the service crops every decoded JPEG.
    A class, not a closure, so that data loader workers can pickle it.
    """

    def __init__(self, preprocessing: Preprocessing):
        self._resize = [preprocessing.resize]
        self._crop = [preprocessing.input_size]

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        pixels = F.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        return F.center_crop_image(F.resize_image(pixels, self._resize, antialias=True), self._crop)


class Normalization:
    """uint8 image tensor (..., 3, H, W) -> float32, scaled to [0, 1] and normalised with mean/std.

    The arithmetic of torchvision's ``ToDtype(float32, scale=True)`` then ``Normalize``, op for
    op, so the result is the same bit for bit; but mean and std are made once per device, where
    torchvision copies them from Python lists on every call: a host-to-device copy per batch that
    also makes the pass impossible to record as a CUDA graph (``models.network.graphs``).
    """

    def __init__(self, preprocessing: Preprocessing):
        self._mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, image: Tensor) -> Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image tensor, got {image.dtype}")
        mean, std = self._constants(image.device)
        return image.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._mean.to(device), self._std.to(device))
        return self._on_device[device]


class EvalTransform:
    """RGB image -> normalised float tensor (3, input_size, input_size): geometry, then normalisation."""

    def __init__(self, preprocessing: Preprocessing):
        self._geometry = EvalGeometry(preprocessing)
        self._normalize = Normalization(preprocessing)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        return self._normalize(self._geometry(image))


def preprocess_batch(images: Sequence[Image.Image], preprocessing: Preprocessing) -> Tensor:
    """Stack RGB PIL images into one normalised batch (B, 3, S, S)."""
    transform = EvalTransform(preprocessing)
    return torch.stack([transform(image) for image in images])
