"""gather_conv2d through halo tiles and the vendor convolution (csrc/gather_conv2d_tiles.cpp).

The composite is device-agnostic ATen; the CUDA op takes it, with the experimental switch on, for the
calls its tensor-core kernel cannot take. Here it runs through its internal op on the CPU against the
reference, on every shape of the op's own tests; the CUDA cases (skipped without a GPU) check that the
public op takes it only when switched on.
"""

import pytest
import torch

import laudnet_ops
from laudnet_ops import reference

from helpers import TOL, to_layout
from test_gather_conv2d import SHAPES, make_case, shape_id

needs_extension = pytest.mark.skipif(laudnet_ops.extension_error is not None, reason="needs the compiled extension")
pytestmark = needs_extension


def by_tiles(x, idx, w, b, conv, activation="relu"):
    return torch.ops.laudnet_ops._gather_conv2d_by_tiles(
        x, idx, w, b, conv["patch_size"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"],
        activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(dtype, shape, keep, layout):
    N, Cin, Cout, H, W, k, S, stride, padding, dilation, groups = shape
    x, idx, w, b, conv = make_case(N, Cin, Cout, H, W, k, S, keep, stride, padding, dilation, groups, dtype=dtype,
                                   seed=hash((shape, keep, "tiles")) % 1000)
    x = to_layout(x, layout)
    for activation, bias in (("relu", b), ("none", None)):
        got = by_tiles(x, idx, w, bias, conv, activation)
        want = reference.gather_conv2d(x.double(), idx, w.double(), None if bias is None else bias.double(), **conv,
                                       activation=activation)
        assert got.dtype == dtype and got.shape == (idx.shape[0], Cout, S, S)
        # packed comes back in x's layout, as the op's contract says
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format)
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


def test_a_strided_input_is_read_where_it_lies():
    x, idx, w, b, conv = make_case(2, 6, 5, 9, 11, 3, 4, 0.6, seed=3)
    got = by_tiles(to_layout(x, "strided"), idx, w, b, conv)
    torch.testing.assert_close(got, reference.gather_conv2d(x, idx, w, b, **conv))


def test_nan_outside_the_map_does_not_leak_into_the_zeros():
    # Positions of a border patch outside the output map are written as zeros, even when the tile
    # there holds NaN (masked_fill, not a multiplication by a 0/1 mask).
    x, idx, w, b, conv = make_case(1, 4, 3, 7, 7, 3, 4, 1.0, seed=5)
    x[..., -1] = float("nan")
    got = by_tiles(x, idx, w, b, conv)
    Ho = 7
    border = idx[:, 2] == 1  # the right-hand patches reach columns 4..7 of a 7-wide map
    assert torch.all(got[border][..., Ho - 4:] == 0)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0, 2, 0]], dtype=torch.int32), r"indices must name a patch of the \(N, Hp, Wp\) = \(1, 2, 2\)"),
    (torch.tensor([[1, 0, 0]], dtype=torch.int32), "output grid"),
    (torch.tensor([[0, 0, -1]], dtype=torch.int32), "output grid"),
])
def test_rows_outside_the_patch_grid_are_refused(bad, message):
    # Hq, the windows view's row count, exceeds Hp here, so the view alone would let row 2 through.
    x, _, w, b, conv = make_case(1, 4, 3, 8, 8, 3, 4, 1.0, padding=1, seed=1)
    with pytest.raises(RuntimeError, match=message):
        by_tiles(x, bad, w, b, conv)


def test_bad_arguments_are_named():
    x, idx, w, b, conv = make_case(1, 4, 3, 8, 8, 3, 4, 1.0, seed=1)
    with pytest.raises(RuntimeError, match='activation must be "relu" or "none", got "gelu"'):
        by_tiles(x, idx, w, b, conv, "gelu")
    with pytest.raises(RuntimeError, match="_gather_conv2d_by_tiles"):
        by_tiles(x, idx, w[:, :2], b, conv)


# ---------------------------------------------------------------- the CUDA op's use of it (GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_cuda_op_takes_the_tiles_when_switched_on(experimental, dtype, shape):
    N, Cin, Cout, H, W, k, S, stride, padding, dilation, groups = shape
    x, idx, w, b, conv = make_case(N, Cin, Cout, H, W, k, S, 0.5, stride, padding, dilation, groups, dtype=dtype,
                                   device="cuda", seed=hash((shape, "cuda-tiles")) % 1000)
    got = laudnet_ops.gather_conv2d(x, idx, w, b, **conv)
    torch.testing.assert_close(got, by_tiles(x, idx, w, b, conv), atol=0, rtol=0)  # the same path
    want = reference.gather_conv2d(x.double(), idx, w.double(), None if b is None else b.double(), **conv)
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])  # (conftest.py turns TF32 off)
