"""Training: turn a static network into a LAUDNet with the paper's recipe.

``python -m laudnet_ops.train --help`` for the command line, :class:`Trainer` and :class:`TrainConfig`
for the library. The pieces are usable alone: :mod:`.schedules` (Gumbel temperature, sparsity bounds,
learning rate), :mod:`.losses`, :mod:`.data`, :mod:`.checkpoint`, :mod:`.log`.
"""

from .architectures import SmallLaudResNet, build_model, load_weights
from .loop import TrainConfig, Trainer
from .losses import LaudLoss, distillation_loss, sparsity_loss
from .schedules import cosine_scheduler, gumbel_tau, scaled_lr, sparsity_bounds

__all__ = ["TrainConfig", "Trainer", "SmallLaudResNet", "build_model", "load_weights", "LaudLoss",
           "distillation_loss", "sparsity_loss", "gumbel_tau", "sparsity_bounds", "scaled_lr", "cosine_scheduler"]
