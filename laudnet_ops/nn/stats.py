"""What every dynamic block computed in its last forward: activation rates and FLOPs.

FLOPs are counted as multiply-accumulates (the convention of the papers' "FLOPs"). Per bottleneck
(the LAUDNet accounting, laudnet-facts.md "FLOPs accounting"), with per-sample channel density
``c``, spatial density ``s`` of the kept output pixels and ``s1`` of the input pixels the kept
patches' 3x3 halo reads, and layer decision ``l``:

    conv1 x c x s1 (x l)    conv2 x c^2 x s (x l)    conv3 x c x s (x l)    SE x c (x l)

the projection shortcut is dense and the masker is always paid. A block's activation rate is
``r = executed / dense``; the model's activation rate is the mean of its blocks' rates, and its
FLOPs ratio counts the static stem and head too. Forward stores only the masks; the numbers are
computed here, on request, and stay differentiable in training so the sparsity loss can use them.

The sparse path computes conv1 on just the ``s1`` pixels for channels_last maps on the CPU;
elsewhere conv1 runs on every pixel, fused with the masker, so there these numbers are the paper's
accounting of the ideal computation, not a trace of the kernels.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .gather_conv import expand_patch_mask, halo_mask

__all__ = ["BlockRecord", "stats", "sparsity_loss", "dilated_density", "part_densities"]


@dataclass
class BlockRecord:
    """Stored by a block's forward: its mode, per-sample dense MACs of each part, and its mask."""

    mode: str
    batch: int
    parts: dict  # name -> dense MACs of one sample
    mask: Optional[torch.Tensor] = None  # spatial (N, Hp, Wp), channel (N, groups), layer (N,)
    geometry: dict = field(default_factory=dict)  # spatial: patch_size, stride, in_hw, out_hw


def dilated_density(mask: torch.Tensor, patch_size: int, stride: int, in_hw: tuple, out_hw: tuple) -> torch.Tensor:
    """Per-sample fraction of input pixels that the 3x3 halo (padding 1) of the kept outputs reads."""
    return halo_mask(mask, patch_size, stride, in_hw, out_hw).mean((1, 2, 3))


def _densities(record: BlockRecord) -> tuple:
    """``(keep, {part: per-sample density})`` of a record."""
    mode, mask = record.mode, record.mask
    if mode == "dense":
        return 1.0, {}
    mask = mask.float() if not mask.dtype.is_floating_point else mask
    if mode == "spatial":
        g = record.geometry
        s = expand_patch_mask(mask, g["patch_size"], *g["out_hw"]).mean((1, 2, 3))
        s1 = dilated_density(mask, g["patch_size"], g["stride"], g["in_hw"], g["out_hw"])
        return s.mean(), {"conv1": s1, "conv2": s, "conv3": s}
    if mode == "channel":
        c = mask.mean(1)
        return c.mean(), {"conv1": c, "conv2": c * c, "se": c, "conv3": c}
    if mode == "layer":
        return mask.mean(), {"conv1": mask, "conv2": mask, "se": mask, "conv3": mask}
    raise ValueError(f"unknown mode {mode!r}")


def part_densities(block: nn.Module) -> dict:
    """The batch-mean fraction of each part (``"conv1"``, ``"conv2"``, ...) of a dynamic block that
    its last forward computed; parts not listed (projection shortcut, masker) ran whole."""
    record = getattr(block, "_laud_record", None)
    if record is None:
        raise RuntimeError("laudnet_ops.nn.stats: this block has not run a forward yet")
    return {part: _float(torch.as_tensor(d).float().mean()) for part, d in _densities(record)[1].items()}


def block_flops(record: BlockRecord) -> dict:
    keep, density = _densities(record)
    dense = float(sum(v for k, v in record.parts.items() if k != "masker")) * record.batch
    executed = 0.0
    for part, macs in record.parts.items():
        d = density.get(part)
        executed = executed + (macs * record.batch if d is None else macs * d.sum())
    return {"keep": keep, "dense_flops": dense, "flops": executed, "activation_rate": executed / dense}


def _float(v):
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def stats(model: nn.Module) -> dict:
    """Per-block and model-level rates and FLOPs of the last forward of ``model``.

    Returns a dict: ``"blocks"`` maps each dynamic block's name to ``mode``, ``keep`` (fraction of
    kept units), ``activation_rate`` (executed / dense FLOPs), ``dense_flops`` and ``flops``; then
    the model's ``activation_rate`` (mean of the blocks'), ``dense_flops``, ``flops`` (stem and head
    included where the model records them), and ``flops_ratio`` and ``block_rates`` as tensors that
    carry gradients to the maskers in training.
    """
    blocks, rates = {}, []
    dense_total, executed_total = 0.0, 0.0
    for name, module in model.named_modules():
        static = getattr(module, "_laud_static_macs", None)
        if static is not None:
            dense_total += static
            executed_total = executed_total + static
        record = getattr(module, "_laud_record", None)
        if record is None:
            continue
        numbers = block_flops(record)
        rates.append(torch.as_tensor(numbers["activation_rate"]))
        dense_total += numbers["dense_flops"]
        executed_total = executed_total + numbers["flops"]
        blocks[name] = {"mode": record.mode, **{k: _float(v) for k, v in numbers.items()}}
    if not blocks and not dense_total:
        raise RuntimeError("laudnet_ops.nn.stats: no dynamic block has run a forward yet")
    block_rates = torch.stack([r.float() for r in rates]) if rates else torch.ones(0)
    return {
        "blocks": blocks,
        "activation_rate": _float(block_rates.mean()) if rates else 1.0,
        "dense_flops": dense_total,
        "flops": _float(executed_total),
        "flops_ratio": torch.as_tensor(executed_total / dense_total),
        "block_rates": block_rates,
    }


def sparsity_loss(model: nn.Module, progress: float, target: Optional[float] = None,
                  warmup: float = 0.33) -> torch.Tensor:
    """The paper's sparsity loss for the last forward, ``progress`` = epoch / epochs in [0, 1].

    ``target`` defaults to the model's ``target_rate``.

    Each block rate is pushed into ``[p t, 1 - p (1 - t)]``, ``p = cos^2(pi/2 * clip(progress /
    warmup, 0, 1))``: a band that starts at the target and widens to [0, 1] over the warm-up, so
    blocks may then specialise; the model's FLOPs ratio is always pulled to the target.
    """
    if target is None:
        target = getattr(model, "target_rate", None)
        if target is None:
            raise ValueError("sparsity_loss: give a target, the model has no target_rate")
    s = stats(model)
    p = math.cos(math.pi / 2 * min(max(progress / warmup, 0.0), 1.0)) ** 2
    upper, lower = 1 - p * (1 - target), p * target
    r = s["block_rates"]
    band = (torch.clamp(r - upper, min=0) ** 2 + torch.clamp(lower - r, min=0) ** 2).mean()
    return band + (s["flops_ratio"] - target) ** 2
