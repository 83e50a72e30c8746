"""Tests for training.fit.mixing: the Beta draw, the CutMix box, mixup/cutmix and the soft targets."""

from __future__ import annotations

import math

import pytest
import torch

from training.fit.mixing import cutmix, cutmix_box, mixed_targets, mixup, sample_lambda


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _paired_constant_batches(batch: int, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ID image i is the constant i + 1, its outlier the constant -(i + 1): every pixel tells its source."""
    values = torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1, 1)
    ones = torch.ones(batch, channels, height, width)
    return ones * values, ones * -values


# sample_lambda ------------------------------------------------------------------------------------


def test_sample_lambda_is_reproducible_from_the_generator() -> None:
    first = [sample_lambda(1.0, _generator(7)) for _ in range(3)]
    gen_a, gen_b = _generator(7), _generator(7)
    seq_a = [sample_lambda(2.0, gen_a) for _ in range(20)]
    seq_b = [sample_lambda(2.0, gen_b) for _ in range(20)]
    assert seq_a == seq_b
    assert len(set(seq_a)) == 20, "successive draws from one generator must differ"
    assert first[0] == first[1] == first[2]
    assert sample_lambda(2.0, _generator(8)) != seq_a[0]


def test_sample_lambda_ignores_the_global_rng() -> None:
    torch.manual_seed(0)
    a = sample_lambda(1.0, _generator(3))
    torch.manual_seed(12345)
    b = sample_lambda(1.0, _generator(3))
    assert a == b


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_sample_lambda_matches_beta_moments(alpha: float) -> None:
    gen = _generator(0)
    draws = torch.tensor([sample_lambda(alpha, gen) for _ in range(4000)], dtype=torch.float64)
    assert bool(((draws >= 0) & (draws <= 1)).all())
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    expected_var = 1.0 / (4.0 * (2.0 * alpha + 1.0))
    assert abs(draws.mean().item() - 0.5) < 0.02
    assert abs(draws.var().item() - expected_var) < 0.1 * expected_var


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_sample_lambda_rejects_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        sample_lambda(alpha, _generator(0))


# cutmix_box ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(1, 1), (1, 9), (7, 3), (32, 32), (17, 40)])
def test_cutmix_box_stays_inside_the_image(height: int, width: int) -> None:
    gen = _generator(1)
    lams = [0.0, 1e-9, 1e-3, 1.0 - 1e-3, 1.0 - 1e-9, 1.0] + torch.rand(200, generator=gen).tolist()
    for lam in lams:
        y0, y1, x0, x1 = cutmix_box(height, width, lam, gen)
        assert 0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width, (lam, (y0, y1, x0, x1))
        cut_h, cut_w = round(height * math.sqrt(1 - lam)), round(width * math.sqrt(1 - lam))
        assert y1 - y0 <= cut_h and x1 - x0 <= cut_w
        if 0 < y0 and y1 < height:
            assert y1 - y0 == cut_h
        if 0 < x0 and x1 < width:
            assert x1 - x0 == cut_w


def test_cutmix_box_is_empty_at_lambda_one_and_full_size_at_zero() -> None:
    gen = _generator(2)
    for _ in range(10):
        y0, y1, x0, x1 = cutmix_box(16, 16, 1.0, gen)
        assert (y1 - y0) * (x1 - x0) == 0
    boxes = [cutmix_box(16, 16, 0.0, gen) for _ in range(1500)]
    assert (0, 16, 0, 16) in boxes, "a centred full-size box covers the whole image"
    for y0, y1, x0, x1 in boxes:
        assert (y0 == 0 or y1 == 16) and (x0 == 0 or x1 == 16), "a full-size box reaches a border on each axis"


@pytest.mark.parametrize("lam", [-0.1, 1.1])
def test_cutmix_box_rejects_lambda_outside_unit_interval(lam: float) -> None:
    with pytest.raises(ValueError, match="lam"):
        cutmix_box(8, 8, lam, _generator(0))


# mixup / cutmix -----------------------------------------------------------------------------------


def test_mixup_is_the_convex_combination() -> None:
    x, outliers = torch.rand(3, 2, 4, 5, generator=_generator(0)), torch.rand(3, 2, 4, 5, generator=_generator(1))
    x_mix, lam = mixup(x, outliers, 0.3)
    assert lam == 0.3
    assert torch.allclose(x_mix, 0.3 * x + 0.7 * outliers)
    assert torch.equal(mixup(x, outliers, 1.0)[0], x)
    assert torch.equal(mixup(x, outliers, 0.0)[0], outliers)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lam", [0.05, 0.4, 0.8, 0.999])
def test_cutmix_lambda_is_the_kept_id_pixel_fraction(seed: int, lam: float) -> None:
    x, outliers = _paired_constant_batches(batch=4, channels=3, height=13, width=10)
    x_mix, lam_kept = cutmix(x, outliers, lam, _generator(seed))
    kept = (x_mix == x).all(dim=1)  # (B, H, W): ID pixel kept in every channel
    pasted = (x_mix == outliers).all(dim=1)
    assert bool((kept ^ pasted).all()), "each pixel comes whole from the ID image or its own outlier"
    for i in range(len(x)):
        assert kept[i].float().mean().item() == pytest.approx(lam_kept)
    assert bool((pasted == pasted[0]).all()), "the same box for the whole batch"
    assert not torch.equal(x, x_mix) or lam_kept == 1.0
    assert torch.equal(x, _paired_constant_batches(4, 3, 13, 10)[0]), "the input is not modified"


def test_cutmix_is_reproducible_from_the_generator() -> None:
    x, outliers = _paired_constant_batches(batch=2, channels=1, height=20, width=20)
    a, lam_a = cutmix(x, outliers, 0.5, _generator(9))
    b, lam_b = cutmix(x, outliers, 0.5, _generator(9))
    assert torch.equal(a, b) and lam_a == lam_b


@pytest.mark.parametrize("outlier_shape", [(3, 3, 8, 8), (4, 1, 8, 8), (4, 3, 8, 7)])
def test_mixing_rejects_unpaired_outliers(outlier_shape: tuple[int, ...]) -> None:
    x, outliers = torch.zeros(4, 3, 8, 8), torch.zeros(outlier_shape)
    with pytest.raises(ValueError, match="outlier"):
        mixup(x, outliers, 0.5)
    with pytest.raises(ValueError, match="outlier"):
        cutmix(x, outliers, 0.5, _generator(0))


# mixed_targets ------------------------------------------------------------------------------------


def _lambda_from(mix: str, seed: int) -> float:
    gen = _generator(seed)
    lam = sample_lambda(2.0, gen)
    if mix == "mixup":
        return mixup(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), lam)[1]
    return cutmix(torch.zeros(1, 1, 9, 7), torch.ones(1, 1, 9, 7), lam, gen)[1]


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
@pytest.mark.parametrize("seed", range(4))
def test_mixed_targets_rows_are_distributions(mix: str, seed: int) -> None:
    lam = _lambda_from(mix, seed)
    labels = torch.tensor([0, 4, 2, 4])
    targets = mixed_targets(labels, 5, lam)
    assert targets.shape == (4, 5) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    for i, label in enumerate(labels.tolist()):
        for k in range(5):
            expected = lam + (1 - lam) / 5 if k == label else (1 - lam) / 5
            assert targets[i, k].item() == pytest.approx(expected)


def test_mixed_targets_at_the_extremes() -> None:
    labels = torch.tensor([1, 0])
    assert torch.equal(mixed_targets(labels, 3, 1.0), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(mixed_targets(labels, 3, 0.0), torch.full((2, 3), 1 / 3))
