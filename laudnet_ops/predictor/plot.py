"""Latency-vs-activation-rate curves per paradigm (the paper's Figure 5/6 style); matplotlib is optional."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .blocks import FUSED, Schedule
from .devices import Device, get_device
from .networks import predict_network

DEFAULT_RATES = tuple(round(0.1 * i, 1) for i in range(1, 11))


def latency_curves(device: str | Device, model: str, rates: Sequence[float] = DEFAULT_RATES,
                   modes: Sequence[tuple[str, Any]] = (("layer", None), ("channel", None), ("spatial", None)),
                   batch: int | None = None, dtype: str = "fp32", schedule: Schedule = FUSED,
                   calibration: Any = None) -> dict[str, Any]:
    """Predicted network latency (ms) per paradigm over ``rates``; ``modes`` pairs a paradigm with its
    granularity (None = the model's default)."""
    dev = device if isinstance(device, Device) else get_device(device, calibration)
    curves: dict[str, list[float]] = {}
    dense = 0.0
    for mode, gran in modes:
        label = mode if gran is None else f"{mode} ({gran})"
        values = []
        for r in rates:
            net = predict_network(dev, model, mode, r, gran, batch, dtype, schedule)
            values.append(net.dynamic * 1e3)
            dense = net.dense * 1e3
        curves[label] = values
    return {"device": dev.name, "model": model, "rates": list(rates), "dense_ms": dense, "curves": curves}


def plot_curves(path: str | os.PathLike[str], device: str | Device, model: str,
                rates: Sequence[float] = DEFAULT_RATES,
                modes: Sequence[tuple[str, Any]] = (("layer", None), ("channel", None), ("spatial", None)),
                batch: int | None = None, dtype: str = "fp32", schedule: Schedule = FUSED,
                calibration: Any = None) -> Path:
    """Save the latency-vs-rate curves as a PNG and return its path (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'laudnet_ops[plot]' (or matplotlib)") from exc
    data = latency_curves(device, model, rates, modes, batch, dtype, schedule, calibration)
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    markers = {"layer": "*", "channel": "s", "spatial": "o"}
    for label, values in data["curves"].items():
        ax.plot(data["rates"], values, marker=markers.get(label.split()[0], "."), label=label)
    ax.axhline(data["dense_ms"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("activation rate")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{data['model']} on {data['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target)
    plt.close(fig)
    return target
