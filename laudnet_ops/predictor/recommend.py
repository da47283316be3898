"""Latency-guided design: the paradigm and per-stage granularity with the lowest predicted latency.

Blocks of different stages do not interact in the model, so the best granularity of each stage is found
independently (the sum of its blocks' latencies), which makes the per-stage search exact and cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ._util import check_rate, normalize_dtype
from .blocks import FUSED, Schedule, predict_block
from .devices import Device, get_device
from .networks import get_model, predict_network

SPATIAL_CANDIDATES = (1, 2, 4, 7, 8, 14)
CHANNEL_CANDIDATES = (1, 2, 4, 8, 16)


@dataclass
class Option:
    mode: str
    granularity: tuple[int, ...]
    dense_ms: float
    dynamic_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.dynamic_ms


@dataclass
class Recommendation:
    device: str
    model: str
    rate: float
    batch: int
    dtype: str
    options: list[Option] = field(default_factory=list)

    @property
    def best(self) -> Option:
        return min(self.options, key=lambda o: o.dynamic_ms)

    def table(self) -> str:
        lines = [f"{self.model} on {self.device}, activation rate {self.rate}, batch {self.batch}, {self.dtype}",
                 f"{'paradigm':10s} {'granularity':14s} {'latency ms':>11s} {'speed-up':>9s}"]
        dense = self.options[0].dense_ms
        lines.append(f"{'dense':10s} {'-':14s} {dense:11.3f} {1.0:9.2f}")
        for o in sorted(self.options, key=lambda o: o.dynamic_ms):
            gran = "-".join(map(str, o.granularity)) if o.mode in ("spatial", "channel") else "-"
            mark = "  <- best" if o is self.best else ""
            lines.append(f"{o.mode:10s} {gran:14s} {o.dynamic_ms:11.3f} {o.speedup:9.2f}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.model, "rate": self.rate, "batch": self.batch,
                "dtype": self.dtype, "best": {"mode": self.best.mode, "granularity": list(self.best.granularity)},
                "options": [{"mode": o.mode, "granularity": list(o.granularity), "dense_ms": o.dense_ms,
                             "dynamic_ms": o.dynamic_ms, "speedup": o.speedup} for o in self.options]}


def _best_per_stage(dev: Device, model: str, mode: str, rate: float, candidates: Sequence[int], batch: int,
                    dtype: str, schedule: Schedule, resolution: int) -> tuple[int, ...]:
    spec = get_model(model, resolution)
    choice = []
    for stage in range(spec.stages):
        blocks = [b for b in spec.blocks if b.stage == stage]
        limit = max(b.ho for b in blocks)
        usable = [c for c in candidates if mode != "spatial" or c <= limit] or [1]
        if mode == "channel":
            usable = [c for c in usable if c <= min(b.width for b in blocks)] or [1]
        cost = {c: sum(predict_block(b, dev, mode, rate, c, batch, dtype, schedule).dynamic for b in blocks)
                for c in usable}
        choice.append(min(cost, key=lambda c: (cost[c], -c)))
    return tuple(choice)


def recommend(device: str | Device, model: str, target_rate: float, batch: int | None = None,
              dtype: str = "fp32", schedule: Schedule = FUSED, resolution: int = 224,
              spatial_candidates: Sequence[int] = SPATIAL_CANDIDATES,
              channel_candidates: Sequence[int] = CHANNEL_CANDIDATES, calibration: Any = None) -> Recommendation:
    """For ``device``, ``model`` and ``target_rate``: each paradigm with its best per-stage granularity,
    and the overall best (``Recommendation.best``), by predicted latency."""
    dev = device if isinstance(device, Device) else get_device(device, calibration)
    rate = check_rate(target_rate, "target_rate")
    dtype = normalize_dtype(dtype)
    n = dev.default_batch if batch is None else int(batch)
    rec = Recommendation(dev.name, get_model(model).name, rate, n, dtype)
    for mode, cands in (("layer", (1,)), ("channel", channel_candidates), ("spatial", spatial_candidates)):
        gran = (1,) * 4 if mode == "layer" else _best_per_stage(dev, model, mode, rate, cands, n, dtype,
                                                               schedule, resolution)
        net = predict_network(dev, model, mode, rate, gran, n, dtype, schedule, resolution)
        rec.options.append(Option(mode, net.granularity, net.dense * 1e3, net.dynamic * 1e3))
    return rec
