"""Tests for training.fit.methods: every objective against a hand computation on a tiny linear model.

The expected values are computed with explicit loops in float64 Python arithmetic (logits as sums of
weight * pixel, log-softmax by its definition), independently of the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import MethodConfig
from training.fit.methods import (
    METHOD_NAMES,
    Baseline,
    EnergyOE,
    Method,
    MixOE,
    OutlierExposure,
    build_method,
    energy_margin_loss,
    soft_cross_entropy,
    uniform_cross_entropy,
)
from training.fit.mixing import cutmix_box, sample_lambda

B, C, H, W, K = 3, 2, 4, 5, 4
SEED = 11


def _generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CountingModel(nn.Module):
    """``flatten -> Linear(C*H*W, K)`` with fixed weights; records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        gen = _generator(0)
        self.linear = nn.Linear(C * H * W, K)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(K, C * H * W, generator=gen) * 0.3)
            self.linear.bias.copy_(torch.randn(K, generator=gen))
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(len(x))
        return self.linear(x.flatten(1))


def _batch(seed: int, n: int = B) -> Tensor:
    return torch.rand(n, C, H, W, generator=_generator(seed)) * 2 - 1


LABELS = torch.tensor([2, 0, 3])


# Independent hand computations ----------------------------------------------------------------------


def _logits(model: CountingModel, image: list) -> list[float]:
    """z_k = b_k + sum_j w_kj * pixel_j, pixels in (c, row, col) order."""
    weight, bias = model.linear.weight.tolist(), model.linear.bias.tolist()
    pixels = [image[c][r][col] for c in range(C) for r in range(H) for col in range(W)]
    return [bias[k] + sum(w * p for w, p in zip(weight[k], pixels)) for k in range(K)]


def _log_softmax(z: list[float]) -> list[float]:
    log_norm = math.log(sum(math.exp(v) for v in z))
    return [v - log_norm for v in z]


def _ce(model: CountingModel, images: Tensor, labels: Tensor) -> float:
    rows = [_log_softmax(_logits(model, img)) for img in images.tolist()]
    return sum(-row[y] for row, y in zip(rows, labels.tolist())) / len(rows)


def _soft_ce(model: CountingModel, images: list, targets: list[list[float]]) -> float:
    rows = [_log_softmax(_logits(model, img)) for img in images]
    return sum(-sum(t * lp for t, lp in zip(tr, row)) for tr, row in zip(targets, rows)) / len(rows)


def _targets(labels: Tensor, lam: float) -> list[list[float]]:
    return [[lam * (k == y) + (1 - lam) / K for k in range(K)] for y in labels.tolist()]


def _energy(model: CountingModel, image: list) -> float:
    return -math.log(sum(math.exp(v) for v in _logits(model, image)))


# Pure loss functions -----------------------------------------------------------------------------------


def test_soft_cross_entropy_matches_the_definition_and_plain_ce_on_one_hot() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    targets = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    rows = [_log_softmax(r) for r in logits.tolist()]
    expected = sum(-sum(t * lp for t, lp in zip(tr, row)) for tr, row in zip(targets.tolist(), rows)) / 2
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    labels = torch.tensor([2, 1])
    one_hot = F.one_hot(labels, 3).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    with pytest.raises(ValueError, match="shape"):
        soft_cross_entropy(logits, targets[:, :2])


def test_uniform_cross_entropy_matches_the_definition() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    expected = sum(-sum(row) / 3 for row in map(_log_softmax, logits.tolist())) / 2
    assert uniform_cross_entropy(logits).item() == pytest.approx(expected, rel=1e-6)


def test_energy_margin_loss_clips_each_side() -> None:
    # E = -logsumexp: rows of equal logits c over K=2 classes have E = -(c + log 2).
    logits_in = torch.tensor([[5.0, 5.0], [0.0, 0.0]])  # E ~ -5.69, -0.69
    logits_out = torch.tensor([[5.0, 5.0], [-9.0, -9.0]])  # E ~ -5.69, 8.31
    m_in, m_out = -2.0, 1.0
    e_in = [-(5 + math.log(2)), -math.log(2)]
    e_out = [-(5 + math.log(2)), 9 - math.log(2)]
    expected = sum(max(0.0, e - m_in) ** 2 for e in e_in) / 2 + sum(max(0.0, m_out - e) ** 2 for e in e_out) / 2
    assert energy_margin_loss(logits_in, logits_out, m_in, m_out).item() == pytest.approx(expected, rel=1e-6)
    assert energy_margin_loss(logits_in[:1], logits_out[1:], m_in, m_out).item() == 0.0


