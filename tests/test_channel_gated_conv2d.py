import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, TOL, device_dtype_params, random_mask, to_layout

# Half-precision convs on CUDA: the reference runs in float64, so allow for float16/bfloat16
# inputs summed over Cin*KH*KW products.
CONV_TOL = dict(TOL)
CONV_TOL[torch.float16] = dict(atol=1e-2, rtol=1e-2)
CONV_TOL[torch.bfloat16] = dict(atol=8e-2, rtol=5e-2)


def make_case(N, Cin, Cout, H, W, K, G, keep_in, keep_out, groups=1, bias=True, dtype=torch.float32,
              device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(Cout, Cin // groups, K, K, generator=gen, dtype=torch.float64) / (Cin // groups * K * K) ** 0.5
    b = torch.randn(Cout, generator=gen, dtype=torch.float64) if bias else None
    gin = random_mask((N, Cin // G), keep_in, gen) if keep_in is not None else None
    gout = random_mask((N, Cout // G), keep_out, gen) if keep_out is not None else None
    move = lambda t: None if t is None else t.to(device, dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return move(x), move(w), move(b), move(gin), move(gout)


def run_both(case, G, activation="relu", **conv):
    x, w, b, gin, gout = case
    got = laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, activation=activation, **conv)
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    want = reference.channel_gated_conv2d(x.double(), w.double(), dbl(b), gin, gout, G, activation=activation, **conv)
    return got, want


SHAPES = [
    # N, Cin, Cout, H, W, K, G, conv kwargs
    (2, 8, 12, 7, 9, 1, 4, {}),
    (3, 8, 8, 9, 8, 3, 2, dict(padding=1)),
    (2, 12, 8, 11, 10, 3, 4, dict(stride=2, padding=1)),
    (1, 8, 16, 6, 6, 3, 4, dict(padding=2, dilation=2)),
    (2, 8, 8, 9, 7, 1, 2, dict(stride=2)),
    (2, 16, 8, 8, 8, 3, 2, dict(padding=1, groups=2)),
    (2, 8, 8, 5, 5, 3, 1, dict(padding=1, groups=4)),
    (2, 4, 4, 4, 3, 3, 4, {}),
    (1, 4, 8, 1, 1, 1, 4, {}),
    # Groups of more than 16 output channels take the per-group products; narrower ones (above) the
    # dense grouped convolution, then the gates.
    (2, 48, 40, 6, 5, 3, 4, dict(padding=1, groups=2)),
]
KEEPS = [(None, None), (1.0, 1.0), (0.0, 0.0), (0.5, None), (None, 0.5), (0.5, 0.5), (0.0, 1.0)]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("keeps", KEEPS, ids=[f"{a}-{b}" for a, b in KEEPS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(device, dtype, shape, keeps, layout):
    N, Cin, Cout, H, W, K, G, conv = shape
    case = make_case(N, Cin, Cout, H, W, K, G, *keeps, groups=conv.get("groups", 1), dtype=dtype, device=device,
                     seed=hash((shape[:7], keeps)) % 1000)
    x = to_layout(case[0], layout)
    got, want = run_both((x,) + case[1:], G, **conv)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(got, want.to(dtype), **CONV_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_inactive_outputs_are_exact_zeros(device, activation, bias):
    x, w, b, gin, gout = make_case(3, 8, 8, 6, 6, 3, 2, 0.5, 0.5, bias=bias, device=device, seed=4)
    y = laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, 2, padding=1, activation=activation)
    off = ~gout.repeat_interleave(2, dim=1)
    assert (y.permute(0, 2, 3, 1)[off.unsqueeze(1).unsqueeze(1).expand(-1, 6, 6, -1)] == 0).all()
    # An inactive input never reaches the output, even as NaN.
    x = x.clone()
    x[~gin.repeat_interleave(2, dim=1)] = float("nan")
    y = laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, 2, padding=1, activation=activation)
    assert not y.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_narrow_groups_keep_off_channels_out(device, layout, activation):
    # RegNetY-like groups of 8 channels: an off input channel holding NaN or Inf reaches nothing, and
    # off output channels are exact zeros whatever the bias.
    x, w, b, gin, gout = make_case(3, 32, 32, 7, 6, 3, 4, 0.5, 0.5, groups=4, device=device, seed=11)
    x = x.clone()
    off_in = ~gin.repeat_interleave(4, dim=1)
    x[off_in] = float("nan")
    x[:, :, 0, 0][off_in] = float("inf")
    got = laudnet_ops.channel_gated_conv2d(to_layout(x, layout), w, b, gin, gout, 4, padding=1, groups=4,
                                           activation=activation)
    want = reference.channel_gated_conv2d(x.masked_fill(off_in[:, :, None, None], 0), w, b, gin, gout, 4,
                                          padding=1, groups=4, activation=activation)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want)
    off_out = ~gout.repeat_interleave(4, dim=1)
    assert (got.permute(0, 2, 3, 1)[off_out[:, None, None, :].expand(-1, 7, 6, -1)] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_and_mixed_samples(device):
    # A non-contiguous x, and a batch whose samples range from all-off to all-on.
    x, w, b, _, _ = make_case(4, 8, 8, 7, 7, 3, 4, None, None, device=device, seed=6)
    gin = torch.tensor([[0, 0], [1, 1], [1, 0], [0, 1]], dtype=torch.bool, device=device)
    gout = torch.tensor([[1, 1], [0, 0], [0, 1], [1, 0]], dtype=torch.bool, device=device)
    got = laudnet_ops.channel_gated_conv2d(to_layout(x, "strided"), w, b, gin, gout, 4, padding=1)
    torch.testing.assert_close(got, reference.channel_gated_conv2d(x, w, b, gin, gout, 4, padding=1))


@pytest.mark.parametrize("device", DEVICES)
def test_large_map_spans_several_tiles(device):
    # More output pixels than one packed tile holds, in both layouts.
    case = make_case(2, 32, 16, 40, 37, 3, 4, 0.5, 0.5, device=device, seed=8)
    for layout in ("contiguous", "channels_last"):
        got, want = run_both((to_layout(case[0], layout),) + case[1:], 4, padding=1)
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 24, 136, 5, 6, 3, 4, dict(padding=1)), (2, 40, 100, 4, 4, 1, 2, {}),
                                   (2, 16, 72, 7, 5, 3, 4, dict(stride=2, padding=1))], ids=["3x3", "1x1", "s2"])
@pytest.mark.parametrize("keeps", [(0.5, 0.5), (None, 0.5), (0.5, None), (0.0, 0.5), (1.0, 0.0)],
                         ids=lambda k: f"{k[0]}-{k[1]}")
def test_small_map_many_outputs(device, shape, keeps):
    # Fewer output pixels than output channels (stage-4-like maps), more than one 64-column block of
    # the product and a partial one, with 4-channel and 2-channel gate groups.
    N, Cin, Cout, H, W, K, G, conv = shape
    case = make_case(N, Cin, Cout, H, W, K, G, *keeps, device=device, seed=7)
    for layout in ("contiguous", "channels_last"):
        x, w, b, gin, gout = case
        got, want = run_both((to_layout(x, layout), w, b, gin, gout), G, **conv)
        torch.testing.assert_close(got, want.float())


# Small maps with large weights, at least two samples per thread: in channels_last float32 on the CPU
# these run weight-stationary when gated (the weight walked block by block, each block serving every
# sample of a pass). Outputs over one 512-channel block and a partial one, inputs over two blocks,
# 1x1 convs reading x itself (every input channel on) or packed, strided, padded.
STATIONARY_SHAPES = [
    (5, 128, 256, 7, 9, 3, 4, dict(padding=1)),
    (4, 128, 256, 11, 10, 3, 4, dict(stride=2, padding=1)),
    (5, 512, 600, 5, 6, 1, 4, {}),
    (4, 512, 520, 9, 9, 1, 4, dict(stride=2)),
    (4, 1024, 520, 5, 5, 1, 4, {}),
]
STATIONARY_IDS = ["3x3", "3x3-s2", "1x1", "1x1-s2", "1x1-wide"]
STATIONARY_KEEPS = [(0.5, 0.5), (None, 0.5), (0.5, None), (None, None), (0.0, 0.5), (1.0, 0.0)]


def with_two_threads(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", STATIONARY_SHAPES, ids=STATIONARY_IDS)
@pytest.mark.parametrize("keeps", STATIONARY_KEEPS, ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_large_weight_small_map(shape, keeps, activation):
    N, Cin, Cout, H, W, K, G, conv = shape
    x, w, b, gin, gout = make_case(N, Cin, Cout, H, W, K, G, *keeps, seed=Cout + K)
    for weight in (w, WEIGHT_LAYOUTS["taps_major"](w)):
        got, want = with_two_threads(lambda: run_both((to_layout(x, "channels_last"), weight, b, gin, gout), G,
                                                      activation, **conv))
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


# channels_last float32 convolutions wider than a pixel with column dilation 1 read their input from
# a band of rows regrouped by row phase, a GEMM per kernel row over virtual pixels (see tile_band).
# Kernels of other heights than widths, row and column strides and paddings that differ, row
# dilation, a padding that leaves whole band rows of zeros, and maps cut into several tiles that
# start inside an output row (24 x 37 outputs of 32 channels, two samples and one).
BAND_GEOMETRIES = {
    "3x3-s1": dict(kernel=(3, 3), stride=1, padding=1),
    "3x3-s2-odd": dict(kernel=(3, 3), stride=2, padding=1),
    "3x3-s3": dict(kernel=(3, 3), stride=3, padding=1),
    "1x3": dict(kernel=(1, 3), stride=1, padding=(0, 1)),
    "3x1": dict(kernel=(3, 1), stride=1, padding=(1, 0)),
    "5x3-s21": dict(kernel=(5, 3), stride=(2, 1), padding=(2, 1)),
    "3x3-s12-p0": dict(kernel=(3, 3), stride=(1, 2), padding=0),
    "3x3-dil21": dict(kernel=(3, 3), stride=1, padding=(2, 1), dilation=(2, 1)),
    "3x3-dil21-s2": dict(kernel=(3, 3), stride=2, padding=(2, 1), dilation=(2, 1)),
    "3x3-wide-pad": dict(kernel=(3, 3), stride=2, padding=3),
}


@pytest.mark.parametrize("geometry", list(BAND_GEOMETRIES), ids=list(BAND_GEOMETRIES))
@pytest.mark.parametrize("keeps", [(0.5, 0.5), (None, 0.5), (0.5, None), (None, None), (0.0, 0.5)],
                         ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("N", [1, 2])
def test_band_geometries(geometry, keeps, N):
    conv = dict(BAND_GEOMETRIES[geometry])
    KH, KW = conv.pop("kernel")
    gen = torch.Generator().manual_seed(KH * 7 + KW + N)
    Cin, Cout, G = 32, 24, 4
    x = torch.randn(N, Cin, 47, 73, generator=gen, dtype=torch.float64)
    w = torch.randn(Cout, Cin, KH, KW, generator=gen, dtype=torch.float64) / (Cin * KH * KW) ** 0.5
    b = torch.randn(Cout, generator=gen, dtype=torch.float64)
    gin = random_mask((N, Cin // G), keeps[0], gen) if keeps[0] is not None else None
    gout = random_mask((N, Cout // G), keeps[1], gen) if keeps[1] is not None else None
    want = reference.channel_gated_conv2d(x, w, b, gin, gout, G, **conv)
    xf = to_layout(x.float(), "channels_last")
    for weight in (w.float(), WEIGHT_LAYOUTS["taps_major"](w.float())):
        got = with_two_threads(lambda: laudnet_ops.channel_gated_conv2d(xf, weight, b.float(), gin, gout, G, **conv))
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
    residual = to_layout(torch.randn(want.shape, generator=gen), "channels_last")
    means = torch.empty(N, Cout)
    got = laudnet_ops.channel_gated_conv2d_add_(residual.clone(), xf, w.float(), b.float(), gin, gout, G,
                                                means=means, **conv)
    want_add = torch.relu(residual.double() + reference.channel_gated_conv2d(x, w, b, gin, gout, G,
                                                                             activation="none", **conv))
    torch.testing.assert_close(got, want_add.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(means, want_add.mean((2, 3)).float(), atol=1e-5, rtol=1e-4)


def exact_half_gates(N, groups, seed):
    order = torch.rand(N, groups, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    return order < groups // 2


# channels_last float32 weight slices whose rows of active outputs are a multiple of 1 KiB long (256
# or 512 outputs) are stored with a padded row distance; on maps over 64 pixels (the per-sample
# path), one or two convolution groups, in-gated (every output on) or out-gated with exactly 256 on.
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("Cout, groups, gate", [(256, 1, "in"), (512, 1, "out"), (512, 2, "in"), (1024, 2, "out")])
def test_weight_slices_of_kib_rows(K, Cout, groups, gate):
    N, Cin, G = 3, 64, 4
    x, w, b, gin, gout = make_case(N, Cin, Cout, 9, 10, K, G, None, None, groups=groups, seed=Cout + K)
    if gate == "in":
        gin = exact_half_gates(N, Cin // G, seed=K)
    else:
        gout = exact_half_gates(N, Cout // G, seed=K)
    x = to_layout(x, "channels_last")
    got, want = run_both((x, w, b, gin, gout), G, padding=K // 2, groups=groups)
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
    res = to_layout(torch.randn(want.shape, generator=torch.Generator().manual_seed(2)), "channels_last")
    want = reference.channel_gated_conv2d_add(res.double(), x.double(), w.double(), b.double(), gin, gout, G,
                                              padding=K // 2, groups=groups)
    laudnet_ops.channel_gated_conv2d_add_(res, x, w, b, gin, gout, G, padding=K // 2, groups=groups)
    torch.testing.assert_close(res, want.float(), atol=1e-4, rtol=1e-4)


def check_channels_last_epilogues():
    """The channels_last float32 kernel places each pixel's kept output channels with a vector loop
    chosen for the CPU: wide groups (several 16-channel words and a partial one), with and without
    bias and activation, written fresh and added into a residual."""
    for Cout, G, groups in ((100, 4, 1), (136, 4, 1), (48, 2, 2)):
        case = make_case(3, 24, Cout, 5, 6, 1, G, None, 0.5, groups=groups, seed=Cout)
        x, w, b, gin, gout = case
        x = to_layout(x, "channels_last")
        for bias in (b, None):
            for activation in ("relu", "none"):
                got = laudnet_ops.channel_gated_conv2d(x, w, bias, gin, gout, G, groups=groups, activation=activation)
                want = reference.channel_gated_conv2d(x.double(), w.double(), None if bias is None else bias.double(),
                                                      gin, gout, G, groups=groups, activation=activation)
                torch.testing.assert_close(got, want.float())
                res = to_layout(torch.randn(want.shape, generator=torch.Generator().manual_seed(1)), "channels_last")
                want = reference.channel_gated_conv2d_add(
                    res.double(), x.double(), w.double(), None if bias is None else bias.double(), gin, gout, G,
                    groups=groups, activation=activation)
                laudnet_ops.channel_gated_conv2d_add_(res, x, w, bias, gin, gout, G, groups=groups,
                                                      activation=activation)
                torch.testing.assert_close(res, want.float())


@pytest.mark.parametrize("capability", [None, "default"])
def test_channels_last_epilogue_on_every_cpu(capability):
    # ATEN_CPU_CAPABILITY=default holds the loop to its portable form, as it holds ATen's kernels.
    if capability is None:
        check_channels_last_epilogues()
        return
    code = "import test_channel_gated_conv2d as t; t.check_channels_last_epilogues()"
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability,
           "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    # From the repository root, as the other subprocess tests: the package imports as it does here.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(tests))
    assert out.returncode == 0, out.stderr[-3000:]


WEIGHT_LAYOUTS = {
    "contiguous": lambda w: w.contiguous(),
    "channels_last": lambda w: w.contiguous(memory_format=torch.channels_last),
    # the blocks' folded-weight layout, (ky, kx, Cin, Cout) in memory, read without a copy
    "taps_major": lambda w: w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1),
    "strided": lambda w: torch.stack([w, w], dim=-1)[..., 0],
}


@pytest.mark.parametrize("weight_layout", list(WEIGHT_LAYOUTS))
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_memory_layouts(weight_layout, groups, layout):
    # Every weight layout is re-laid (or viewed) into the operand the kernel multiplies by.
    case = make_case(2, 40, 36, 7, 6, 3, 2, 0.5, 0.5, groups=groups, seed=13)
    x, w, b, gin, gout = case
    w_in = WEIGHT_LAYOUTS[weight_layout](w)
    assert torch.equal(w_in, w)
    got = laudnet_ops.channel_gated_conv2d(to_layout(x, layout), w_in, b, gin, gout, 2, padding=1, groups=groups)
    want = reference.channel_gated_conv2d(x.double(), w.double(), b.double(), gin, gout, 2, padding=1, groups=groups)
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("keeps", [(0.5, 0.5), (None, 0.5), (None, None)], ids=lambda k: f"{k[0]}-{k[1]}")
def test_one_sample_split_over_threads(layout, keeps):
    # Fewer samples than threads: the map is cut into tiles for the idle threads.
    case = make_case(1, 16, 24, 13, 11, 3, 4, *keeps, seed=12)
    got, want = with_two_threads(lambda: run_both((to_layout(case[0], layout),) + case[1:], 4, padding=1))
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x, w, b, gin, gout = make_case(2, 4, 4, 5, 5, 3, 2, 0.5, 0.5, device=device)
    y = laudnet_ops.channel_gated_conv2d(x[:0], w, b, gin[:0], gout[:0], 2, padding=1)
    assert y.shape == (0, 4, 5, 5)
    y = laudnet_ops.channel_gated_conv2d(x[:, :0], w[:0, :0], None, None, None, 2)
    assert y.shape == (2, 0, 3, 3)


GRAD_CASES = [
    # shape, activation, layout
    ((2, 4, 4, 4, 3, 3, 2, dict(padding=1)), "relu", "contiguous"),
    ((2, 4, 4, 4, 3, 3, 2, dict(padding=1)), "none", "channels_last"),
    ((1, 4, 8, 5, 5, 1, 2, dict(stride=2)), "relu", "channels_last"),
    ((2, 8, 4, 4, 4, 3, 2, dict(stride=2, padding=1, groups=2)), "none", "contiguous"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, activation, layout", GRAD_CASES, ids=[str(i) for i in range(len(GRAD_CASES))])
def test_gradcheck(device, shape, activation, layout):
    N, Cin, Cout, H, W, K, G, conv = shape
    x, w, b, gin, gout = make_case(N, Cin, Cout, H, W, K, G, 0.5, 0.5, groups=conv.get("groups", 1),
                                   dtype=torch.float64, device=device, seed=2)
    gin[0, 0] = gout[0, 0] = True  # keep something on
    x = to_layout(x, layout).requires_grad_()
    w, b = w.requires_grad_(), b.requires_grad_()
    fn = lambda x, w, b: laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, activation=activation, **conv)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    x, w, b, gin, gout = make_case(3, 8, 8, 7, 6, 3, 2, 0.5, 0.5, device=device, seed=3)
    grad = torch.randn(3, 8, 4, 3, device=device)
    leaves = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    laudnet_ops.channel_gated_conv2d(*leaves[0], gin, gout, 2, stride=2, padding=1).backward(grad)
    reference.channel_gated_conv2d(*leaves[1], gin, gout, 2, stride=2, padding=1).backward(grad)
    for got, want in zip(*leaves):
        torch.testing.assert_close(got.grad, want.grad)
    # No gates at all: weight and bias only.
    w2 = w.clone().requires_grad_()
    laudnet_ops.channel_gated_conv2d(x, w2, None, None, None, 2, stride=2, padding=1).backward(grad)
    w3 = w.clone().requires_grad_()
    reference.channel_gated_conv2d(x, w3, None, None, None, 2, stride=2, padding=1).backward(grad)
    torch.testing.assert_close(w2.grad, w3.grad)


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        x, w, b, gin, gout = make_case(2, 4, 4, 5, 5, 3, 2, 0.5, 0.5, dtype=torch.float64, seed=13)
        x = to_layout(x, layout)
        args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), gin, gout, 2, [2, 1], [1, 1], [1, 1], 1,
                "relu")
        torch.library.opcheck(torch.ops.laudnet_ops.channel_gated_conv2d.default, args)
        torch.library.opcheck(torch.ops.laudnet_ops.channel_gated_conv2d.default,
                              (x, w, None, None, gout, 2, [1, 1], [0, 0], [1, 1], 1, "none"))
        # narrow groups: the dense grouped convolution between gating passes
        x, w, b, gin, gout = make_case(2, 8, 8, 5, 5, 3, 2, 0.5, 0.5, groups=2, dtype=torch.float64, seed=15)
        x = to_layout(x, layout)
        args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), gin, gout, 2, [2, 1], [1, 1], [1, 1], 2,
                "relu")
        torch.library.opcheck(torch.ops.laudnet_ops.channel_gated_conv2d.default, args)


def test_compile_fullgraph():
    x, w, b, gin, gout = make_case(2, 8, 8, 6, 6, 3, 4, 0.5, 0.5, seed=14)

    def block(x, w, b, gin, gout):
        return laudnet_ops.channel_gated_conv2d(x * 2, w, b, gin, gout, 4, padding=1) + 1

    want = block(x, w, b, gin, gout)
    torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(x, w, b, gin, gout), want)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, w, b, gin, gout), want)


# Random small convolutions and gates, shared with the tests of channel_gated_conv2d_add_.
CONV_STRATEGIES = dict(
    N=st.integers(1, 3), cin_groups=st.integers(1, 3), cout_groups=st.integers(1, 3), G=st.sampled_from([1, 2, 4]),
    H=st.integers(1, 9), W=st.integers(1, 9), K=st.sampled_from([1, 3]), stride=st.integers(1, 2),
    padding=st.integers(0, 1), keep_in=st.floats(0, 1), keep_out=st.floats(0, 1), seed=st.integers(0, 9999),
    channels_last=st.booleans(), activation=st.sampled_from(["relu", "none"]),
)


@settings(max_examples=30, deadline=None)
@given(**CONV_STRATEGIES)
def test_property_matches_reference(N, cin_groups, cout_groups, G, H, W, K, stride, padding, keep_in, keep_out, seed,
                                    channels_last, activation):
    if H + 2 * padding < K or W + 2 * padding < K:
        return
    case = make_case(N, cin_groups * G, cout_groups * G, H, W, K, G, keep_in, keep_out, seed=seed)
    x = to_layout(case[0], "channels_last" if channels_last else "contiguous")
    got, want = run_both((x,) + case[1:], G, activation, stride=stride, padding=padding)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def _valid():
    x, w, b, gin, gout = make_case(2, 8, 8, 6, 6, 3, 2, 0.5, 0.5, seed=1)
    return dict(x=x, weight=w, bias=b, in_gates=gin, out_gates=gout, group_size=2, padding=1)


ERROR_CASES = [
    ("x rank", dict(x=lambda a: a["x"][0]), "x must be a 4-D tensor, got 3-D"),
    ("weight rank", dict(weight=lambda a: a["weight"][0]), "weight must be a 4-D tensor, got 3-D"),
    ("integer x", dict(x=lambda a: a["x"].long(), weight=lambda a: a["weight"].long(), bias=lambda a: None),
     "x must be a floating-point tensor, got Long"),
    ("dtype mismatch", dict(weight=lambda a: a["weight"].double()), "x and weight must have the same dtype"),
    ("bias dtype", dict(bias=lambda a: a["bias"].double()), "x and bias must have the same dtype"),
    ("bias shape", dict(bias=lambda a: a["bias"][:3]), r"bias must have shape \(Cout,\) = \(8,\), got \[3\]"),
    ("Cin not divisible", dict(group_size=lambda a: 3, in_gates=lambda a: None, out_gates=lambda a: None),
     "Cin = 8 is not divisible by group_size = 3"),
    ("Cout not divisible", dict(weight=lambda a: a["weight"][:6], bias=lambda a: None, group_size=lambda a: 4,
                                in_gates=lambda a: a["in_gates"][:, :2], out_gates=lambda a: None),
     "Cout = 6 is not divisible by group_size = 4"),
    ("gate straddles conv groups", dict(weight=lambda a: a["weight"][:, :2], groups=lambda a: 4, group_size=lambda a: 4,
                                        in_gates=lambda a: a["in_gates"][:, :2], out_gates=lambda a: a["out_gates"][:, :2]),
     r"group_size = 4 must divide the channels of each convolution group \(Cin / groups = 2"),
    ("weight channels", dict(weight=lambda a: a["weight"][:, :4]), "weight must have shape .Cout, Cin / groups, KH, KW."),
    ("groups", dict(groups=lambda a: 3), "groups = 3 must divide both Cin = 8 and Cout = 8"),
    ("in_gates dtype", dict(in_gates=lambda a: a["in_gates"].float()), "in_gates must be a bool tensor, got Float"),
    ("in_gates shape", dict(in_gates=lambda a: a["in_gates"][:, :3]),
     r"in_gates must have shape \(N, channels / group_size\) = \(2, 4\), got \[2, 3\]"),
    ("out_gates shape", dict(out_gates=lambda a: a["out_gates"][:1]),
     r"out_gates must have shape \(N, channels / group_size\) = \(2, 4\), got \[1, 4\]"),
    ("stride", dict(stride=lambda a: 0), r"stride must be at least 1, got \[0, 0\]"),
    ("padding", dict(padding=lambda a: -1), r"padding must be at least 0, got \[-1, -1\]"),
    ("dilation", dict(dilation=lambda a: (1, 0)), r"dilation must be at least 1, got \[1, 0\]"),
    ("group_size", dict(group_size=lambda a: 0), "group_size must be at least 1, got 0"),
    ("map too small", dict(x=lambda a: a["x"][:, :, :1, :1], padding=lambda a: 0),
     r"the padded input \(1x1\) is smaller than the dilated kernel \(3x3\)"),
    ("activation", dict(activation=lambda a: "gelu"), 'activation must be "relu" or "none", got "gelu"'),
]


@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, mutate, message):
    args = _valid()
    args.update({k: f(args) for k, f in mutate.items()})
    with pytest.raises(RuntimeError, match=message):
        laudnet_ops.channel_gated_conv2d(**args)


@pytest.mark.cuda
def test_device_mismatch():
    args = _valid()
    with pytest.raises(RuntimeError, match="x and weight must be on the same device"):
        laudnet_ops.channel_gated_conv2d(**{**args, "x": args["x"].cuda()})
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(RuntimeError, match="x and in_gates must be on the same device"):
        laudnet_ops.channel_gated_conv2d(**{**cuda, "in_gates": args["in_gates"]})
