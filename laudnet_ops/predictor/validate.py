"""Validation: measure real blocks on this machine and compare them with the (calibrated) predictions.

Each case is a callable block implementation plus the kernel list the predictor prices for exactly that
schedule.  When the compiled extension loads, every paradigm runs the library's ops (label
``laudnet_ops``), glued by PyTorch eager code, channels_last throughout:

* spatial: the masker (average pool + 1x1 conv) -> ``masked_conv1x1`` (conv1 on the input pixels the
  kept patches' 3x3 halo reads) -> ``patch_indices`` -> ``gather_conv2d`` (3x3) -> the 1x1 conv on the
  packed patches (``F.conv2d`` on (P, C, S, S)) -> ``scatter_add_`` in place; the kept patches form one
  compact region per image, as the predictor's halo model assumes;
* channel: ``channel_gated_conv2d`` for conv1 and conv2, ``channel_gated_conv2d_add_`` for conv3 with the
  residual add and ReLU fused, with per-sample random gates (every sample keeps the same number of
  groups, different ones);
* layer: ``sample_gather`` -> the dense branch (``F.conv2d``) -> ``sample_scatter_add_`` in place.

The decisions (mask, gates) are prescribed -- they set the rate under test -- but the maskers' work
runs.  They are priced with ``blocks.LIBRARY_CPU`` on the CPU (the kernels as csrc/cpu runs them).

Without the extension the cases fall back to plain PyTorch, labelled so:

* ``torch`` layer skipping: index_select of the kept samples, the dense branch, the residual rows
  gathered, added and scattered back (index_copy_); channel skipping with gates shared by the batch:
  the weights sliced to the kept channels (index_select), then dense convs on fewer channels;
* ``torch stand-in`` spatial: masker (pool + 1-logit conv), conv1, mask -> nonzero, a pad copy, an
  index_select gather of the haloed windows, the 3x3 conv on the packed windows, the 1x1 conv, and a
  gather / add / ReLU / index_copy_ scatter.

These are priced with the matching ``EAGER`` schedules.  Dense blocks are ``F.conv2d`` (torch) always.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ._util import progress
from .blocks import EAGER, LIBRARY_CPU, BlockSpec, block_kernels, with_schedule
from .devices import get_device
from .tiles import Kernel, price
from .timing import measure, resolve_clock, steady_allocator

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

#: The ops each paradigm's library implementation needs.
LIBRARY_NEEDS = {
    "spatial": ("masked_conv1x1", "patch_indices", "gather_conv2d", "scatter_add_"),
    "channel": ("channel_gated_conv2d", "channel_gated_conv2d_add_"),
    "layer": ("sample_gather", "sample_scatter_add_"),
}


def library_ops() -> dict[str, Callable[..., Any]]:
    """The laudnet_ops ops usable here (empty when the compiled extension does not load)."""
    try:
        import laudnet_ops
    except ImportError:
        return {}
    if getattr(laudnet_ops, "extension_error", None) is not None:
        return {}
    found = {}
    for name in sorted({op for ops_ in LIBRARY_NEEDS.values() for op in ops_}):
        try:
            found[name] = getattr(laudnet_ops, name)
        except (AttributeError, ImportError, RuntimeError):
            continue
    return found


def _has(lib: dict[str, Callable[..., Any]], mode: str) -> bool:
    return all(name in lib for name in LIBRARY_NEEDS[mode])


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
    """The library's spatial block when its ops load, else the torch stand-in."""
    if _has(lib, "spatial"):
        return _build_spatial_library(spec, n, patch, kept, lib)
    return _build_spatial_standin(spec, n, patch, kept)


