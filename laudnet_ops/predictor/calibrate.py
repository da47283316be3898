"""Calibration: measure a handful of microbenchmarks and fit the model's efficiency constants.

The microbenchmarks cover the regimes the model distinguishes: streaming copies (DRAM bandwidth), tiny
ops (launch / dispatch cost), large and small convolutions (arithmetic efficiency, on-chip traffic),
index_select / index_copy with long and short rows (scattered-access cost), pooling and a linear layer.
Their shapes deliberately differ from the blocks ``validate`` measures, so validation is a check on
unseen cases, not on the fitted ones.  The fit minimises the squared log ratio of predicted to measured
latency with a small Nelder-Mead search over the constants (in log space, so all stay positive).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import operators as ops
from ._util import progress
from .devices import Device, Efficiency, default_calibration_path
from .tiles import Kernel, price
from .timing import measure, resolve_clock, steady_allocator

#: The constants the fit adjusts; the others (matrix, sync_us) keep their defaults.
FITTED = ("compute", "simple", "index", "scatter", "memory", "onchip", "segment_bytes", "launch_us", "overlap",
          "row_block", "output_ops", "blas")
# compute may exceed 1: detected clocks are base clocks and turbo runs faster
_BOUNDS = {"compute": (0.01, 2.0), "simple": (0.005, 2.0), "index": (0.001, 2.0), "scatter": (0.001, 2.0), "memory": (0.05, 4.0), "onchip": (0.5, 64.0),
           "segment_bytes": (0.0, 4096.0), "launch_us": (0.1, 200.0), "overlap": (0.0, 1.0),
           "row_block": (1.0, 64.0), "output_ops": (0.0, 1024.0), "blas": (0.01, 2.0)}


@dataclass
class Sample:
    """One microbenchmark: its name, measured and (after fitting) predicted seconds."""

    name: str
    measured: float
    predicted: float = float("nan")


@dataclass
class Calibration:
    """Fitted constants for one device, with the measurements they came from."""

    device: str
    efficiency: dict[str, float]
    dram_gbs: float
    samples: list[Sample] = field(default_factory=list)
    created: str = ""
    machine: str = ""
    torch_version: str = ""
    threads: int = 0
    clock: str = ""
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["samples"] = [dataclasses.asdict(s) for s in self.samples]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        data = dict(data)
        data["samples"] = [Sample(**s) for s in data.get("samples", [])]
        return cls(**data)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the calibration as JSON (default: the device's file in :func:`calibration_dir`)."""
        target = Path(path) if path is not None else default_calibration_path(self.device)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return target


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read a calibration file written by :meth:`Calibration.save`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist; run "
                                "`python -m laudnet_ops.predictor calibrate` first") from None
    return Calibration.from_dict(data)


def apply_calibration(device: Device, calibration: Calibration) -> Device:
    """The device with the calibration's efficiency constants and measured bandwidth."""
    known = {f.name for f in dataclasses.fields(Efficiency)}
    eff = device.efficiency.replace(**{k: float(v) for k, v in calibration.efficiency.items() if k in known})
    changes: dict[str, Any] = {"efficiency": eff, "dram_gbs": float(calibration.dram_gbs), "calibrated": True}
    if device.kind == "cpu" and calibration.threads > 0:
        changes["num_pe"] = calibration.threads  # the PEs are the threads the measurements used
    return device.replace(**changes)


# --- microbenchmarks ------------------------------------------------------------------------------------

@dataclass
class Microbenchmark:
    """A measurable callable (built lazily, so importing needs no torch) and the kernels it launches."""

    name: str
    build: Callable[[str], Callable[[], object]]
    kernels: Callable[[], list[Kernel]]


