"""Helpers shared by the LAUD models: granularity defaults, initialisation, backbone loading."""

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..nn.maskers import Masker

Granularity = Optional[Union[int, Sequence[int]]]

DEFAULT_GRANULARITY = {"spatial": (4, 4, 2, 1), "channel": 4}


def stage_granularity(mode: str, granularity: Granularity, stages: int) -> tuple:
    """Per-stage granularity: given, or the mode's default (S = 4-4-2-1, G = 4), or 1."""
    if granularity is None:
        granularity = DEFAULT_GRANULARITY.get(mode, 1)
    if isinstance(granularity, int):
        granularity = (granularity,) * stages
    granularity = tuple(int(g) for g in granularity)
    if len(granularity) != stages:
        raise ValueError(f"granularity needs one value per stage ({stages}), got {granularity}")
    return granularity


def on_inference_path(model: nn.Module, first_block: nn.Module) -> bool:
    """Whether ``model`` runs its inference path: eval, its blocks on the sparse (folded) path."""
    return not model.training and first_block.resolved_execution() == "sparse"


def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """The input of the inference path, laid out as it computes fastest: channels_last on the CPU.

    oneDNN's convolutions and this library's CPU kernels both run faster on channels_last maps, in
    every mode (batch 8, 224x224, 2 threads, ms NCHW -> channels_last: LAUD-ResNet-50 dense 386 ->
    343, spatial 336 -> 249, channel 324 -> 210, layer 252 -> 214; LAUD-RegNetY-400MF dense 87 -> 58,
    channel 73 -> 63). Only the model's intermediate maps change layout; its output is the logits.
    Other devices keep the caller's layout."""
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def run_blocks(stages, x):
    """Run every block of ``stages`` in order: ``(output, its channel means (N, C) or None)``.

    Blocks hand each other the channel means of the map between them (see
    ``DynamicBlock.forward_with_means``): on the inference path of layer and channel skipping, the
    kernel that writes one block's output pools what the next block's masker (or the head) would
    otherwise pool in a pass of its own."""
    means = None
    for stage in stages:
        for block in stage:
            x, means = block.forward_with_means(x, means)
    return x, means


def init_backbone(model: nn.Module) -> None:
    """torchvision's initialisation of ResNet and RegNet, leaving the maskers' own (keep-biased) one."""
    masker_modules = {id(m) for masker in model.modules() if isinstance(masker, Masker) for m in masker.modules()}
    for m in model.modules():
        if id(m) in masker_modules:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def load_backbone(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load a torchvision state dict into a LAUD model; only masker keys may be missing.

    Raises if the state dict has keys the model lacks or lacks backbone keys. Returns ``model``.
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if ".masker." not in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"load_backbone: missing backbone keys {missing}, unexpected keys {result.unexpected_keys}")
    return model
