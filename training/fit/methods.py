"""Fine-tuning objectives: plain cross-entropy, MixOE and the outlier-exposure baselines it is
compared with.

Each objective is a :class:`Method`: it says how many outliers it wants per ID image and turns a
batch into a scalar loss plus a few floats to log. The model maps images ``(B, C, H, W)`` to logits
``(B, K)``. The pure maths (:func:`soft_cross_entropy`, :func:`uniform_cross_entropy`,
:func:`energy_margin_loss`, :meth:`MixOE.mixed_loss`) is testable without a model.

**One forward pass.** Methods that also look at outliers (or mixed images) run the model once on
``cat([x, other])`` and split the logits, as the reference code of Outlier Exposure and Energy-OE
does. Besides halving the launches, this fixes the BatchNorm semantics: in training mode the batch
statistics are computed over ID and auxiliary images together (in eval mode, or for a network
without BatchNorm, this is identical to two separate passes).

Losses are computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import MethodConfig
from training.fit.mixing import cutmix, mixed_targets, mixup, sample_lambda

LossAndLogs = tuple[Tensor, dict[str, float]]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy to soft targets: ``mean_b [ -sum_k t_bk * log softmax(z_b)_k ]``.

    ``logits`` and ``targets`` are ``(B, K)``; each target row is a probability vector.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    return -(targets * logits.float().log_softmax(dim=1)).sum(dim=1).mean()


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Cross-entropy to the uniform distribution: ``mean_b [ -(1/K) sum_k log softmax(z_b)_k ]``."""
    return -logits.float().log_softmax(dim=1).mean(dim=1).mean()


def energy_margin_loss(logits_in: Tensor, logits_out: Tensor, m_in: float, m_out: float) -> Tensor:
    """Squared-hinge energy regulariser of Liu et al., "Energy-based Out-of-distribution Detection"
    (NeurIPS 2020):

    ``mean_in relu(E(x_in) - m_in)^2 + mean_out relu(m_out - E(x_out))^2`` with the free energy
    ``E(z) = -logsumexp_k z_k``: it pushes ID energies below ``m_in`` and outlier energies above
    ``m_out``.
    """
    energy_in = -logits_in.float().logsumexp(dim=1)
    energy_out = -logits_out.float().logsumexp(dim=1)
    return F.relu(energy_in - m_in).pow(2).mean() + F.relu(m_out - energy_out).pow(2).mean()


