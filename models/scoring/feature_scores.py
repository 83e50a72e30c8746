"""OOD scores on penultimate features, fitted on the training set. **Higher = more OOD**, as in
:mod:`models.scoring.scores`.

Logit scores see only the K numbers of the head, so an input the head is unsure about for a
reason unrelated to novelty (a blurry photo, say) looks as OOD as a real novelty, and a novelty
that happens to excite one class looks ID. Feature-space scores compare the whole penultimate
feature with the training data instead.

* ``knn``          distance of the L2-normalised feature to its k-th nearest L2-normalised
                   training feature (Sun et al., "Out-of-Distribution Detection with Deep
                   Nearest Neighbors", ICML 2022).
* ``mahalanobis``  smallest squared Mahalanobis distance to a class mean under one covariance
                   shared by all classes (Lee et al., "A Simple Unified Framework for Detecting
                   Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018), without
                   input perturbation or feature ensembles; the covariance is shrunk by Ledoit and
                   Wolf's rule, since small data sets have fewer images than feature dimensions.

Each score has a pure function of ``(features, fitted state)`` and a ``fit`` that computes the
state from training features. The state is what a bundle stores beside the weights
(``models.contract.bundle``): the KNN bank in float16 (its scores stay within 1e-3 of a float32 bank's,
``tests/models/test_feature_scores.py``), the Gaussian in float32. Training calibrates on the
state exactly as stored, so served scores and calibration thresholds come from the same numbers.
Both functions are one or two matrix products per batch, so they run on the model's device beside
the network, inside its CUDA graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def normalized(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    return torch.nn.functional.normalize(features.float(), dim=1)


def squared_norms(bank: Tensor) -> Tensor:
    """``|b|^2`` of each row of ``bank`` (N, D), in float32 (N,)."""
    rows = bank.float()
    return (rows * rows).sum(dim=1)


def knn_distance(features: Tensor, bank: Tensor, k: int, bank_squared_norms: Tensor | None = None) -> Tensor:
    """Euclidean distance of each normalised row of ``features`` (B, D) to its ``k``-th nearest row
    of ``bank`` (N, D, normalised when fitted). One matrix product and a top-k: no per-image loop.

    The squared distance is expanded as ``|z|^2 - 2 z.b + |b|^2`` with the bank's own norms, so a
    bank stored at lower precision (norms not exactly 1) still gives true distances to its rows.
    ``bank_squared_norms`` (:func:`squared_norms` of ``bank``) saves computing them per batch; a
    loaded bundle passes them (:meth:`KNNScore.prepare`).
    """
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} must lie between 1 and the bank size {bank.shape[0]}")
    z = normalized(features)
    rows = bank.to(device=z.device, dtype=torch.float32)
    norms = squared_norms(rows) if bank_squared_norms is None else bank_squared_norms.to(z.device)
    squared = (z * z).sum(dim=1, keepdim=True) - 2.0 * z @ rows.T + norms
    kth_nearest = squared.topk(k, dim=1, largest=False).values[:, -1]
    return kth_nearest.clamp(min=0.0).sqrt()


def mean_quadratic_terms(means: Tensor, precision: Tensor) -> Tensor:
    """``mu_c^T P mu_c`` of each class mean (C,), in float32: the part of every distance that does
    not depend on the image."""
    means, precision = means.float(), precision.to(device=means.device, dtype=torch.float32)
    return ((means @ precision) * means).sum(dim=1)


def mahalanobis_distance(
    features: Tensor, means: Tensor, precision: Tensor, mean_terms: Tensor | None = None
) -> Tensor:
    """``min_c (f - mu_c)^T P (f - mu_c)`` for features (B, D), class means (C, D) and the shared
    precision matrix P (D, D), expanded into two matrix products: ``f^T P f - 2 f^T P mu_c +
    mu_c^T P mu_c``. ``mean_terms`` (:func:`mean_quadratic_terms`) saves computing the last term
    per batch; a loaded bundle passes them (:meth:`MahalanobisScore.prepare`)."""
    f = features.float()
    means = means.to(device=f.device, dtype=torch.float32)
    precision = precision.to(device=f.device, dtype=torch.float32)
    terms = mean_quadratic_terms(means, precision) if mean_terms is None else mean_terms.to(f.device)
    projected = f @ precision  # (B, D)
    per_class = (projected * f).sum(dim=1, keepdim=True) - 2.0 * projected @ means.T + terms  # (B, C)
    return per_class.amin(dim=1)


def subsample(n: int, size: int | None, seed: int) -> Tensor:
    """Indices of a seeded, sorted subsample of ``size`` out of ``n`` rows (all rows when ``size``
    is ``None`` or at least ``n``): the documented way to keep a large bank small."""
    if size is None or size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


def fit_knn_bank(features: Tensor, size: int | None = None, seed: int = 0) -> Tensor:
    """The KNN bank: normalised training features (all, or a seeded subsample of ``size``), float16."""
    rows = features[subsample(features.shape[0], size, seed)]
    return normalized(rows).half()


def ledoit_wolf_shrinkage(centred: Tensor) -> float:
    """The Ledoit-Wolf shrinkage intensity for the covariance of ``centred`` rows (N, D), float64.

    Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices",
    J. Multivariate Analysis 2004: the weight of ``mu * I`` (``mu`` the mean eigenvalue) in the
    convex combination with the sample covariance that minimises the expected squared error. With
    fewer images than feature dimensions (600 Oxford Flowers training photos, 1,280 MobileNetV2
    features) the sample covariance is singular and its pseudo-inverse weighs the directions the
    training images happen not to span by up to 1/1e-12; shrinkage bounds those weights.
    """
    n, d = centred.shape
    squared = centred * centred
    sample = centred.T @ centred / n
    mu = float(sample.diagonal().sum()) / d
    frobenius = float((sample * sample).sum())
    # mean over images of ||x x^T - S||_F^2, divided by n: the variance of the sample covariance
    fourth = float((squared.T @ squared).sum())
    beta = (fourth / n - frobenius) / (d * n)
    delta = (frobenius - 2.0 * mu * float(sample.diagonal().sum()) + d * mu * mu) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0.0 else beta / delta


def fit_tied_gaussian(
    features: Tensor, labels: Tensor, num_classes: int, shrinkage: float | None = None
) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and the precision (D, D) of the covariance pooled over classes, float32.

    Computed in float64. The covariance is the mean outer product of class-centred features,
    shrunk towards ``mu * I`` with weight ``shrinkage`` (``None``: the Ledoit-Wolf estimate,
    :func:`ledoit_wolf_shrinkage`; ``0``: the maximum-likelihood estimate of Lee et al., inverted
    with a pseudo-inverse when singular, which is what pytorch-ood computes)."""
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    f = features.double()
    missing = [c for c in range(num_classes) if not bool((labels == c).any())]
    if missing:
        raise ValueError(f"no training features for classes {missing}: cannot fit their means")
    means = torch.stack([f[labels == c].mean(dim=0) for c in range(num_classes)])
    centred = f - means[labels]
    covariance = centred.T @ centred / f.shape[0]
    weight = ledoit_wolf_shrinkage(centred) if shrinkage is None else shrinkage
    mu = covariance.diagonal().mean()
    shrunk = (1.0 - weight) * covariance + weight * mu * torch.eye(f.shape[1], dtype=torch.float64)
    precision = torch.linalg.pinv(shrunk, hermitian=True)
    return means.float(), precision.float()