def test_mixoe_mixed_loss_interpolates_between_label_ce_and_uniform_ce() -> None:
    logits = torch.randn(5, K, generator=_generator(3))
    labels = torch.tensor([0, 1, 2, 3, 1])
    rows = [_log_softmax(r) for r in logits.tolist()]
    label_ce = sum(-row[y] for row, y in zip(rows, labels.tolist())) / 5
    uniform_ce = sum(-sum(row) / K for row in rows) / 5
    assert MixOE.mixed_loss(logits, labels, 1.0).item() == pytest.approx(label_ce, rel=1e-6)
    assert MixOE.mixed_loss(logits, labels, 0.0).item() == pytest.approx(uniform_ce, rel=1e-6)
    # Linear in lam, since the target is.
    assert MixOE.mixed_loss(logits, labels, 0.25).item() == pytest.approx(0.25 * label_ce + 0.75 * uniform_ce, rel=1e-6)


# Methods against hand computations -----------------------------------------------------------------------


def test_baseline_is_cross_entropy() -> None:
    model, images = CountingModel(), _batch(1)
    loss, logs = Baseline().loss(model, images, LABELS, None, _generator())
    expected = _ce(model, images, LABELS)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs == {"ce": pytest.approx(expected, rel=1e-5)}
    assert model.calls == [B]


def test_mixoe_mixup_matches_hand_computation() -> None:
    model, images, outliers = CountingModel(), _batch(1), _batch(2)
    method = MixOE(mix="mixup", alpha=1.0, beta=5.0)
    loss, logs = method.loss(model, images, LABELS, outliers, _generator())

    lam = sample_lambda(1.0, _generator())  # the method's first (and only) draw
    x, o = images.tolist(), outliers.tolist()
    mixed = [
        [[[lam * x[i][c][r][q] + (1 - lam) * o[i][c][r][q] for q in range(W)] for r in range(H)] for c in range(C)]
        for i in range(B)
    ]
    ce = _ce(model, images, LABELS)
    aux = _soft_ce(model, mixed, _targets(LABELS, lam))
    assert logs["lam"] == pytest.approx(lam)
    assert logs["ce"] == pytest.approx(ce, rel=1e-5)
    assert logs["aux"] == pytest.approx(aux, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 5.0 * aux, rel=1e-5)
    assert model.calls == [2 * B], "one forward pass over cat([x, x_mix])"


def test_mixoe_cutmix_matches_hand_computation() -> None:
    model, images, outliers = CountingModel(), _batch(1), _batch(2)
    method = MixOE(mix="cutmix", alpha=2.0, beta=3.0)
    loss, logs = method.loss(model, images, LABELS, outliers, _generator())

    gen = _generator()  # replay the method's draws: lam, then the box
    y0, y1, x0, x1 = cutmix_box(H, W, sample_lambda(2.0, gen), gen)
    area = (y1 - y0) * (x1 - x0)
    assert 0 < area < H * W, "the seed must give a partial box for this test to mean anything"
    lam = 1 - area / (H * W)
    x, o = images.tolist(), outliers.tolist()
    mixed = [
        [[[(o if y0 <= r < y1 and x0 <= q < x1 else x)[i][c][r][q] for q in range(W)] for r in range(H)] for c in range(C)]
        for i in range(B)
    ]
    ce = _ce(model, images, LABELS)
    aux = _soft_ce(model, mixed, _targets(LABELS, lam))
    assert logs["lam"] == pytest.approx(lam)
    assert logs["aux"] == pytest.approx(aux, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 3.0 * aux, rel=1e-5)
    assert model.calls == [2 * B]


def test_outlier_exposure_matches_hand_computation() -> None:
    model, images, outliers = CountingModel(), _batch(1), _batch(2, n=2 * B)
    loss, logs = OutlierExposure(weight=0.7).loss(model, images, LABELS, outliers, _generator())
    ce = _ce(model, images, LABELS)
    aux = sum(-sum(_log_softmax(_logits(model, img))) / K for img in outliers.tolist()) / (2 * B)
    assert logs["ce"] == pytest.approx(ce, rel=1e-5)
    assert logs["aux"] == pytest.approx(aux, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 0.7 * aux, rel=1e-5)
    assert model.calls == [3 * B], "one forward pass over cat([x, outliers])"


