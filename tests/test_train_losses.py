"""The LAUDNet loss: cross-entropy, the banded sparsity loss and T²-scaled distillation."""

import math

import pytest
import torch
import torch.nn.functional as F

from laudnet_ops.nn import sparsity_loss as nn_sparsity_loss
from laudnet_ops.nn import stats
from laudnet_ops.train.architectures import SmallLaudResNet
from laudnet_ops.train.losses import LaudLoss, band_penalty, distillation_loss, sparsity_loss
from laudnet_ops.train.schedules import sparsity_bounds


def test_band_penalty_is_zero_inside_and_quadratic_outside():
    rates = torch.tensor([0.2, 0.5, 0.9])
    assert band_penalty(rates, 0.1, 0.95).item() == 0.0
    expected = ((0.9 - 0.6) ** 2 + (0.3 - 0.2) ** 2) / 3
    assert band_penalty(rates, 0.3, 0.6).item() == pytest.approx(expected)


def test_sparsity_loss_adds_the_network_term():
    rates = torch.tensor([0.5, 0.7])
    loss = sparsity_loss(rates, torch.tensor(0.65), target=0.4, lower=0.0, upper=1.0)
    assert loss.item() == pytest.approx((0.65 - 0.4) ** 2)
    loss = sparsity_loss(rates, torch.tensor(0.65), target=0.4, lower=0.4, upper=0.4)
    assert loss.item() == pytest.approx(((0.1 ** 2) + (0.3 ** 2)) / 2 + 0.25 ** 2)


@pytest.mark.parametrize("mode", ["spatial", "channel", "layer"])
@pytest.mark.parametrize("epoch", [0.0, 1.0, 5.0])
def test_sparsity_loss_agrees_with_the_models_own(mode, epoch):
    torch.manual_seed(0)
    model = SmallLaudResNet((4, 8), (1, 1), mode, granularity=(2, 1) if mode != "channel" else 2)
    model(torch.randn(4, 1, 8, 8))
    s = stats(model)
    lower, upper = sparsity_bounds(epoch, 10, 0.5)
    ours = sparsity_loss(s["block_rates"], s["flops_ratio"], 0.5, lower, upper)
    assert ours.item() == pytest.approx(nn_sparsity_loss(model, epoch / 10, 0.5).item(), rel=1e-6)


def test_distillation_is_t_squared_kl_of_teacher_to_student():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 4.0
    p_t, p_s = F.softmax(t / T, 1), F.softmax(s / T, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert distillation_loss(s, t, T).item() == pytest.approx(T * T * kl.item(), rel=1e-5)
    assert distillation_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_sends_no_gradient_to_the_teacher():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    distillation_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_laud_loss_weights_its_parts():
    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    rates, ratio = torch.tensor([0.9, 0.8]), torch.tensor(0.85)
    loss = LaudLoss()  # lambda 10, alpha 0.5, T 4
    parts = loss(logits, labels, teacher, rates, ratio, 0.5, (0.5, 0.5))
    ce = F.cross_entropy(logits, labels)
    expected = ce + 10 * sparsity_loss(rates, ratio, 0.5, 0.5, 0.5) + 0.5 * distillation_loss(logits, teacher, 4.0)
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts.ce.item() == pytest.approx(ce.item())
    plain = loss(logits, labels)
    assert plain.total.item() == pytest.approx(ce.item()) and plain.sparsity.item() == 0.0
    assert math.isfinite(parts.distill.item()) and parts.distill.item() > 0
