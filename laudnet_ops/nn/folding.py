"""Batch norm folded into the preceding convolution, for inference."""

from typing import Optional

import torch
from torch import nn

__all__ = ["fold_bn", "FoldedWeights"]


def fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d) -> tuple:
    """``(w, b)`` with ``conv2d(x, w, b) == bn(conv2d(x, weight, bias))`` for ``bn`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn: the batch norm must track running statistics to be folded")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.reshape(-1, 1, 1, 1), shift


def _lay_out(w: torch.Tensor, layout: Optional[str], groups: int) -> torch.Tensor:
    if layout == "channels_last":
        return w.contiguous(memory_format=torch.channels_last)
    if layout == "taps_major" and groups == 1:
        # A (Cout, Cin, K, K) view of a contiguous (K, K, Cin, Cout) buffer.
        return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    return w.contiguous()


class FoldedWeights:
    """Folded ``(w, b)`` per named (conv, bn) pair of one block, recomputed only when a parameter or statistic changes.

    The cache key is each tensor's storage and version counter, so an optimiser step, a
    ``load_state_dict`` or a ``.to()`` invalidates it without any hook.
    """

    def __init__(self):
        self._cache = {}

    def __call__(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, layout: Optional[str] = None) -> tuple:
        """``(w, b)``; ``layout`` lays ``w`` out in memory (same values) the way a kernel reads it:
        ``"channels_last"``, or ``"taps_major"`` ((ky, kx, Cin, Cout) order, for gather_conv2d's CPU
        GEMM), so the kernel need not re-lay the weight on every call."""
        tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
                   if t is not None]
        if any(t.is_inference() for t in tensors):
            # Made under torch.inference_mode: no version counter, so an in-place change there (a
            # load_state_dict) would go unseen. Folded afresh on every call instead.
            self._cache.pop((name, layout), None)
            return self._fold(conv, bn, layout)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        name = (name, layout)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        folded = self._fold(conv, bn, layout)
        self._cache[name] = (key, folded)
        return folded

    @staticmethod
    def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, layout: Optional[str]) -> tuple:
        with torch.no_grad():
            w, b = fold_bn(conv.weight, conv.bias, bn)
            return _lay_out(w, layout, conv.groups), b

    def clear(self) -> None:
        self._cache.clear()
