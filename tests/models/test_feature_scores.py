"""Feature-space scores: independent float64 computations, pytorch-ood's detectors, the float16 bank,
and every registered score through the one registry interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import KNN, Mahalanobis
from sklearn.covariance import ledoit_wolf
from torch import Tensor

from models.scoring import feature_scores
from models.scoring.feature_scores import (
    FitData,
    fit_knn_bank,
    fit_tied_gaussian,
    ledoit_wolf_shrinkage,
    knn_distance,
    mahalanobis_distance,
    normalized,
    subsample,
)
from models.scoring.scores import SCORES, get_score


def _clusters(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative (post-ReLU-like) features around one centre per class, with labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, dim, generator=generator) * 4
    labels = torch.arange(n) % classes
    features = (centres[labels] + torch.randn(n, dim, generator=generator)).clamp(min=0)
    return features, labels


def _knn_float64(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Brute force in float64: normalise, all pairwise distances, sort, take the k-th."""
    z = features.astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    b = bank.astype(np.float64)
    distances = np.sqrt(((z[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))
    return np.sort(distances, axis=1)[:, k - 1]


def test_knn_matches_a_float64_brute_force_on_the_stored_bank() -> None:
    train, _ = _clusters(200, 64, 4, seed=0)
    queries, _ = _clusters(30, 64, 4, seed=1)
    bank = fit_knn_bank(train)
    assert bank.dtype == torch.float16 and bank.shape == (200, 64)
    expected = _knn_float64(queries.numpy(), bank.float().numpy(), k=7)
    np.testing.assert_allclose(knn_distance(queries, bank, 7).numpy(), expected, rtol=0, atol=2e-6)


def test_a_float16_bank_keeps_knn_scores_within_1e_3_of_a_float32_bank() -> None:
    train, _ = _clusters(500, 512, 10, seed=2)
    queries, _ = _clusters(100, 512, 10, seed=3)
    queries = torch.cat([queries, torch.rand(50, 512, generator=torch.Generator().manual_seed(4)) * 3])
    full = knn_distance(queries, normalized(train), 10)
    half = knn_distance(queries, fit_knn_bank(train), 10)
    assert (half - full).abs().max().item() < 1e-3
    assert full.std().item() > 1e-2  # the tolerance is small against the spread of the scores


def test_knn_agrees_with_pytorch_ood() -> None:
    """pytorch-ood's KNN (scikit-learn neighbours, no faiss needed) on the same features."""
    train, labels = _clusters(300, 32, 3, seed=5)
    queries, _ = _clusters(40, 32, 3, seed=6)
    detector = KNN(None, k=5).fit_features(train, labels)
    theirs = detector.predict_features(queries).numpy()
    np.testing.assert_allclose(knn_distance(queries, normalized(train), 5).numpy(), theirs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(knn_distance(queries, fit_knn_bank(train), 5).numpy(), theirs, rtol=0, atol=1e-3)


def test_mahalanobis_matches_a_float64_computation_with_pseudo_inverse() -> None:
    """Fewer images than dimensions (a singular covariance, as on small fine-grained sets)."""
    train, labels = _clusters(40, 64, 4, seed=7)
    queries, _ = _clusters(10, 64, 4, seed=8)
    means, precision = fit_tied_gaussian(train, labels, 4, shrinkage=0.0)
    f, y = train.double().numpy(), labels.numpy()
    mu = np.stack([f[y == c].mean(axis=0) for c in range(4)])
    centred = f - mu[y]
    p = np.linalg.pinv(centred.T @ centred / len(f), hermitian=True)
    q = queries.double().numpy()
    expected = np.min([np.einsum("bd,de,be->b", q - mu[c], p, q - mu[c]) for c in range(4)], axis=0)
    np.testing.assert_allclose(mahalanobis_distance(queries, means, precision).numpy(), expected, rtol=1e-3)


def test_mahalanobis_agrees_with_pytorch_ood_up_to_its_scaling() -> None:
    """pytorch-ood's covariance is the scatter sum (not divided by N) and its score carries the
    Gaussian's 1/2: its score is ours / (2 N)."""
    train, labels = _clusters(600, 16, 3, seed=9)
    queries, _ = _clusters(50, 16, 3, seed=10)
    detector = Mahalanobis(None).fit_features(train, labels)
    theirs = detector.predict_features(queries).double().numpy()
    ours = mahalanobis_distance(queries, *fit_tied_gaussian(train, labels, 3, shrinkage=0.0)).double().numpy()
    np.testing.assert_allclose(ours / (2 * len(train)), theirs, rtol=1e-3)


def test_a_prepared_mahalanobis_state_scores_the_same_without_recomputing_the_mean_terms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train, labels = _clusters(300, 16, 3, seed=11)
    queries, _ = _clusters(20, 16, 3, seed=12)
    score = get_score("mahalanobis")
    state = score.fit(FitData(features=train, labels=labels, num_classes=3))
    unprepared = score.apply(queries, queries, state, 1.0, None)
    prepared = score.prepare(state)
    computed: list[int] = []
    real = feature_scores.mean_quadratic_terms
    monkeypatch.setattr(feature_scores, "mean_quadratic_terms", lambda *a: computed.append(1) or real(*a))
    torch.testing.assert_close(score.apply(queries, queries, prepared, 1.0, None), unprepared, rtol=0, atol=0)
    assert computed == []  # the prepared terms served the batch


def test_shrinkage_is_ledoit_wolf_as_scikit_learn_computes_it() -> None:
    """The default fit shrinks by scikit-learn's Ledoit-Wolf estimate on the class-centred features."""
    train, labels = _clusters(40, 64, 4, seed=7)
    f, y = train.double().numpy(), labels.numpy()
    mu = np.stack([f[y == c].mean(axis=0) for c in range(4)])
    centred = f - mu[y]
    _, shrinkage = ledoit_wolf(centred, assume_centered=True)
    assert ledoit_wolf_shrinkage(torch.from_numpy(centred)) == pytest.approx(shrinkage, rel=1e-9)
    assert 0.0 < shrinkage < 1.0
    expected_covariance, _ = ledoit_wolf(centred, assume_centered=True)
    _, precision = fit_tied_gaussian(train, labels, 4)
    np.testing.assert_allclose(precision.double().numpy(), np.linalg.inv(expected_covariance), rtol=1e-3, atol=1e-4)


def test_shrunk_mahalanobis_separates_where_the_singular_fit_does_not() -> None:
    """Fewer training images than dimensions: held-out ID images are off the span of the training
    set, so the pseudo-inverse of the singular covariance scores them like outliers, while the
    shrunk covariance ranks a shifted cluster above them."""
    generator = torch.Generator().manual_seed(21)
    dims, classes = 128, 4
    centres = 3.0 * torch.randn(classes, dims, generator=generator)

    def draw(n: int, shift: float) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n) % classes
        return centres[labels] + shift + torch.randn(n, dims, generator=generator), labels

    train, labels = draw(60, 0.0)
    held_out, _ = draw(200, 0.0)
    outliers, _ = draw(200, 0.5)

    def auroc(shrinkage: float | None) -> float:
        state = fit_tied_gaussian(train, labels, classes, shrinkage=shrinkage)
        inside, outside = mahalanobis_distance(held_out, *state), mahalanobis_distance(outliers, *state)
        return float((outside[:, None] > inside[None, :]).double().mean())

    assert auroc(None) > 0.8  # measured 0.846 at this seed
    assert auroc(None) > auroc(0.0) + 0.08  # the singular fit: 0.716


def test_subsample_is_seeded_sorted_and_sized() -> None:
    picked = subsample(100, 30, seed=1)
    assert picked.tolist() == subsample(100, 30, seed=1).tolist() == sorted(set(picked.tolist()))
    assert len(picked) == 30 and picked.tolist() != subsample(100, 30, seed=2).tolist()
    assert subsample(100, None, 0).tolist() == subsample(100, 500, 0).tolist() == list(range(100))
    train, _ = _clusters(100, 8, 2, seed=11)
    assert torch.equal(fit_knn_bank(train, 30, seed=1), normalized(train[picked]).half())


def test_impossible_fits_and_neighbour_counts_are_refused() -> None:
    train, labels = _clusters(20, 8, 2, seed=12)
    with pytest.raises(ValueError, match="k=21 must lie between 1 and the bank size 20"):
        knn_distance(train, fit_knn_bank(train), 21)
    with pytest.raises(ValueError, match=r"no training features for classes \[2\]"):
        fit_tied_gaussian(train, labels, 3)
    with pytest.raises(ValueError, match=r"shrinkage must lie in \[0, 1\], got 1.5"):
        fit_tied_gaussian(train, labels, 2, shrinkage=1.5)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_registered_score_ranks_far_inputs_above_training_like_ones(name: str) -> None:
    """Through the registry interface alone: fit on training features, apply to a batch."""
    generator = torch.Generator().manual_seed(13)
    head = torch.nn.Linear(32, 4)
    train, labels = _clusters(200, 32, 4, seed=14)
    with torch.no_grad():  # a head that fits the clusters: weights point at the class centres
        centres = torch.stack([train[labels == c].mean(dim=0) for c in range(4)])
        head.weight.copy_(centres / centres.norm(dim=1, keepdim=True) * 3)
        head.bias.zero_()
        near, _ = _clusters(20, 32, 4, seed=14)
        far = torch.rand(20, 32, generator=generator)  # weak, directionless: flat logits, far from every cluster
        features = torch.cat([near, far])
        logits = head(features)
    score = get_score(name)
    state = score.fit(FitData(train, labels, 4))
    assert bool(state) == score.needs_features
    scores = score.apply(logits, features, state, score.default_temperature, score.default_k)
    assert scores.shape == (40,)
    assert scores[:20].mean().item() < scores[20:].mean().item()
