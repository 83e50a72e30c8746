"""The OE and Energy-OE objectives of ``training.fit.methods`` against pytorch-ood's losses.

pytorch-ood's losses take one batch of logits with targets, OOD rows marked by a negative target
(here ``-1``); the project's methods take the ID images with labels and the outlier images apart.
With ``nn.Identity`` as the model, the "images" are the logits themselves, so both see one batch:
32 ID rows and 64 outlier rows (the MixOE paper's two outliers per ID image), 10 classes.

* **Energy-OE** is defined identically: ``EnergyRegularizedLoss(alpha=0.1, margin_in=-13,
  margin_out=-6)`` with its ``mean`` reduction averages the cross-entropy over the ID rows and each
  squared hinge over its own rows, as the project does. Values and gradients must agree.
* **OE** differs in the reduction. Per row, both use ``CE(z, y)`` for ID rows and
  ``weight * (logsumexp(z) - mean(z))`` (cross-entropy to uniform) for outlier rows, so with
  ``reduction="none"`` the project's loss is the mean over the ID rows plus the mean over the
  outlier rows. pytorch-ood's ``mean`` instead averages over the whole batch of ``N = n_in + n_out``
  rows, which weights the two terms by their share of the batch; hence
  ``project(weight=w) = N / n_in * OutlierExposureLoss(alpha=w * n_in / n_out)`` exactly.

The batch is chosen so that about half of each hinge is active (energies on both sides of their
margins), so a wrong margin, weight or sign changes the value.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_ood.loss import EnergyRegularizedLoss, OutlierExposureLoss
from torch import Tensor, nn

from tests.helpers.logits import LabelledLogits, synthetic_logits
from training.config import MethodConfig
from training.fit.methods import build_method

N_IN, N_OUT, K = 32, 64, 10
RTOL = 1e-5  # float32 sums over ~100 rows, computed in a different order


@pytest.fixture
def batch() -> LabelledLogits:
    data = synthetic_logits(N_IN, N_OUT, K, seed=4, margin=11.0, offset=2.0)
    energy_in, energy_out = -data.id_logits.logsumexp(dim=1), -data.ood_logits.logsumexp(dim=1)
    assert 0.25 < float((energy_in > -13.0).float().mean()) < 0.75  # part of the ID hinge is active
    assert 0.25 < float((energy_out < -6.0).float().mean()) < 0.75  # part of the outlier hinge too
    return data


def _targets(batch: LabelledLogits) -> Tensor:
    """pytorch-ood's targets for ``cat([id_logits, ood_logits])``: class labels, then ``-1``."""
    return torch.cat([batch.labels, torch.full((N_OUT,), -1)])


def _project_loss(method_name: str, id_logits: Tensor, batch: LabelledLogits, ood_logits: Tensor) -> Tensor:
    """The configured method's loss with the logits standing in for images (identity model)."""
    method = build_method(MethodConfig(name=method_name))
    loss, _ = method.loss(nn.Identity(), id_logits, batch.labels, ood_logits, torch.Generator().manual_seed(0))
    return loss


def test_energy_oe_equals_energy_regularized_loss_in_value_and_gradient(batch: LabelledLogits) -> None:
    id_logits = batch.id_logits.clone().requires_grad_()
    ood_logits = batch.ood_logits.clone().requires_grad_()
    ours = _project_loss("energy-oe", id_logits, batch, ood_logits)
    criterion = EnergyRegularizedLoss(alpha=0.1, margin_in=-13.0, margin_out=-6.0)
    theirs = criterion(torch.cat([id_logits, ood_logits]), _targets(batch))
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0.0)
    ours_grads = torch.autograd.grad(ours, [id_logits, ood_logits])
    theirs_grads = torch.autograd.grad(theirs, [id_logits, ood_logits])
    for mine, reference in zip(ours_grads, theirs_grads):
        assert mine.abs().sum() > 0
        torch.testing.assert_close(mine, reference, rtol=RTOL, atol=1e-8)


def test_oe_is_the_sum_of_per_group_means_of_pytorch_ood_terms(batch: LabelledLogits) -> None:
    ours = _project_loss("oe", batch.id_logits, batch, batch.ood_logits)
    logits, targets = torch.cat([batch.id_logits, batch.ood_logits]), _targets(batch)
    per_row = OutlierExposureLoss(alpha=1.0, reduction="none")(logits, targets)
    expected = per_row[:N_IN].mean() + per_row[N_IN:].mean()
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=0.0)


def test_oe_relates_to_pytorch_ood_batch_mean_by_reweighting(batch: LabelledLogits) -> None:
    ours = _project_loss("oe", batch.id_logits, batch, batch.ood_logits)
    logits, targets = torch.cat([batch.id_logits, batch.ood_logits]), _targets(batch)
    same_alpha = OutlierExposureLoss(alpha=1.0)(logits, targets)
    reweighted = OutlierExposureLoss(alpha=1.0 * N_IN / N_OUT)(logits, targets)
    # pytorch-ood's batch mean is a different number at the same alpha ...
    assert abs(float(ours - same_alpha)) > 0.1 * float(ours)
    # ... and exactly the project's loss once the terms are reweighted.
    torch.testing.assert_close(ours, (N_IN + N_OUT) / N_IN * reweighted, rtol=RTOL, atol=0.0)
