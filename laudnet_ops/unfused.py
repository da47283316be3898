"""The spatial-skipping computations as separate standard PyTorch steps.

What a framework without fused kernels runs -- gather the halo tiles into a
buffer, run the dense convolution on that buffer, scatter the result -- and
the baseline the fused ops are benchmarked against (the paper's Table I).
Same signatures and results as the fused ops; plain PyTorch, so also a
fallback that needs no compiled code, differentiable by PyTorch's autograd.
"""

import math

import torch
import torch.nn.functional as F

from .reference import _activate, scatter_add  # noqa: F401  (scatter_add: the composite scatter)


def gather_halo_tiles(x, indices, patch_size, kernel, stride=1, padding=0, dilation=1):
    """``(P, Cin, T, T)`` with ``T = (S - 1) * stride + dilation * (k - 1) + 1``: the input window
    (zero padded) that output patch ``(n, py, px)`` of a ``k x k`` convolution reads."""
    N, C, H, W = x.shape
    S = patch_size
    Ho = (H + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    Hp, Wp = math.ceil(Ho / S), math.ceil(Wo / S)
    T = (S - 1) * stride + dilation * (kernel - 1) + 1
    step = S * stride
    # Pad so that the tile of the last (border) patch lies inside the padded map.
    bottom = max(0, (Hp - 1) * step + T - (H + 2 * padding))
    right = max(0, (Wp - 1) * step + T - (W + 2 * padding))
    xp = F.pad(x, (padding, padding + right, padding, padding + bottom))
    tiles = xp.unfold(2, T, step).unfold(3, T, step)  # (N, C, Hp', Wp', T, T), a view
    n, py, px = indices.long().unbind(1)
    return tiles.permute(0, 2, 3, 1, 4, 5)[n, py, px]  # the gather: one copy of every tile


def _inside_output(indices, S, Ho, Wo, like):
    """(P, 1, S, S) mask of the packed positions that lie inside the output map."""
    rows = indices[:, 1:2].long() * S + torch.arange(S, device=indices.device)
    cols = indices[:, 2:3].long() * S + torch.arange(S, device=indices.device)
    inside = (rows < Ho)[:, :, None] & (cols < Wo)[:, None, :]
    return inside[:, None].to(like.dtype)


def gather_conv2d(x, indices, weight, bias, patch_size, stride=1, padding=0, dilation=1, groups=1,
                  activation="relu"):
    """Gather halo tiles, dense ``F.conv2d`` on the tile buffer, activation; like the fused op."""
    K = weight.shape[2]
    tiles = gather_halo_tiles(x, indices, patch_size, K, stride, padding, dilation)
    out = F.conv2d(tiles, weight, bias, stride, 0, dilation, groups)
    Ho = (x.shape[2] + 2 * padding - dilation * (K - 1) - 1) // stride + 1
    Wo = (x.shape[3] + 2 * padding - dilation * (K - 1) - 1) // stride + 1
    return _activate(out, activation) * _inside_output(indices, patch_size, Ho, Wo, out)


def masker_conv1x1(x, weight, bias, mask_weight, mask_bias, patch_size, stride=1, activation="relu"):
    """The 1x1 convolution, then the masker as its own steps: pool x to the mask grid, 1x1 conv."""
    y = _activate(F.conv2d(x, weight, bias), activation)
    window = patch_size * stride
    pooled = F.avg_pool2d(x, window, window, ceil_mode=True)  # border windows: mean of what is inside
    return y, F.conv2d(pooled, mask_weight, mask_bias)


def conv1x1_scatter_add(residual, packed, indices, weight, bias=None, activation="relu"):
    """The 1x1 convolution writes the ``(P, Cout, S, S)`` patches, then the composite scatter reads them."""
    return scatter_add(residual, F.conv2d(packed, weight, bias), indices, activation)
