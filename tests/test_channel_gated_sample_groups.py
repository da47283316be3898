"""channel_gated_conv2d as one grouped vendor convolution over (sample, conv group) pairs
(csrc/channel_gated_sample_groups.cpp).

The composite is device-agnostic ATen; the CUDA op takes it, with the experimental switch on, for the
calls its tensor-core kernel declines. Here it runs through its internal op on the CPU against the
reference, on every shape and gate pattern of the op's own tests; the CUDA cases (skipped without a
GPU) check that the public op takes it only when switched on.
"""

import pytest
import torch

import laudnet_ops
from laudnet_ops import reference

from helpers import TOL, to_layout
from test_channel_gated_conv2d import KEEPS, SHAPES, make_case

needs_extension = pytest.mark.skipif(laudnet_ops.extension_error is not None, reason="needs the compiled extension")
pytestmark = needs_extension


def by_sample_groups(x, w, b, gin, gout, G, activation="relu", stride=1, padding=0, dilation=1, groups=1):
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return torch.ops.laudnet_ops._channel_gated_conv2d_by_sample_groups(
        x, w, b, gin, gout, G, pair(stride), pair(padding), pair(dilation), groups, activation)


def want_for(case, G, activation="relu", **conv):
    x, w, b, gin, gout = case
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.channel_gated_conv2d(x.double(), w.double(), dbl(b), gin, gout, G, activation=activation, **conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("keeps", KEEPS, ids=[f"{a}-{b}" for a, b in KEEPS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(dtype, shape, keeps, layout):
    N, Cin, Cout, H, W, K, G, conv = shape
    x, w, b, gin, gout = make_case(N, Cin, Cout, H, W, K, G, *keeps, groups=conv.get("groups", 1), dtype=dtype,
                                   seed=hash((shape[:7], keeps, "pairs")) % 1000)
    x = to_layout(x, layout)
    for activation, bias in (("relu", b), ("none", None)):
        got = by_sample_groups(x, w, bias, gin, gout, G, activation, **conv)
        want = want_for((x, w, bias, gin, gout), G, activation, **conv)
        assert got.dtype == dtype and got.shape == want.shape
        # y comes back in x's layout, as the op's contract says
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format)
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


def test_uneven_pairs_pad_to_the_largest():
    # Sample 0 keeps every channel, sample 1 one gate group in and out, sample 2 none in and all out
    # (bias only), sample 3 none out: the padded slots of the thin pairs name their inactive channels.
    G = 2
    x, w, b, _, _ = make_case(4, 8, 6, 5, 5, 3, G, None, None, seed=11)
    gin = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    gout = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    for layout in ("contiguous", "channels_last"):
        xl = to_layout(x, layout)
        got = by_sample_groups(xl, w, b, gin, gout, G, padding=1)
        torch.testing.assert_close(got, want_for((xl, w, b, gin, gout), G, padding=1).float())


def test_inactive_channels_do_not_leak():
    # Inactive input channels hold NaN, an active one inf: an inactive output stays 0 (masked_fill,
    # not a multiplication), an active input's inf reaches the active outputs only.
    G = 2
    x, w, b, _, _ = make_case(2, 4, 4, 4, 4, 3, G, None, None, seed=2)
    gin = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    gout = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    x[0, 2:] = float("nan")
    x[1, :2] = float("nan")
    x[0, 0, 1, 1] = float("inf")
    got = by_sample_groups(x, w, b, gin, gout, G, activation="none", padding=1)
    assert torch.all(got[0, 2:] == 0) and torch.all(got[1, :2] == 0)
    assert not torch.isnan(got[1]).any()
    torch.testing.assert_close(got, want_for((x, w, b, gin, gout), G, "none", padding=1).float())


def test_no_input_channels_gives_the_bias():
    # An empty sum: each active output is relu(bias), as the CPU kernel computes it (F.conv2d, hence the
    # reference, returns no channels at all for a weight with no input channel).
    w, b = torch.randn(4, 0, 3, 3), torch.tensor([0.5, -1.0, 2.0, -3.0])
    gout = torch.tensor([[True, False], [False, True]])
    x = torch.randn(2, 0, 5, 5)
    got = by_sample_groups(x, w, b, None, gout, 2, padding=1)
    want = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])[:, :, None, None].expand(2, 4, 5, 5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, laudnet_ops.channel_gated_conv2d(x, w, b, None, gout, 2, padding=1))


def test_a_strided_input_is_read_where_it_lies():
    x, w, b, gin, gout = make_case(2, 8, 8, 6, 7, 3, 4, 0.5, 0.5, seed=4)
    got = by_sample_groups(to_layout(x, "strided"), w, b, gin, gout, 4, padding=1)
    torch.testing.assert_close(got, want_for((x, w, b, gin, gout), 4, padding=1).float())


def test_bad_arguments_are_named():
    x, w, b, gin, gout = make_case(2, 8, 8, 5, 5, 3, 4, 0.5, 0.5, seed=1)
    with pytest.raises(RuntimeError, match='activation must be "relu" or "none", got "gelu"'):
        by_sample_groups(x, w, b, gin, gout, 4, "gelu")
    with pytest.raises(RuntimeError, match="_channel_gated_conv2d_by_sample_groups"):
        by_sample_groups(x, w, b, gin[:, :1], gout, 4)


# ---------------------------------------------------------------- the CUDA op's use of it (GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_op_takes_the_pairs_when_switched_on(experimental, dtype, shape, layout):
    N, Cin, Cout, H, W, K, G, conv = shape
    x, w, b, gin, gout = make_case(N, Cin, Cout, H, W, K, G, 0.5, 0.5, groups=conv.get("groups", 1), dtype=dtype,
                                   device="cuda", seed=hash((shape[:7], "cuda-pairs")) % 1000)
    x = to_layout(x, layout)
    got = laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, **conv)
    want = want_for((x, w, b, gin, gout), G, **conv)
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])  # (conftest.py turns TF32 off)
    if dtype != torch.float16 or layout != "channels_last":  # not a tensor-core call: the same path
        torch.testing.assert_close(got, by_sample_groups(x, w, b, gin, gout, G, **conv), atol=0, rtol=0)
