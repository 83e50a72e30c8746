"""Seeded synthetic logits for ID and OOD inputs, for tests that compare scores, metrics and losses.

ID rows put an extra ``margin`` on their own class, so they are confident; OOD rows are the same
noise without it. The two sets overlap, so detection is good but imperfect (every metric is strictly
between its best and worst value), which keeps comparisons between implementations informative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LabelledLogits:
    """``id_logits`` ``(n_id, K)`` with class ``labels`` ``(n_id,)``, and ``ood_logits`` ``(n_ood, K)``."""

    id_logits: Tensor
    labels: Tensor
    ood_logits: Tensor


def synthetic_logits(
    n_id: int,
    n_ood: int,
    num_classes: int,
    *,
    seed: int,
    margin: float,
    noise: float = 2.0,
    offset: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> LabelledLogits:
    """Logits ``offset + noise * N(0, 1)``, plus ``margin`` on the labelled class for ID rows."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n_id,), generator=generator)
    id_logits = offset + noise * torch.randn(n_id, num_classes, generator=generator, dtype=torch.float64)
    id_logits[torch.arange(n_id), labels] += margin
    ood_logits = offset + noise * torch.randn(n_ood, num_classes, generator=generator, dtype=torch.float64)
    return LabelledLogits(id_logits.to(dtype), labels, ood_logits.to(dtype))
