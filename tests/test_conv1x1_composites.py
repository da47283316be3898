"""masker_conv1x1 and conv1x1_scatter_add through the vendor convolution (csrc/conv1x1_composites.cpp).

Device-agnostic ATen that the CUDA ops take, with the experimental switch on, for the calls their
tensor-core kernels decline. Here they run through their internal ops on the CPU against the
reference, on the shapes of the ops' own tests; the CUDA cases (skipped without a GPU) check that the
public ops take them only when switched on.
"""

import math

import pytest
import torch

import laudnet_ops
from laudnet_ops import reference

import test_conv1x1_scatter_add as scatter_tests
import test_masker_conv1x1 as masker_tests
from helpers import TOL, to_layout

pytestmark = pytest.mark.skipif(laudnet_ops.extension_error is not None, reason="needs the compiled extension")


def masker_by_dense_conv(*args):
    return torch.ops.laudnet_ops._masker_conv1x1_by_dense_conv(*args)


def conv1x1_scatter_add_by_dense_conv(*args):
    return torch.ops.laudnet_ops._conv1x1_scatter_add_by_dense_conv(*args)


def double(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", masker_tests.SHAPES, ids=[masker_tests.shape_id(s) for s in masker_tests.SHAPES])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("biases", [True, False])
def test_masker_matches_reference(dtype, shape, layout, biases):
    N, Cin, Cout, M, H, W, S, stride = shape
    x, w, b, wm, bm = masker_tests.make_case(N, Cin, Cout, M, H, W, bias=biases, mask_bias=biases, dtype=dtype,
                                             seed=hash((shape, "dense")) % 1000)
    x = to_layout(x, layout)
    for activation in ("relu", "none"):
        y, logits = masker_by_dense_conv(x, w, b, wm, bm, S, stride, activation)
        want_y, want_logits = reference.masker_conv1x1(x.double(), w.double(), double(b), wm.double(), double(bm),
                                                       S, stride, activation)
        Hq, Wq = math.ceil(math.ceil(H / stride) / S), math.ceil(math.ceil(W / stride) / S)
        assert y.shape == (N, Cout, H, W) and logits.shape == (N, M, Hq, Wq)
        assert y.dtype == logits.dtype == dtype
        if layout == "channels_last" and x.shape[1] > 1 and H * W > 1:  # (a 1x1 map is both layouts at once)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert logits.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, want_y.to(dtype), **TOL[dtype])
        torch.testing.assert_close(logits, want_logits.to(dtype), **TOL[dtype])


def test_masker_bad_arguments_are_named():
    x, w, b, wm, bm = masker_tests.make_case(1, 4, 3, 1, 8, 8)
    with pytest.raises(RuntimeError, match="_masker_conv1x1_by_dense_conv"):
        masker_by_dense_conv(x, w[:, :2], b, wm, bm, 4, 1, "relu")
    with pytest.raises(RuntimeError, match='activation must be "relu" or "none", got "gelu"'):
        masker_by_dense_conv(x, w, b, wm, bm, 4, 1, "gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", scatter_tests.SHAPES, ids=str)
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv1x1_scatter_add_matches_reference(dtype, shape, keep, layout):
    N, Cin, Cout, H, W, S = shape
    residual, packed, idx, w, b = scatter_tests.make_case(N, Cin, Cout, H, W, S, keep, dtype=dtype,
                                                          seed=hash((shape, keep, "dense")) % 1000)
    residual, packed = to_layout(residual, layout), to_layout(packed, layout)
    for activation, bias in (("relu", b), ("none", None)):
        got = conv1x1_scatter_add_by_dense_conv(residual, packed, idx, w, bias, activation)
        torch.testing.assert_close(got, scatter_tests.ref(residual, packed, idx, w, bias, activation), **TOL[dtype])


def test_conv1x1_scatter_add_refuses_duplicate_rows():
    residual, packed, idx, w, b = scatter_tests.make_case(1, 4, 3, 8, 8, 4, 1.0)
    dup = torch.cat([idx, idx[:1]])
    packed = torch.cat([packed, packed[:1]])
    with pytest.raises(RuntimeError, match="unique"):
        conv1x1_scatter_add_by_dense_conv(residual, packed, dup, w, b, "relu")


# ---------------------------------------------------------------- the CUDA ops' use of them (GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape", masker_tests.SHAPES, ids=[masker_tests.shape_id(s) for s in masker_tests.SHAPES])
def test_cuda_masker_takes_the_dense_convs_when_switched_on(experimental, dtype, shape):
    N, Cin, Cout, M, H, W, S, stride = shape
    x, w, b, wm, bm = masker_tests.make_case(N, Cin, Cout, M, H, W, dtype=dtype, device="cuda", seed=7)
    y, logits = laudnet_ops.masker_conv1x1(x, w, b, wm, bm, S, stride)
    same_y, same_logits = masker_by_dense_conv(x, w, b, wm, bm, S, stride, "relu")
    torch.testing.assert_close(y, same_y, atol=0, rtol=0)  # the same path
    torch.testing.assert_close(logits, same_logits, atol=0, rtol=0)
    want_y, want_logits = reference.masker_conv1x1(x.double(), w.double(), b.double(), wm.double(), bm.double(), S,
                                                   stride)
    torch.testing.assert_close(y, want_y.to(dtype), **TOL[dtype])
    torch.testing.assert_close(logits, want_logits.to(dtype), **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape", scatter_tests.SHAPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_conv1x1_scatter_add_takes_the_dense_conv_when_switched_on(experimental, dtype, shape, inplace):
    N, Cin, Cout, H, W, S = shape
    residual, packed, idx, w, b = scatter_tests.make_case(N, Cin, Cout, H, W, S, 0.5, dtype=dtype, device="cuda",
                                                          seed=8)
    want = scatter_tests.ref(residual, packed, idx, w, b)
    if inplace:
        got = residual.clone()
        laudnet_ops.conv1x1_scatter_add_(got, packed, idx, w, b)
    else:
        got = laudnet_ops.conv1x1_scatter_add(residual, packed, idx, w, b)
    torch.testing.assert_close(got, conv1x1_scatter_add_by_dense_conv(residual, packed, idx, w, b, "relu"), atol=0,
                               rtol=0)
    torch.testing.assert_close(got, want, **TOL[dtype])
