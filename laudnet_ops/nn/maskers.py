"""Maskers: the small networks that decide what a dynamic block computes.

Each masker turns the block input into logits, one per decision unit (a patch, a channel group or a
sample), and the logits into a hard 0/1 mask:

- training: a straight-through hard Gumbel-sigmoid with temperature ``tau``. The forward value is
  exactly 0 or 1; the gradient is that of ``sigmoid((logit + g1 - g2) / tau)``, which with two Gumbel
  noises is the two-class Gumbel-softmax over {keep, skip} of the paper.
- eval: a deterministic threshold, keep where the logit is positive.

``force_keep`` overrides the learned decision (for tests, benchmarks and latency studies): 1.0 keeps
everything, 0.0 nothing, a value in between keeps each unit with that probability, drawn from a
generator seeded by :func:`set_force_keep` so runs repeat.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Masker", "SpatialMasker", "ChannelMasker", "LayerMasker", "set_force_keep", "set_tau",
           "channel_masker_hidden", "tau_schedule"]


class Masker(nn.Module):
    """Logits to hard masks; subclasses define :meth:`logits` and the bias that starts them at "keep"."""

    def __init__(self, tau: float = 1.0, force_keep: Optional[float] = None, seed: int = 0):
        super().__init__()
        self.tau = tau
        self._generator = torch.Generator()
        self.set_force_keep(force_keep, seed)

    def set_force_keep(self, value: Optional[float], seed: int = 0) -> None:
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"force_keep must be None or a float in [0, 1], got {value}")
        self.force_keep = None if value is None else float(value)
        self._generator.manual_seed(seed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float 0/1 mask for block input ``x`` (straight-through differentiable in training)."""
        if self.force_keep is not None:
            return self.forced(self.unit_shape(x), x.device, x.dtype)
        return self.decide(self.logits(x))

    def unit_shape(self, x: torch.Tensor) -> tuple:
        raise NotImplementedError

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard 0/1 mask of ``logits``' shape and dtype, honouring ``force_keep``."""
        if self.force_keep is not None:
            return self.forced(logits.shape, logits.device, logits.dtype)
        if self.training:
            return hard_gumbel_sigmoid(logits, self.tau)
        return (logits > 0).to(logits.dtype)

    def forced(self, shape, device, dtype) -> torch.Tensor:
        keep = self.force_keep
        if keep >= 1.0:
            return torch.ones(shape, device=device, dtype=dtype)
        if keep <= 0.0:
            return torch.zeros(shape, device=device, dtype=dtype)
        # Drawn on the CPU generator so a seed gives the same mask on every device.
        draw = torch.rand(shape, generator=self._generator) < keep
        if device.type == "cuda":
            # From pageable memory the copy would first wait for all queued GPU work: a host
            # synchronisation per masker that learned masks (computed on the GPU) do not pay.
            # A pinned copy is queued like a kernel; the pinned allocator keeps the buffer until
            # the transfer has run.
            return draw.pin_memory().to(device=device, non_blocking=True).to(dtype)
        return draw.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, force_keep={self.force_keep}"


def hard_gumbel_sigmoid(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through hard Gumbel-sigmoid: forward 0/1, backward the tempered soft sample."""
    u = torch.rand((2,) + tuple(logits.shape), device=logits.device, dtype=logits.dtype)
    u = u.clamp_(torch.finfo(logits.dtype).tiny, 1.0)
    gumbel = -torch.log(-torch.log(u))
    soft = torch.sigmoid((logits + gumbel[0] - gumbel[1]) / tau)
    hard = (soft > 0.5).to(logits.dtype)
    return hard - soft.detach() + soft


class SpatialMasker(Masker):
    """One logit per output patch: average-pool the block input to the patch grid, then a 1x1 conv.

    The grid lives at the block's output resolution ``Ho = ceil(H / stride)``: a patch of ``S``
    output pixels pools ``S * stride`` input pixels, clipped at the border -- exactly the pooling of
    ``laudnet_ops.masker_conv1x1``, which fuses this masker with the block's first convolution.
    Only the keep-minus-skip difference of the paper's two logits matters, so there is one.
    """

    def __init__(self, in_channels: int, patch_size: int, stride: int = 1, keep_bias: float = 5.0, **kw):
        super().__init__(**kw)
        self.patch_size = patch_size
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, 1, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, keep_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        window = self.patch_size * self.stride
        pooled = F.avg_pool2d(x, window, window, ceil_mode=True)
        # The 1x1 conv with one output channel as a product over channels: the same values (and the
        # same parameters), without a convolution call's setup, which on the CPU cost 2-3x the product
        # on the ResNet-50 patch grids at batch 8 (0.07-0.18 ms a call, against 0.02-0.06 ms).
        weight = self.conv.weight.view(1, -1)
        return F.linear(pooled.movedim(1, -1), weight, self.conv.bias)[..., 0]

    def unit_shape(self, x: torch.Tensor) -> tuple:
        window = self.patch_size * self.stride
        return (x.shape[0], -(-x.shape[2] // window), -(-x.shape[3] // window))

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, stride={self.stride}, " + super().extra_repr()


def channel_masker_hidden(groups: int) -> int:
    return max(groups // 16, 16)


class ChannelMasker(Masker):
    """One logit per channel group: global pool, Linear(Cin, max(groups // 16, 16)), ReLU, Linear."""

    def __init__(self, in_channels: int, groups: int, keep_bias: float = 4.0, **kw):
        super().__init__(**kw)
        self.groups = groups
        hidden = channel_masker_hidden(groups)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, groups)
        nn.init.constant_(self.fc2.bias, keep_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_means(x.mean((2, 3)))

    def logits_from_means(self, means: torch.Tensor) -> torch.Tensor:
        """The logits from the block input's channel means ``(N, C)``, where they are already known."""
        return self.fc2(F.relu(self.fc1(means)))

    def unit_shape(self, x: torch.Tensor) -> tuple:
        return (x.shape[0], self.groups)


class LayerMasker(Masker):
    """One logit per sample: global pool and a Linear."""

    def __init__(self, in_channels: int, keep_bias: float = 5.0, **kw):
        super().__init__(**kw)
        self.fc = nn.Linear(in_channels, 1)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.constant_(self.fc.bias, keep_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_means(x.mean((2, 3)))

    def logits_from_means(self, means: torch.Tensor) -> torch.Tensor:
        """The logits from the block input's channel means ``(N, C)``, where they are already known."""
        return self.fc(means)[:, 0]

    def unit_shape(self, x: torch.Tensor) -> tuple:
        return (x.shape[0],)


def set_force_keep(model: nn.Module, value: Optional[float], seed: int = 0) -> None:
    """Set ``force_keep`` on every masker of ``model``; masker ``i`` draws from seed ``seed + i``."""
    for i, masker in enumerate(m for m in model.modules() if isinstance(m, Masker)):
        masker.set_force_keep(value, seed + i)


def set_tau(model: nn.Module, tau: float) -> None:
    """Set the Gumbel temperature of every masker (call it from the training schedule)."""
    for masker in model.modules():
        if isinstance(masker, Masker):
            masker.tau = tau


def tau_schedule(step: int, total_steps: int, tau0: float = 5.0, tau_end: float = 0.1) -> float:
    """The paper's exponential temperature decay ``tau0 * (tau_end / tau0) ** (step / total_steps)``."""
    return tau0 * (tau_end / tau0) ** (min(max(step, 0), total_steps) / max(total_steps, 1))