def _build_spatial_standin(spec: BlockSpec, n: int, patch: int, kept: int) -> Callable[[str], Callable[[], object]]:
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

        def run():
            # masker: pooled input -> one logit per patch (its decision is prescribed above).  Not fused
            # with conv1: torch has no fused kernel, and a conv with width + 1 outputs falls off
            # oneDNN onto torch's slow convolution, which would measure torch, not the schedule.
            F.conv2d(F.avg_pool2d(x, s), wm) > 0
            y1 = F.conv2d(x, w1).relu_()
            idx = mask.nonzero()
            padded[:, 1:-1, 1:-1, :].copy_(y1.permute(0, 2, 3, 1))
            rows = ((idx * in_strides).sum(1)[:, None] + win_offsets[None, :]).reshape(-1)
            packed = padded.view(-1, width).index_select(0, rows)
            packed = packed.view(-1, win, win, width).permute(0, 3, 1, 2)
            y3 = F.conv2d(F.conv2d(packed, w2).relu_(), w3)
            out_rows = ((idx * out_strides).sum(1)[:, None] + out_offsets[None, :]).reshape(-1)
            r = residual_rows.index_select(0, out_rows)
            r.add_(y3.permute(0, 2, 3, 1).reshape(-1, c)).relu_()
            residual_rows.index_copy_(0, out_rows, r)  # a view of x: this updates x
            return x
        return run
    return build


def _weights(spec: BlockSpec, dev: str):
    """conv1, conv2, conv3 weights (the same seeds in every builder, so implementations can be compared)."""
    return (_tensor(spec.width, spec.cin, 1, 1, device=dev), _tensor(spec.width, spec.width, 3, 3, device=dev),
            _tensor(spec.cout, spec.width, 1, 1, device=dev))


