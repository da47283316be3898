"""Maskers: hard Gumbel-sigmoid in training, threshold in eval, force_keep, pooling geometry."""

import math

import pytest
import torch
from torch import nn

from laudnet_ops.nn import ChannelMasker, LayerMasker, SpatialMasker, set_force_keep, set_tau, tau_schedule
from laudnet_ops.nn.maskers import channel_masker_hidden, hard_gumbel_sigmoid


def _maskers():
    return [SpatialMasker(6, patch_size=2, stride=2), ChannelMasker(6, groups=5), LayerMasker(6)]


def test_unit_shapes():
    x = torch.randn(3, 6, 11, 9)
    spatial, channel, layer = _maskers()
    # Output 6 x 5, patch grid ceil(6/2) x ceil(5/2).
    assert spatial(x).shape == (3, 3, 3)
    assert channel(x).shape == (3, 5)
    assert layer(x).shape == (3,)


def test_channel_masker_hidden_width():
    assert channel_masker_hidden(8) == 16 and channel_masker_hidden(1024) == 64
    assert ChannelMasker(6, 512).fc1.out_features == 32


@pytest.mark.parametrize("stride,S,H,W", [(1, 4, 9, 7), (2, 2, 11, 9), (2, 4, 14, 14), (1, 1, 3, 5)])
def test_spatial_logits_pool_output_patches_over_input_pixels(stride, S, H, W):
    # logits[n, py, px] is the mean over input rows [py*S*stride, min((py+1)*S*stride, H)) (and
    # columns likewise) of the 1x1 conv -- the contract of laudnet_ops.masker_conv1x1.
    torch.manual_seed(0)
    masker = SpatialMasker(3, S, stride).double()
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    per_pixel = masker.conv(x)[:, 0]
    Ho, Wo = math.ceil(H / stride), math.ceil(W / stride)
    Hp, Wp = math.ceil(Ho / S), math.ceil(Wo / S)
    expected = torch.empty(2, Hp, Wp, dtype=torch.float64)
    step = S * stride
    for py in range(Hp):
        for px in range(Wp):
            expected[:, py, px] = per_pixel[:, py * step : (py + 1) * step, px * step : (px + 1) * step].mean((1, 2))
    torch.testing.assert_close(masker.logits(x), expected)


def test_eval_thresholds_logits_deterministically():
    masker = LayerMasker(4).eval()
    with torch.no_grad():
        masker.fc.weight.zero_()
        masker.fc.weight[0, 0] = 1.0
        masker.fc.bias.zero_()
    x = torch.zeros(4, 4, 2, 2)
    x[:, 0] = torch.tensor([-2.0, -0.5, 0.5, 2.0])[:, None, None]
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(masker(x), expected)
    torch.testing.assert_close(masker(x), expected)


def test_training_masks_are_hard_and_carry_gradients():
    torch.manual_seed(0)
    for masker in _maskers():
        masker.train()
        x = torch.randn(4, 6, 8, 8)
        mask = masker(x)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        (mask * torch.randn_like(mask)).sum().backward()
        grads = [p.grad for p in masker.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_gumbel_sigmoid_follows_the_logit():
    torch.manual_seed(0)
    logits = torch.tensor([-3.0, 0.0, 3.0]).repeat(4000, 1)
    keep = hard_gumbel_sigmoid(logits, tau=1.0).mean(0)
    # P(keep) = sigmoid(logit) for the difference of two Gumbel noises.
    torch.testing.assert_close(keep, torch.sigmoid(torch.tensor([-3.0, 0.0, 3.0])), atol=0.03, rtol=0)


def test_force_keep_all_none_and_seeded_fraction():
    x = torch.randn(8, 6, 16, 16)
    for masker in _maskers():
        masker.set_force_keep(1.0)
        assert (masker(x) == 1).all()
        masker.set_force_keep(0.0)
        assert (masker(x) == 0).all()
    big = SpatialMasker(6, patch_size=1)
    big.set_force_keep(0.5, seed=7)
    first = big(x)
    big.set_force_keep(0.5, seed=7)
    assert torch.equal(big(x), first)
    assert abs(first.mean().item() - 0.5) < 0.05
    big.set_force_keep(0.5, seed=8)
    assert not torch.equal(big(x), first)


@pytest.mark.cuda
def test_force_keep_draws_the_same_masks_on_cuda():
    x = torch.randn(8, 6, 16, 16)
    for masker in _maskers():
        masker.set_force_keep(0.5, seed=3)
        on_cpu = [masker(x) for _ in range(3)]
        masker.cuda().set_force_keep(0.5, seed=3)
        on_gpu = [masker(x.cuda()) for _ in range(3)]
        for cpu_mask, gpu_mask in zip(on_cpu, on_gpu):
            assert gpu_mask.device.type == "cuda" and gpu_mask.dtype == cpu_mask.dtype
            assert torch.equal(gpu_mask.cpu(), cpu_mask)


def test_force_keep_ignores_the_logits_and_stays_hard_in_training():
    masker = ChannelMasker(6, 4).train()
    masker.set_force_keep(0.3, seed=0)
    mask = masker(torch.randn(16, 6, 2, 2))
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and not mask.requires_grad


def test_set_force_keep_and_tau_on_a_model():
    model = nn.Sequential(*_maskers())
    set_force_keep(model, 0.25, seed=3)
    set_tau(model, 0.7)
    assert all(m.force_keep == 0.25 and m.tau == 0.7 for m in model)
    set_force_keep(model, None)
    assert all(m.force_keep is None for m in model)
    with pytest.raises(ValueError, match=r"force_keep must be None or a float in \[0, 1\], got 1.5"):
        set_force_keep(model, 1.5)


def test_tau_schedule():
    assert tau_schedule(0, 100) == pytest.approx(5.0)
    assert tau_schedule(100, 100) == pytest.approx(0.1)
    assert tau_schedule(50, 100) == pytest.approx(math.sqrt(5.0 * 0.1))
