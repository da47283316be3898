"""Per-epoch log: one CSV row per epoch, and a plot of the curves (matplotlib, optional)."""

import csv
import math
from pathlib import Path
from typing import Dict, List

__all__ = ["FIELDS", "CSVLog", "read_log", "plot_curves"]

FIELDS = ("epoch", "lr", "tau", "lower", "upper", "train_loss", "train_ce", "train_sparsity", "train_distill",
          "train_acc", "train_activation_rate", "train_flops_ratio", "val_loss", "val_acc",
          "val_activation_rate", "val_flops_ratio", "target", "seconds")


class CSVLog:
    """Appends one row per epoch; on resume, rows of epochs after the checkpoint are dropped first."""

    def __init__(self, path, resume_epoch: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [r for r in read_log(self.path) if int(r["epoch"]) <= resume_epoch] if resume_epoch else []
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)

    def write(self, row: Dict[str, float]) -> None:
        unknown = set(row) - set(FIELDS)
        if unknown:
            raise KeyError(f"CSVLog: unknown columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: _format(row.get(k)) for k in FIELDS})


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_log(path) -> List[Dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows, name):
    return [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]


def plot_curves(csv_path, png_path=None, title: str = "") -> Path:
    """Loss, accuracy, and activation rate / FLOPs ratio against the target, per epoch, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(csv_path)
    if not rows:
        raise ValueError(f"plot_curves: {csv_path} has no rows")
    png_path = Path(png_path) if png_path else Path(csv_path).with_suffix(".png")
    epochs = _column(rows, "epoch")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("loss", [("train_loss", "train total"), ("train_ce", "train CE"), ("val_loss", "val CE")]),
        ("accuracy", [("train_acc", "train"), ("val_acc", "val")]),
        ("computation", [("train_activation_rate", "train activation rate"),
                         ("val_activation_rate", "val activation rate"),
                         ("val_flops_ratio", "val FLOPs ratio"), ("target", "target")]),
    ]
    for ax, (ylabel, series) in zip(axes, panels):
        for name, label in series:
            values = _column(rows, name)
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, "--" if name == "target" else "-o", label=label, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
