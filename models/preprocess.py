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
from torchvision.transforms import v2

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


def eval_geometry(preprocessing: Preprocessing) -> v2.Compose:
    """PIL RGB image -> uint8 tensor (3, input_size, input_size): resize shorter side, centre crop."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(preprocessing.resize, antialias=True),
            v2.CenterCrop(preprocessing.input_size),
        ]
    )


def normalization(preprocessing: Preprocessing) -> v2.Compose:
    """uint8 image tensor -> float, scaled to [0, 1] and normalised with the bundle's mean/std."""
    return v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocessing.mean), list(preprocessing.std)),
        ]
    )


def eval_transform(preprocessing: Preprocessing) -> v2.Compose:
    """PIL RGB image -> normalised float tensor (3, input_size, input_size)."""
    return v2.Compose([eval_geometry(preprocessing), normalization(preprocessing)])


def preprocess_batch(images: Sequence[Image.Image], preprocessing: Preprocessing) -> Tensor:
    """Stack RGB PIL images into one normalised batch (B, 3, S, S)."""
    transform = eval_transform(preprocessing)
    return torch.stack([transform(image) for image in images])
