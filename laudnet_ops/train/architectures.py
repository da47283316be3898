"""Which network to train: the LAUD models of ``laudnet_ops.models``, or a narrow LAUD-ResNet for small images.

The small network is made of the same :class:`laudnet_ops.nn.DynamicBottleneck` blocks as LAUD-ResNet-50,
with a 3×3 stride-1 stem (no max-pool) so that 28×28 or 8×8 inputs keep a usable feature map, and it
records its static stem and head FLOPs like the large models, so ``laudnet_ops.nn.stats`` reports the same
quantities for it.
"""

from typing import Optional, Sequence

import torch
from torch import nn

from .. import models as laud_models
from ..nn import DynamicBottleneck

__all__ = ["SmallLaudResNet", "build_model", "ARCHITECTURES", "load_weights"]


class SmallLaudResNet(nn.Module):
    """A reduced-width LAUD-ResNet: 3×3 stem, then stages of dynamic bottlenecks (first stage stride 1).

    Args:
        planes: bottleneck width of each stage (its output is 4× that).
        blocks: blocks per stage.
        mode, granularity (one per stage), target_rate, force_keep, num_classes: as ``LaudResNet``.
        in_channels: image channels (1 for the bundled grayscale datasets).
    """

    def __init__(self, planes: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 2, 2), mode: str = "dense",
                 granularity=None, target_rate: float = 0.5, force_keep: Optional[float] = None,
                 num_classes: int = 10, in_channels: int = 1, stem_width: int = 32):
        super().__init__()
        from ..models._common import init_backbone, stage_granularity

        self.mode, self.target_rate = mode, target_rate
        if granularity is None and mode == "spatial":
            granularity = (4, 2, 1, 1)[: len(planes)] if len(planes) <= 4 else 1
        self.granularity = stage_granularity(mode, granularity, len(planes))
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem_width
        stages = []
        for i, (width, depth) in enumerate(zip(planes, blocks)):
            stride = 1 if i == 0 else 2
            out = width * DynamicBottleneck.expansion
            layers = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != out):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                block = DynamicBottleneck(inplanes, width, stride if j == 0 else 1, downsample, mode=mode,
                                          granularity=self.granularity[i], force_keep=force_keep)
                # As in LaudResNet: a later block's input is its predecessor's post-ReLU output.
                block.owns_activated_input = j > 0
                layers.append(block)
                inplanes = out
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_backbone(self)
        self._laud_static_macs = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        stem_macs = self.conv1.weight.numel() * x.shape[2] * x.shape[3]
        x = torch.flatten(self.avgpool(self.layers(x)), 1)
        self._laud_static_macs = float(x.shape[0] * (stem_macs + self.fc.weight.numel()))
        return self.fc(x)


ARCHITECTURES = ("small_laud_resnet", "laud_resnet50", "laud_resnet101", "laud_regnety_400mf", "laud_regnety_800mf")


def build_model(arch: str, mode: str = "dense", granularity=None, target_rate: float = 0.5, num_classes: int = 10,
                in_channels: int = 3, width: Sequence[int] = (16, 32, 64), depth: Sequence[int] = (1, 2, 2)
                ) -> nn.Module:
    """A model by name; ``width``/``depth`` shape the small network, ``in_channels`` must be 3 for the others.

    ``granularity`` is one value for every stage or one per stage (a 1-tuple counts as one value).
    """
    if isinstance(granularity, (tuple, list)) and len(granularity) == 1:
        granularity = granularity[0]
    if arch == "small_laud_resnet":
        return SmallLaudResNet(tuple(width), tuple(depth), mode, granularity, target_rate,
                               num_classes=num_classes, in_channels=in_channels)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    if in_channels != 3:
        raise ValueError(f"{arch} takes 3-channel images (grayscale data is repeated to 3 channels)")
    return getattr(laud_models, arch)(mode=mode, granularity=granularity, target_rate=target_rate,
                                      num_classes=num_classes)


def load_weights(model: nn.Module, source) -> nn.Module:
    """Load backbone weights into ``model`` from a training checkpoint or a plain (torchvision) state dict.

    Only masker parameters may be missing (a dense teacher has none; a dynamic student starts from it),
    through ``laudnet_ops.models.load_backbone``. ``source`` is a path or an already loaded dict.
    """
    state = torch.load(source, map_location="cpu", weights_only=True) if not isinstance(source, dict) else source
    state = state.get("model", state)
    # Checkpoints written from a DDP-wrapped or compiled model carry a prefix: strip it.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return laud_models.load_backbone(model, state)
