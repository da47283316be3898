"""LAUD-RegNetY: torchvision's RegNetY-400MF / 800MF with dynamic blocks.

Parameter names are torchvision's ``regnet_y_400mf`` / ``regnet_y_800mf``
(``stem``, ``trunk_output.blockI.blockI-J.{proj,f.a,f.b,f.se,f.c}``, ``fc``).
"""

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.blocks import DynamicRegNetYBlock
from ._common import (Granularity, inference_layout, init_backbone, on_inference_path, run_blocks,
                      stage_granularity)

__all__ = ["LaudRegNetY", "laud_regnety_400mf", "laud_regnety_800mf", "REGNETY_CONFIGS"]

# The stage depths and widths torchvision's BlockParams.from_init_params derives from the RegNet
# design space parameters (400MF: w_0=48, w_a=27.89, w_m=2.09; 800MF: w_0=56, w_a=38.84, w_m=2.4).
REGNETY_CONFIGS = {
    "400mf": dict(depths=(1, 3, 6, 6), widths=(48, 104, 208, 440), group_width=8),
    "800mf": dict(depths=(1, 3, 8, 2), widths=(64, 144, 320, 784), group_width=16),
}


class LaudRegNetY(nn.Module):
    """RegNetY (SE ratio 0.25, bottleneck multiplier 1, stride 2 per stage) with dynamic blocks.

    Args: ``depths``, ``widths``, ``group_width`` of the stages; ``mode``, ``granularity``,
    ``target_rate``, ``force_keep`` and ``num_classes`` as :class:`LaudResNet`.
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], group_width: int, mode: str = "dense",
                 granularity: Granularity = None, target_rate: float = 0.5, force_keep: Optional[float] = None,
                 num_classes: int = 1000, stem_width: int = 32, se_ratio: float = 0.25):
        super().__init__()
        self.mode = mode
        self.target_rate = target_rate
        self.granularity = stage_granularity(mode, granularity, len(depths))
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
        )
        stages = OrderedDict()
        width_in = stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = OrderedDict()
            for j in range(depth):
                block = DynamicRegNetYBlock(width_in if j == 0 else width, width, 2 if j == 0 else 1, group_width,
                                            se_ratio, mode, self.granularity[i], force_keep)
                block.owns_activated_input = j > 0
                blocks[f"block{i + 1}-{j}"] = block
            stages[f"block{i + 1}"] = nn.Sequential(blocks)
            width_in = width
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        init_backbone(self)
        self._laud_static_macs = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        if on_inference_path(self, self.trunk_output[0][0]):
            x = inference_layout(x)
        x = self.stem(x)
        stem_macs = self.stem[0].weight.numel() * x.shape[2] * x.shape[3]
        x, means = run_blocks(self.trunk_output, x)
        x = torch.flatten(self.avgpool(x), 1) if means is None else means
        self._laud_static_macs = float(N * (stem_macs + self.fc.weight.numel()))
        return self.fc(x)


def laud_regnety_400mf(mode: str = "dense", granularity: Granularity = None, target_rate: float = 0.5,
                       force_keep: Optional[float] = None, **kwargs) -> LaudRegNetY:
    """LAUD-RegNetY-400MF; loads torchvision ``regnet_y_400mf`` weights."""
    return LaudRegNetY(**REGNETY_CONFIGS["400mf"], mode=mode, granularity=granularity, target_rate=target_rate,
                       force_keep=force_keep, **kwargs)


def laud_regnety_800mf(mode: str = "dense", granularity: Granularity = None, target_rate: float = 0.5,
                       force_keep: Optional[float] = None, **kwargs) -> LaudRegNetY:
    """LAUD-RegNetY-800MF; loads torchvision ``regnet_y_800mf`` weights."""
    return LaudRegNetY(**REGNETY_CONFIGS["800mf"], mode=mode, granularity=granularity, target_rate=target_rate,
                       force_keep=force_keep, **kwargs)
