"""Operator-to-hardware mapping: tile search over output tile shapes (paper Appendix A).

A kernel's output is viewed as a 4-D space ``P x C x S1 x S2`` (samples or gathered patches, channels,
two spatial dimensions).  Every candidate tile ``T_P x T_C x T_S1 x T_S2`` (powers of two, clipped to the
dimension) is mapped to the PEs: ``n_tiles`` tiles run in ``ceil(n_tiles / num_pe)`` waves.  For each
candidate we price

* computation: the tile's FLOPs over the PE's arithmetic rate (FP32 FMA lanes x clock, or the matrix units
  for FP16/BF16 GEMMs), derated when the tile has fewer outputs than the PE has lanes;
* on-chip data movement: the bytes the tile pulls into the PE (its input window including the halo of a
  k x k kernel, its slice of the weights, its outputs) over the PE's share of on-chip bandwidth.  Small
  tiles re-read inputs and weights many times, which is what makes the search non-trivial;
* off-chip data movement: compulsory bytes, plus re-reads of what does not fit on chip, over DRAM
  bandwidth.  Gathered / scattered tensors pay for whole memory transactions and a per-segment cost, so
  short contiguous runs (small granularity S or G) waste bandwidth;

and keep the tile with the lowest latency (plus launch cost).  The geometry of the candidates does not
depend on the efficiency constants, so it is cached and calibration can re-price it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from .devices import Device, Efficiency


@dataclass(frozen=True)
class Kernel:
    """One kernel launch, described by what the tile model needs.

    ``out`` is the output space ``(P, C, S1, S2)``.  ``macs`` is the work per output element: multiply-adds
    for GEMM-like kernels (``gemm=True``), simple operations otherwise.  For GEMM-like kernels the input
    window of a tile is ``cin / groups`` channels per output-channel group times the ``kh x kw`` footprint;
    other kernels read ``n_inputs`` element streams of their own channels.  ``*_bytes`` are the compulsory
    DRAM bytes; ``seg_*`` the contiguous run length (bytes) of gathered input, gathered weights and
    scattered outputs (0 = streaming access).
    """

    name: str
    out: tuple[int, int, int, int]
    macs: float
    dtype_bytes: int = 4
    dtype: str = "fp32"
    gemm: bool = False
    cin: int = 0
    groups: int = 1
    kh: int = 1
    kw: int = 1
    stride: int = 1
    dilation: int = 1
    n_inputs: int = 1
    weight_per_sample: bool = False
    in_bytes: float = 0.0
    w_bytes: float = 0.0
    out_bytes: float = 0.0
    other_bytes: float = 0.0
    seg_in: float = 0.0
    seg_w: float = 0.0
    seg_out: float = 0.0
    epilogue_inputs: int = 0
    launches: int = 1
    syncs: int = 0
    patch_views: bool = False
    indexed: str = ""  # "gather" / "scatter": an index-driven copy (priced with that efficiency)
    blas: bool = False  # a GEMM through a BLAS library call (priced with ``Efficiency.blas`` when set)
    #: per output element, operations that form one dependent chain (a scalar float reduction the
    #: compiler may not reorder): each waits for the previous one, ``Device.chain_cycles`` apart
    serial_ops: float = 0.0

    @property
    def flops(self) -> float:
        p, c, s1, s2 = self.out
        return (2.0 if self.gemm else 1.0) * p * c * s1 * s2 * self.macs


@dataclass(frozen=True)
class KernelCost:
    """The priced best tile of one kernel.  Times are seconds."""

    name: str
    latency: float
    tile: tuple[int, int, int, int]
    view: tuple[int, int, int, int]
    n_tiles: int
    waves: int
    compute: float
    onchip: float
    dram: float
    launch: float
    flops: float
    dram_bytes: float


def _pow2_upto(n: int) -> np.ndarray:
    """Powers of two up to the next power of two >= n.  Tiles larger than the dimension are clipped to it,
    so the candidate set never shrinks as a dimension grows: latency is then monotone in P, C, S."""
    top = max(1, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return 1 << np.arange(int(math.log2(top)) + 1)


@dataclass(frozen=True)
class _Geometry:
    """Per-candidate quantities that depend only on the kernel and the device's PE layout."""

    tiles: np.ndarray  # (n, 4) tile shapes
    views: np.ndarray  # (n, 4) the output view each tile belongs to
    n_tiles: np.ndarray
    waves: np.ndarray
    flops_tile: np.ndarray
    util: np.ndarray
    in_tile: np.ndarray
    w_tile: np.ndarray
    out_tile: np.ndarray
    row: np.ndarray  # output positions of a tile along a row (T_S2, clipped)


