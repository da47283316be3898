"""The temperature, sparsity-bound and learning-rate schedules against their formulas."""

import math

import pytest
import torch

from laudnet_ops.nn import tau_schedule
from laudnet_ops.train import schedules


@pytest.mark.parametrize("tau0,tau_end,total", [(5.0, 0.1, 1000), (2.0, 0.5, 7), (1.0, 1.0, 10)])
def test_gumbel_tau_is_exponential_decay(tau0, tau_end, total):
    for step in range(0, total + 1, max(total // 13, 1)):
        expected = tau0 * math.exp(step / total * math.log(tau_end / tau0))
        assert schedules.gumbel_tau(step, total, tau0, tau_end) == pytest.approx(expected, rel=1e-12)
    assert schedules.gumbel_tau(0, total, tau0, tau_end) == pytest.approx(tau0)
    assert schedules.gumbel_tau(total, total, tau0, tau_end) == pytest.approx(tau_end)
    # Beyond the end it stays at tau_end (no extrapolation below it).
    assert schedules.gumbel_tau(total + 5, total, tau0, tau_end) == pytest.approx(tau_end)


def test_gumbel_tau_defaults_are_the_papers_and_agree_with_nn():
    assert schedules.gumbel_tau(0, 100) == 5.0
    assert schedules.gumbel_tau(100, 100) == pytest.approx(0.1)
    for step in (0, 13, 50, 99, 100):
        assert schedules.gumbel_tau(step, 100) == pytest.approx(tau_schedule(step, 100))
    ratios = [schedules.gumbel_tau(s + 1, 100) / schedules.gumbel_tau(s, 100) for s in range(99)]
    assert max(ratios) == pytest.approx(min(ratios))  # a constant factor per step


def test_gumbel_tau_rejects_non_positive_temperatures():
    with pytest.raises(ValueError, match="temperatures must be positive"):
        schedules.gumbel_tau(0, 10, 0.0, 0.1)


@pytest.mark.parametrize("target", [0.4, 0.5, 0.8])
@pytest.mark.parametrize("epochs", [3, 10, 100])
def test_sparsity_bounds_match_the_formula(target, epochs):
    for epoch in [0, 0.5, 1, 2, epochs * 0.2, epochs * 0.33, epochs * 0.5, epochs]:
        p = math.cos(math.pi / 2 * min(1.0, epoch / (0.33 * epochs))) ** 2
        lower, upper = schedules.sparsity_bounds(epoch, epochs, target)
        assert lower == pytest.approx(p * target, abs=1e-12)
        assert upper == pytest.approx(1 - p * (1 - target), abs=1e-12)
        assert 0.0 <= lower <= target <= upper <= 1.0


def test_sparsity_bounds_start_pinned_and_relax_by_a_third():
    assert schedules.sparsity_bounds(0, 90, 0.4) == pytest.approx((0.4, 0.4))
    assert schedules.sparsity_bounds(0.33 * 90, 90, 0.4) == (0.0, 1.0)
    assert schedules.sparsity_bounds(80, 90, 0.4) == (0.0, 1.0)
    lowers = [schedules.sparsity_bounds(e / 10, 9, 0.6)[0] for e in range(40)]
    assert all(a >= b for a, b in zip(lowers, lowers[1:]))  # monotone relaxation


def test_sparsity_bounds_warmup_is_configurable_and_checked():
    assert schedules.sparsity_bounds(5, 10, 0.5, warmup=0.5) == (0.0, 1.0)
    assert schedules.sparsity_bounds(5, 10, 0.5, warmup=1.0)[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="target must be in"):
        schedules.sparsity_bounds(0, 10, 1.5)


def test_scaled_lr_is_linear_in_the_batch():
    assert schedules.scaled_lr(256) == pytest.approx(0.02)
    assert schedules.scaled_lr(1024) == pytest.approx(0.08)
    assert schedules.scaled_lr(128, lr_per_256=0.02) == pytest.approx(0.01)  # the paper's 0.01 · batch / 128


def test_cosine_scheduler_follows_the_cosine_per_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.2}, {"params": params[1:], "lr": 0.02}], lr=0.2)
    total = 20
    sched = schedules.cosine_scheduler(opt, total)
    for step in range(total):
        factor = 0.5 * (1 + math.cos(math.pi * step / total))
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * factor)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.02 * factor)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cosine_factor_warmup_is_linear():
    assert [schedules.cosine_factor(s, 100, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedules.cosine_factor(4, 100, warmup_steps=4) == pytest.approx(1.0)