def _randn(*shape: int, device: str, channels_last: bool = False):
    import torch

    t = torch.randn(*shape, device=device) * 0.1
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def microbenchmarks(quick: bool = False) -> list[Microbenchmark]:
    """The calibration set (``quick``: a smaller subset for tests)."""
    import torch
    import torch.nn.functional as F

    def copy(numel: int) -> Microbenchmark:
        def build(dev: str):
            src, dst = _randn(numel, device=dev), _randn(numel, device=dev)
            return lambda: dst.copy_(src)
        return Microbenchmark(f"copy-{numel}", build,
                              lambda: [ops.elementwise("copy", (1, 1, 1, numel), 1, 1)])

    def add(numel: int) -> Microbenchmark:
        def build(dev: str):
            a, b = _randn(numel, device=dev), _randn(numel, device=dev)
            return lambda: torch.add(a, b)
        return Microbenchmark(f"add-{numel}", build,
                              lambda: [ops.elementwise("add", (1, 1, 1, numel), 2, 1)])

    def conv(n: int, cin: int, cout: int, hw: int, k: int, padding: int) -> Microbenchmark:
        def build(dev: str):
            x = _randn(n, cin, hw, hw, device=dev, channels_last=True)
            w = _randn(cout, cin, k, k, device=dev)
            return lambda: F.conv2d(x, w, padding=padding)
        return Microbenchmark(f"conv{k}x{k}-{n}x{cin}x{hw}x{hw}->{cout}", build,
                              lambda: [ops.conv2d("conv", n, cin, cout, hw, hw, k, 1, padding=padding)])

    def index_select(rows_total: int, row: int, picked: int) -> Microbenchmark:
        def build(dev: str):
            src = _randn(rows_total, row, device=dev)
            idx = torch.randperm(rows_total, device=dev)[:picked].sort().values
            return lambda: src.index_select(0, idx)
        return Microbenchmark(f"index-select-{picked}x{row}", build,
                              lambda: [ops.gather_rows("gather", picked, row, row)])

    def index_copy(rows_total: int, row: int, picked: int) -> Microbenchmark:
        def build(dev: str):
            dst, src = _randn(rows_total, row, device=dev), _randn(picked, row, device=dev)
            idx = torch.randperm(rows_total, device=dev)[:picked].sort().values
            return lambda: dst.index_copy_(0, idx, src)
        return Microbenchmark(f"index-copy-{picked}x{row}", build,
                              lambda: [ops.scatter_rows("scatter", picked, row, row)])

    def global_pool(n: int, c: int, hw: int) -> Microbenchmark:
        def build(dev: str):
            x = _randn(n, c, hw, hw, device=dev, channels_last=True)
            return lambda: x.mean((2, 3))
        return Microbenchmark(f"mean-{n}x{c}x{hw}x{hw}", build,
                              lambda: [ops.global_pool("pool", n, c, hw, hw)])

    def linear(n: int, cin: int, cout: int) -> Microbenchmark:
        def build(dev: str):
            x, w = _randn(n, cin, device=dev), _randn(cout, cin, device=dev)
            return lambda: F.linear(x, w)
        return Microbenchmark(f"linear-{n}x{cin}->{cout}", build, lambda: [ops.linear("fc", n, cin, cout)])

    def mm(m: int, k: int, n: int) -> Microbenchmark:
        """A BLAS GEMM (torch.mm: MKL sgemm on the CPU), an (m x k) . (k x n) product."""
        def build(dev: str):
            a, b = _randn(m, k, device=dev), _randn(k, n, device=dev)
            return lambda: torch.mm(a, b)
        return Microbenchmark(f"mm-{m}x{k}x{n}", build,
                              lambda: [ops.blas_gemm(m, k, n)])

    def relu(numel: int) -> Microbenchmark:
        def build(dev: str):
            x = _randn(numel, device=dev)
            return lambda: x.relu_()
        return Microbenchmark(f"relu-{numel}", build, lambda: [ops.elementwise("relu", (1, 1, 1, numel), 1, 1)])

    def nonzero(numel: int) -> Microbenchmark:
        def build(dev: str):
            m = torch.rand(numel, device=dev) > 0.5
            return lambda: m.nonzero()
        return Microbenchmark(f"nonzero-{numel}", build,
                              lambda: [ops.patch_indices(1, 1, numel, numel // 2)])

    if quick:
        return [relu(256), copy(1 << 20), conv(2, 64, 64, 16, 3, 1), index_select(32768, 4, 16384)]
    return [
        relu(256), relu(1 << 16), copy(1 << 18), copy(1 << 21), add(1 << 20),
        conv(2, 384, 192, 20, 1, 0), conv(2, 96, 96, 24, 3, 1), conv(64, 128, 128, 3, 3, 0),
        conv(16, 32, 48, 12, 3, 1), conv(4, 16, 24, 32, 1, 0), conv(8, 24, 16, 20, 3, 1),
        conv(96, 64, 96, 4, 3, 0), conv(48, 96, 64, 8, 3, 0),
        index_select(65536, 64, 30000), index_select(262144, 4, 100000), index_select(12, 60000, 5),
        index_copy(65536, 96, 20000), index_copy(12, 60000, 5), index_copy(262144, 8, 50000),
        global_pool(8, 256, 14), linear(32, 512, 256), nonzero(8 * 14 * 14),
        mm(3000, 288, 40), mm(1200, 640, 24), mm(500, 96, 160),
    ]


# --- fitting ---------------------------------------------------------------------------------------------

def _to_vector(eff: Efficiency) -> np.ndarray:
    vals = []
    for name in FITTED:
        v = getattr(eff, name)
        if name == "blas" and v <= 0:  # unset: start from the convolutions' efficiency
            v = eff.compute
        if name == "overlap":  # logit keeps it inside (0, 1)
            v = min(max(v, 1e-3), 1 - 1e-3)
            vals.append(math.log(v / (1 - v)))
        elif name in ("segment_bytes", "output_ops"):
            vals.append(math.log(v + 1.0))
        else:
            vals.append(math.log(v))
    return np.array(vals)


def _from_vector(vec: np.ndarray, base: Efficiency) -> Efficiency:
    values = {}
    for name, v in zip(FITTED, vec):
        if name == "overlap":
            x = 1.0 / (1.0 + math.exp(-v))
        elif name in ("segment_bytes", "output_ops"):
            x = math.exp(v) - 1.0
        else:
            x = math.exp(v)
        lo, hi = _BOUNDS[name]
        values[name] = min(max(x, lo), hi)
    return base.replace(**values)


def _nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, steps: float = 0.5,
                 iterations: int = 300) -> np.ndarray:
    """Plain Nelder-Mead (no SciPy dependency); enough for a 7-parameter smooth-ish objective."""
    n = len(x0)
    simplex = [x0] + [x0 + steps * np.eye(n)[i] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        reflected = centroid + (centroid - worst)
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2.0 * (centroid - worst)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (worst - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best point
                best = simplex[0]
                simplex = [best] + [best + 0.5 * (x - best) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
        if max(values) - min(values) < 1e-7:
            break
    return simplex[int(np.argmin(values))]


def fit(device: Device, benches: Sequence[tuple[list[Kernel], float]], iterations: int = 300) -> Efficiency:
    """Efficiency constants minimising the mean squared log error over (kernels, measured seconds)."""
    def loss(vec: np.ndarray) -> float:
        dev = device.replace(efficiency=_from_vector(vec, device.efficiency))
        err = 0.0
        for kernels, measured in benches:
            predicted = sum(price(k, dev).latency for k in kernels)
            err += math.log(predicted / measured) ** 2
        return err / len(benches)

    best = _nelder_mead(loss, _to_vector(device.efficiency), iterations=iterations)
    best = _nelder_mead(loss, best, steps=0.2, iterations=iterations)  # restart: escapes early collapse
    return _from_vector(best, device.efficiency)


def _target(device: str | None) -> tuple[str, Device]:
    """Which torch device to measure on and the model device it calibrates."""
    from .devices import get_device

    if device in (None, "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", "host"):
        return "cpu", get_device("host", calibration=False)
    if str(device).startswith("cuda"):
        from .cuda import detect_cuda_device

        return str(device), detect_cuda_device(str(device))
    raise ValueError(f"calibrate measures on 'cpu' (the host) or 'cuda[:i]', got {device!r}")


def calibrate(device: str | None = "cpu", path: str | os.PathLike[str] | None = None, quick: bool = False,
              repeats: int = 7, show_progress: bool = True, save: bool = True,
              threads: int | None = None, rounds: int = 3, statistic: str = "median",
              clock: str = "auto") -> Calibration:
    """Measure the microbenchmarks on ``device`` ('cpu' or 'cuda'), fit the constants, save them.

    ``threads``: CPU threads torch uses while measuring (default: torch's current setting); the host
    model then has that many PEs.  On a machine shared with other jobs, one thread measures far more
    steadily than several (OpenMP barriers stall whenever a core is taken away).
    Each microbenchmark is measured in ``rounds`` round-robin passes (see :func:`~.timing.measure` for
    ``repeats``, ``statistic`` and ``clock``) and the median over rounds is kept.
    Returns the :class:`Calibration`; with ``save`` it is written to ``path`` (default: the device's
    calibration file, which later predictions for that device load automatically).
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    torch_device, model_device = _target(device)
    benches = microbenchmarks(quick)
    steady_allocator()  # steady-state latencies, whatever ran before in this process
    fns = [bench.build(torch_device) for bench in benches]
    times: list[list[float]] = [[] for _ in benches]
    for _ in progress(range(rounds), "calibrate rounds", show_progress):
        for i, fn in enumerate(fns):
            times[i].append(measure(fn, torch_device, repeats=repeats, statistic=statistic, clock=clock))
    measured = [(b.name, b.kernels(), statistics.median(t)) for b, t in zip(benches, times)]

    # DRAM bandwidth: read + write bytes of the largest copy over its time (launch cost is negligible
    # at that size); the fit then only refines efficiencies relative to it.
    copies = [(k, t) for name, k, t in measured if name.startswith("copy-")]
    dram = model_device.dram_gbs
    if copies:
        kernels, seconds = max(copies, key=lambda c: c[0][0].in_bytes)
        dram = (kernels[0].in_bytes + kernels[0].out_bytes) / seconds / 1e9
    start = model_device.replace(dram_gbs=dram, efficiency=model_device.efficiency.replace(memory=1.0))
    eff = fit(start, [(k, t) for _, k, t in measured], iterations=120 if quick else 300)
    fitted = start.replace(efficiency=eff)
    samples = [Sample(name, t, sum(price(k, fitted).latency for k in kernels)) for name, kernels, t in measured]
    cal = Calibration(
        device=model_device.name, efficiency=dataclasses.asdict(eff), dram_gbs=dram, samples=samples,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.node()} {model_device.description}", torch_version=torch.__version__,
        threads=torch.get_num_threads(), clock=resolve_clock(clock, torch_device),
    )
    if save:
        cal.save(path)
    return cal
