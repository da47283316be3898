"""Latency predictor validation: which implementation each case runs, that the library cases compute the
block they claim to, and that the host prices the library's CPU kernels."""

import importlib

import pytest

from laudnet_ops.predictor.blocks import LIBRARY_CPU, BlockSpec, block_kernels, predict_block
from laudnet_ops.predictor.devices import get_device

# the package exports a ``validate`` function that shadows the submodule's attribute
val = importlib.import_module("laudnet_ops.predictor.validate")

LIB = val.library_ops()
needs_extension = pytest.mark.skipif(not all(val._has(LIB, m) for m in val.LIBRARY_NEEDS),
                                     reason="the compiled extension is not built")


@pytest.fixture(autouse=True)
def _no_saved_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUDNET_PREDICTOR_CALIBRATION_DIR", str(tmp_path / "cal"))


def _names(case):
    return {k.name for k in case.kernels}


# --- case tables ---------------------------------------------------------------------------------------

def test_without_the_extension_cases_fall_back_and_say_so():
    cases = val.validation_cases(quick=True, lib={})
    impl = {c.mode: c.impl for c in cases}
    assert impl == {"dense": val.TORCH, "layer": val.TORCH, "channel": val.TORCH, "spatial": val.STANDIN}
    spatial = next(c for c in cases if c.mode == "spatial")
    assert {"pad", "gather", "scatter"} <= _names(spatial)  # the stand-in's unfused steps are priced


@needs_extension
def test_with_the_extension_every_paradigm_runs_the_library():
    cases = val.validation_cases(quick=True)
    impl = {c.mode: c.impl for c in cases}
    assert impl == {"dense": val.TORCH, "layer": val.LIBRARY, "channel": val.LIBRARY, "spatial": val.LIBRARY}
    spatial = next(c for c in cases if c.mode == "spatial")
    assert {"masker-pool", "masked-conv1x1-gemm", "gather-conv-tiles", "gather-conv-gemm",
            "scatter-add"} <= _names(spatial)
    channel = next(c for c in cases if c.mode == "channel" and c.keep < 1)
    assert {"conv1-gemm", "conv2-pack", "conv3-gemm"} <= _names(channel)
    layer = next(c for c in cases if c.mode == "layer")
    assert {"sample-gather", "sample-scatter-add"} <= _names(layer)


@needs_extension
def test_validate_quick_measures_the_library_cases():
    rep = val.validate("cpu", calibration=False, quick=True, repeats=2, rounds=1, threads=1, show_progress=False)
    assert {r.impl for r in rep.results if r.mode != "dense"} == {val.LIBRARY}
    assert all(r.measured > 0 and r.predicted > 0 for r in rep.results)


# --- the library cases compute the block -------------------------------------------------------------

