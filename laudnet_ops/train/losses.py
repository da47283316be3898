"""The LAUDNet training loss: ``CE + λ · L_sparsity + α · T² · KL(teacher/T ‖ student/T)``.

The sparsity term takes the block rates and the FLOPs ratio that ``laudnet_ops.nn.stats`` returns for the
last forward (tensors that carry gradients to the maskers through the straight-through Gumbel masks).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["band_penalty", "sparsity_loss", "distillation_loss", "LaudLoss", "LossParts"]


def band_penalty(block_rates: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """``mean_i[max(0, r_i − upper)² + max(0, lower − r_i)²]``: zero while every block is inside the band."""
    if block_rates.numel() == 0:
        return block_rates.new_zeros(())
    over = torch.clamp(block_rates - upper, min=0)
    under = torch.clamp(lower - block_rates, min=0)
    return (over * over + under * under).mean()


def sparsity_loss(block_rates: torch.Tensor, flops_ratio: torch.Tensor, target: float, lower: float,
                  upper: float) -> torch.Tensor:
    """Per-block band penalty plus the network-level ``(FLOPs / dense FLOPs − t)²``."""
    flops_ratio = torch.as_tensor(flops_ratio, dtype=torch.float32)
    return band_penalty(block_rates.float(), lower, upper) + (flops_ratio - target) ** 2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
                      ) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` averaged over the batch.

    The T² keeps the soft-target gradients on the scale of the cross-entropy's (Hinton et al.).
    Computed in float32 so that mixed precision does not lose the small probabilities.
    """
    T = temperature
    log_student = F.log_softmax(student_logits.float() / T, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * (T * T)


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    sparsity: torch.Tensor
    distill: torch.Tensor


@dataclass
class LaudLoss:
    """The recipe's weights: λ = 10 (``sparsity_weight``), α = 0.5 (``distill_weight``), T = 4."""

    sparsity_weight: float = 10.0
    distill_weight: float = 0.5
    temperature: float = 4.0
    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                 block_rates: Optional[torch.Tensor] = None, flops_ratio: Optional[torch.Tensor] = None,
                 target: Optional[float] = None, bounds: tuple = (0.0, 1.0)) -> LossParts:
        """The total loss and its parts; the sparsity term is used when block rates are given."""
        zero = logits.new_zeros((), dtype=torch.float32)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        sparsity = zero
        if block_rates is not None and target is not None:
            sparsity = sparsity_loss(block_rates, flops_ratio, target, *bounds)
        distill = zero
        if teacher_logits is not None and self.distill_weight:
            distill = distillation_loss(logits, teacher_logits, self.temperature)
        total = ce + self.sparsity_weight * sparsity + self.distill_weight * distill
        return LossParts(total, ce, sparsity, distill)
