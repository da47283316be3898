"""Paths the CPU kernels choose by shape, for the callers that plan around them (the dynamic blocks
and the latency predictor). Each rule mirrors the kernel's own test, named beside it."""

import torch

# Grouped convolutions of at most this many output channels per group run, in channel_gated_conv2d's
# CPU kernel, as the dense grouped convolution of the gated input followed by the output gates: the
# per-group products would be at most one vector wide (dense_grouped_is_faster in
# csrc/cpu/channel_gated_conv2d.cpp).
DENSE_GROUP_WIDTH = 16


def dense_grouped(out_channels: int, groups: int) -> bool:
    """Whether the CPU channel_gated_conv2d runs this convolution as a dense grouped one."""
    return groups > 1 and out_channels // groups <= DENSE_GROUP_WIDTH


def runs_dense_grouped(x: torch.Tensor, out_channels: int, groups: int) -> bool:
    """Whether channel_gated_conv2d on ``x`` takes that path: then ``in_gates`` skip no work, and cost a
    gated copy of ``x``."""
    return x.device.type == "cpu" and dense_grouped(out_channels, groups)
