"""Validation: measure real blocks on this machine and compare them with the (calibrated) predictions.

Each case is a callable block implementation plus the kernel list the predictor prices for exactly that
schedule.  Dense, layer-skipping and channel-skipping blocks are measured honestly in plain PyTorch:

* layer skipping is index_select of the kept samples, the dense branch on them, and the residual rows
  gathered, added and scattered back (index_copy_);
* channel skipping with gates shared by the batch is the weights sliced to the kept channels
  (index_select) followed by dense convs on fewer channels - what a weight-gather conv costs then.

Spatial blocks use the library's ``patch_indices`` / ``scatter_add_`` when the compiled extension loads,
and otherwise a **torch stand-in** with the same work profile as the unfused schedule: masker (pool +
1-logit conv), conv1, mask -> nonzero, a pad copy, an index_select gather of the haloed windows, the 3x3
conv on the packed windows, the 1x1 conv, and a gather / add / ReLU / index_copy_ scatter.  Cases are
labelled with the implementation they used.  Everything runs channels_last (what oneDNN prefers).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ._util import progress
from .blocks import EAGER, BlockSpec, block_kernels, with_schedule
from .devices import get_device
from .tiles import Kernel, price
from .timing import measure, resolve_clock

STANDIN = "torch stand-in"
TORCH = "torch"
LIBRARY = "laudnet_ops"


@dataclass
class Case:
    """One measurable configuration: ``build(device)`` returns the callable to time."""

    name: str
    block: str
    mode: str
    granularity: int
    keep: float
    impl: str
    kernels: list[Kernel]
    build: Callable[[str], Callable[[], object]]


@dataclass
class CaseResult:
    name: str
    block: str
    mode: str
    granularity: int
    keep: float
    impl: str
    predicted: float
    measured: float

    @property
    def ape(self) -> float:
        """Absolute percentage error of the prediction."""
        return abs(self.predicted - self.measured) / self.measured * 100.0


@dataclass
class ValidationReport:
    device: str
    threads: int
    calibrated: bool
    clock: str = "wall"
    results: list[CaseResult] = field(default_factory=list)

    @property
    def median_ape(self) -> float:
        return float(statistics.median(r.ape for r in self.results))

    @property
    def spearman(self) -> float:
        return spearman([r.predicted for r in self.results], [r.measured for r in self.results])

    def table(self) -> str:
        lines = [f"{'case':44s} {'impl':15s} {'pred ms':>9s} {'meas ms':>9s} {'err %':>7s}"]
        for r in self.results:
            lines.append(f"{r.name:44s} {r.impl:15s} {r.predicted * 1e3:9.3f} {r.measured * 1e3:9.3f} "
                         f"{(r.predicted / r.measured - 1) * 100:+7.1f}")
        lines.append(f"device {self.device} ({self.threads} threads, {self.clock} clock, "
                     f"{'calibrated' if self.calibrated else 'UNCALIBRATED'}): {len(self.results)} cases, "
                     f"median |error| {self.median_ape:.1f}%, Spearman {self.spearman:.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "threads": self.threads, "calibrated": self.calibrated, "clock": self.clock,
                "median_ape": self.median_ape, "spearman": self.spearman,
                "cases": [{"name": r.name, "block": r.block, "mode": r.mode, "granularity": r.granularity,
                           "keep": r.keep, "impl": r.impl, "predicted_ms": r.predicted * 1e3,
                           "measured_ms": r.measured * 1e3, "ape": r.ape} for r in self.results]}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman needs two equally long sequences of >= 2 values, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


# --- the library, when its compiled extension loads ------------------------------------------------------

def library_ops() -> dict[str, Callable[..., Any]]:
    """The laudnet_ops ops usable here (empty when the compiled extension does not load)."""
    try:
        import laudnet_ops
    except ImportError:
        return {}
    if getattr(laudnet_ops, "extension_error", None) is not None:
        return {}
    found = {}
    for name in ("patch_indices", "scatter_add_"):
        try:
            found[name] = getattr(laudnet_ops, name)
        except (AttributeError, ImportError):
            continue
    return found


# --- block implementations ---------------------------------------------------------------------------------

def _tensor(*shape: int, device: str, channels_last: bool = False, scale: float = 0.05):
    import torch

    g = torch.Generator().manual_seed(sum(shape) * 7919 + len(shape))
    t = (torch.randn(*shape, generator=g) * scale).to(device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _choice(total: int, kept: int, seed: int, device: str):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:kept].sort().values.to(device)


def _dense_branch(x, w1, w2, w3, stride: int = 1):
    import torch.nn.functional as F

    y = F.conv2d(x, w1).relu_()
    y = F.conv2d(y, w2, stride=stride, padding=1).relu_()
    return F.conv2d(y, w3)


def _build_dense(spec: BlockSpec, n: int) -> Callable[[str], Callable[[], object]]:
    def build(dev: str):
        x = _tensor(n, spec.cin, spec.h, spec.w, device=dev, channels_last=True)
        w1, w2, w3 = (_tensor(spec.width, spec.cin, 1, 1, device=dev), _tensor(spec.width, spec.width, 3, 3, device=dev),
                      _tensor(spec.cout, spec.width, 1, 1, device=dev))

        def run():
            y = _dense_branch(x, w1, w2, w3)
            y.add_(x)
            return y.relu_()
        return run
    return build


def _build_layer(spec: BlockSpec, n: int, kept: int) -> Callable[[str], Callable[[], object]]:
    def build(dev: str):
        import torch
        import torch.nn.functional as F

        x = _tensor(n, spec.cin, spec.h, spec.w, device=dev, channels_last=True)
        w1, w2, w3 = (_tensor(spec.width, spec.cin, 1, 1, device=dev), _tensor(spec.width, spec.width, 3, 3, device=dev),
                      _tensor(spec.cout, spec.width, 1, 1, device=dev))
        wg = _tensor(1, spec.cin, device=dev)
        gate = torch.zeros(n, dtype=torch.bool, device=dev)
        gate[_choice(n, kept, 1, dev)] = True  # prescribed decisions: the rate under test

        # samples as rows of a 2-D view (channels_last memory is NHWC): row copies, no strided gather
        x_rows = x.permute(0, 2, 3, 1).reshape(n, -1)
        shape = (spec.h, spec.w, spec.cin)

        def run():
            F.linear(x.mean((2, 3)), wg)  # the gate's work (its decision is prescribed above)
            idx = gate.nonzero().squeeze(1)
            xk = x_rows.index_select(0, idx).view(-1, *shape).permute(0, 3, 1, 2)
            y = _dense_branch(xk, w1, w2, w3)
            y_rows = y.permute(0, 2, 3, 1).reshape(len(idx), -1)
            y_rows.add_(x_rows.index_select(0, idx)).relu_()
            x_rows.index_copy_(0, idx, y_rows)  # x_rows is a view: this updates x
            return x
        return run
    return build


def _build_channel(spec: BlockSpec, n: int, group: int, kept_c: int) -> Callable[[str], Callable[[], object]]:
    def build(dev: str):
        import torch
        import torch.nn.functional as F

        groups = math.ceil(spec.width / group)
        hidden = max(groups // 16, 16)
        x = _tensor(n, spec.cin, spec.h, spec.w, device=dev, channels_last=True)
        w1, w2, w3 = (_tensor(spec.width, spec.cin, 1, 1, device=dev), _tensor(spec.width, spec.width, 3, 3, device=dev),
                      _tensor(spec.cout, spec.width, 1, 1, device=dev))
        m1, m2 = _tensor(hidden, spec.cin, device=dev), _tensor(groups, hidden, device=dev)
        kept_groups = _choice(groups, kept_c // group, 2, dev)
        idx = (kept_groups[:, None] * group + torch.arange(group, device=dev)[None, :]).reshape(-1)

        def run():
            logits = F.linear(F.linear(x.mean((2, 3)), m1).relu_(), m2)
            logits > 0  # the gates' work; the kept groups are prescribed above
            w1k = w1.index_select(0, idx)
            w2k = w2.index_select(0, idx).index_select(1, idx)
            w3k = w3.index_select(1, idx)
            y = _dense_branch(x, w1k, w2k, w3k)
            y.add_(x)
            return y.relu_()
        return run
    return build


def _build_spatial(spec: BlockSpec, n: int, patch: int, kept: int,
                   lib: dict[str, Callable[..., Any]]) -> Callable[[str], Callable[[], object]]:
    def build(dev: str):
        import torch
        import torch.nn.functional as F

        s, h, w, c, width = patch, spec.h, spec.w, spec.cout, spec.width
        hp, wp, win = h // s, w // s, s + 2
        x = _tensor(n, spec.cin, h, w, device=dev, channels_last=True)
        w1 = _tensor(width, spec.cin, 1, 1, device=dev)
        wm = _tensor(1, spec.cin, 1, 1, device=dev)
        w2, w3 = _tensor(width, width, 3, 3, device=dev), _tensor(c, width, 1, 1, device=dev)
        mask = torch.zeros(n * hp * wp, dtype=torch.bool, device=dev)
        mask[_choice(n * hp * wp, kept, 3, dev)] = True
        mask = mask.view(n, hp, wp)
        padded = torch.zeros(n, h + 2, w + 2, width, device=dev)  # workspace: borders stay zero
        ar_w, ar_s = torch.arange(win, device=dev), torch.arange(s, device=dev)
        win_offsets = (ar_w[:, None] * (w + 2) + ar_w[None, :]).reshape(-1)
        out_offsets = (ar_s[:, None] * w + ar_s[None, :]).reshape(-1)
        in_strides = torch.tensor([(h + 2) * (w + 2), s * (w + 2), s], device=dev)
        out_strides = torch.tensor([h * w, s * w, s], device=dev)
        residual_rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view of x (channels_last)
        patch_indices = lib.get("patch_indices")
        scatter_add_ = lib.get("scatter_add_")

        def run():
            # masker: pooled input -> one logit per patch (its decision is prescribed above).  Not fused
            # with conv1: torch has no fused kernel, and a conv with width + 1 outputs falls off
            # oneDNN onto torch's slow convolution, which would measure torch, not the schedule.
            F.conv2d(F.avg_pool2d(x, s), wm) > 0
            y1 = F.conv2d(x, w1).relu_()
            idx = patch_indices(mask) if patch_indices else mask.nonzero()
            padded[:, 1:-1, 1:-1, :].copy_(y1.permute(0, 2, 3, 1))
            rows = ((idx * in_strides).sum(1)[:, None] + win_offsets[None, :]).reshape(-1)
            packed = padded.view(-1, width).index_select(0, rows)
            packed = packed.view(-1, win, win, width).permute(0, 3, 1, 2)
            y3 = F.conv2d(F.conv2d(packed, w2).relu_(), w3)
            if scatter_add_ is not None:
                return scatter_add_(x, y3, idx, "relu")
            out_rows = ((idx * out_strides).sum(1)[:, None] + out_offsets[None, :]).reshape(-1)
            r = residual_rows.index_select(0, out_rows)
            r.add_(y3.permute(0, 2, 3, 1).reshape(-1, c)).relu_()
            residual_rows.index_copy_(0, out_rows, r)  # a view of x: this updates x
            return x
        return run
    return build


#: Block configurations validated on a CPU (small enough for a shared 2-core machine).
CPU_BLOCKS = (
    (BlockSpec("r50-s1-like", 256, 64, 256, 28, 28), 4, (1, 2, 4, 7)),
    (BlockSpec("r50-s2-like", 512, 128, 512, 14, 14), 8, (1, 2, 7)),
)
KEEPS = (0.25, 0.5, 0.75, 1.0)


def validation_cases(quick: bool = False, blocks=CPU_BLOCKS, keeps: Sequence[float] = KEEPS,
                     groups: Sequence[int] = (2, 8)) -> list[Case]:
    """The case table: dense, layer, channel (per G) and spatial (per S) blocks at each keep ratio."""
    lib = library_ops()
    if quick:
        blocks = ((BlockSpec("tiny", 64, 16, 64, 8, 8), 2, (2,)),)
        keeps, groups = (0.5, 1.0), (4,)
    spatial_sched = with_schedule(EAGER, fuse_masker=False, fuse_scatter="scatter_add_" in lib)
    spatial_impl = LIBRARY if lib else STANDIN
    cases: list[Case] = []
    for spec, n, patches in blocks:
        cases.append(Case(f"{spec.name} dense", spec.name, "dense", 1, 1.0, TORCH,
                          block_kernels(spec, "dense", n, 1.0, 1, "fp32", EAGER), _build_dense(spec, n)))
        for keep in keeps:
            kept = max(1, round(keep * n))
            cases.append(Case(f"{spec.name} layer r={kept / n:.2f}", spec.name, "layer", 1, kept / n, TORCH,
                              block_kernels(spec, "layer", n, kept / n, 1, "fp32", EAGER),
                              _build_layer(spec, n, kept)))
            for g in groups:
                total = math.ceil(spec.width / g)
                kept_g = max(1, round(keep * total))
                cases.append(Case(f"{spec.name} channel G={g} r={kept_g / total:.2f}", spec.name, "channel", g,
                                  kept_g / total, TORCH,
                                  block_kernels(spec, "channel", n, kept_g / total, g, "fp32", EAGER),
                                  _build_channel(spec, n, g, kept_g * g)))
            for s in patches:
                total = n * (spec.ho // s) * (spec.wo // s)
                kept_p = max(1, round(keep * total))
                cases.append(Case(f"{spec.name} spatial S={s} r={kept_p / total:.2f}", spec.name, "spatial", s,
                                  kept_p / total, spatial_impl,
                                  block_kernels(spec, "spatial", n, kept_p / total, s, "fp32", spatial_sched),
                                  _build_spatial(spec, n, s, kept_p, lib)))
    return cases


def validate(device: str = "cpu", calibration: Any = None, quick: bool = False, repeats: int = 5,
             rounds: int = 3, threads: int | None = None, show_progress: bool = True,
             cases: Sequence[Case] | None = None, statistic: str = "median",
             clock: str = "auto") -> ValidationReport:
    """Measure every case ``rounds`` times (round-robin, so background load hits all cases alike), take
    the median, and compare with the prediction on the calibrated model of this machine.

    ``calibration``: a calibration file (default: this device's saved calibration, if any);
    ``threads``: CPU threads (default: those the calibration used, else torch's setting).
    """
    import torch

    if device not in ("cpu", "host") and not str(device).startswith("cuda"):
        raise ValueError(f"validate measures on 'cpu' or 'cuda[:i]', got {device!r}")
    torch_device = "cpu" if device in ("cpu", "host") else str(device)
    if torch_device == "cpu":
        model = get_device("host", calibration)
        if threads is None and model.calibrated:
            threads = model.num_pe
        if threads is not None:
            torch.set_num_threads(threads)
            model = model.replace(num_pe=threads)
    else:
        from .cuda import detect_cuda_device

        base = detect_cuda_device(torch_device)
        model = get_device(base, calibration if calibration is not None else _default_cal(base.name))
    cases = list(cases) if cases is not None else validation_cases(quick)
    runs = [c.build(torch_device) for c in cases]
    timings: list[list[float]] = [[] for _ in cases]
    with torch.inference_mode():
        for _ in progress(range(rounds), "validate rounds", show_progress):
            for i, fn in enumerate(runs):
                timings[i].append(measure(fn, torch_device, repeats=repeats, statistic=statistic, clock=clock))
    report = ValidationReport(device=model.name, threads=torch.get_num_threads() if torch_device == "cpu" else 0,
                              calibrated=model.calibrated, clock=resolve_clock(clock, torch_device))
    for case, times in zip(cases, timings):
        predicted = sum(price(k, model).latency for k in case.kernels)
        report.results.append(CaseResult(case.name, case.block, case.mode, case.granularity, case.keep, case.impl,
                                         predicted, statistics.median(times)))
    return report


def _default_cal(name: str) -> Any:
    from .devices import default_calibration_path

    path = default_calibration_path(name)
    return path if path.exists() else False
