"""Argument checks of the spatial-skipping convolutions, mirroring csrc/spatial_conv.h.

Used by the fake kernels of gather_conv2d, masker_conv1x1 and masked_conv1x1, which run under
torch.compile and torch.export where the C++ checks do not.
"""

import torch

from . import _checks


def check_bias(bias, x, channels, op, arg):
    if bias is None:
        return
    _checks.check(bias.dim() == 1 and bias.shape[0] == channels, op,
                  f"{arg} must have shape ({channels},), got {list(bias.shape)}")
    _checks.check_same(x, bias, "dtype", op, "x", arg)
    _checks.check_same(x, bias, "device", op, "x", arg)


def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_gather_conv_args(x, indices, weight, bias, patch_size, stride, padding, dilation, groups, activation):
    """Checks gather_conv2d's arguments; returns the convolution's output size (Ho, Wo)."""
    op = "gather_conv2d"
    _checks.check_dim(x, 4, op, "x")
    _checks.check_floating(x, op, "x")
    _checks.check_dim(weight, 4, op, "weight")
    _checks.check_same(x, weight, "dtype", op, "x", "weight")
    _checks.check_same(x, weight, "device", op, "x", "weight")
    _checks.check_same(x, indices, "device", op, "x", "indices")
    _checks.check_indices_shape(indices, op)
    _checks.check(patch_size >= 1, op, f"patch_size must be at least 1, got {patch_size}")
    _checks.check(stride >= 1, op, f"stride must be at least 1, got {stride}")
    _checks.check(padding >= 0, op, f"padding must be non-negative, got {padding}")
    _checks.check(dilation >= 1, op, f"dilation must be at least 1, got {dilation}")
    _checks.check(groups >= 1, op, f"groups must be at least 1, got {groups}")
    K = weight.shape[2]
    _checks.check(weight.shape[2] == weight.shape[3] and K >= 1, op,
                  f"weight must have a square kernel, shape (Cout, Cin / groups, k, k), got {list(weight.shape)}")
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    _checks.check(Cin % groups == 0 and Cout % groups == 0, op,
                  f"groups ({groups}) must divide both x's channels ({Cin}) and weight's output channels ({Cout})")
    _checks.check(weight.shape[1] * groups == Cin, op,
                  f"weight has {weight.shape[1]} input channels per group, but x has {Cin} channels in {groups} groups")
    check_bias(bias, x, Cout, op, "bias")
    span = dilation * (K - 1) + 1
    _checks.check(H + 2 * padding >= span and W + 2 * padding >= span, op,
                  f"the {K}x{K} kernel with dilation {dilation} (span {span}) does not fit the {H}x{W} "
                  f"input with padding {padding}")
    _checks.check_activation(activation, op)
    return conv_output_size(H, K, stride, padding, dilation), conv_output_size(W, K, stride, padding, dilation)


def _check_1x1_weight(w, x, op, arg, rows):
    _checks.check_dim(w, 4, op, arg)
    _checks.check_same(x, w, "dtype", op, "x", arg)
    _checks.check_same(x, w, "device", op, "x", arg)
    _checks.check(w.shape[2] == 1 and w.shape[3] == 1, op,
                  f"{arg} must be a 1x1 kernel, shape ({rows}, Cin, 1, 1), got {list(w.shape)}")
    _checks.check(w.shape[1] == x.shape[1], op, f"{arg} has {w.shape[1]} input channels but x has {x.shape[1]}")


def check_masker_args(x, weight, bias, mask_weight, mask_bias, patch_size, stride, activation):
    """Checks masker_conv1x1's arguments; returns the mask grid (Hq, Wq)."""
    op = "masker_conv1x1"
    _checks.check_dim(x, 4, op, "x")
    _checks.check_floating(x, op, "x")
    _check_1x1_weight(weight, x, op, "weight", "Cout")
    _check_1x1_weight(mask_weight, x, op, "mask_weight", "M")
    _checks.check(mask_weight.shape[0] >= 1, op,
                  f"mask_weight must have at least one masker channel, got {list(mask_weight.shape)}")
    check_bias(bias, x, weight.shape[0], op, "bias")
    check_bias(mask_bias, x, mask_weight.shape[0], op, "mask_bias")
    _checks.check(patch_size >= 1, op, f"patch_size must be at least 1, got {patch_size}")
    _checks.check(stride >= 1, op, f"stride must be at least 1, got {stride}")
    _checks.check_activation(activation, op)
    window = patch_size * stride
    return mask_grid(x.shape[2], x.shape[3], window)


def check_masked_conv_args(x, mask, weight, bias, activation):
    """Checks masked_conv1x1's arguments."""
    op = "masked_conv1x1"
    _checks.check_dim(x, 4, op, "x")
    _checks.check_floating(x, op, "x")
    _check_1x1_weight(weight, x, op, "weight", "Cout")
    check_bias(bias, x, weight.shape[0], op, "bias")
    _checks.check_same(x, mask, "device", op, "x", "mask")
    _checks.check(mask.dtype == torch.bool, op, f"mask must be a bool tensor, got {mask.dtype}")
    N, _, H, W = x.shape
    _checks.check(mask.dim() == 3 and mask.shape[0] == N and mask.shape[1] == H and mask.shape[2] == W, op,
                  f"mask must have shape (N, H, W) = ({N}, {H}, {W}), got {list(mask.shape)}")
    _checks.check_activation(activation, op)


def mask_grid(H, W, window):
    """(ceil(H / window), ceil(W / window)), also for symbolic sizes."""
    return (H + window - 1) // window, (W + window - 1) // window


__all__ = ["check_bias", "check_gather_conv_args", "check_masker_args", "check_masked_conv_args", "conv_output_size",
           "mask_grid"]
