"""Drop-in convolutions that compute only what a mask keeps: patches, or channel groups.

Both subclass ``nn.Conv2d``: same constructor arguments (plus the granularity), same parameter
names and state-dict keys, and with no mask they are exactly ``nn.Conv2d``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import has_op, op

__all__ = ["GatherConv2d", "ChannelGatedConv2d", "expand_patch_mask", "expand_group_mask", "halo_mask"]


def expand_patch_mask(mask: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """``(N, Hp, Wp)`` patch mask -> ``(N, 1, height, width)`` pixel mask, border patches cropped."""
    S = patch_size
    pixels = mask.repeat_interleave(S, dim=1).repeat_interleave(S, dim=2)
    return pixels[:, None, :height, :width]


def halo_mask(mask: torch.Tensor, patch_size: int, stride: int, in_hw: tuple, out_hw: tuple) -> torch.Tensor:
    """``(N, 1, H, W)``: the input pixels that a 3x3 convolution (padding 1, ``stride``) reads to
    compute the kept ``S x S`` patches of its ``(Ho, Wo)`` output, 1 where read, 0 elsewhere.

    ``mask`` ``(N, Hp, Wp)`` is bool or 0/1 float; a float mask gives a float map that is
    differentiable in it (the FLOPs accounting of training), a bool mask a bool map.
    """
    (H, W), (Ho, Wo) = in_hw, out_hw
    kept = expand_patch_mask(mask, patch_size, Ho, Wo)
    # Output (i, j) reads input rows stride*i-1 .. stride*i+1: place each output at stride*i (one
    # pixel inside a zero border), then dilate by one pixel.
    spread = kept.new_zeros(kept.shape[0], 1, max(H, Ho * stride) + 2, max(W, Wo * stride) + 2)
    spread[:, :, 1 : Ho * stride + 1 : stride, 1 : Wo * stride + 1 : stride] = kept
    if kept.dtype.is_floating_point:  # a max keeps it exact for 0/1 masks and differentiable for the loss
        return F.max_pool2d(spread, 3, 1, 0)[:, :, :H, :W]
    # bool (inference): the dilation as ORs of shifted views, row then column. For a batch-8 56x56
    # map this function took 0.25 ms with a max pool over a float copy (0.15 of it the pool), 0.07 so.
    rows = spread[..., :-2] | spread[..., 1:-1] | spread[..., 2:]
    return (rows[..., :-2, :] | rows[..., 1:-1, :] | rows[..., 2:, :])[:, :, :H, :W]


def expand_group_mask(gates: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N, C / G)`` group gates -> ``(N, C, 1, 1)`` channel mask."""
    return gates.repeat_interleave(group_size, dim=1)[:, :, None, None]


def _single(value, name: str) -> Optional[int]:
    """The int of a square conv argument, or None where the fused ops cannot take it."""
    if isinstance(value, str):
        return None
    a, b = value if isinstance(value, tuple) else (value, value)
    return a if a == b else None


