"""Modules: drop-in gathered convolutions, maskers, dynamic blocks, execution and statistics.

Importing this package does not need the compiled extension: the masked path is plain PyTorch,
and the sparse path raises the extension's ImportError when it first runs without it.
"""

from .blocks import MODES, DynamicBlock, DynamicBottleneck, DynamicRegNetYBlock
from .execution import set_execution
from .folding import fold_bn
from .gather_conv import ChannelGatedConv2d, GatherConv2d, halo_mask
from .maskers import ChannelMasker, LayerMasker, Masker, SpatialMasker, set_force_keep, set_tau, tau_schedule
from .stats import sparsity_loss, stats

__all__ = [
    "MODES", "DynamicBlock", "DynamicBottleneck", "DynamicRegNetYBlock", "set_execution", "fold_bn",
    "GatherConv2d", "ChannelGatedConv2d", "halo_mask", "Masker", "SpatialMasker", "ChannelMasker", "LayerMasker",
    "set_force_keep", "set_tau", "tau_schedule", "stats", "sparsity_loss",
]
