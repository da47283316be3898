"""masked_conv1x1: a 1x1 convolution on the pixels a mask keeps, zero on the others."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, TOL, assert_raises_on, device_dtype_params, random_mask, to_layout

OP = torch.ops.laudnet_ops.masked_conv1x1.default


def make_case(N, Cin, Cout, H, W, keep, bias=True, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    x = randn(N, Cin, H, W)
    w = randn(Cout, Cin, 1, 1, scale=1 / math.sqrt(max(Cin, 1)))
    mask = random_mask((N, H, W), keep, generator=gen, device=device)
    return x, mask, w, randn(Cout) if bias else None


def patch_halo_mask(N, H, W, S, keep, seed):
    """A block-like mask: kept S x S patches dilated by one pixel (long runs of kept pixels)."""
    gen = torch.Generator().manual_seed(seed)
    patches = random_mask((N, math.ceil(H / S), math.ceil(W / S)), keep, generator=gen)
    pixels = patches.repeat_interleave(S, 1).repeat_interleave(S, 2)[:, :H, :W]
    return F.max_pool2d(pixels[:, None].float(), 3, 1, 1)[:, 0] > 0


def check(x, mask, w, b, activation="relu", **tol):
    got = laudnet_ops.masked_conv1x1(x, mask, w, b, activation)
    want = reference.masked_conv1x1(x.double(), mask, w.double(), None if b is None else b.double(), activation)
    assert got.shape == want.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want.to(x.dtype), **(tol or TOL[x.dtype]))
    # Dropped pixels are exactly zero.
    assert not got.masked_select(~mask[:, None]).any()
    return got


# N, Cin, Cout, H, W
SHAPES = [(2, 8, 6, 8, 8), (3, 5, 7, 9, 7), (1, 3, 4, 1, 1), (2, 64, 48, 17, 13), (1, 1, 1, 5, 3)]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_matches_reference(device, dtype, shape, keep, layout, activation):
    x, mask, w, b = make_case(*shape, keep, dtype=dtype, device=device, seed=sum(shape))
    x = to_layout(x, layout)
    got = check(x, mask, w, b, activation)
    # Output layout: channels_last for a channels_last map, contiguous otherwise (as the other ops).
    want_cl = layout == "channels_last" and not x.is_contiguous()
    assert got.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S, keep", [(4, 0.5), (2, 0.5), (1, 0.5), (4, 1.0), (3, 0.1)])
def test_halo_masks_of_large_maps(device, S, keep):
    # Many chunks on every thread, some one contiguous run of pixels (read and written in place),
    # the others gathered; a weight in the blocks' folded (1, 1, Cin, Cout) layout and no bias.
    N, Cin, Cout, H, W = 3, 96, 80, 37, 41
    x, _, w, _ = make_case(N, Cin, Cout, H, W, 1.0, device=device, seed=S)
    mask = patch_halo_mask(N, H, W, S, keep, seed=S).to(device)
    folded = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    check(to_layout(x, "channels_last"), mask, folded, None, atol=1e-4, rtol=1e-4)
    check(x, mask, w, None, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_long_reduction(device, keep):
    # Cin = 1100: the CPU GEMM cuts the reduction into blocks, accumulating into the same rows.
    x, mask, w, b = make_case(2, 1100, 70, 9, 11, keep, device=device, seed=6)
    check(to_layout(x, "channels_last"), mask, w, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_dropped_pixels_are_zero_whatever_x_holds(device):
    x, mask, w, b = make_case(2, 4, 3, 5, 6, 0.5, device=device, seed=4)
    x[~mask[:, None].expand_as(x)] = float("nan")
    x = to_layout(x, "channels_last")
    y = laudnet_ops.masked_conv1x1(x, mask, w, b, "none")
    assert torch.equal(y.masked_select(~mask[:, None]), torch.zeros_like(y.masked_select(~mask[:, None])))
    assert not y.masked_select(mask[:, None]).isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for N, Cin, Cout, H, W in ((0, 3, 4, 5, 5), (2, 3, 4, 0, 4), (1, 3, 0, 3, 3), (2, 0, 4, 3, 3)):
        x, mask, w, b = make_case(N, Cin, Cout, H, W, 0.5, device=device)
        y = laudnet_ops.masked_conv1x1(x, mask, w, b)
        assert y.shape == (N, Cout, H, W)
        torch.testing.assert_close(y, reference.masked_conv1x1(x, mask, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_gradcheck(device, layout, activation):
    x, mask, w, b = make_case(2, 3, 4, 5, 6, 0.6, dtype=torch.float64, device=device, seed=5)
    x = to_layout(x, layout).requires_grad_()
    fn = lambda x, w, b: laudnet_ops.masked_conv1x1(x, mask, w, b, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w.requires_grad_(), b.requires_grad_()))
    fn = lambda x, w: laudnet_ops.masked_conv1x1(x, mask, w, None, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    x, mask, w, b = make_case(2, 6, 5, 9, 10, 0.5, device=device, seed=7)
    leaves = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    outs = [fn(lv[0], mask, lv[1], lv[2]) for fn, lv in zip((laudnet_ops.masked_conv1x1, reference.masked_conv1x1),
                                                             leaves)]
    grad = torch.randn_like(outs[1])
    for out in outs:
        out.backward(grad)
    for got, want in zip(*leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dense_fallback_matches_reference(layout):
    # The kernel of devices without one of their own (CUDA), reached by dispatching to it with CPU tensors.
    x, mask, w, b = make_case(2, 5, 4, 7, 6, 0.5, seed=8)
    x = to_layout(x, layout)
    dense = torch._C.DispatchKey.CompositeExplicitAutograd
    for activation in ("relu", "none"):
        got = OP._op_dk(dense, x, mask, w, b, activation)
        torch.testing.assert_close(got, reference.masked_conv1x1(x, mask, w, b, activation))
        assert got.is_contiguous(memory_format=laudnet_ops.ops._checks.feature_layout(x))
    with pytest.raises(RuntimeError, match=r"mask must have shape \(N, H, W\) = \(2, 7, 6\)"):
        OP._op_dk(dense, x, mask[:, :3], w, b, "relu")
    empty = make_case(2, 5, 4, 0, 6, 0.5)
    assert OP._op_dk(dense, *empty, "relu").shape == (2, 4, 0, 6)


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        x, mask, w, b = make_case(2, 4, 3, 7, 6, 0.5, dtype=torch.float64, seed=11)
        args = (to_layout(x, layout).requires_grad_(), mask, w.requires_grad_(), b.requires_grad_(), "relu")
        torch.library.opcheck(OP, args)
        torch.library.opcheck(OP, (x, mask, w, None, "none"))


def test_compile_fullgraph():
    x, mask, w, b = make_case(2, 4, 3, 7, 6, 0.5, seed=12)

    def conv(x, w, b):
        return laudnet_ops.masked_conv1x1(x, mask, w, b) * 2

    want = conv(x, w, b)
    for backend in ("aot_eager", "inductor"):
        torch.testing.assert_close(torch.compile(conv, fullgraph=True, backend=backend)(x, w, b), want)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 3), Cin=st.integers(1, 40), Cout=st.integers(1, 40), H=st.integers(1, 12),
       W=st.integers(1, 12), keep=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]), seed=st.integers(0, 9999),
       channels_last=st.booleans(), activation=st.sampled_from(["relu", "none"]))
def test_property_matches_reference(N, Cin, Cout, H, W, keep, seed, channels_last, activation):
    x, mask, w, b = make_case(N, Cin, Cout, H, W, keep, seed=seed)
    check(to_layout(x, "channels_last" if channels_last else "contiguous"), mask, w, b, activation)


def _valid():
    x, mask, w, b = make_case(2, 4, 6, 5, 7, 0.5, seed=1)
    return dict(x=x, mask=mask, weight=w, bias=b, activation="relu")


ERROR_CASES = [
    ("x rank", dict(x=lambda a: a["x"][0]), "x must be a 4-D tensor, got 3-D"),
    ("integer x", dict(x=lambda a: a["x"].long()), "x must be a floating-point tensor, got (Long|torch.int64)"),
    ("weight dtype", dict(weight=lambda a: a["weight"].double()), "x and weight must have the same dtype"),
    ("weight not 1x1", dict(weight=lambda a: a["weight"].expand(6, 4, 3, 3)),
     r"weight must be a 1x1 kernel, shape \(Cout, Cin, 1, 1\), got \[6, 4, 3, 3\]"),
    ("weight channels", dict(weight=lambda a: a["weight"][:, :3]), "weight has 3 input channels but x has 4"),
    ("bias shape", dict(bias=lambda a: a["bias"][:5]), r"bias must have shape \(6,\), got \[5\]"),
    ("mask dtype", dict(mask=lambda a: a["mask"].float()), "mask must be a bool tensor, got (Float|torch.float32)"),
    ("mask shape", dict(mask=lambda a: a["mask"][:, :, :6]),
     r"mask must have shape \(N, H, W\) = \(2, 5, 7\), got \[2, 5, 6\]"),
    ("mask rank", dict(mask=lambda a: a["mask"][:, None]), r"mask must have shape \(N, H, W\)"),
    ("activation", dict(activation=lambda a: "gelu"), 'activation must be "relu" or "none", got "gelu"'),
]


@pytest.mark.parametrize("fake", [False, True])
@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, mutate, message, fake):
    args = _valid()
    args.update({k: f(args) for k, f in mutate.items()})
    args = [args[k] for k in ("x", "mask", "weight", "bias", "activation")]
    assert_raises_on(OP, args, message, fake)


@pytest.mark.cuda
def test_device_mismatch():
    x, mask, w, b = make_case(1, 2, 2, 4, 4, 0.5)
    with pytest.raises(RuntimeError, match="x and mask must be on the same device"):
        laudnet_ops.masked_conv1x1(x.cuda(), mask, w.cuda(), None)
