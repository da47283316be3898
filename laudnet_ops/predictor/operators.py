"""The operators of the library, each described as one :class:`~.tiles.Kernel` for the tile model.

Shapes follow PyTorch (N, C, H, W).  ``layout`` ("nchw" or "nhwc") decides how long the contiguous runs of
gathered / scattered data are: in NCHW a spatial patch row of one channel is contiguous (``S`` elements),
in NHWC a pixel's channels are (``C`` elements).  Those run lengths are what the access penalty of the tile
model charges for, so small patches (S) and small channel groups (G) pay for short scattered accesses.
"""

from __future__ import annotations

import math

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
