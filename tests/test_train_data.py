"""Datasets, per-epoch log, plot and command line of the trainer."""

import gzip
import struct
import sys

import numpy as np
import pytest
import torch

from laudnet_ops.train import data
from laudnet_ops.train.cli import config_from_args, main
from laudnet_ops.train.log import CSVLog, plot_curves, read_log


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(directory, n_train=40, n_test=12):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_idx_files_are_read_as_fashion_mnist(tmp_path, monkeypatch):
    _fake_fashion_mnist(tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    train, val, spec = data.bundled_dataset("auto")
    assert spec.name == "fashion-mnist" and spec.num_classes == 10 and spec.image_size == 28
    images, labels = train.tensors
    assert images.shape == (40, 1, 28, 28) and images.dtype == torch.uint8 and len(val) == 12
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()[16:]
    assert images.flatten().tolist()[:50] == list(raw[:50])
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10


def test_corrupt_idx_file_is_reported(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 3) + b"\0" * 12)
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        data._read_idx(path)


def test_installed_fashion_mnist_has_the_real_sizes():
    if data.fashion_mnist_dir() is None:
        pytest.skip("dataset-fashion-mnist is not installed")
    train, val, _ = data.load_fashion_mnist()
    assert len(train) == 60000 and len(val) == 10000
    assert torch.bincount(val.tensors[1]).tolist() == [1000] * 10


def test_digits_fallback_when_fashion_mnist_is_absent(monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    train, val, spec = data.bundled_dataset("auto")
    assert spec.name == "digits" and spec.image_size == 8
    assert len(train) + len(val) == 1797 and train.tensors[0].max() == 255


def test_clear_error_when_no_dataset_is_available(monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(RuntimeError, match="no bundled dataset is available: install Debian's dataset-fashion-mnist"):
        data.bundled_dataset("auto")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.bundled_dataset("fashion-mnist")
    with pytest.raises(ValueError, match="unknown bundled dataset"):
        data.bundled_dataset("cifar")


def test_image_folder_reads_classes_crops_and_flips(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                array = np.full((20, 30, 3), 40 * k + i, dtype=np.uint8)
                Image.fromarray(array).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train, val, spec = data.image_folder_dataset(tmp_path, image_size=16)
    assert spec.classes == ("cat", "dog") and spec.num_classes == 2 and len(train) == 6
    image, label = val[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1
    assert int(image[0, 8, 8]) == 41
    with pytest.raises(ValueError, match="needs a data directory"):
        data.build_datasets("folder", None)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.ImageFolderDataset(tmp_path / "missing")


def test_loader_order_depends_only_on_seed_and_epoch():
    dataset = torch.utils.data.TensorDataset(torch.arange(40))
    def order(epoch, seed=0):
        loader = data.build_loader(dataset, 8, True, seed=seed)
        loader.sampler.set_epoch(epoch)
        return torch.cat([b[0] for b in loader]).tolist()
    assert order(3) == order(3) and order(3) != order(4) and order(3) != order(3, seed=1)
    shards = [data.build_loader(dataset, 4, True, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([b[0] for b in s]).tolist() for s in shards]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 40
    odd = torch.utils.data.TensorDataset(torch.arange(41))
    val = [torch.cat([b[0] for b in data.build_loader(odd, 8, False, rank=r, world_size=3)]) for r in range(3)]
    assert sorted(torch.cat(val).tolist()) == list(range(41))  # every image once: no padding


def test_csv_log_truncates_on_resume_and_plots(tmp_path):
    path = tmp_path / "log.csv"
    log = CSVLog(path)
    for epoch in (1, 2, 3):
        log.write({"epoch": epoch, "train_loss": 1.0 / epoch, "val_acc": 0.5 + 0.1 * epoch, "target": 0.5,
                   "val_activation_rate": 0.9 - 0.1 * epoch})
    CSVLog(path, resume_epoch=2)  # a run resumed after epoch 2 drops epoch 3's row
    rows = read_log(path)
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["train_loss"]) == 0.5
    with pytest.raises(KeyError, match="unknown columns"):
        log.write({"epoch": 4, "bogus": 1.0})
    pytest.importorskip("matplotlib")
    png = plot_curves(path)
    assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_maps_to_the_config():
    cfg = config_from_args(["--mode", "spatial", "--granularity", "4", "2", "1", "--target", "0.4", "--amp",
                            "--channels-last", "--no-nesterov", "--masker-lr-mult", "2"])
    assert cfg.mode == "spatial" and cfg.granularity == (4, 2, 1) and cfg.target == 0.4
    assert cfg.amp and cfg.channels_last and not cfg.nesterov and cfg.masker_lr_mult == 2.0
    defaults = config_from_args([])
    assert (defaults.tau0, defaults.tau_end, defaults.sparsity_weight, defaults.distill_weight,
            defaults.temperature, defaults.weight_decay, defaults.momentum, defaults.lr_per_256) == \
        (5.0, 0.1, 10.0, 0.5, 4.0, 5e-5, 0.9, 0.02)
    with pytest.raises(SystemExit):
        config_from_args(["--mode", "pixel"])


def test_command_line_trains_on_the_bundled_digits(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    row = main(["--dataset", "digits", "--width", "4", "8", "--depth", "1", "1", "--epochs", "1",
                "--max-steps-per-epoch", "3", "--train-subset", "200", "--val-subset", "60", "--out", str(tmp_path),
                "--no-progress", "--threads", "1", "--mode", "channel", "--granularity", "2"])
    assert row["epoch"] == 1 and 0 <= row["val_acc"] <= 1
    for name in ("last.pt", "log.csv", "summary.json"):
        assert (tmp_path / name).is_file()


def test_demo_trains_teacher_then_student_and_reports(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from laudnet_ops.train.demo import run

    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    report = tmp_path / "report.md"
    result = run(["--dataset", "digits", "--width", "4", "8", "--depth", "1", "1", "--teacher-epochs", "1",
                  "--student-epochs", "1", "--train-subset", "200", "--threads", "1", "--out", str(tmp_path),
                  "--report", str(report), "--extra", "--max-steps-per-epoch", "2", "--val-subset", "50",
                  "--no-progress", "--no-plot"])
    assert 0 <= result["teacher_val_acc"] <= 1 and 0 <= result["student_val_acc"] <= 1
    assert result["target"] == 0.5 and result["student_activation_rate"] > 0
    text = report.read_text()
    assert "| static teacher (dense) |" in text and "| dynamic student (spatial) |" in text
