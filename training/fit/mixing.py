"""Mixing an in-distribution batch with outliers, as MixOE does (Zhang et al., WACV 2023,
arXiv 2106.03917).

Small pure functions in the spirit of timm's ``data/mixup.py``: the mixing coefficient and the
box are drawn from an explicit :class:`torch.Generator` (never the global RNG), the box is computed
from the image shape alone, and CutMix returns the coefficient corrected for clipping.

Conventions: ``lam`` is the share of the **in-distribution** image kept in the mix, so ``lam = 1``
is the ID image unchanged and ``lam = 0`` is the outlier alone. Image batches are ``(B, C, H, W)``;
the outlier batch pairs one outlier with each ID image and has the same shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _uniform(generator: torch.Generator) -> float:
    """One draw from U(0, 1], so that its logarithm and its powers are finite."""
    return 1.0 - torch.rand((), dtype=torch.float64, generator=generator, device=generator.device).item()


def _normal(generator: torch.Generator) -> float:
    return torch.randn((), dtype=torch.float64, generator=generator, device=generator.device).item()


def _sample_gamma(shape: float, generator: torch.Generator) -> float:
    """One draw from Gamma(shape, 1) by Marsaglia & Tsang (2000), "A simple method for generating
    gamma variables".

    For ``shape >= 1``: with ``d = shape - 1/3``, ``c = 1 / sqrt(9 d)``, draw ``z ~ N(0, 1)``,
    ``v = (1 + c z)^3`` and ``u ~ U(0, 1]``; accept ``d v`` when ``v > 0`` and
    ``log u < z^2 / 2 + d - d v + d log v``. For ``shape < 1`` use the boost
    ``Gamma(a) = Gamma(a + 1) * U^(1/a)``.
    """
    if shape < 1.0:
        return _sample_gamma(shape + 1.0, generator) * _uniform(generator) ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = _normal(generator)
        v = (1.0 + c * z) ** 3
        if v <= 0.0:
            continue
        if math.log(_uniform(generator)) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


def sample_lambda(alpha: float, generator: torch.Generator) -> float:
    """Draw the mixing coefficient ``lam ~ Beta(alpha, alpha)``.

    Uses ``Beta(a, b) = G_a / (G_a + G_b)`` with independent ``G_a ~ Gamma(a)``, ``G_b ~ Gamma(b)``,
    both drawn from ``generator`` only, so the same generator state always gives the same ``lam``.
    The MixOE paper draws it once per batch (alpha = 1 for mixup, 2 for cutmix).
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    g_id = _sample_gamma(alpha, generator)
    g_out = _sample_gamma(alpha, generator)
    return g_id / (g_id + g_out)


def _check_lambda(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")


def _check_pair(x: Tensor, outliers: Tensor) -> None:
    if x.shape != outliers.shape:
        raise ValueError(
            f"MixOE pairs one outlier with each ID image: outliers must have the ID batch's shape "
            f"{tuple(x.shape)}, got {tuple(outliers.shape)}"
        )


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """The box ``(y0, y1, x0, x1)`` (half-open rows ``y0:y1``, columns ``x0:x1``) to fill with outlier
    pixels.

    Its unclipped sides are ``round(sqrt(1 - lam) * height)`` and ``round(sqrt(1 - lam) * width)``, so
    that it covers about ``1 - lam`` of the image; its centre is a uniformly drawn pixel, and the box
    is then clipped to the image (so it may cover less than ``1 - lam``: see :func:`cutmix`).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    _check_lambda(lam)
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = round(height * ratio), round(width * ratio)
    cy = int(torch.randint(height, (), generator=generator, device=generator.device).item())
    cx = int(torch.randint(width, (), generator=generator, device=generator.device).item())
    top, left = cy - cut_h // 2, cx - cut_w // 2
    y0, y1 = max(top, 0), min(top + cut_h, height)
    x0, x1 = max(left, 0), min(left + cut_w, width)
    return y0, y1, x0, x1


def mixup(x: Tensor, outliers: Tensor, lam: float) -> tuple[Tensor, float]:
    """Mixup with outliers: ``x_mix = lam * x + (1 - lam) * o`` (Zhang et al., ICLR 2018), pixel-wise,
    each ID image with its paired outlier. Returns ``(x_mix, lam)``."""
    _check_pair(x, outliers)
    _check_lambda(lam)
    return lam * x + (1.0 - lam) * outliers, lam


def cutmix(x: Tensor, outliers: Tensor, lam: float, generator: torch.Generator) -> tuple[Tensor, float]:
    """CutMix with outliers (Yun et al., ICCV 2019): one box from :func:`cutmix_box`, the same for the
    whole batch, is filled in each ID image with its paired outlier's pixels.

    Returns ``(x_mix, lam_kept)`` where ``lam_kept = 1 - box_area / (H * W)`` is the share of ID pixels
    actually kept after clipping the box, the ``lam`` MixOE uses for the soft target.
    """
    _check_pair(x, outliers)
    height, width = x.shape[-2:]
    y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
    x_mix = x.clone()
    x_mix[..., y0:y1, x0:x1] = outliers[..., y0:y1, x0:x1]
    return x_mix, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mixed_targets(labels: Tensor, num_classes: int, lam: float) -> Tensor:
    """Soft targets ``t = lam * onehot(y) + (1 - lam) * uniform(K)``, shape ``(B, K)``, float32.

    Each row sums to one: the ID share of the mix keeps its label, the outlier share is spread evenly
    over the ``K`` classes.
    """
    _check_lambda(lam)
    onehot = torch.nn.functional.one_hot(labels, num_classes).float()
    return lam * onehot + (1.0 - lam) / num_classes
