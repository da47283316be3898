"""LAUD-ResNet: torchvision's ResNet v1.5 with dynamic bottlenecks.

Parameter names are torchvision's ``resnet50`` / ``resnet101``: their state dicts load directly
(``strict=False`` reports the maskers as the only missing keys, see :func:`load_backbone`).
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.blocks import DynamicBottleneck, conv_weight_layout
from ..nn.folding import FoldedWeights
from ._common import (Granularity, inference_layout, init_backbone, on_inference_path, run_blocks,
                      stage_granularity)

__all__ = ["LaudResNet", "laud_resnet50", "laud_resnet101"]


class LaudResNet(nn.Module):
    """ResNet with :class:`DynamicBottleneck` blocks.

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        mode: "dense", "spatial", "channel" or "layer", for every block.
        granularity: per-stage (or one) patch size S for spatial mode (default (4, 4, 2, 1)) or
            channels per group G for channel mode (default 4).
        target_rate: the activation rate the sparsity loss aims for (``laudnet_ops.nn.sparsity_loss``).
        force_keep: passed to every masker (see ``laudnet_ops.nn.set_force_keep``).
        num_classes, groups, width_per_group: as torchvision's.
    """

    def __init__(self, layers: Sequence[int], mode: str = "dense", granularity: Granularity = None,
                 target_rate: float = 0.5, force_keep: Optional[float] = None, num_classes: int = 1000,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.mode = mode
        self.target_rate = target_rate
        self.granularity = stage_granularity(mode, granularity, len(layers))
        self.inplanes = 64
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = self._make_layer(planes, blocks, 1 if i == 0 else 2, mode, self.granularity[i], force_keep)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * DynamicBottleneck.expansion, num_classes)
        init_backbone(self)
        self._laud_static_macs = None
        self._stem_folded = FoldedWeights()

    def _make_layer(self, planes, blocks, stride, mode, granularity, force_keep) -> nn.Sequential:
        expansion = DynamicBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        kw = dict(groups=self.groups, base_width=self.base_width, mode=mode, granularity=granularity,
                  force_keep=force_keep)
        layers = [DynamicBottleneck(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = planes * expansion
        for _ in range(1, blocks):
            block = DynamicBottleneck(self.inplanes, planes, **kw)
            # Its input is the previous block's post-ReLU output, which nothing else reads.
            block.owns_activated_input = True
            layers.append(block)
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        if on_inference_path(self, self.layer1[0]):
            x = inference_layout(x)
            # Where the blocks run folded, so does the stem: one conv instead of conv + batch norm.
            w, b = self._stem_folded("conv1", self.conv1, self.bn1, conv_weight_layout(x))
            x = F.relu_(F.conv2d(x, w, b, self.conv1.stride, self.conv1.padding))
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        stem_macs = self.conv1.weight.numel() * x.shape[2] * x.shape[3]
        x = self.maxpool(x)
        x, means = run_blocks((self.layer1, self.layer2, self.layer3, self.layer4), x)
        x = torch.flatten(self.avgpool(x), 1) if means is None else means
        self._laud_static_macs = float(N * (stem_macs + self.fc.weight.numel()))
        return self.fc(x)


def _resnet(layers, mode, granularity, target_rate, force_keep, **kwargs) -> LaudResNet:
    return LaudResNet(layers, mode, granularity, target_rate, force_keep, **kwargs)


def laud_resnet50(mode: str = "dense", granularity: Granularity = None, target_rate: float = 0.5,
                  force_keep: Optional[float] = None, **kwargs) -> LaudResNet:
    """LAUD-ResNet-50; loads torchvision ``resnet50`` weights (see :func:`load_backbone`)."""
    return _resnet((3, 4, 6, 3), mode, granularity, target_rate, force_keep, **kwargs)


def laud_resnet101(mode: str = "dense", granularity: Granularity = None, target_rate: float = 0.5,
                   force_keep: Optional[float] = None, **kwargs) -> LaudResNet:
    """LAUD-ResNet-101; loads torchvision ``resnet101`` weights (see :func:`load_backbone`)."""
    return _resnet((3, 4, 23, 3), mode, granularity, target_rate, force_keep, **kwargs)
