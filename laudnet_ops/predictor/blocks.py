"""Block latency: the kernels each paradigm launches for one residual block, and their predicted cost.

Paradigms (``mode``): ``dense``; ``spatial`` (patches of S x S output pixels, masker fused with conv1,
gather-conv3x3, 1x1 conv on packed patches, scatter-add); ``channel`` (groups of G bottleneck channels,
masker MLP, channel-gated convs with the weight gather fused); ``layer`` (one decision per sample: gate,
sample gather, dense block on the kept samples, sample scatter-add).  The projection (downsample) branch
stays dense in every paradigm.

``rate`` is the paper's block activation rate: executed over dense FLOPs of the residual branch, masker
FLOPs included (the quantity the sparsity loss targets).  It is turned into each paradigm's keep ratio
(patches, channel groups or samples kept) by inverting the paradigm's FLOPs accounting; pass
``rate_kind="keep"`` to give the keep ratio directly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any

from .._cpu_dispatch import dense_grouped
from . import operators as ops
from ._util import check_rate, choice_error, normalize_dtype
from .devices import Device
from .tiles import Kernel, KernelCost, price

MODES = ("dense", "spatial", "channel", "layer")
RATE_KINDS = ("flops", "keep")


@dataclass(frozen=True)
class BlockSpec:
    """A bottleneck residual block: 1x1 (cin->width), 3x3 (width, stride, groups), optional SE, 1x1
    (width->cout); ``h, w`` is the input resolution; ``se`` the SE squeeze width (0 = none)."""

    name: str
    cin: int
    width: int
    cout: int
    h: int
    w: int
    stride: int = 1
    groups: int = 1
    se: int = 0
    stage: int = 0

    @property
    def downsample(self) -> bool:
        return self.stride != 1 or self.cin != self.cout

    @property
    def ho(self) -> int:
        return ops.conv_out(self.h, 3, self.stride)

    @property
    def wo(self) -> int:
        return ops.conv_out(self.w, 3, self.stride)


@dataclass(frozen=True)
class Schedule:
    """How the block's operators are fused (the paper's Sec. 3.4 ablation) and laid out.

    fuse_masker:   spatial masker shares conv1's input read (one conv with width + 1 outputs).
    fuse_gather:   spatial gather happens inside the conv's loads (else: pad copy + gather copy + conv).
    fuse_scatter:  scatter, residual add and activation in one kernel (else: gather the residual rows,
                   add, activation, scatter back).
    fuse_epilogue: BN/ReLU/residual add inside conv epilogues (else: separate element-wise kernels, as
                   PyTorch eager mode runs them).
    shared_gates:  channel mode with gates shared by the batch: weights sliced once, then dense convs.
    layout:        "nchw" or "nhwc" (decides the length of scattered accesses).
    cpu_kernels:   price the library's ops as its CPU kernels run them (csrc/cpu): the masker's pooling
                   pass, conv1 on the gathered pixel rows the kept halos read, gather-conv as per-position
                   receptive-field copies + GEMM, channel-gated convs per sample (weight slices, packed
                   active channels, dense-size output).  ``predict_block`` sets it for CPU devices.
    """

    fuse_masker: bool = True
    fuse_gather: bool = True
    fuse_scatter: bool = True
    fuse_epilogue: bool = True
    shared_gates: bool = False
    layout: str = "nchw"
    cpu_kernels: bool = False


FUSED = Schedule()
UNFUSED = Schedule(fuse_masker=False, fuse_gather=False, fuse_scatter=False)
#: What plain PyTorch eager code runs (used by ``validate``'s torch stand-ins).
EAGER = Schedule(fuse_masker=True, fuse_gather=False, fuse_scatter=False, fuse_epilogue=False,
                 shared_gates=True, layout="nhwc")
#: The library's ops on the CPU, glued by PyTorch eager code (``validate``'s library cases): the ops fuse
#: their own activations; thresholds, masker activations and the channel block's residual add and ReLU
#: are separate eager kernels.
LIBRARY_CPU = Schedule(fuse_masker=True, fuse_gather=True, fuse_scatter=True, fuse_epilogue=False,
                       shared_gates=False, layout="nhwc", cpu_kernels=True)


@dataclass
class BlockLatency:
    """Predicted latency (seconds) of one block, dense and dynamic, with the priced kernels."""

    block: str
    mode: str
    granularity: int
    rate: float
    keep: float
    dense: float
    dynamic: float
    kernels: list[KernelCost] = field(default_factory=list)
    dense_kernels: list[KernelCost] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense / self.dynamic if self.dynamic > 0 else float("inf")

    def to_dict(self, kernels: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"block": self.block, "mode": self.mode, "granularity": self.granularity,
                                "rate": self.rate, "keep": self.keep, "dense_ms": self.dense * 1e3,
                                "dynamic_ms": self.dynamic * 1e3, "speedup": self.speedup}
        if kernels:
            data["kernels"] = [{"name": k.name, "ms": k.latency * 1e3, "tile": list(k.tile)}
                               for k in self.kernels]
        return data


# --- FLOPs accounting (paper / facts) -------------------------------------------------------------------

def _dense_branch_macs(spec: BlockSpec) -> dict[str, float]:
    hw_in, hw_out = spec.h * spec.w, spec.ho * spec.wo
    macs = {
        "conv1": spec.cin * spec.width * hw_in,
        "conv2": spec.width * spec.width / spec.groups * 9 * hw_out,
        "conv3": spec.width * spec.cout * hw_out,
        "se": 2.0 * spec.width * spec.se if spec.se else 0.0,
    }
    return macs


def dilated_density(keep: float, size: int) -> float:
    """Fraction of conv1 output pixels (an ``size`` x ``size`` map) that the kept output patches need once
    the 3x3 halo is added.  Kept patches are assumed to form one compact region per image (objects are
    contiguous; the authors compute it from real masks), so the halo adds a one-pixel ring around a square
    of area ``keep``.  Independent random patches would dilate far more, and would make small S look
    artificially cheap at a given FLOPs rate."""
    if keep <= 0.0:
        return 0.0
    side = math.sqrt(keep) * size + 2.0
    return min(1.0, (side / size) ** 2)


def channel_masker_hidden(groups: int) -> int:
    """Hidden width of the channel masker MLP: max(groups // 16, 16) (sized from the gated width)."""
    return max(groups // 16, 16)


def executed_macs(spec: BlockSpec, mode: str, keep: float, granularity: int) -> float:
    """Theoretical executed MACs of the residual branch, masker included, at keep ratio ``keep``."""
    macs = _dense_branch_macs(spec)
    dense = sum(macs.values())
    if mode == "dense":
        return dense
    if mode == "layer":
        return keep * dense + spec.cin  # masker: pooled input -> one logit
    if mode == "spatial":
        patch = min(granularity, spec.ho)
        grid = math.ceil(spec.ho / patch) * math.ceil(spec.wo / patch)
        return (macs["conv1"] * dilated_density(keep, spec.h)
                + (macs["conv2"] + macs["conv3"] + macs["se"]) * keep + spec.cin * grid)
    if mode == "channel":
        groups = math.ceil(spec.width / granularity)
        hidden = channel_masker_hidden(groups)
        return (macs["conv1"] * keep + macs["conv2"] * keep * keep + macs["conv3"] * keep
                + macs["se"] * keep + spec.cin * hidden + hidden * groups)
    raise choice_error("mode", mode, MODES)


def keep_for_rate(spec: BlockSpec, mode: str, rate: float, granularity: int) -> float:
    """Invert the FLOPs accounting: the keep ratio whose executed / dense MACs equal ``rate``
    (clamped to [0, 1]; bisection, the accounting is increasing in the keep ratio)."""
    if mode == "dense":
        return 1.0
    dense = sum(_dense_branch_macs(spec).values())
    target = rate * dense
    lo, hi = 0.0, 1.0
    if executed_macs(spec, mode, 0.0, granularity) >= target:
        return 0.0
    if executed_macs(spec, mode, 1.0, granularity) <= target:
        return 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if executed_macs(spec, mode, mid, granularity) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --- kernel lists ------------------------------------------------------------------------------------------

def _count(keep: float, total: int) -> int:
    """Kept items out of ``total`` (round half up: monotone in ``keep``)."""
    return min(total, int(math.floor(keep * total + 0.5)))


def _relu(name: str, shape: tuple[int, int, int, int], dtype: str) -> Kernel:
    return ops.elementwise(name, shape, 1, 1, dtype)


def _se_kernels(prefix: str, n: int, c: int, pooled_shape: tuple[int, int, int, int], se: int, dtype: str,
                sched: Schedule, seg_w: float = 0.0) -> list[Kernel]:
    """Squeeze-and-excitation on ``c`` channels over a map of ``pooled_shape`` (N or P, c, h, w)."""
    p, _, h, w = pooled_shape
    kernels = [ops.global_pool(f"{prefix}se-pool", p, c, h, w, dtype),
               ops.linear(f"{prefix}se-fc1", n, c, se, dtype, seg_w=seg_w),
               ops.linear(f"{prefix}se-fc2", n, se, c, dtype, seg_w=seg_w)]
    if not sched.fuse_epilogue:
        kernels += [_relu(f"{prefix}se-relu", (n, se, 1, 1), dtype), _relu(f"{prefix}se-sigmoid", (n, c, 1, 1), dtype)]
    kernels.append(ops.elementwise(f"{prefix}se-scale", pooled_shape, 1, 1, dtype))
    return kernels


def _residual_kernels(spec: BlockSpec, n: int, dtype: str) -> list[Kernel]:
    if not spec.downsample:
        return []
    return [ops.conv2d("downsample", n, spec.cin, spec.cout, spec.h, spec.w, 1, spec.stride, dtype=dtype)]


def dense_kernels(spec: BlockSpec, n: int, dtype: str = "fp32", sched: Schedule = FUSED,
                  residual_epilogue: bool = True, prefix: str = "") -> list[Kernel]:
    """The static block: conv1, conv2, [SE], conv3 (+ residual add and ReLU) and, when
    ``residual_epilogue``, the projection; without it (the layer-skip branch) just the residual branch."""
    ho, wo = spec.ho, spec.wo
    fe = sched.fuse_epilogue
    kernels = _residual_kernels(spec, n, dtype) if residual_epilogue else []
    kernels += [ops.conv2d(f"{prefix}conv1", n, spec.cin, spec.width, spec.h, spec.w, 1, 1, dtype=dtype)]
    if not fe:
        kernels.append(_relu(f"{prefix}relu1", (n, spec.width, spec.h, spec.w), dtype))
    kernels.append(ops.conv2d(f"{prefix}conv2", n, spec.width, spec.width, spec.h, spec.w, 3, spec.stride,
                              spec.groups, dtype=dtype))
    if not fe:
        kernels.append(_relu(f"{prefix}relu2", (n, spec.width, ho, wo), dtype))
    if spec.se:
        kernels += _se_kernels(prefix, n, spec.width, (n, spec.width, ho, wo), spec.se, dtype, sched)
    epi = 1 if (fe and residual_epilogue) else 0
    kernels.append(ops.conv2d(f"{prefix}conv3", n, spec.width, spec.cout, ho, wo, 1, 1, dtype=dtype,
                              epilogue_inputs=epi))
    if residual_epilogue and not fe:
        kernels.append(ops.elementwise(f"{prefix}add", (n, spec.cout, ho, wo), 2, 1, dtype))
        kernels.append(_relu(f"{prefix}relu3", (n, spec.cout, ho, wo), dtype))
    return kernels


def spatial_kernels(spec: BlockSpec, n: int, patch: int, keep: float, dtype: str = "fp32",
                    sched: Schedule = FUSED) -> list[Kernel]:
    """Spatially dynamic block with S x S output patches kept at ratio ``keep``."""
    ho, wo, s = spec.ho, spec.wo, min(patch, spec.ho)
    hp, wp = math.ceil(ho / s), math.ceil(wo / s)
    kept = _count(keep, n * hp * wp)
    fe, nhwc = sched.fuse_epilogue, sched.layout == "nhwc"
    if sched.cpu_kernels and sched.fuse_masker and sched.fuse_gather and sched.fuse_scatter:
        return _spatial_cpu_kernels(spec, n, s, kept, hp, wp, dtype, sched)
    kernels: list[Kernel] = []
    if sched.fuse_masker:
        kernels.append(ops.masker_conv1x1(n, spec.cin, spec.width, spec.h, spec.w, dtype))
    else:
        window = s * spec.stride
        kernels += [ops.pool("masker-pool", n, spec.cin, spec.h, spec.w, window, window, dtype),
                    ops.conv2d("masker-conv", n, spec.cin, 1, hp, wp, 1, 1, dtype=dtype),
                    ops.conv2d("conv1", n, spec.cin, spec.width, spec.h, spec.w, 1, 1, dtype=dtype)]
    if not fe:  # eager: activation, (the fused conv's logits pooled to the grid,) threshold
        kernels.append(_relu("relu1", (n, spec.width + int(sched.fuse_masker), spec.h, spec.w), dtype))
        if sched.fuse_masker:
            kernels.append(ops.pool("masker-logit-pool", n, 1, ho, wo, s, s, dtype))
        kernels.append(ops.elementwise("masker-threshold", (n, 1, hp, wp), 1, 1, dtype))
    kernels.append(ops.patch_indices(n, hp, wp, kept))
    kernels += _residual_kernels(spec, n, dtype)
    if kept == 0:
        return kernels
    window = (s - 1) * spec.stride + 3
    if sched.fuse_gather:
        kernels.append(ops.gather_conv2d(kept, spec.width, spec.width, s, 3, spec.stride, spec.groups,
                                         (spec.h, spec.w), n, dtype, sched.layout))
    else:
        kernels.append(ops.elementwise("pad", (n, spec.width, spec.h + 2, spec.w + 2), 1, 1, dtype))
        # the gather's row list: patch origin arithmetic, expanded by the window offsets
        kernels.append(dataclasses.replace(
            ops.elementwise("gather-index", (kept, 1, window, window), 1, 1, "fp32", elem_bytes=ops.INDEX_BYTES),
            launches=3))  # origin = (indices * strides).sum(1), then + window offsets
        if nhwc:  # pixel rows of all channels
            kernels.append(ops.gather_rows("gather", kept * window * window, spec.width, spec.width, dtype))
        else:  # window rows of each channel
            kernels.append(ops.gather_rows("gather", kept * spec.width * window, window, window, dtype))
        kernels.append(ops.conv2d("conv2", kept, spec.width, spec.width, window, window, 3, spec.stride,
                                  spec.groups, dtype=dtype, padding=0))
    if not fe:
        kernels.append(_relu("relu2", (kept, spec.width, s, s), dtype))
    if spec.se:
        kernels += _se_kernels("", n, spec.width, (kept, spec.width, s, s), spec.se, dtype, sched)
    kernels.append(ops.conv2d("conv3", kept, spec.width, spec.cout, s, s, 1, 1, dtype=dtype))
    if sched.fuse_scatter:
        kernels.append(ops.scatter_add(kept, spec.cout, s, dtype, sched.layout))
    else:
        rows, row, seg = ((kept * s * s, spec.cout, spec.cout) if nhwc else (kept * spec.cout * s, s, s))
        kernels.append(dataclasses.replace(
            ops.elementwise("scatter-index", (kept, 1, s, s), 1, 1, "fp32", elem_bytes=ops.INDEX_BYTES),
            launches=3))
        kernels.append(ops.gather_rows("residual-gather", rows, row, seg, dtype))
        kernels.append(ops.elementwise("add", (kept, spec.cout, s, s), 2, 1, dtype))
        if not fe:
            kernels.append(_relu("relu3", (kept, spec.cout, s, s), dtype))
        kernels.append(ops.scatter_rows("scatter", rows, row, seg, dtype))
    return kernels


def channel_kernels(spec: BlockSpec, n: int, group_size: int, keep: float, dtype: str = "fp32",
                    sched: Schedule = FUSED) -> list[Kernel]:
    """Channel-skipping block: groups of G bottleneck channels kept at ratio ``keep``, per sample."""
    ho, wo, g = spec.ho, spec.wo, group_size
    groups_total = math.ceil(spec.width / g)
    kept_c = min(spec.width, _count(keep, groups_total) * g)
    hidden = channel_masker_hidden(groups_total)
    fe = sched.fuse_epilogue
    kernels = [ops.global_pool("masker-pool", n, spec.cin, spec.h, spec.w, dtype),
               ops.linear("masker-fc1", n, spec.cin, hidden, dtype),
               ops.linear("masker-fc2", n, hidden, groups_total, dtype)]
    if not fe:
        kernels += [_relu("masker-relu", (n, hidden, 1, 1), dtype),
                    ops.elementwise("masker-threshold", (n, groups_total, 1, 1), 1, 1, dtype)]
    kernels += _residual_kernels(spec, n, dtype)
    if sched.cpu_kernels and not sched.shared_gates:
        return kernels + _channel_cpu_kernels(spec, n, g, kept_c, dtype, sched)
    # the grouped 3x3 keeps its group count; each group keeps ~keep of its channels
    conv_groups = spec.groups
    if sched.shared_gates:
        # all samples share the gates: slice the weights once, then run dense convs.  The slices are
        # index_select copies by channel index (one run per kept channel, which is what torch does)
        cin2 = spec.width // spec.groups
        kernels += [ops.gather_rows("w1-gather", kept_c, spec.cin, spec.cin, dtype),
                    ops.gather_rows("w2-gather-out", kept_c, cin2 * 9, cin2 * 9, dtype),
                    ops.gather_rows("w2-gather-in", max(1, kept_c * kept_c // conv_groups), 9, 9, dtype),
                    ops.gather_rows("w3-gather", max(1, spec.cout * kept_c), 1, 1, dtype)]
        if kept_c == 0:
            return kernels + _zero_branch_tail(spec, n, dtype, fe)
        kernels.append(ops.conv2d("conv1", n, spec.cin, kept_c, spec.h, spec.w, 1, 1, dtype=dtype))
        if not fe:
            kernels.append(_relu("relu1", (n, kept_c, spec.h, spec.w), dtype))
        kernels.append(ops.conv2d("conv2", n, kept_c, kept_c, spec.h, spec.w, 3, spec.stride, conv_groups,
                                  dtype=dtype))
    else:
        if kept_c == 0:
            return kernels + _zero_branch_tail(spec, n, dtype, fe)
        kernels.append(ops.channel_gated_conv2d("conv1", n, spec.cin, kept_c, spec.h, spec.w, 1, 1, 1, g,
                                                in_gated=False, out_gated=True,
                                                full_weight_elems=spec.width * spec.cin, dtype=dtype,
                                                layout=sched.layout))
        if not fe:
            kernels.append(_relu("relu1", (n, kept_c, spec.h, spec.w), dtype))
        kernels.append(ops.channel_gated_conv2d("conv2", n, kept_c, kept_c, spec.h, spec.w, 3, spec.stride,
                                                conv_groups, g, in_gated=True, out_gated=True,
                                                full_weight_elems=spec.width * spec.width / conv_groups * 9,
                                                dtype=dtype, layout=sched.layout))
    if not fe:
        kernels.append(_relu("relu2", (n, kept_c, ho, wo), dtype))
    if spec.se:
        kernels += _se_kernels("", n, kept_c, (n, kept_c, ho, wo), spec.se, dtype, sched,
                               seg_w=0.0 if sched.shared_gates else g * ops.DTYPE_BYTES[dtype])
    epi = 1 if fe else 0
    if sched.shared_gates:
        kernels.append(ops.conv2d("conv3", n, kept_c, spec.cout, ho, wo, 1, 1, dtype=dtype, epilogue_inputs=epi))
    else:
        kernels.append(ops.channel_gated_conv2d("conv3", n, kept_c, spec.cout, ho, wo, 1, 1, 1, g,
                                                in_gated=True, out_gated=False,
                                                full_weight_elems=spec.cout * spec.width, dtype=dtype,
                                                layout=sched.layout, epilogue_inputs=epi))
    if not fe:
        kernels += [ops.elementwise("add", (n, spec.cout, ho, wo), 2, 1, dtype),
                    _relu("relu3", (n, spec.cout, ho, wo), dtype)]
    return kernels


def _spatial_cpu_kernels(spec: BlockSpec, n: int, s: int, kept: int, hp: int, wp: int, dtype: str,
                         sched: Schedule) -> list[Kernel]:
    """The spatial block on the library's CPU kernels: the masker (pool + 1x1 conv), threshold,
    masked_conv1x1 (conv1 on the input pixels the kept patches' halo reads), patch_indices, gather_conv2d
    (3x3), the 1x1 conv on the packed patches, scatter_add_ in place."""
    read = dilated_density(kept / (n * hp * wp), spec.h) if kept else 0.0
    kernels = ops.masked_conv1x1_cpu(n, spec.cin, spec.width, spec.h, spec.w, read, dtype, s, spec.stride)
    if not sched.fuse_epilogue:
        kernels.append(ops.elementwise("masker-threshold", (n, 1, hp, wp), 1, 1, dtype))
    kernels.append(ops.patch_indices(n, hp, wp, kept))
    kernels += _residual_kernels(spec, n, dtype)
    if kept == 0:
        return kernels
    kernels += ops.gather_conv2d_cpu(kept, spec.width, spec.width, s, 3, spec.stride, spec.groups,
                                     (spec.h, spec.w), n, dtype)
    if spec.se:
        kernels += _se_kernels("", n, spec.width, (kept, spec.width, s, s), spec.se, dtype, sched)
    # F.conv2d on the (P, C, S, S) packed batch: oneDNN runs it image by image, so every patch streams the
    # weights again (the tile model's per-image weights on a CPU): S = 1 is a matrix-vector product per patch
    kernels.append(ops.conv2d("conv3", kept, spec.width, spec.cout, s, s, 1, 1, dtype=dtype))
    kernels.append(ops.scatter_add(kept, spec.cout, s, dtype, "nhwc"))
    return kernels


def _channel_cpu_kernels(spec: BlockSpec, n: int, g: int, kept_c: int, dtype: str,
                         sched: Schedule) -> list[Kernel]:
    """The channel block on the library's CPU channel_gated_conv2d (per-sample gates), its last conv
    fused with the residual add and ReLU (channel_gated_conv2d_add_)."""
    ho, wo = spec.ho, spec.wo
    keep = kept_c / spec.width
    kernels = ops.channel_gated_conv2d_cpu("conv1", n, spec.cin, spec.width, spec.h, spec.w, 1, 1, 1, g,
                                           1.0, keep, dtype)
    # conv1's output is already zero on the off channels: the block gives a conv run as a dense grouped
    # one no input gates to apply (laudnet_ops.nn's RegNetY channel block).
    keep_in = 1.0 if dense_grouped(spec.width, spec.groups) else keep
    kernels += ops.channel_gated_conv2d_cpu("conv2", n, spec.width, spec.width, spec.h, spec.w, 3, spec.stride,
                                            spec.groups, g, keep_in, keep, dtype)
    if spec.se:
        kernels += _se_kernels("", n, spec.width, (n, spec.width, ho, wo), spec.se, dtype, sched)
    kernels += ops.channel_gated_conv2d_cpu("conv3", n, spec.width, spec.cout, ho, wo, 1, 1, 1, g,
                                            keep, 1.0, dtype)
    kernels.append(ops.residual_epilogue_cpu("conv3-add-relu", (n, spec.cout, ho, wo), dtype))
    return kernels


def _zero_branch_tail(spec: BlockSpec, n: int, dtype: str, fused_epilogue: bool) -> list[Kernel]:
    """Every channel skipped: the block's output is ReLU(residual), one element-wise pass (unless the
    residual is the block input, already non-negative, and nothing has to run)."""
    if not spec.downsample:
        return []
    return [_relu("relu-residual", (n, spec.cout, spec.ho, spec.wo), dtype)]


def layer_kernels(spec: BlockSpec, n: int, keep: float, dtype: str = "fp32",
                  sched: Schedule = FUSED) -> list[Kernel]:
    """Layer-skipping block: one gate per sample (pool -> 1 logit), the kept samples gathered, the dense
    branch run on them, and scatter-added onto their residual rows."""
    kept = _count(keep, n)
    ho, wo = spec.ho, spec.wo
    kernels = [ops.global_pool("gate-pool", n, spec.cin, spec.h, spec.w, dtype),
               ops.linear("gate-fc", n, spec.cin, 1, dtype),
               # the kept-sample list has a data-dependent length: one host synchronisation
               ops.elementwise("gate-indices", (n, 1, 1, 1), 1, 1, dtype, syncs=1)]
    kernels += _residual_kernels(spec, n, dtype)
    if kept == 0:
        return kernels + _zero_branch_tail(spec, n, dtype, sched.fuse_epilogue)
    if sched.cpu_kernels:  # the CPU kernels are flat, vectorised loops over whole samples
        kernels.append(ops.sample_gather_cpu(kept, spec.cin, spec.h, spec.w, dtype))
    else:
        kernels.append(ops.sample_gather(kept, spec.cin, spec.h, spec.w, dtype))
    kernels += dense_kernels(spec, kept, dtype, sched, residual_epilogue=False)
    row = spec.cout * ho * wo
    if sched.fuse_scatter and sched.cpu_kernels:
        kernels.append(ops.sample_scatter_add_cpu(kept, spec.cout, ho, wo, dtype))
    elif sched.fuse_scatter:
        kernels.append(ops.sample_scatter_add(kept, spec.cout, ho, wo, dtype))
    else:
        kernels.append(ops.gather_rows("residual-gather", kept, row, row, dtype))
        kernels.append(ops.elementwise("add", (kept, spec.cout, ho, wo), 2, 1, dtype))
        if not sched.fuse_epilogue:
            kernels.append(_relu("relu3", (kept, spec.cout, ho, wo), dtype))
        kernels.append(ops.scatter_rows("scatter", kept, row, row, dtype))
    return kernels


def block_kernels(spec: BlockSpec, mode: str, n: int, keep: float = 1.0, granularity: int = 1,
                  dtype: str = "fp32", sched: Schedule = FUSED) -> list[Kernel]:
    """The kernels ``mode`` launches for ``spec`` at keep ratio ``keep``."""
    if mode == "dense":
        return dense_kernels(spec, n, dtype, sched)
    if mode == "spatial":
        return spatial_kernels(spec, n, granularity, keep, dtype, sched)
    if mode == "channel":
        return channel_kernels(spec, n, granularity, keep, dtype, sched)
    if mode == "layer":
        return layer_kernels(spec, n, keep, dtype, sched)
    raise choice_error("mode", mode, MODES)


def predict_block(spec: BlockSpec, device: Device, mode: str, rate: float, granularity: int = 1,
                  batch: int = 1, dtype: str = "fp32", schedule: Schedule = FUSED,
                  rate_kind: str = "flops") -> BlockLatency:
    """Predicted dense and dynamic latency of one block on ``device``.

    ``granularity`` is S (spatial) or G (channel) and ignored by the other modes; ``rate`` is the FLOPs
    activation rate (or the keep ratio with ``rate_kind="keep"``).
    """
    if mode not in MODES:
        raise choice_error("mode", mode, MODES)
    if rate_kind not in RATE_KINDS:
        raise choice_error("rate_kind", rate_kind, RATE_KINDS)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}")
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity!r}")
    dtype = normalize_dtype(dtype)
    rate = check_rate(rate)
    if device.kind == "cpu" and not schedule.cpu_kernels:
        schedule = with_schedule(schedule, cpu_kernels=True)
    keep = rate if rate_kind == "keep" else keep_for_rate(spec, mode, rate, granularity)
    dense_costs = [price(k, device) for k in dense_kernels(spec, batch, dtype, schedule)]
    if mode == "dense":
        costs, dynamic = dense_costs, sum(c.latency for c in dense_costs)
    else:
        # Decisions come in whole units (patches, channel groups, samples).  A fractional expected count
        # (e.g. half a sample at batch 1) is priced as the mix of the two neighbouring whole counts, which
        # is the expected latency when the count varies from input to input.
        units = decision_units(spec, mode, batch, granularity)
        exact = keep * units
        lo, hi = math.floor(exact), math.ceil(exact)
        costs = [price(k, device) for k in block_kernels(spec, mode, batch, hi / units, granularity, dtype,
                                                          schedule)]
        dynamic = sum(c.latency for c in costs)
        if hi != lo:
            low = sum(price(k, device).latency for k in block_kernels(spec, mode, batch, lo / units, granularity,
                                                                       dtype, schedule))
            dynamic = low + (exact - lo) * (dynamic - low)
    return BlockLatency(block=spec.name, mode=mode, granularity=granularity if mode in ("spatial", "channel") else 1,
                        rate=rate, keep=keep, dense=sum(c.latency for c in dense_costs),
                        dynamic=dynamic, kernels=costs, dense_kernels=dense_costs)


def decision_units(spec: BlockSpec, mode: str, batch: int, granularity: int) -> int:
    """How many keep/skip decisions a block makes for a batch: patches, channel groups or samples."""
    if mode == "spatial":
        s = min(granularity, spec.ho)
        return batch * math.ceil(spec.ho / s) * math.ceil(spec.wo / s)
    if mode == "channel":
        return math.ceil(spec.width / granularity)
    return batch


def with_schedule(schedule: Schedule, **changes: Any) -> Schedule:
    """A copy of ``schedule`` with some fields changed (validates ``layout``)."""
    sched = replace(schedule, **changes)
    if sched.layout not in ops.LAYOUTS:
        raise choice_error("layout", sched.layout, ops.LAYOUTS)
    return sched
