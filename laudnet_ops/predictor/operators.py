"""The operators of the library, each described as one :class:`~.tiles.Kernel` for the tile model.

Shapes follow PyTorch (N, C, H, W).  ``layout`` ("nchw" or "nhwc") decides how long the contiguous runs of
gathered / scattered data are: in NCHW a spatial patch row of one channel is contiguous (``S`` elements),
in NHWC a pixel's channels are (``C`` elements).  Those run lengths are what the access penalty of the tile
model charges for, so small patches (S) and small channel groups (G) pay for short scattered accesses.
"""

from __future__ import annotations

import dataclasses
import math

from .._cpu_dispatch import dense_grouped
from ._util import DTYPE_BYTES, choice_error
from .tiles import Kernel

LAYOUTS = ("nchw", "nhwc")
INDEX_BYTES = 4  # int32 indices


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise choice_error("layout", layout, LAYOUTS)
    return layout


def conv_out(size: int, k: int, stride: int, padding: int | None = None, dilation: int = 1) -> int:
    """Output size of a convolution / pooling window (padding defaults to 'same' for odd kernels)."""
    pad = (k // 2) * dilation if padding is None else padding
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def conv2d(name: str, n: int, cin: int, cout: int, h: int, w: int, k: int = 1, stride: int = 1,
           groups: int = 1, dtype: str = "fp32", epilogue_inputs: int = 0, padding: int | None = None) -> Kernel:
    """A dense convolution (BN folded, activation and ``epilogue_inputs`` residual reads in its epilogue)."""
    b = DTYPE_BYTES[dtype]
    ho, wo = conv_out(h, k, stride, padding), conv_out(w, k, stride, padding)
    out_bytes = n * cout * ho * wo * b
    return Kernel(
        name=name, out=(n, cout, ho, wo), macs=cin / groups * k * k, dtype_bytes=b, dtype=dtype, gemm=True,
        cin=cin, groups=groups, kh=k, kw=k, stride=stride, in_bytes=n * cin * h * w * b,
        w_bytes=cout * cin / groups * k * k * b, out_bytes=out_bytes, other_bytes=epilogue_inputs * out_bytes,
        epilogue_inputs=epilogue_inputs, patch_views=True,
    )


def linear(name: str, n: int, cin: int, cout: int, dtype: str = "fp32", seg_w: float = 0.0,
           seg_in: float = 0.0) -> Kernel:
    """A fully connected layer (masker MLPs, SE, classifier); ``seg_*`` when its rows/columns are gathered."""
    b = DTYPE_BYTES[dtype]
    return Kernel(name=name, out=(n, cout, 1, 1), macs=cin, dtype_bytes=b, dtype=dtype, gemm=True, cin=cin,
                  in_bytes=n * cin * b, w_bytes=cout * cin * b, out_bytes=n * cout * b, seg_w=seg_w,
                  seg_in=seg_in)


def pool(name: str, n: int, c: int, h: int, w: int, k: int, stride: int, dtype: str = "fp32",
         padding: int = 0) -> Kernel:
    """Average / max pooling with a k x k window (``k = h = w`` and stride 1 for global pooling)."""
    b = DTYPE_BYTES[dtype]
    ho, wo = conv_out(h, k, stride, padding), conv_out(w, k, stride, padding)
    return Kernel(name=name, out=(n, c, ho, wo), macs=k * k, dtype_bytes=b, dtype=dtype, kh=k, kw=k,
                  stride=stride, in_bytes=n * c * h * w * b, out_bytes=n * c * ho * wo * b)


def global_pool(name: str, n: int, c: int, h: int, w: int, dtype: str = "fp32") -> Kernel:
    b = DTYPE_BYTES[dtype]
    return Kernel(name=name, out=(n, c, 1, 1), macs=h * w, dtype_bytes=b, dtype=dtype, kh=h, kw=w,
                  in_bytes=n * c * h * w * b, out_bytes=n * c * b)


def elementwise(name: str, shape: tuple[int, int, int, int], n_inputs: int = 1, ops: float = 1.0,
                dtype: str = "fp32", elem_bytes: int | None = None, syncs: int = 0) -> Kernel:
    """An element-wise kernel reading ``n_inputs`` tensors of ``shape`` and writing one (ReLU, add, scale,
    fill with ``n_inputs=0``, threshold)."""
    b = DTYPE_BYTES[dtype] if elem_bytes is None else elem_bytes
    numel = math.prod(shape)
    return Kernel(name=name, out=shape, macs=ops, dtype_bytes=b, dtype=dtype, n_inputs=n_inputs,
                  in_bytes=n_inputs * numel * b, out_bytes=numel * b, syncs=syncs)


def gather_rows(name: str, rows: int, row_elems: int, segment_elems: int, dtype: str = "fp32") -> Kernel:
    """An index_select-style copy of ``rows`` rows of ``row_elems`` elements, read in contiguous runs of
    ``segment_elems`` (sample gather, weight gather, unfused patch gather) into a packed buffer."""
    b = DTYPE_BYTES[dtype]
    return Kernel(name=name, out=(rows, 1, 1, row_elems), macs=1, dtype_bytes=b, dtype=dtype,
                  in_bytes=rows * row_elems * b, out_bytes=rows * row_elems * b,
                  other_bytes=rows * INDEX_BYTES, seg_in=segment_elems * b, indexed="gather")


def scatter_rows(name: str, rows: int, row_elems: int, segment_elems: int, dtype: str = "fp32",
                 accumulate: bool = False, activation: bool = False) -> Kernel:
    """An index_copy / index_add-style write of packed rows into scattered runs of ``segment_elems``
    elements of a larger tensor; ``accumulate`` also reads the destination (scatter-add)."""
    b = DTYPE_BYTES[dtype]
    numel = rows * row_elems
    return Kernel(name=name, out=(rows, 1, 1, row_elems), macs=1 + int(accumulate) + int(activation),
                  dtype_bytes=b, dtype=dtype, n_inputs=1, in_bytes=numel * b,
                  out_bytes=numel * b * (2 if accumulate else 1), other_bytes=rows * INDEX_BYTES,
                  seg_out=segment_elems * b, epilogue_inputs=int(accumulate), indexed="scatter")


# --- the library's dynamic operators ------------------------------------------------------------------

def masker_conv1x1(n: int, cin: int, cout: int, h: int, w: int, dtype: str = "fp32") -> Kernel:
    """Fused spatial masker + first 1x1 conv: one conv with ``cout + 1`` outputs sharing one read of x;
    the extra channel's logits are pooled to the patch grid in the epilogue (paper Sec. 3.4)."""
    return conv2d("masker-conv1x1", n, cin, cout + 1, h, w, 1, 1, dtype=dtype)


def patch_indices(n: int, hp: int, wp: int, kept: int) -> Kernel:
    """Mask (N, Hp, Wp) bool -> int32 (P, 3) list of kept patches; its length depends on the data, so the
    host must learn P before launching the gather (one synchronisation)."""
    numel = n * hp * wp
    return Kernel(name="patch-indices", out=(n, 1, hp, wp), macs=1, dtype_bytes=1, dtype="fp32",
                  in_bytes=numel, out_bytes=kept * 3 * INDEX_BYTES, syncs=1)


def gather_conv2d(patches: int, cin: int, cout: int, patch: int, k: int, stride: int, groups: int,
                  src_hw: tuple[int, int], n: int, dtype: str = "fp32", layout: str = "nchw") -> Kernel:
    """Gather-conv: each of ``patches`` output patches (S x S) reads its input window with the k x k halo
    straight from the source map (gather fused into the loads); output packed (P, Cout, S, S)."""
    _check_layout(layout)
    b = DTYPE_BYTES[dtype]
    window = (patch - 1) * stride + k
    full = n * cin * src_hw[0] * src_hw[1] * b
    # neighbouring kept patches share halo rows; at the DRAM level at most the whole map is read
    in_bytes = min(full, patches * cin * window * window * b)
    segment = window if layout == "nchw" else window * cin
    return Kernel(
        name="gather-conv", out=(patches, cout, patch, patch), macs=cin / groups * k * k, dtype_bytes=b,
        dtype=dtype, gemm=True, cin=cin, groups=groups, kh=k, kw=k, stride=stride, in_bytes=in_bytes,
        w_bytes=cout * cin / groups * k * k * b, out_bytes=patches * cout * patch * patch * b,
        other_bytes=patches * 3 * INDEX_BYTES, seg_in=segment * b,
    )


def scatter_add(patches: int, c: int, patch: int, dtype: str = "fp32", layout: str = "nchw",
                activation: bool = True) -> Kernel:
    """Scatter-add: packed (P, C, S, S) added onto the residual at the patches' places, activation fused;
    reads the packed block and the residual patches, writes the residual patches."""
    _check_layout(layout)
    b = DTYPE_BYTES[dtype]
    numel = patches * c * patch * patch
    segment = patch if layout == "nchw" else patch * c
    return Kernel(name="scatter-add", out=(patches, c, patch, patch), macs=1 + int(activation),
                  dtype_bytes=b, dtype=dtype, n_inputs=1, in_bytes=numel * b, out_bytes=2 * numel * b,
                  other_bytes=patches * 3 * INDEX_BYTES, seg_out=segment * b, epilogue_inputs=1)


def channel_gated_conv2d(name: str, n: int, cin_kept: int, cout_kept: int, h: int, w: int, k: int,
                         stride: int, groups: int, group_size: int, in_gated: bool, out_gated: bool,
                         full_weight_elems: float, dtype: str = "fp32", layout: str = "nchw",
                         shared_gates: bool = False, epilogue_inputs: int = 0) -> Kernel:
    """Channel-gated conv: per sample, only the kept groups of G input / output channels are computed.
    The weights of the kept channels are gathered inside the kernel (runs of G x k x k elements when the
    input channels are gated); with per-sample gates every sample needs its own weight slice, so weights
    are not shared across the batch.  Output channels are written compactly (only kept ones)."""
    _check_layout(layout)
    b = DTYPE_BYTES[dtype]
    ho, wo = conv_out(h, k, stride), conv_out(w, k, stride)
    w_row = cin_kept / groups * k * k
    # Weight layout puts a gated dimension outermost so that its gather reads long runs: OIHW when the
    # outputs are gated (a whole filter per kept output channel; with inputs gated too, runs of G x k x k
    # inside each filter), IOHW when only the inputs are (G whole input-channel slices of all filters).
    if in_gated and out_gated:
        seg_w = group_size * k * k
    elif in_gated:
        seg_w = group_size * cout_kept * k * k
    else:
        seg_w = w_row
    if layout == "nchw":
        seg_in = group_size * h * w if in_gated else 0
        seg_out = group_size * ho * wo if out_gated else 0
    else:
        seg_in = group_size if in_gated else 0
        seg_out = group_size if out_gated else 0
    out_bytes = n * cout_kept * ho * wo * b
    return Kernel(
        name=name, out=(n, max(cout_kept, 1), ho, wo), macs=w_row, dtype_bytes=b, dtype=dtype, gemm=True,
        cin=max(cin_kept, 1), groups=groups, kh=k, kw=k, stride=stride, weight_per_sample=not shared_gates,
        # DRAM sees each weight once: the union of the samples' kept slices (at most the whole weight);
        # the per-sample re-reads happen on chip (``weight_per_sample`` in the tile model)
        in_bytes=n * cin_kept * h * w * b, w_bytes=min(full_weight_elems, n * cout_kept * w_row) * b,
        out_bytes=out_bytes,
        other_bytes=epilogue_inputs * out_bytes, seg_in=seg_in * b, seg_w=seg_w * b, seg_out=seg_out * b,
        epilogue_inputs=epilogue_inputs,
    )


def sample_gather(kept: int, c: int, h: int, w: int, dtype: str = "fp32") -> Kernel:
    """Layer skipping: copy the kept samples (whole C x H x W images, contiguous) into a packed batch."""
    return gather_rows("sample-gather", kept, c * h * w, c * h * w, dtype)


def sample_scatter_add(kept: int, c: int, h: int, w: int, dtype: str = "fp32",
                       activation: bool = True) -> Kernel:
    """Layer skipping: add the kept samples' block output onto their residual rows (activation fused)."""
    return scatter_rows("sample-scatter-add", kept, c * h * w, c * h * w, dtype, accumulate=True,
                        activation=activation)


# --- the library's CPU kernels, as they actually run (csrc/cpu/*.cpp) -----------------------------------------
#
# The CPU kernels differ from the GPU picture above in what they move and compute, so the host prices
# these lists instead (``Schedule.cpu_kernels``).  Work inside one op call is priced with ``launches=0``
# parts: only the op itself pays the dispatch cost.

def _part(kernel: Kernel, **changes) -> Kernel:
    """A piece of work inside an op call (no dispatch of its own)."""
    return dataclasses.replace(kernel, launches=0, **changes)


def residual_epilogue_cpu(name: str, shape: tuple[int, int, int, int], dtype: str = "fp32") -> Kernel:
    """The residual add and ReLU fused into a CPU conv's epilogue (channel_gated_conv2d_add_): one more
    read of the residual map and two operations per output, no pass or dispatch of its own (the
    output write is the conv's)."""
    return _part(elementwise(name, shape, 1, 2, dtype), out_bytes=0.0)


def blas_gemm(m: int, k: int, n: int, dtype: str = "fp32") -> Kernel:
    """A plain BLAS GEMM ``(m x k) . (k x n)`` (torch.mm), priced like the library's per-sample GEMMs."""
    b = DTYPE_BYTES[dtype]
    return dataclasses.replace(_gemm("mm", 1, n, m, k, dtype, in_bytes=m * k * b, w_bytes=k * n * b,
                                     out_bytes=m * n * b), blas=True)


def _gemm(name: str, rows_p: int, cout: int, rows: int, k_elems: float, dtype: str, in_bytes: float,
          w_bytes: float, out_bytes: float, weight_per_sample: bool = False) -> Kernel:
    """A row-major GEMM ``(rows_p x rows) x k_elems . k_elems x cout`` over an already packed A operand:
    output space ``(rows_p, cout, 1, rows)`` (``rows`` output positions per item, flattened, as the
    micro-kernels see them)."""
    b = DTYPE_BYTES[dtype]
    return Kernel(name=name, out=(rows_p, cout, 1, rows), macs=k_elems, dtype_bytes=b, dtype=dtype, gemm=True,
                  cin=max(1, int(round(k_elems))), in_bytes=in_bytes, w_bytes=w_bytes, out_bytes=out_bytes,
                  weight_per_sample=weight_per_sample)


def masked_conv1x1_cpu(n: int, cin: int, cout: int, h: int, w: int, read: float, dtype: str = "fp32",
                       patch: int = 1, stride: int = 1) -> list[Kernel]:
    """The CPU spatial block's masker and conv1 (channels_last): the masker pools x to the patch grid (one
    read of x) and projects each cell; then masked_conv1x1 gathers the ``read`` fraction of pixel rows (the
    kept patches' 3x3 halo) into per-thread buffers, one GEMM writes them (bias + ReLU from L1), and the
    other pixels' rows are zeroed."""
    b = DTYPE_BYTES[dtype]
    window = patch * stride
    hq, wq = math.ceil(h / window), math.ceil(w / window)
    rows = max(0, int(round(read * n * h * w)))
    gather = _part(gather_rows("masked-conv1x1-rows", rows, cin, cin, dtype), other_bytes=0.0)
    return [pool("masker-pool", n, cin, h, w, window, window, dtype),
            conv2d("masker-conv", n, cin, 1, hq, wq, 1, 1, dtype=dtype),
            dataclasses.replace(gather, launches=1),
            _gemm("masked-conv1x1-gemm", 1, cout, rows, cin, dtype, in_bytes=0.0, w_bytes=cin * cout * b,
                  out_bytes=rows * cout * b),
            _part(elementwise("masked-conv1x1-zeros", (n * h * w - rows, 1, 1, cout), 0, 0, dtype))]


def gather_conv2d_cpu(patches: int, cin: int, cout: int, patch: int, k: int, stride: int, groups: int,
                      src_hw: tuple[int, int], n: int, dtype: str = "fp32") -> list[Kernel]:
    """gather_conv2d on the CPU: the weight is reordered once per call; chunks of ~256 output positions
    copy their receptive fields (k*k runs of Cin/groups channels per position: the halo is re-read for
    every position, whatever S is) into an L2-sized tile buffer, and one GEMM per group writes the packed
    output (ReLU in its epilogue).  DRAM sees the map's needed windows once."""
    b = DTYPE_BYTES[dtype]
    rows = patches * patch * patch
    window = (patch - 1) * stride + k
    full = n * cin * src_hw[0] * src_hw[1] * b
    unique_in = min(full, patches * cin * window * window * b)
    taps = k * k
    cg = cin // groups
    w_elems = cout * cg * taps
    gather = Kernel(name="gather-conv-tiles", out=(rows * taps, 1, 1, cin), macs=1, dtype_bytes=b, dtype=dtype,
                    in_bytes=unique_in, other_bytes=patches * 3 * INDEX_BYTES, seg_in=cg * b,
                    indexed="gather", launches=0)
    return [
        _part(elementwise("gather-conv-weight", (1, 1, 1, w_elems), 1, 1, dtype)),
        gather,
        dataclasses.replace(_gemm("gather-conv-gemm", groups, cout // groups, rows, cg * taps, dtype,
                                  in_bytes=0.0, w_bytes=w_elems * b, out_bytes=rows * cout * b), launches=1),
    ]


def _run_elems(group_size: int, keep: float, total: int) -> float:
    """Mean length (elements) of a run of consecutive kept channels when groups of ``group_size`` are kept
    independently with probability ``keep``: adjacent kept groups merge into one copy."""
    if keep >= 1.0:
        return float(total)
    return min(float(total), group_size / max(1e-6, 1.0 - keep))


def channel_gated_conv2d_cpu(name: str, n: int, cin: int, cout: int, h: int, w: int, k: int, stride: int,
                             groups: int, group_size: int, keep_in: float, keep_out: float,
                             dtype: str = "fp32", padding: int | None = None) -> list[Kernel]:
    """channel_gated_conv2d on the CPU (channels_last), per sample: the weight is reordered once per call;
    each sample gathers its weight slice (active outputs x active input runs per tap); each tile of
    output pixels packs the active input channel runs (float32 kernels wider than a pixel: a band of
    the padded input rows, each pixel once, and GEMMs over virtual rows Vw = ceil((w + 2p) / stride)
    pixels long; other dtypes im2col; a 1x1 conv reading every input channel nothing: the GEMM reads x
    directly); one MKL GEMM per (sample, tile) computes the active outputs; with
    some outputs off the epilogue writes every output channel of y (zeros for the inactive ones), so
    the output bytes stay dense. Narrow grouped convolutions run dense instead, between gating passes."""
    b = DTYPE_BYTES[dtype]
    ho, wo = conv_out(h, k, stride, padding), conv_out(w, k, stride, padding)
    if dense_grouped(cout, groups):  # the dense grouped convolution, then the gates
        kernels = []
        if keep_in < 1.0:
            kernels.append(_part(elementwise(f"{name}-gate-input", (n, cin, h, w), 1, 1, dtype)))
        kernels.append(conv2d(f"{name}-dense-grouped", n, cin, cout, h, w, k, stride, groups, dtype,
                              padding=padding))
        if keep_out < 1.0:
            kernels.append(_part(elementwise(f"{name}-gate-output", (n, cout, ho, wo), 1, 1, dtype)))
        return kernels
    cin_k = min(cin, max(0, int(round(keep_in * cin))))
    cout_k = min(cout, max(0, int(round(keep_out * cout))))
    taps = k * k
    cin_g, cin_kg = cin // groups, cin_k // groups
    w_full = cout * cin_g * taps
    kernels = [_part(elementwise(f"{name}-weight-reorder", (1, 1, 1, w_full), 1, 1, dtype))]
    if cout_k == 0 or cin_k == 0:  # nothing to multiply: y is zeros (or the bias, activated)
        return kernels + [dataclasses.replace(elementwise(f"{name}-zeros", (n, cout, ho, wo), 0, 1, dtype),
                                              launches=1)]
    full_in = cin_k == cin
    run = _run_elems(group_size, keep_in, cin_g) * b
    if not (full_in and cout_k == cout):  # per-sample weight slices
        kernels.append(_part(Kernel(name=f"{name}-weight-slices", out=(n, 1, 1, cout_k * cin_kg * taps),
                                    macs=1, dtype_bytes=b, dtype=dtype, in_bytes=w_full * b,
                                    seg_in=run, indexed="gather")))
    map_bytes = n * cin * h * w * b
    pointwise = k == 1 and stride == 1 and (padding or 0) == 0
    pad = k // 2 if padding is None else padding
    banded = k > 1 and dtype == "fp32"  # tile_band in csrc/cpu/channel_gated_conv2d.cpp
    gemm_row = -(-(w + 2 * pad) // stride) if banded else wo  # output pixels computed per row
    if pointwise and full_in:
        gemm_in = map_bytes  # the GEMM reads x in place
    else:
        # packed runs of active channels; DRAM reads whole cache lines of every touched pixel
        pen = access_penalty_bytes(run)
        packed_pixels = n * ho * wo * taps
        if banded:
            packed_pixels = n * (h + 2 * pad) * stride * gemm_row
        kernels.append(Kernel(name=f"{name}-pack", out=(packed_pixels, 1, 1, cin_k), macs=1,
                              dtype_bytes=b, dtype=dtype, in_bytes=min(n * cin_k * h * w * b, map_bytes / pen),
                              seg_in=run, indexed="gather", launches=0))
        gemm_in = 0.0
    out_dense = n * cout * ho * wo * b
    kernels.append(dataclasses.replace(
        _gemm(f"{name}-gemm", n, cout_k, ho * gemm_row, cin_kg * taps, dtype, in_bytes=gemm_in,
              w_bytes=w_full * b, out_bytes=out_dense, weight_per_sample=True), launches=1, blas=True))
    if cout_k < cout:  # epilogue from the GEMM's buffer into y, zeros included, one run of kept
        # output channels (and one zero fill) at a time
        out_run = _run_elems(group_size, keep_out, cout // groups) * b
        kernels.append(_part(elementwise(f"{name}-epilogue", (n, cout, ho, wo), 1, 1, dtype), in_bytes=0.0,
                             out_bytes=0.0, seg_out=out_run))
    return kernels


def access_penalty_bytes(run_bytes: float, line: int = 64) -> float:
    """Bytes of whole cache lines fetched per useful byte for runs of ``run_bytes`` (capped by the row)."""
    if run_bytes <= 0:
        return 1.0
    return max(1.0, math.ceil(run_bytes / line) * line / run_bytes)


def sample_gather_cpu(kept: int, c: int, h: int, w: int, dtype: str = "fp32") -> Kernel:
    """sample_gather on the CPU: one flat parallel loop of contiguous copies of whole samples (a
    streaming copy, not an index_select)."""
    return elementwise("sample-gather", (kept, c, h, w), 1, 1, dtype)


def sample_scatter_add_cpu(kept: int, c: int, h: int, w: int, dtype: str = "fp32") -> Kernel:
    """sample_scatter_add_ on the CPU: a streaming add + ReLU over the kept samples' residual rows."""
    return elementwise("sample-scatter-add", (kept, c, h, w), 2, 2, dtype)
