"""The three schedules of the LAUDNet recipe: Gumbel temperature, sparsity bounds, learning rate.

All three are pure functions of the training position so that a resumed run recomputes exactly the
values an uninterrupted run would have used (nothing to checkpoint but the position itself).
"""

import math
from typing import Tuple

import torch

__all__ = ["gumbel_tau", "bound_progress", "sparsity_bounds", "scaled_lr", "cosine_factor", "cosine_scheduler"]


def gumbel_tau(step: int, total_steps: int, tau0: float = 5.0, tau_end: float = 0.1) -> float:
    """Exponential decay ``tau0 * (tau_end / tau0) ** (step / total_steps)`` over all iterations.

    ``step`` is clipped to ``[0, total_steps]``, so the last iteration and anything after it use ``tau_end``.
    """
    if tau0 <= 0 or tau_end <= 0:
        raise ValueError(f"gumbel_tau: temperatures must be positive, got tau0={tau0}, tau_end={tau_end}")
    fraction = min(max(step, 0), total_steps) / max(total_steps, 1)
    return tau0 * (tau_end / tau0) ** fraction


def bound_progress(epoch: float, epochs: float, warmup: float = 0.33) -> float:
    """``p = cos²(π/2 · min(1, epoch / (warmup · epochs)))``: 1 at the start, 0 once the warmup is over."""
    span = warmup * epochs
    ratio = 1.0 if span <= 0 else min(1.0, max(epoch, 0.0) / span)
    if ratio >= 1.0:
        return 0.0  # exactly: cos(pi/2) is 6e-17 in floating point
    return math.cos(math.pi / 2 * ratio) ** 2


def sparsity_bounds(epoch: float, epochs: float, target: float, warmup: float = 0.33) -> Tuple[float, float]:
    """Per-block ``(lower, upper)`` activation-rate bounds: pinned at ``target``, relaxing to ``(0, 1)``.

    ``lower = p·t`` and ``upper = 1 − p·(1 − t)`` with ``p`` from :func:`bound_progress`. ``epoch``
    may be fractional (the loop passes ``epoch + batch / batches``) so that short runs relax smoothly.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"sparsity_bounds: target must be in [0, 1], got {target}")
    p = bound_progress(epoch, epochs, warmup)
    return p * target, 1.0 - p * (1.0 - target)


def scaled_lr(global_batch: int, lr_per_256: float = 0.02) -> float:
    """The linear scaling rule of the recipe: ``lr_per_256 · global_batch / 256``."""
    return lr_per_256 * global_batch / 256


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate: optional linear warmup, then a cosine down to ``final_factor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    fraction = min(max(step - warmup_steps, 0), span) / span
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * fraction))


class _CosineLambda:
    """A picklable callable, so ``LambdaLR.state_dict()`` carries the schedule's parameters too."""

    def __init__(self, total_steps: int, warmup_steps: int, final_factor: float):
        self.total_steps, self.warmup_steps, self.final_factor = total_steps, warmup_steps, final_factor

    def __call__(self, step: int) -> float:
        return cosine_factor(step, self.total_steps, self.warmup_steps, self.final_factor)


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                     final_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration cosine schedule; each parameter group keeps its own multiplier of the base rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _CosineLambda(total_steps, warmup_steps, final_factor))