class _OpConv(nn.Conv2d):
    def _op_args(self) -> Optional[dict]:
        """stride/padding/dilation as the fused ops take them, or None where only F.conv2d can run."""
        if self.padding_mode != "zeros":
            return None
        args = {k: _single(getattr(self, k), k) for k in ("stride", "padding", "dilation")}
        if any(v is None for v in args.values()) or self.kernel_size[0] != self.kernel_size[1]:
            return None
        return dict(args, groups=self.groups)

    def _output_size(self, x: torch.Tensor) -> tuple:
        size = []
        for i, extent in enumerate(x.shape[2:]):
            pad = self.padding[i] if not isinstance(self.padding, str) else 0
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            size.append((extent + 2 * pad - span) // self.stride[i] + 1)
        return tuple(size)


class GatherConv2d(_OpConv):
    """``nn.Conv2d`` that can compute only the output patches a mask keeps.

    Args: those of ``nn.Conv2d``, plus ``patch_size`` (``S``), the side of an output patch.

    ``forward(x)`` is ``nn.Conv2d``. ``forward(x, mask)``, with bool ``mask`` ``(N, ceil(Ho/S),
    ceil(Wo/S))`` over the output patch grid, returns the dense ``(N, Cout, Ho, Wo)`` map computed only
    in the kept patches and zero elsewhere. ``forward_packed(x, indices)`` returns the packed
    ``(P, Cout, S, S)`` form for the patches ``indices`` (as ``laudnet_ops.patch_indices`` gives).
    """

    def __init__(self, *args, patch_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if patch_size < 1:
            raise ValueError(f"GatherConv2d: patch_size must be at least 1, got {patch_size}")
        self.patch_size = patch_size

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, patch_size: int) -> "GatherConv2d":
        """A GatherConv2d with ``conv``'s configuration and a copy of its parameters."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, patch_size=patch_size,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            return super().forward(x)
        Ho, Wo = self._output_size(x)
        self._check_mask(x, mask, Ho, Wo)
        if has_op("gather_conv2d") and self._op_args() is not None:
            indices = op("patch_indices")(mask)
            zeros = x.new_zeros((x.shape[0], self.out_channels, Ho, Wo))
            return op("scatter_add")(zeros, self.forward_packed(x, indices), indices, "none")
        return super().forward(x) * expand_patch_mask(mask, self.patch_size, Ho, Wo).to(x.dtype)

    def forward_packed(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``(P, Cout, S, S)``: the output patches ``indices``, zero where a border patch sticks out."""
        args = self._op_args()
        if has_op("gather_conv2d") and args is not None:
            return op("gather_conv2d")(x, indices, self.weight, self.bias, self.patch_size, activation="none", **args)
        # Without the fused op: the dense conv, then its patches -- same values, dense cost.
        return torch.ops.laudnet_ops._gather_patches.default(super().forward(x), indices, self.patch_size)

    def _check_mask(self, x, mask, Ho, Wo):
        grid = (x.shape[0], -(-Ho // self.patch_size), -(-Wo // self.patch_size))
        if mask.dtype != torch.bool or tuple(mask.shape) != grid:
            raise ValueError(
                f"GatherConv2d: mask must be bool of shape (N, ceil(Ho/S), ceil(Wo/S)) = {grid}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", patch_size={self.patch_size}"


class ChannelGatedConv2d(_OpConv):
    """``nn.Conv2d`` with per-sample channel-group gates on its input and output.

    Args: those of ``nn.Conv2d``, plus ``group_size`` (``G``, channels per gate).

    ``forward(x, in_gates=None, out_gates=None)``: bool ``in_gates`` ``(N, Cin/G)`` zero the input
    channels of off groups, bool ``out_gates`` ``(N, Cout/G)`` make off output groups exactly 0
    (their bias too); None means all on, and with neither it is ``nn.Conv2d``.
    """

    def __init__(self, *args, group_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if group_size < 1 or self.in_channels % group_size or self.out_channels % group_size:
            raise ValueError(
                f"ChannelGatedConv2d: group_size must divide in_channels ({self.in_channels}) and "
                f"out_channels ({self.out_channels}), got {group_size}"
            )
        self.group_size = group_size

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group_size: int) -> "ChannelGatedConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, group_size=group_size,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: torch.Tensor, in_gates: Optional[torch.Tensor] = None,
                out_gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        if in_gates is None and out_gates is None:
            return super().forward(x)
        args = self._op_args()
        if has_op("channel_gated_conv2d") and args is not None:
            return op("channel_gated_conv2d")(x, self.weight, self.bias, in_gates, out_gates, self.group_size,
                                              activation="none", **args)
        G = self.group_size
        if in_gates is not None:
            x = x * expand_group_mask(in_gates, G).to(x.dtype)
        y = super().forward(x)
        if out_gates is not None:
            y = y * expand_group_mask(out_gates, G).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
