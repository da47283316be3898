"""Pictures of what a spatial LAUD model computes: kept patches of every block over the input image.

Needs matplotlib (``pip install laudnet_ops[pictures]``); imported only when a picture is drawn.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn.blocks import DynamicBlock
from .nn.gather_conv import expand_patch_mask

__all__ = ["preprocess", "kept_patch_maps", "overlay_kept_patches"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image, size: int = 224) -> torch.Tensor:
    """``(1, 3, size, size)`` ImageNet-normalised tensor from an ``H x W x 3`` uint8 image."""
    t = torch.as_tensor(image).permute(2, 0, 1)[None].float() / 255.0
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (t - mean) / std


def kept_patch_maps(model: nn.Module, sample: int = 0) -> list:
    """``(block name, (Ho, Wo) bool map of kept output pixels)`` for every spatial block, from the
    model's last forward."""
    maps = []
    for name, block in model.named_modules():
        record = getattr(block, "_laud_record", None)
        if not isinstance(block, DynamicBlock) or record is None or record.mode != "spatial":
            continue
        geometry = record.geometry
        mask = record.mask[sample : sample + 1].detach() > 0
        kept = expand_patch_mask(mask, geometry["patch_size"], *geometry["out_hw"])[0, 0]
        maps.append((name, kept.cpu()))
    return maps


def overlay_kept_patches(model: nn.Module, image, path: str, size: int = 224, columns: int = 4,
                         dim: float = 0.25, title: Optional[str] = None) -> list:
    """Run ``model`` (eval, no grad) on ``image`` and save a PNG of each spatial block's kept patches.

    Args:
        model: a LAUD model in spatial mode.
        image: ``H x W x 3`` uint8 array, e.g. ``skimage.data.astronaut()``.
        path: where to write the PNG.
        size: the square input resolution the model sees.
        columns: panels per row.
        dim: brightness of the skipped regions (1 would not mark them).

    Returns the ``kept_patch_maps`` drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(preprocess(image, size).to(next(model.parameters()).device))
    model.train(was_training)
    maps = kept_patch_maps(model)
    if not maps:
        raise ValueError("overlay_kept_patches: the model has no spatial block (build it with mode='spatial')")
    shown = torch.as_tensor(image).permute(2, 0, 1)[None].float() / 255.0
    shown = F.interpolate(shown, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    rows = math.ceil(len(maps) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, kept) in zip(axes.flat, maps):
        weight = F.interpolate(kept[None, None].float(), size=(size, size), mode="nearest")[0]
        ax.imshow((shown * (dim + (1 - dim) * weight)).permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(f"{name}: {100 * kept.float().mean():.0f}% kept", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return maps
