"""GatherConv2d and ChannelGatedConv2d: drop-in for nn.Conv2d, and masked/gated outputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import laudnet_ops
from laudnet_ops.nn import ChannelGatedConv2d, GatherConv2d
from laudnet_ops.nn.gather_conv import expand_group_mask, expand_patch_mask

from helpers import patch_grid, random_mask

CONV_CASES = [
    # (cin, cout, kernel, stride, padding, dilation, groups, H, W)
    (4, 6, 3, 1, 1, 1, 1, 9, 7),
    (4, 6, 3, 2, 1, 1, 2, 11, 10),
    (6, 6, 3, 1, 2, 2, 3, 8, 8),
    (5, 3, 1, 1, 0, 1, 1, 7, 5),
    (4, 8, 1, 2, 0, 1, 1, 9, 9),
]


def _pair(case, cls, **kw):
    cin, cout, k, s, p, d, g, H, W = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g).double()
    return conv, cls.from_conv(conv, **kw), torch.randn(2, cin, H, W, dtype=torch.float64)


def test_top_level_exports():
    assert laudnet_ops.GatherConv2d is GatherConv2d
    assert laudnet_ops.ChannelGatedConv2d is ChannelGatedConv2d


@pytest.mark.parametrize("case", CONV_CASES)
def test_gather_conv_without_mask_is_conv2d(case):
    conv, gconv, x = _pair(case, GatherConv2d, patch_size=3)
    assert list(gconv.state_dict()) == list(conv.state_dict())
    torch.testing.assert_close(gconv(x), conv(x), rtol=0, atol=0)


def test_gather_conv_constructor_matches_conv2d():
    torch.manual_seed(1)
    a = nn.Conv2d(4, 8, 3, 2, 1, bias=False)
    torch.manual_seed(1)
    b = GatherConv2d(4, 8, 3, 2, 1, bias=False, patch_size=2)
    torch.testing.assert_close(a.weight, b.weight)
    assert b.bias is None and "patch_size=2" in repr(b)
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("S", [1, 2, 4])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_gather_conv_masked_is_conv_in_kept_patches(case, S, keep):
    conv, gconv, x = _pair(case, GatherConv2d, patch_size=S)
    dense = conv(x)
    Ho, Wo = dense.shape[2:]
    mask = random_mask((2, *patch_grid(Ho, Wo, S)), keep, torch.Generator().manual_seed(3))
    expected = dense * expand_patch_mask(mask, S, Ho, Wo)
    torch.testing.assert_close(gconv(x, mask), expected)


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_gather_conv_packed_is_patches_of_the_output(case):
    S = 3
    conv, gconv, x = _pair(case, GatherConv2d, patch_size=S)
    dense = conv(x)
    mask = random_mask((2, *patch_grid(*dense.shape[2:], S)), 0.5, torch.Generator().manual_seed(4))
    indices = laudnet_ops.patch_indices(mask)
    expected = laudnet_ops.reference.gather_patches(dense, indices, S)
    torch.testing.assert_close(gconv.forward_packed(x, indices), expected)


def test_gather_conv_masked_gradient_reaches_weights():
    conv, gconv, x = _pair(CONV_CASES[1], GatherConv2d, patch_size=2)
    mask = random_mask((2, *patch_grid(6, 5, 2)), 0.5, torch.Generator().manual_seed(5))
    gconv(x.requires_grad_(), mask).sum().backward()
    assert gconv.weight.grad is not None and gconv.weight.grad.abs().sum() > 0
    assert x.grad is not None


def test_gather_conv_bad_mask():
    _, gconv, x = _pair(CONV_CASES[0], GatherConv2d, patch_size=2)
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(N, ceil\(Ho/S\), ceil\(Wo/S\)\) = \(2, 5, 4\)"):
        gconv(x, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        gconv(x, torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="patch_size must be at least 1"):
        GatherConv2d(2, 2, 1, patch_size=0)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[6] == 1] + [(8, 8, 3, 1, 1, 1, 2, 6, 7)])
@pytest.mark.parametrize("which", ["in", "out", "both"])
def test_channel_gated_conv(case, which):
    G = 2 if case[0] % 2 == 0 and case[1] % 2 == 0 else 1
    conv, gconv, x = _pair(case, ChannelGatedConv2d, group_size=G)
    torch.testing.assert_close(gconv(x), conv(x), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(6)
    in_gates = random_mask((2, conv.in_channels // G), 0.5, gen) if which != "out" else None
    out_gates = random_mask((2, conv.out_channels // G), 0.5, gen) if which != "in" else None
    xin = x if in_gates is None else x * expand_group_mask(in_gates, G)
    expected = conv(xin)
    if out_gates is not None:
        expected = expected * expand_group_mask(out_gates, G)
    torch.testing.assert_close(gconv(x, in_gates, out_gates), expected)


def test_channel_gated_conv_off_groups_are_exactly_zero_bias_included():
    conv = ChannelGatedConv2d(4, 4, 1, group_size=2)
    nn.init.constant_(conv.bias, 3.0)
    out = conv(torch.randn(1, 4, 3, 3), None, torch.tensor([[True, False]]))
    assert (out[:, 2:] == 0).all() and (out[:, :2] != 0).any()


def test_channel_gated_conv_bad_group_size():
    with pytest.raises(ValueError, match=r"group_size must divide in_channels \(6\) and out_channels \(4\), got 4"):
        ChannelGatedConv2d(6, 4, 1, group_size=4)
