"""Tiny learnable data and configs for the training tests (seconds on two CPU cores)."""

import torch
from torch.utils.data import TensorDataset

from laudnet_ops.train.data import DataSpec
from laudnet_ops.train.loop import TrainConfig


def toy_datasets(n_train=96, n_val=32, classes=4, size=8, seed=0):
    """uint8 images whose class is a bright 3x3 block at a class-dependent place, plus noise."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.randint(0, classes, (n,), generator=g)
        images = torch.randint(0, 90, (n, 1, size, size), generator=g).to(torch.uint8)
        for i, k in enumerate(labels.tolist()):
            r, c = divmod(k, 2)
            images[i, 0, r * 4: r * 4 + 3, c * 4: c * 4 + 3] = 230
        return TensorDataset(images, labels)

    return make(n_train), make(n_val), DataSpec("toy", classes, 1, size, tuple(map(str, range(classes))))


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(arch="small_laud_resnet", width=(4, 8), depth=(1, 1), batch_size=16, epochs=2, lr=0.1,
                out=str(tmp_path), progress=False, plot=False, threads=1, seed=0, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)