def _forward_split(model: nn.Module, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of ``first`` and of ``second`` from one forward pass over their concatenation."""
    logits = model(torch.cat([first, second]))
    return logits[: len(first)], logits[len(first) :]


def _logs(**values: Tensor | float) -> dict[str, float]:
    """Detached floats for logging; the tensors are read from the device in one transfer."""
    tensors = {name: v.detach().float() for name, v in values.items() if isinstance(v, Tensor)}
    read = dict(zip(tensors, torch.stack(list(tensors.values())).tolist()))
    return {name: read[name] if name in read else float(v) for name, v in values.items()}


def _require_outliers(outliers: Tensor | None, images: Tensor, method: str) -> Tensor:
    if outliers is None or len(outliers) == 0:
        raise ValueError(f"method {method!r} needs a batch of outliers, got none")
    if outliers.shape[1:] != images.shape[1:]:
        raise ValueError(
            f"outlier images {tuple(outliers.shape[1:])} and ID images {tuple(images.shape[1:])} differ in shape"
        )
    return outliers


class Method(ABC):
    """A fine-tuning objective.

    ``outliers_per_id_image`` tells the data pipeline how many outliers to draw per ID image
    (0: none, and ``loss`` receives ``outliers=None``). ``loss`` returns the scalar to minimise and
    a few floats to log (always ``ce``, the cross-entropy on the ID batch).
    """

    name: ClassVar[str]
    outliers_per_id_image: int

    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        outliers: Tensor | None,
        generator: torch.Generator,
    ) -> LossAndLogs:
        """``images`` ``(B, C, H, W)``, ``labels`` ``(B,)``, ``outliers`` ``(B * ratio, C, H, W)`` or None;
        ``generator`` drives any randomness of the objective itself."""


@dataclass(frozen=True)
class Baseline(Method):
    """Plain cross-entropy ``CE(f(x), y)``: the MSP baseline (Hendrycks & Gimpel, ICLR 2017) and the
    starting point MixOE fine-tunes from."""

    name: ClassVar[str] = "baseline"
    outliers_per_id_image: int = field(default=0, init=False)

    def loss(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        outliers: Tensor | None,
        generator: torch.Generator,
    ) -> LossAndLogs:
        if outliers is not None:
            raise ValueError("method 'baseline' uses no outliers; pass outliers=None")
        ce = F.cross_entropy(model(images).float(), labels)
        return ce, _logs(ce=ce)


@dataclass(frozen=True)
class MixOE(Method):
    """Mixture Outlier Exposure (Zhang et al., "Mixture Outlier Exposure: Towards Out-of-Distribution
    Detection in Fine-grained Environments", WACV 2023, arXiv 2106.03917).

    Per batch, ``lam ~ Beta(alpha, alpha)`` is drawn once and each ID image is mixed with its own
    outlier (mixup, or cutmix with one box for the batch and ``lam`` reset to the kept ID pixel
    share). The mixed image's target decays linearly from the ID label towards uniform:
    ``t = lam * onehot(y) + (1 - lam) * uniform(K)``, and

    ``loss = CE(f(x), y) + beta * softCE(f(x_mix), t)``.

    The paper's settings: mixup ``alpha = 1``, cutmix ``alpha = 2``, ``beta = 5``. Randomness is drawn
    from the generator in a fixed order: ``lam`` first, then (cutmix) the box.
    """

    mix: Literal["mixup", "cutmix"] = "mixup"
    alpha: float = 1.0
    beta: float = 5.0
    name: ClassVar[str] = "mixoe"
    outliers_per_id_image: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        if self.mix not in ("mixup", "cutmix"):
            raise ValueError(f"Invalid mix {self.mix!r}. Only 'mixup' and 'cutmix' are supported.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")

    @staticmethod
    def mixed_loss(logits_mix: Tensor, labels: Tensor, lam: float) -> Tensor:
        """``softCE(f(x_mix), lam * onehot(y) + (1 - lam) * uniform(K))``: plain CE on ``y`` at
        ``lam = 1``, cross-entropy to uniform at ``lam = 0``."""
        return soft_cross_entropy(logits_mix, mixed_targets(labels, logits_mix.shape[1], lam))

    def loss(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        outliers: Tensor | None,
        generator: torch.Generator,
    ) -> LossAndLogs:
        outliers = _require_outliers(outliers, images, self.name)
        if len(outliers) != len(images):
            raise ValueError(
                f"MixOE needs one outlier per ID image: got {len(outliers)} outliers for {len(images)} images"
            )
        lam = sample_lambda(self.alpha, generator)
        if self.mix == "mixup":
            x_mix, lam = mixup(images, outliers, lam)
        else:
            x_mix, lam = cutmix(images, outliers, lam, generator)
        logits_id, logits_mix = _forward_split(model, images, x_mix)
        ce = F.cross_entropy(logits_id.float(), labels)
        aux = self.mixed_loss(logits_mix, labels, lam)
        return ce + self.beta * aux, _logs(ce=ce, aux=aux, lam=lam)


@dataclass(frozen=True)
class _OutlierRegularised(Method):
    """The shape OE and Energy-OE share: one forward pass over ``cat([x, outliers])``, then
    ``CE(f(x), y) + weight * auxiliary(f(x), f(o))``. Subclasses define only the auxiliary term."""

    weight: float
    outliers_per_id_image: int

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be non-negative, got {self.weight}")
        if self.outliers_per_id_image < 1:
            raise ValueError(f"outliers_per_id_image must be at least 1, got {self.outliers_per_id_image}")

    @abstractmethod
    def auxiliary(self, logits_id: Tensor, logits_out: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The outlier term and any extra values to log."""

    def loss(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        outliers: Tensor | None,
        generator: torch.Generator,
    ) -> LossAndLogs:
        outliers = _require_outliers(outliers, images, self.name)
        logits_id, logits_out = _forward_split(model, images, outliers)
        ce = F.cross_entropy(logits_id.float(), labels)
        aux, extra = self.auxiliary(logits_id, logits_out)
        return ce + self.weight * aux, _logs(ce=ce, aux=aux, **extra)


@dataclass(frozen=True)
class OutlierExposure(_OutlierRegularised):
    """Outlier Exposure (Hendrycks et al., "Deep Anomaly Detection with Outlier Exposure", ICLR 2019):

    ``loss = CE(f(x), y) + weight * mean_o [ -(1/K) sum_k log softmax(f(o))_k ]``,

    cross-entropy from the outliers' predictions to the uniform distribution. As the MixOE paper's
    baseline: ``weight = 1`` and twice as many outliers as ID images.
    """

    weight: float = 1.0
    outliers_per_id_image: int = 2
    name: ClassVar[str] = "oe"

    def auxiliary(self, logits_id: Tensor, logits_out: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return uniform_cross_entropy(logits_out), {}


@dataclass(frozen=True)
class EnergyOE(_OutlierRegularised):
    """Energy-bounded outlier exposure (Liu et al., "Energy-based Out-of-distribution Detection",
    NeurIPS 2020):

    ``loss = CE(f(x), y) + weight * [ mean_in relu(E_in - m_in)^2 + mean_out relu(m_out - E_out)^2 ]``

    with ``E(z) = -logsumexp(z)`` (see :func:`energy_margin_loss`). The MixOE paper's baseline uses
    ``weight = 0.1``, ``m_in = -13``, ``m_out = -6``, twice as many outliers as ID images, and scores
    with the energy.
    """

    weight: float = 0.1
    outliers_per_id_image: int = 2
    m_in: float = -13.0
    m_out: float = -6.0
    name: ClassVar[str] = "energy-oe"

    def auxiliary(self, logits_id: Tensor, logits_out: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        aux = energy_margin_loss(logits_id, logits_out, self.m_in, self.m_out)
        energies = {
            "energy_in": -logits_id.float().logsumexp(dim=1).mean(),
            "energy_out": -logits_out.float().logsumexp(dim=1).mean(),
        }
        return aux, energies


_BUILDERS: dict[str, Callable[[MethodConfig], Method]] = {
    "baseline": lambda c: Baseline(),
    "mixoe": lambda c: MixOE(mix=c.mix, alpha=c.mix_alpha, beta=c.beta),
    "oe": lambda c: OutlierExposure(weight=c.oe_weight, outliers_per_id_image=c.oe_outlier_ratio),
    "energy-oe": lambda c: EnergyOE(
        weight=c.energy_weight, m_in=c.m_in, m_out=c.m_out, outliers_per_id_image=c.oe_outlier_ratio
    ),
}

METHOD_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_method(config: MethodConfig) -> Method:
    """The :class:`Method` a :class:`~training.config.MethodConfig` describes."""
    builder = _BUILDERS.get(config.name)
    if builder is None:
        raise ValueError(f"Invalid method {config.name!r}. Only {', '.join(METHOD_NAMES)} are supported.")
    return builder(config)