@pytest.mark.parametrize("margins", ["paper", "median"])
def test_energy_oe_matches_hand_computation(margins: str) -> None:
    model, images, outliers = CountingModel(), _batch(1), _batch(2, n=2 * B)
    e_in = [_energy(model, img) for img in images.tolist()]
    e_out = [_energy(model, img) for img in outliers.tolist()]
    if margins == "paper":
        m_in, m_out = -13.0, -6.0
    else:  # margins inside the observed energies, so that both hinges clip some samples and not others
        m_in, m_out = sorted(e_in)[B // 2], sorted(e_out)[B]
    loss, logs = EnergyOE(weight=0.1, m_in=m_in, m_out=m_out).loss(model, images, LABELS, outliers, _generator())

    ce = _ce(model, images, LABELS)
    aux = sum(max(0.0, e - m_in) ** 2 for e in e_in) / B + sum(max(0.0, m_out - e) ** 2 for e in e_out) / (2 * B)
    assert aux > 0
    assert logs["aux"] == pytest.approx(aux, rel=1e-5)
    assert logs["energy_in"] == pytest.approx(sum(e_in) / B, rel=1e-5)
    assert logs["energy_out"] == pytest.approx(sum(e_out) / (2 * B), rel=1e-5)
    assert loss.item() == pytest.approx(ce + 0.1 * aux, rel=1e-5)


# Behaviour -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixoe_is_reproducible_and_differentiable(mix: str) -> None:
    model, images, outliers = CountingModel(), _batch(1), _batch(2)
    method = MixOE(mix=mix, alpha=1.0, beta=5.0)
    first, _ = method.loss(model, images, LABELS, outliers, _generator(5))
    second, _ = method.loss(model, images, LABELS, outliers, _generator(5))
    assert first.item() == second.item()
    first.backward()
    assert model.linear.weight.grad is not None and model.linear.weight.grad.abs().sum().item() > 0


@pytest.mark.parametrize("n_outliers", [B - 1, B + 1, 2 * B])
def test_mixoe_rejects_outlier_batch_of_another_size(n_outliers: int) -> None:
    with pytest.raises(ValueError, match="one outlier per ID image"):
        MixOE().loss(CountingModel(), _batch(1), LABELS, _batch(2, n=n_outliers), _generator())


@pytest.mark.parametrize("method", [MixOE(), OutlierExposure(), EnergyOE()])
def test_outlier_methods_require_outliers(method: Method) -> None:
    with pytest.raises(ValueError, match="outliers"):
        method.loss(CountingModel(), _batch(1), LABELS, None, _generator())


def test_outlier_images_must_match_id_image_shape() -> None:
    outliers = torch.zeros(2 * B, C, H, W + 1)
    with pytest.raises(ValueError, match="differ in shape"):
        OutlierExposure().loss(CountingModel(), _batch(1), LABELS, outliers, _generator())


def test_baseline_rejects_outliers() -> None:
    with pytest.raises(ValueError, match="no outliers"):
        Baseline().loss(CountingModel(), _batch(1), LABELS, _batch(2), _generator())


@pytest.mark.parametrize(
    "kwargs",
    [{"mix": "mixout"}, {"alpha": 0.0}, {"beta": -1.0}],
)
def test_mixoe_rejects_invalid_hyper_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MixOE(**kwargs)


# build_method -------------------------------------------------------------------------------------------


def test_build_method_maps_every_config_name() -> None:
    assert set(METHOD_NAMES) == {"baseline", "mixoe", "oe", "energy-oe"}
    assert build_method(MethodConfig(name="baseline")) == Baseline()
    assert build_method(MethodConfig(name="mixoe", mix="mixup")) == MixOE("mixup", alpha=1.0, beta=5.0)
    assert build_method(MethodConfig(name="mixoe", mix="cutmix", beta=2.0)) == MixOE("cutmix", alpha=2.0, beta=2.0)
    assert build_method(MethodConfig(name="oe", oe_weight=0.5, oe_outlier_ratio=3)) == OutlierExposure(0.5, 3)
    assert build_method(MethodConfig(name="energy-oe", energy_weight=0.2, m_in=-10, m_out=-4)) == EnergyOE(
        weight=0.2, m_in=-10.0, m_out=-4.0, outliers_per_id_image=2
    )


@pytest.mark.parametrize("name, outliers", [("baseline", 0), ("mixoe", 1), ("oe", 3), ("energy-oe", 3)])
def test_built_method_draws_the_right_number_of_outliers(name: str, outliers: int) -> None:
    """MixOE pairs one outlier with each ID image; OE-style methods take ``oe_outlier_ratio``."""
    method = build_method(MethodConfig(name=name, oe_outlier_ratio=3))
    assert method.name == name
    assert method.outliers_per_id_image == outliers


def test_build_method_rejects_unknown_name_listing_valid_ones() -> None:
    config = MethodConfig.model_construct(name="vos")
    with pytest.raises(ValueError, match="'vos'.*baseline, mixoe, oe, energy-oe"):
        build_method(config)