@needs_extension
def test_library_spatial_block_updates_only_the_kept_patches():
    import torch

    spec = BlockSpec("t", 16, 8, 16, 8, 8)
    dense = val._build_dense(spec, 2)("cpu")
    spatial = val._build_spatial(spec, 2, 4, 3, LIB)("cpu")  # 3 of the 8 4x4 patches
    with torch.no_grad():
        out_dense = dense().clone()
        x0 = val._tensor(2, 16, 8, 8, device="cpu", channels_last=True)
        out_spatial = spatial()
    same = (out_spatial - out_dense).abs().amax(dim=1) < 1e-5
    patches = same.view(2, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(2, 2, 2, 16).all(-1)
    assert int(patches.sum()) == 3
    untouched = (out_spatial == x0).all(dim=1)  # in place: the other patches are left as they were
    assert int(untouched.view(2, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(2, 2, 2, 16).all(-1).sum()) == 5


@needs_extension
def test_library_layer_block_runs_the_kept_samples_only():
    import torch

    spec = BlockSpec("t", 16, 8, 16, 6, 6)
    dense = val._build_dense(spec, 4)("cpu")
    layer = val._build_layer_library(spec, 4, 2, LIB)("cpu")
    with torch.no_grad():
        out_dense = dense().clone()
        out_layer = layer()
    kept = torch.zeros(4, dtype=torch.bool)
    kept[val._choice(4, 2, 1, "cpu")] = True
    torch.testing.assert_close(out_layer[kept], out_dense[kept])
    x0 = val._tensor(4, 16, 6, 6, device="cpu", channels_last=True)
    torch.testing.assert_close(out_layer[~kept], x0[~kept])  # in place: the others are left as they were


@needs_extension
def test_library_channel_block_matches_per_sample_masked_convs():
    import torch
    import torch.nn.functional as F

    spec, n, g, kept = BlockSpec("t", 16, 8, 16, 6, 6), 3, 2, 2
    out = val._build_channel_library(spec, n, g, kept, LIB)("cpu")()
    x = val._tensor(n, 16, 6, 6, device="cpu", channels_last=True)
    w1, w2, w3 = val._weights(spec, "cpu")
    gates = val._sample_gates(n, spec.width // g, kept, "cpu")
    assert (gates.sum(1) == kept).all() and len({tuple(r.tolist()) for r in gates}) > 1  # per sample
    m = gates.repeat_interleave(g, dim=1).float()[:, :, None, None]  # (n, width, 1, 1)
    y = F.conv2d(x, w1).relu() * m
    y = F.conv2d(y, w2, padding=1).relu() * m
    ref = (F.conv2d(y, w3) + x).relu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# --- the host prices the library's CPU kernels --------------------------------------------------------

def test_host_predictions_use_the_cpu_kernels():
    host = get_device("host", calibration=False)
    spec = BlockSpec("t", 256, 64, 256, 28, 28)
    names = {k.name for k in predict_block(spec, host, "spatial", 0.5, 2, 4, rate_kind="keep").kernels}
    assert {"masker-pool", "masked-conv1x1-gemm", "gather-conv-tiles", "gather-conv-gemm"} <= names
    names = {k.name for k in predict_block(spec, host, "channel", 0.5, 4, 4, rate_kind="keep").kernels}
    assert {"conv2-weight-slices", "conv2-pack", "conv2-gemm"} <= names
    gpu = {k.name for k in predict_block(spec, get_device("v100"), "spatial", 0.5, 2, 4, rate_kind="keep").kernels}
    assert "gather-conv" in gpu and "gather-conv-tiles" not in gpu


def test_cpu_gather_conv_rereads_the_halo_per_position_whatever_s():
    spec = BlockSpec("t", 256, 64, 256, 28, 28)

    def tiles(s):
        kernels = block_kernels(spec, "spatial", 4, 0.5, s, "fp32", LIBRARY_CPU)
        k = next(k for k in kernels if k.name == "gather-conv-tiles")
        return k.out[0] * k.out[3]  # copied elements: positions x 9 taps x Cin

    # equal kept area (half the map) copies the same 9 x Cin per output position for S = 1, 2, 4
    assert tiles(1) == tiles(2) == tiles(4) == 4 * 28 * 28 // 2 * 9 * 64


def test_cpu_channel_conv_writes_a_dense_output_and_spatial_conv1_computes_the_halo_only():
    spec = BlockSpec("t", 256, 64, 256, 28, 28)
    kernels = block_kernels(spec, "channel", 4, 0.25, 4, "fp32", LIBRARY_CPU)
    conv1 = next(k for k in kernels if k.name == "conv1-gemm")
    assert conv1.out_bytes == 4 * 64 * 28 * 28 * 4  # zeros of the inactive channels are written too
    assert conv1.out[1] == 16  # but only the active outputs are computed
    sp = block_kernels(spec, "spatial", 4, 0.25, 4, "fp32", LIBRARY_CPU)
    conv1 = next(k for k in sp if k.name == "masked-conv1x1-gemm")
    # A compact quarter of the 28x28 map is a 14x14 square; its 3x3 halo reads a 16x16 one.
    assert conv1.flops == 2 * 4 * 16 * 16 * 64 * 256
    zeros = next(k for k in sp if k.name == "masked-conv1x1-zeros")
    assert zeros.out_bytes == 4 * (28 * 28 - 16 * 16) * 64 * 4  # the other pixels' rows are zeroed


def test_blas_gemms_use_their_own_efficiency():
    from laudnet_ops.predictor import operators as ops
    from laudnet_ops.predictor.tiles import price

    host = get_device("host", calibration=False)
    k = ops.blas_gemm(512, 256, 64)
    same = price(k, host.replace(efficiency=host.efficiency.replace(blas=0.0)))
    slow = price(k, host.replace(efficiency=host.efficiency.replace(blas=host.efficiency.compute / 2)))
    assert slow.compute == pytest.approx(2 * same.compute)  # 0 = the convolutions' efficiency