def _compact_patches(n: int, hp: int, wp: int, kept: int, dev: str):
    """(n, hp, wp) bool: ``kept`` patches spread over the images, each image keeping those nearest its
    centre -- the one compact region per image that the predictor's halo model assumes."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    order = (((ys - (hp - 1) / 2) ** 2 + (xs - (wp - 1) / 2) ** 2).flatten()).argsort(stable=True)
    mask = torch.zeros(n, hp * wp, dtype=torch.bool)
    for i in range(n):
        mask[i, order[:kept // n + (i < kept % n)]] = True
    return mask.view(n, hp, wp).to(dev)


def _build_spatial_library(spec: BlockSpec, n: int, patch: int, kept: int,
                           lib: dict[str, Callable[..., Any]]) -> Callable[[str], Callable[[], object]]:
    """masker (pool + 1x1 conv) -> masked_conv1x1 on the halo -> patch_indices -> gather_conv2d -> 1x1 conv
    on the packed patches -> scatter_add_."""
    def build(dev: str):
        import torch.nn.functional as F
        from laudnet_ops.nn import halo_mask

        s = patch
        hp, wp = math.ceil(spec.ho / s), math.ceil(spec.wo / s)
        x = _tensor(n, spec.cin, spec.h, spec.w, device=dev, channels_last=True)
        w1, w2, w3 = _weights(spec, dev)
        wm = _tensor(1, spec.cin, 1, 1, device=dev)
        mask = _compact_patches(n, hp, wp, kept, dev)  # prescribed decisions: the rate under test
        window = s * spec.stride
        masked_conv, indices = lib["masked_conv1x1"], lib["patch_indices"]
        gather_conv, scatter = lib["gather_conv2d"], lib["scatter_add_"]

        def run():
            F.conv2d(F.avg_pool2d(x, window, window, ceil_mode=True), wm) > 0  # the masker (decision prescribed)
            read = halo_mask(mask, s, spec.stride, (spec.h, spec.w), (spec.ho, spec.wo))[:, 0]
            y1 = masked_conv(x, read, w1, None, "relu")
            idx = indices(mask)
            y2 = gather_conv(y1, idx, w2, None, s, spec.stride, 1, 1, spec.groups, "relu")
            return scatter(x, F.conv2d(y2, w3), idx, "relu")  # x: the block's input is its residual
        return run
    return build


def _sample_gates(n: int, groups: int, kept: int, dev: str):
    """(n, groups) bool: every sample keeps ``kept`` groups, each sample its own (seeded) choice."""
    import torch

    gates = torch.zeros(n, groups, dtype=torch.bool)
    for i in range(n):
        gates[i, _choice(groups, kept, 100 + i, "cpu")] = True
    return gates.to(dev)


def _build_channel_library(spec: BlockSpec, n: int, group: int, kept_groups: int,
                           lib: dict[str, Callable[..., Any]]) -> Callable[[str], Callable[[], object]]:
    """channel_gated_conv2d for conv1 (outputs gated) and conv2 (both), channel_gated_conv2d_add_ for conv3
    (inputs) fused with the residual add and ReLU in place, per-sample gates."""
    def build(dev: str):
        import torch.nn.functional as F

        groups = spec.width // group
        hidden = max(groups // 16, 16)
        x = _tensor(n, spec.cin, spec.h, spec.w, device=dev, channels_last=True)
        w1, w2, w3 = _weights(spec, dev)
        m1, m2 = _tensor(hidden, spec.cin, device=dev), _tensor(groups, hidden, device=dev)
        gates = _sample_gates(n, groups, kept_groups, dev)
        conv, conv_add = lib["channel_gated_conv2d"], lib["channel_gated_conv2d_add_"]

        def run():
            logits = F.linear(F.linear(x.mean((2, 3)), m1).relu_(), m2)
            logits > 0  # the gates' work; the gates are prescribed above
            y = conv(x, w1, None, None, gates, group, activation="relu")
            y = conv(y, w2, None, gates, gates, group, stride=spec.stride, padding=1, groups=spec.groups,
                     activation="relu")
            return conv_add(x, y, w3, None, gates, None, group, activation="relu")
        return run
    return build


def _build_layer_library(spec: BlockSpec, n: int, kept: int,
                         lib: dict[str, Callable[..., Any]]) -> Callable[[str], Callable[[], object]]:
    """sample_gather -> the dense branch on the kept samples -> sample_scatter_add_ in place."""
    def build(dev: str):
        import torch
        import torch.nn.functional as F

        x = _tensor(n, spec.cin, spec.h, spec.w, device=dev, channels_last=True)
        w1, w2, w3 = _weights(spec, dev)
        wg = _tensor(1, spec.cin, device=dev)
        gate = torch.zeros(n, dtype=torch.bool, device=dev)
        gate[_choice(n, kept, 1, dev)] = True  # prescribed decisions: the rate under test
        gather, scatter = lib["sample_gather"], lib["sample_scatter_add_"]

        def run():
            F.linear(x.mean((2, 3)), wg) > 0  # the gate's work (its decision is prescribed above)
            xk, sel = gather(x, gate)
            return scatter(x, _dense_branch(xk, w1, w2, w3), sel, "relu")
        return run
    return build


#: Block configurations validated on a CPU (small enough for a shared 2-core machine).
CPU_BLOCKS = (
    (BlockSpec("r50-s1-like", 256, 64, 256, 28, 28), 4, (1, 2, 4, 7)),
    (BlockSpec("r50-s2-like", 512, 128, 512, 14, 14), 8, (1, 2, 7)),
)
KEEPS = (0.25, 0.5, 0.75, 1.0)


def validation_cases(quick: bool = False, blocks=CPU_BLOCKS, keeps: Sequence[float] = KEEPS,
                     groups: Sequence[int] = (2, 8), lib: dict[str, Callable[..., Any]] | None = None,
                     device: str = "cpu") -> list[Case]:
    """The case table: dense, layer, channel (per G) and spatial (per S) blocks at each keep ratio.

    ``lib``: the library ops to use (default: :func:`library_ops`; ``{}`` forces the torch fallbacks);
    ``device``: where the cases will run ('cpu' prices the library's CPU kernels)."""
    lib = library_ops() if lib is None else lib
    if quick:
        blocks = ((BlockSpec("tiny", 64, 16, 64, 8, 8), 2, (2,)),)
        keeps, groups = (0.5, 1.0), (4,)
    on_cpu = device in ("cpu", "host")
    library_sched = with_schedule(LIBRARY_CPU, cpu_kernels=on_cpu)
    standin_sched = with_schedule(EAGER, fuse_masker=False)
    impl = {mode: (LIBRARY, library_sched) if _has(lib, mode) else (fallback, sched)
            for mode, fallback, sched in (("spatial", STANDIN, standin_sched), ("channel", TORCH, EAGER),
                                          ("layer", TORCH, EAGER))}
    cases: list[Case] = []
    for spec, n, patches in blocks:
        cases.append(Case(f"{spec.name} dense", spec.name, "dense", 1, 1.0, TORCH,
                          block_kernels(spec, "dense", n, 1.0, 1, "fp32", EAGER), _build_dense(spec, n)))
        for keep in keeps:
            kept = max(1, round(keep * n))
            label, sched = impl["layer"]
            build = (_build_layer_library(spec, n, kept, lib) if label == LIBRARY else _build_layer(spec, n, kept))
            cases.append(Case(f"{spec.name} layer r={kept / n:.2f}", spec.name, "layer", 1, kept / n, label,
                              block_kernels(spec, "layer", n, kept / n, 1, "fp32", sched), build))
            for g in groups:
                total = math.ceil(spec.width / g)
                kept_g = max(1, round(keep * total))
                label, sched = impl["channel"]
                build = (_build_channel_library(spec, n, g, kept_g, lib) if label == LIBRARY
                         else _build_channel(spec, n, g, kept_g * g))
                cases.append(Case(f"{spec.name} channel G={g} r={kept_g / total:.2f}", spec.name, "channel", g,
                                  kept_g / total, label,
                                  block_kernels(spec, "channel", n, kept_g / total, g, "fp32", sched), build))
            for s in patches:
                total = n * math.ceil(spec.ho / s) * math.ceil(spec.wo / s)
                kept_p = max(1, round(keep * total))
                label, sched = impl["spatial"]
                cases.append(Case(f"{spec.name} spatial S={s} r={kept_p / total:.2f}", spec.name, "spatial", s,
                                  kept_p / total, label,
                                  block_kernels(spec, "spatial", n, kept_p / total, s, "fp32", sched),
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
    cases = list(cases) if cases is not None else validation_cases(quick, device=torch_device)
    steady_allocator()  # steady-state latencies, whatever ran before in this process
    runs = [c.build(torch_device) for c in cases]
    # The in-place cases add their branch onto their own input call after call; flushing denormals keeps
    # values that drift towards zero from hitting the slow path (it changes nothing else).
    flush = torch.set_flush_denormal(True)
    try:
        timings = _measure_all(runs, torch_device, rounds, repeats, statistic, clock, show_progress)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    report = ValidationReport(device=model.name, threads=torch.get_num_threads() if torch_device == "cpu" else 0,
                              calibrated=model.calibrated, clock=resolve_clock(clock, torch_device))
    for case, times in zip(cases, timings):
        predicted = sum(price(k, model).latency for k in case.kernels)
        report.results.append(CaseResult(case.name, case.block, case.mode, case.granularity, case.keep, case.impl,
                                         predicted, statistics.median(times)))
    return report


def _measure_all(runs: Sequence[Callable[[], object]], device: str, rounds: int, repeats: int, statistic: str,
                 clock: str, show_progress: bool) -> list[list[float]]:
    """Every run measured once per round, round-robin (background load then hits all cases alike)."""
    import torch

    timings: list[list[float]] = [[] for _ in runs]
    with torch.inference_mode():
        for _ in progress(range(rounds), "validate rounds", show_progress):
            for i, fn in enumerate(runs):
                timings[i].append(measure(fn, device, repeats=repeats, statistic=statistic, clock=clock))
    return timings


def _default_cal(name: str) -> Any:
    from .devices import default_calibration_path

    path = default_calibration_path(name)
    return path if path.exists() else False
