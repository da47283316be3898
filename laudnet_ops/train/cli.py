"""``python -m laudnet_ops.train``: the command line of :class:`laudnet_ops.train.loop.TrainConfig`.

Every field of the config is an option (``--batch-size``, ``--no-nesterov`` ...). Several GPUs::

    torchrun --nproc_per_node 8 -m laudnet_ops.train --arch laud_resnet50 --mode spatial ...
"""

import argparse
import dataclasses
import sys
import typing
from typing import List, Optional

from .loop import TrainConfig, Trainer

__all__ = ["build_parser", "config_from_args", "main"]

HELP = {
    "arch": "small_laud_resnet (reduced width, for small images) or a laudnet_ops.models name",
    "mode": "dense (a static teacher), spatial, channel or layer",
    "granularity": "per-stage patch size S (spatial) or channels per group G (channel), e.g. 4 2 1",
    "target": "target activation rate t of the sparsity loss",
    "width": "small_laud_resnet: bottleneck width per stage",
    "depth": "small_laud_resnet: blocks per stage",
    "init": "initial backbone weights: a checkpoint of this trainer or a (torchvision) state dict",
    "teacher": "weights of the static teacher to distil from ('init': the same as --init)",
    "dataset": "auto (Fashion-MNIST if installed, else scikit-learn digits), fashion-mnist, digits, folder",
    "data_dir": "for --dataset folder: a directory with train/<class>/* and val/<class>/*",
    "batch_size": "per process; the default learning rate scales with the global batch",
    "lr": "base learning rate (default: lr-per-256 x global batch / 256)",
    "backbone_lr_mult": "learning-rate multiplier of the backbone (0.1 for RegNet in the paper)",
    "masker_lr_mult": "learning-rate multiplier of the maskers",
    "tau0": "Gumbel temperature at the first iteration",
    "tau_end": "Gumbel temperature at the last iteration",
    "bound_warmup": "fraction of training over which the per-block bounds relax from t to [0, 1]",
    "sparsity_weight": "lambda, weight of the sparsity loss",
    "distill_weight": "alpha, weight of alpha * T^2 * KL",
    "temperature": "T, distillation temperature",
    "amp": "automatic mixed precision (float16 + GradScaler on CUDA, bfloat16 on CPU)",
    "channels_last": "channels_last memory format for the model and the inputs",
    "eval_execution": "validation path: masked (plain PyTorch), sparse (the kernels), auto (sparse where built)",
    "resume": "checkpoint to resume from, or 'auto' for <out>/last.pt if it exists",
    "max_steps_per_epoch": "cap on iterations per epoch (0: all), for smoke tests",
    "threads": "torch CPU threads (0: torch's default)",
}


def _base_type(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        return _base_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
    return annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m laudnet_ops.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        help_text = HELP.get(f.name, " ")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=int, nargs="+", default=f.default, help=help_text)
        else:
            choices = {"mode": ("dense", "spatial", "channel", "layer"),
                       "eval_execution": ("masked", "sparse", "auto"), "device": ("auto", "cpu", "cuda")}.get(f.name)
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_text)
    return parser


def config_from_args(argv: Optional[List[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    for f in dataclasses.fields(TrainConfig):
        if isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return TrainConfig(**values)


def main(argv: Optional[List[str]] = None) -> dict:
    from .distributed import cleanup_distributed

    config = config_from_args(argv)
    try:
        return Trainer(config).fit()
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
