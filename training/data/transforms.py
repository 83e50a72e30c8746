"""Training and evaluation image transforms built from :class:`TransformConfig`.

Evaluation (and therefore calibration) goes through :class:`models.network.preprocess.EvalTransform`, the
very function the service uses, so a threshold calibrated here holds for what the service feeds
the network. Training adds the usual fine-grained augmentation: random-resized crop, horizontal
flip and optional colour jitter. Both expect a PIL RGB image (the datasets convert on load).

The training transform stops at a uint8 tensor: loader workers then ship a quarter of the bytes,
and the trainer converts and normalises on the device with :class:`models.network.preprocess.Normalization`,
as the service does.
:func:`build_eval_geometry` is the evaluation transform's uint8 counterpart for that path.
"""

from __future__ import annotations

from torchvision.transforms import v2

from models.network.preprocess import EvalGeometry, EvalTransform, Preprocessing
from training.config import OutlierConfig, TransformConfig


def preprocessing_of(cfg: TransformConfig) -> Preprocessing:
    """The evaluation preprocessing a bundle records, taken from the run's transform settings."""
    return Preprocessing(input_size=cfg.input_size, resize=cfg.resize, mean=cfg.mean, std=cfg.std)


def build_eval_transform(cfg: TransformConfig) -> EvalTransform:
    """Resize + centre crop + normalise, identical to serving."""
    return EvalTransform(preprocessing_of(cfg))


def build_eval_geometry(cfg: TransformConfig) -> EvalGeometry:
    """Resize + centre crop to a uint8 tensor; normalisation happens on the device."""
    return EvalGeometry(preprocessing_of(cfg))


def build_train_transform(cfg: TransformConfig) -> v2.Compose:
    """Random-resized crop (scale ``cfg.random_crop_scale``), optional flip and jitter; uint8 out.

    Switched-off augmentations are left out of the pipeline rather than run as no-ops, so the
    composed transform printed in logs shows exactly what was applied.
    """
    low, high = cfg.random_crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"random_crop_scale must satisfy 0 < low <= high <= 1, got {cfg.random_crop_scale}")
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(cfg.input_size, scale=(low, high), antialias=True),
    ]
    if cfg.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.color_jitter > 0:
        strength = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    return v2.Compose(steps)


def build_outlier_transform(outliers: OutlierConfig, cfg: TransformConfig) -> v2.Compose:
    """How training outliers reach the input size (see :class:`training.config.OutlierConfig`).

    ``same_as_id``: the ID training transform. ``resize_center_crop``: the evaluation geometry
    (whole image, shorter side to ``resize``, centre crop) then the flip, uint8 out.
    """
    if outliers.outlier_resize == "same_as_id":
        return build_train_transform(cfg)
    if outliers.outlier_resize == "resize_center_crop":
        steps: list[v2.Transform] = [v2.ToImage(), build_eval_geometry(cfg)]
        if cfg.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps)
    raise ValueError(
        f"Invalid outlier_resize {outliers.outlier_resize!r}. Only same_as_id and resize_center_crop are supported."
    )
