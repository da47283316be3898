"""Datasets for training: an ImageFolder-style directory, and a small bundled real dataset for demos.

Bundled dataset, in order of preference:

- Fashion-MNIST (70 000 grayscale 28×28 images of 10 clothing classes) from Debian's
  ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), read from its idx files;
- scikit-learn's ``load_digits`` (1 797 grayscale 8×8 handwritten digits), shipped inside scikit-learn.

Both are loaded whole into memory as uint8/float tensors; normalisation happens per batch in the loader's
collate so the datasets stay small. Nothing here downloads anything.
"""

import gzip
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

__all__ = ["DataSpec", "ShardSampler", "FASHION_MNIST_DIRS", "load_fashion_mnist", "load_sklearn_digits", "bundled_dataset",
           "ImageFolderDataset", "image_folder_dataset", "build_datasets", "build_loader"]

# Where Debian's dataset-fashion-mnist puts the idx files (dpkg -L dataset-fashion-mnist); an environment
# variable can point elsewhere (for instance at a copy of the upstream files).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "LAUDNET_FASHION_MNIST"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


@dataclass
class DataSpec:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: Sequence[str]


# -- idx files (Fashion-MNIST) ---------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped): big-endian magic with the dtype code and rank, then the sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, rank = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} bytes of data, found {array.size}")
    return array.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_dir() -> Optional[Path]:
    """The first directory holding all four Fashion-MNIST idx files, or None."""
    candidates = [os.environ[FASHION_MNIST_ENV]] if os.environ.get(FASHION_MNIST_ENV) else []
    for directory in map(Path, candidates + list(FASHION_MNIST_DIRS)):
        stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
        if all(_find_idx(directory, s) for s in stems):
            return directory
    return None


def load_fashion_mnist(directory: Optional[Path] = None) -> Tuple[TensorDataset, TensorDataset, DataSpec]:
    """Fashion-MNIST's 60 000 training and 10 000 test images as ``(N, 1, 28, 28)`` uint8 tensors."""
    directory = Path(directory) if directory else fashion_mnist_dir()
    if directory is None:
        raise FileNotFoundError("Fashion-MNIST idx files not found (apt-get install dataset-fashion-mnist, "
                                f"or set {FASHION_MNIST_ENV})")

    def split(prefix):
        images = _read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        return TensorDataset(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))

    spec = DataSpec("fashion-mnist", 10, 1, 28, FASHION_MNIST_CLASSES)
    return split("train"), split("t10k"), spec


def load_sklearn_digits(val_fraction: float = 0.2, seed: int = 0) -> Tuple[TensorDataset, TensorDataset, DataSpec]:
    """scikit-learn's 8×8 digits (values 0..16, rescaled to uint8 0..255), split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(labels)))
    val, train = order[:n_val], order[n_val:]
    spec = DataSpec("digits", 10, 1, 8, tuple(str(d) for d in range(10)))
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]), spec


def bundled_dataset(name: str = "auto") -> Tuple[TensorDataset, TensorDataset, DataSpec]:
    """``"fashion-mnist"``, ``"digits"``, or ``"auto"``: Fashion-MNIST if installed, else the digits."""
    if name == "fashion-mnist":
        return load_fashion_mnist()
    if name == "digits":
        return load_sklearn_digits()
    if name != "auto":
        raise ValueError(f"unknown bundled dataset {name!r}: use 'fashion-mnist', 'digits' or 'auto'")
    if fashion_mnist_dir() is not None:
        return load_fashion_mnist()
    try:
        return load_sklearn_digits()
    except ImportError as error:
        raise RuntimeError(
            "no bundled dataset is available: install Debian's dataset-fashion-mnist package "
            f"(apt-get install dataset-fashion-mnist, or point {FASHION_MNIST_ENV} at the idx files) "
            "or scikit-learn (pip install scikit-learn) for its digits"
        ) from error


# -- ImageFolder -----------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` as (uint8 ``(C, size, size)`` tensor, class index), classes sorted by name.

    Training: resize the short side to ``size · 8/7``, random crop and random horizontal flip;
    evaluation: the same resize and a centre crop (the usual ImageNet protocol, scaled). Needs Pillow;
    torchvision is not required.
    """

    def __init__(self, root, image_size: int = 224, train: bool = True, channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} is not a directory")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"ImageFolder root {self.root} has no class subdirectories")
        self.samples: List[Tuple[Path, int]] = [
            (path, index)
            for index, name in enumerate(self.classes)
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder root {self.root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.image_size, self.train, self.channels = image_size, train, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB" if self.channels == 3 else "L")
            size = self.image_size
            resize = max(size, round(size * 8 / 7))
            w, h = image.size
            scale = resize / min(w, h)
            image = image.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
            w, h = image.size
            if self.train:
                # Python's random: seeded per worker by the DataLoader, so runs repeat.
                left, top = random.randint(0, w - size), random.randint(0, h - size)
            else:
                left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
            if self.train and random.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        return tensor, label


def image_folder_dataset(root, image_size: int = 224, channels: int = 3):
    """``root/train`` and ``root/val`` as :class:`ImageFolderDataset` (the ImageNet layout)."""
    root = Path(root)
    train = ImageFolderDataset(root / "train", image_size, True, channels)
    val = ImageFolderDataset(root / "val", image_size, False, channels)
    if val.classes != train.classes:
        raise ValueError(f"{root}: train and val have different classes")
    spec = DataSpec(root.name, len(train.classes), channels, image_size, tuple(train.classes))
    return train, val, spec


def build_datasets(dataset: str, data_dir: Optional[str] = None, image_size: Optional[int] = None,
                   channels: int = 3):
    """``dataset`` is ``"folder"`` (with ``data_dir``) or a bundled name (see :func:`bundled_dataset`)."""
    if dataset == "folder":
        if not data_dir:
            raise ValueError("dataset 'folder' needs a data directory (--data-dir) with train/ and val/")
        return image_folder_dataset(data_dir, image_size or 224, channels)
    return bundled_dataset(dataset)


# -- loaders ---------------------------------------------------------------------------------------------

def build_loader(dataset: Dataset, batch_size: int, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader whose order depends only on ``seed`` and the epoch (``loader.sampler.set_epoch``).

    Training uses a :class:`DistributedSampler` even on one process: it gives each rank its shard and
    makes the shuffle a function of the epoch, which is what lets a resumed run see the same batches;
    it drops the last partial batch (batch-norm statistics of one sample are meaningless).
    Evaluation uses :class:`ShardSampler`, which splits the set without the padding DistributedSampler
    adds, so that the metrics summed over ranks count every image exactly once.
    """
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=train and len(dataset) // world_size > batch_size,
                      persistent_workers=workers > 0)


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...``: disjoint shards that together cover the set once."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:  # the same order every epoch
        pass


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    channels: int) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` to normalised float; grayscale is repeated when the model wants 3 channels."""
    x = images.float().div_(255.0)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean_t) / std_t


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalization(train_set: Dataset, channels: int) -> Tuple[tuple, tuple]:
    """Per-channel mean and std: measured on an in-memory training set, ImageNet's for a directory."""
    if isinstance(train_set, TensorDataset):
        x = train_set.tensors[0].float().div(255.0)
        mean, std = x.mean().item(), x.std().item()
        return (mean,) * channels, (std,) * channels
    if channels == 1:
        return (0.449,), (0.226,)
    return IMAGENET_MEAN, IMAGENET_STD