def _views(kernel: Kernel) -> list[tuple[int, int, int, int]]:
    """The output spaces a kernel may be tiled over.  A dense convolution may also treat its output as a
    grid of s x s patches (a strict superset of what a gathered patch kernel can do), so a sparse kernel at
    full density is never cheaper than its dense counterpart just because it searched a different space."""
    views = [kernel.out]
    if kernel.patch_views:
        p, c, s1, s2 = kernel.out
        s = 1
        while s < max(s1, s2):
            if s1 % s == 0 and s2 % s == 0:
                views.append((p * (s1 // s) * (s2 // s), c, s, s))
            s *= 2
        views = list(dict.fromkeys(views))
    return views


@lru_cache(maxsize=4096)
def _geometry(kernel: Kernel, num_pe: int, lanes: int, max_tile_outputs: int,
              per_image_weights: bool = False) -> _Geometry:
    """``per_image_weights``: a tile spanning several images (P) streams the weights once per image, as
    CPU convolutions do (oneDNN's and the library's loops put the image outermost), so tiles cannot share
    a weight load across images; the GPU implicit GEMM spans images freely."""
    parts = []
    b = kernel.dtype_bytes
    for view in _views(kernel):
        p, c, s1, s2 = view
        tp, tc, t1, t2 = np.meshgrid(_pow2_upto(p), _pow2_upto(c), _pow2_upto(s1), _pow2_upto(s2),
                                     indexing="ij")
        tp, tc, t1, t2 = (a.ravel().astype(np.float64) for a in (tp, tc, t1, t2))
        # clip to the dimension: a tile larger than the dimension covers all of it
        ep, ec, e1, e2 = np.minimum(tp, p), np.minimum(tc, c), np.minimum(t1, s1), np.minimum(t2, s2)
        outputs = ep * ec * e1 * e2
        keep = outputs <= max_tile_outputs
        if not keep.any():  # every tile too large: fall back to the smallest one
            keep = outputs == outputs.min()
        tp, tc, t1, t2, ep, ec, e1, e2, outputs = (a[keep] for a in (tp, tc, t1, t2, ep, ec, e1, e2, outputs))
        n_tiles = (np.ceil(p / tp) * np.ceil(c / tc) * np.ceil(s1 / t1) * np.ceil(s2 / t2))
        waves = np.ceil(n_tiles / num_pe)
        # input window of a tile: the strided footprint of its outputs plus the kernel halo
        in1 = (e1 - 1) * kernel.stride + (kernel.kh - 1) * kernel.dilation + 1
        in2 = (e2 - 1) * kernel.stride + (kernel.kw - 1) * kernel.dilation + 1
        if kernel.gemm:
            cin_g = kernel.cin / kernel.groups
            cout_g = c / kernel.groups
            # channels of input a tile of tc output channels needs: all of them for a dense conv,
            # only its groups' for a grouped one
            cin_t = np.minimum(kernel.cin, np.ceil(ec / cout_g) * cin_g) if kernel.groups > 1 else kernel.cin
            in_tile = ep * cin_t * in1 * in2 * b
            per_image = kernel.weight_per_sample or per_image_weights
            w_tile = ec * cin_g * kernel.kh * kernel.kw * b * (ep if per_image else 1.0)
            flops_tile = 2.0 * outputs * kernel.macs
        else:
            in_tile = ep * ec * in1 * in2 * b * kernel.n_inputs
            w_tile = np.zeros_like(outputs)
            flops_tile = outputs * kernel.macs
        out_tile = outputs * b * (1 + kernel.epilogue_inputs)
        util = np.minimum(1.0, outputs / lanes)
        view_arr = np.tile(np.asarray(view, dtype=np.float64), (len(outputs), 1))
        parts.append((np.stack([tp, tc, t1, t2], axis=1), view_arr, n_tiles, waves, flops_tile, util,
                      np.broadcast_to(in_tile, outputs.shape).astype(np.float64), w_tile, out_tile, e2))
    cat = [np.concatenate([part[i] for part in parts]) for i in range(10)]
    return _Geometry(*cat)


def access_penalty(segment: float, device: Device) -> float:
    """Bytes moved per useful byte when data comes in contiguous runs of ``segment`` bytes: whole
    transactions are fetched, and every run pays ``segment_bytes`` of access latency.  1 for streaming."""
    if segment <= 0:
        return 1.0
    txn = device.txn_bytes
    moved = math.ceil(segment / txn) * txn + device.efficiency.segment_bytes
    return moved / segment


def combine(compute: np.ndarray | float, memory: np.ndarray | float, overlap: float) -> np.ndarray | float:
    """Latency of work that computes for ``compute`` and moves data for ``memory`` seconds:
    their sum when nothing overlaps (overlap = 0), their maximum when everything does (overlap = 1)."""
    return np.maximum(compute, memory) + (1.0 - overlap) * np.minimum(compute, memory)


def pe_rate(kernel: Kernel, device: Device) -> float:
    """Operations per second one PE sustains on this kernel (FLOP/s for GEMMs, simple ops/s otherwise)."""
    eff = device.efficiency
    clock = device.clock_mhz * 1e6
    simd = float(device.simd_factor.get(kernel.dtype, 1.0))
    if kernel.gemm:
        matrix = float(device.matrix_tflops.get(kernel.dtype, 0.0))
        if matrix > 0:  # tensor cores / matrix instructions for FP16 and BF16 GEMMs
            return matrix * 1e12 / device.num_pe * eff.matrix
        fraction = eff.blas if (kernel.blas and eff.blas > 0) else eff.compute
        return device.fp32_per_pe * 2.0 * clock * simd * fraction
    fraction = {"gather": eff.index, "scatter": eff.scatter}.get(kernel.indexed, eff.simple)
    return device.fp32_per_pe * clock * simd * fraction


def price(kernel: Kernel, device: Device) -> KernelCost:
    """Search the tile space of ``kernel`` on ``device`` and return the cheapest tile's cost."""
    return _price_cached(kernel, device)


@lru_cache(maxsize=65536)
def _price_cached(kernel: Kernel, device: Device) -> KernelCost:
    eff: Efficiency = device.efficiency
    geo = _geometry(kernel, device.num_pe, device.fp32_per_pe, device.max_tile_outputs, device.kind == "cpu")
    dram_bw = device.dram_gbs * 1e9 * eff.memory
    pe_onchip_bw = dram_bw * eff.onchip / device.num_pe
    pen_in = access_penalty(kernel.seg_in, device)
    pen_w = access_penalty(kernel.seg_w, device)
    pen_out = access_penalty(kernel.seg_out, device)

    rate = pe_rate(kernel, device)
    if kernel.macs <= 0:
        t_compute_tile = np.zeros_like(geo.util)
    elif kernel.gemm:
        # besides its MACs every output costs ``output_ops``; tiles narrower than the PE's row block
        # leave part of its lanes idle
        row_util = np.minimum(1.0, geo.row / max(eff.row_block, 1.0))
        work = geo.flops_tile * (1.0 + eff.output_ops / kernel.macs)
        t_compute_tile = work / (rate * geo.util * row_util)
    else:
        t_compute_tile = geo.flops_tile / (rate * geo.util)
    tile_bytes = geo.in_tile * pen_in + geo.w_tile * pen_w + geo.out_tile * pen_out
    t_move_tile = tile_bytes / pe_onchip_bw
    t_onchip = geo.waves * combine(t_compute_tile, t_move_tile, eff.overlap)

    # off-chip: compulsory bytes, plus the share of on-chip re-reads that misses a too-small cache
    unique_read = kernel.in_bytes + kernel.w_bytes
    working_set = unique_read + kernel.out_bytes + kernel.other_bytes
    spill = min(1.0, max(0.0, 1.0 - device.onchip_bytes / working_set)) if working_set > 0 else 0.0
    rereads = np.maximum(0.0, geo.n_tiles * (geo.in_tile + geo.w_tile) - unique_read) * spill
    compulsory = (kernel.in_bytes * pen_in + kernel.w_bytes * pen_w + kernel.out_bytes * pen_out
                  + kernel.other_bytes)
    dram_bytes = compulsory + rereads
    t_dram = dram_bytes / dram_bw

    launch = kernel.launches * eff.launch_us * 1e-6 + kernel.syncs * eff.sync_us * 1e-6
    p, c, s1, s2 = kernel.out
    chains = math.ceil(p * c * s1 * s2 / device.num_pe) * kernel.serial_ops * device.chain_cycles / clock_hz(device)
    total = launch + combine(t_onchip, t_dram, eff.overlap) + chains
    best = int(np.argmin(total))
    t_compute_total = float(geo.waves[best] * t_compute_tile[best])
    return KernelCost(
        name=kernel.name, latency=float(total[best]),
        tile=tuple(int(x) for x in geo.tiles[best]), view=tuple(int(x) for x in geo.views[best]),
        n_tiles=int(geo.n_tiles[best]), waves=int(geo.waves[best]), compute=t_compute_total,
        onchip=float(geo.waves[best] * t_move_tile[best]), dram=float(t_dram[best]), launch=launch,
        flops=kernel.flops, dram_bytes=float(dram_bytes[best]),
    )


def clock_hz(device: Device) -> float:
    return device.clock_mhz * 1e6


def clear_caches() -> None:
    """Drop cached tile geometry and prices (useful in long sessions that create many devices)."""
    _geometry.cache_clear()
    _price_cached.cache_clear()


def best_tile(kernel: Kernel, device: Device) -> Optional[tuple[int, int, int, int]]:
    """The tile shape the search keeps for ``kernel`` on ``device``."""
    return price(kernel, device).tile