@dataclass(frozen=True)
class FitData:
    """What a feature score is fitted on: training-set features (N, D), labels (N,), class count,
    and the bank subsample settings (``bank_size`` ``None`` = every training image)."""

    features: Tensor
    labels: Tensor
    num_classes: int
    bank_size: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class KNNScore:
    """Distance to the k-th nearest training feature (Sun et al., ICML 2022); state ``{"bank"}``."""

    name: str = "knn"
    default_temperature: float = 1.0  # unused; every score declares one for a uniform manifest
    default_k: int | None = 10
    needs_features: bool = True

    def fit(self, data: FitData) -> dict[str, Tensor]:
        return {"bank": fit_knn_bank(data.features, data.bank_size, data.seed)}

    def prepare(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The stored state and the bank's squared row norms, computed once (from the bank as
        stored, float16 values included) rather than per batch."""
        return {**state, "bank_squared_norms": squared_norms(state["bank"])}

    def apply(
        self, logits: Tensor, features: Tensor | None, state: Mapping[str, Tensor], temperature: float, k: int | None
    ) -> Tensor:
        if features is None or k is None:
            raise ValueError("the knn score needs features and k")
        return knn_distance(features, state["bank"], k, state.get("bank_squared_norms"))


@dataclass(frozen=True)
class MahalanobisScore:
    """Smallest class-conditional Mahalanobis distance, tied covariance (Lee et al., NeurIPS 2018);
    state ``{"means", "precision"}``."""

    name: str = "mahalanobis"
    default_temperature: float = 1.0  # unused, as for knn
    default_k: int | None = None
    needs_features: bool = True

    def fit(self, data: FitData) -> dict[str, Tensor]:
        means, precision = fit_tied_gaussian(data.features, data.labels, data.num_classes)
        return {"means": means, "precision": precision}

    def prepare(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The stored state and each class mean's quadratic term, computed once rather than per batch."""
        return {**state, "mean_terms": mean_quadratic_terms(state["means"], state["precision"])}

    def apply(
        self, logits: Tensor, features: Tensor | None, state: Mapping[str, Tensor], temperature: float, k: int | None
    ) -> Tensor:
        if features is None:
            raise ValueError("the mahalanobis score needs features")
        return mahalanobis_distance(features, state["means"], state["precision"], state.get("mean_terms"))


FEATURE_SCORES = (KNNScore(), MahalanobisScore())
