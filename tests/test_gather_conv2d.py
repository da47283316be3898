import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference, unfused

from helpers import DEVICES, TOL, assert_raises_on, device_dtype_params, random_mask, to_layout


def out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def make_case(N, Cin, Cout, H, W, k, S, keep, stride=1, padding=None, dilation=1, groups=1, bias=True,
              dtype=torch.float32, device="cpu", seed=0):
    """x, indices, weight, bias and the conv arguments of one random gather_conv2d call."""
    padding = (k // 2) * dilation if padding is None else padding
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = out_size(H, k, stride, padding, dilation), out_size(W, k, stride, padding, dilation)
    mask = random_mask((N, math.ceil(Ho / S), math.ceil(Wo / S)), keep, gen)
    indices = reference.patch_indices(mask).to(device)
    x = torch.randn(N, Cin, H, W, generator=gen, dtype=torch.float64).to(device, dtype)
    w = torch.randn(Cout, Cin // groups, k, k, generator=gen, dtype=torch.float64) / math.sqrt(Cin // groups * k * k)
    b = torch.randn(Cout, generator=gen, dtype=torch.float64).to(device, dtype) if bias else None
    conv = dict(patch_size=S, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, indices, w.to(device, dtype), b, conv


# N, Cin, Cout, H, W, k, S, stride, padding, dilation, groups
SHAPES = [
    (2, 4, 6, 8, 8, 3, 4, 1, 1, 1, 1),      # divisible map
    (2, 5, 3, 7, 9, 3, 4, 1, 1, 1, 1),      # map not divisible by S: border patches
    (1, 3, 4, 11, 10, 3, 2, 2, 1, 1, 1),    # stride 2 with odd sizes, N = 1
    (2, 6, 4, 9, 9, 1, 3, 1, 0, 1, 1),      # 1x1 kernel
    (1, 4, 4, 10, 9, 1, 2, 2, 0, 1, 1),     # 1x1 stride-2 (a projection shortcut)
    (2, 8, 8, 7, 7, 3, 2, 1, 1, 1, 4),      # grouped 3x3 (RegNetY)
    (1, 6, 9, 12, 8, 3, 5, 1, 2, 2, 3),     # dilation 2, groups 3, Cout/g = 3
    (2, 3, 5, 6, 6, 3, 1, 1, 0, 1, 1),      # S = 1, no padding
    (1, 2, 3, 5, 5, 5, 7, 1, 3, 1, 1),      # 5x5, padding > k // 2, S larger than the map
    (3, 4, 2, 14, 14, 3, 7, 2, 1, 1, 2),    # stride 2, groups, S = 7
]


def shape_id(s):
    return "N{}_C{}-{}_{}x{}_k{}_S{}_s{}_p{}_d{}_g{}".format(*s)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_matches_reference(device, dtype, shape, keep):
    N, Cin, Cout, H, W, k, S, stride, padding, dilation, groups = shape
    x, idx, w, b, conv = make_case(N, Cin, Cout, H, W, k, S, keep, stride, padding, dilation, groups,
                                   dtype=dtype, device=device, seed=hash((shape, keep)) % 1000)
    for activation in ("relu", "none"):
        got = laudnet_ops.gather_conv2d(x, idx, w, b, **conv, activation=activation)
        want = reference.gather_conv2d(x.double(), idx, w.double(), None if b is None else b.double(), **conv,
                                       activation=activation)
        assert got.dtype == dtype and got.shape == (idx.shape[0], Cout, S, S)
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_memory_formats(device, layout, weight_layout):
    x, idx, w, b, conv = make_case(2, 6, 5, 9, 11, 3, 4, 0.6, groups=1, device=device, seed=3)
    got = laudnet_ops.gather_conv2d(to_layout(x, layout), idx, to_layout(w, weight_layout), b, **conv)
    torch.testing.assert_close(got, reference.gather_conv2d(x, idx, w, b, **conv))
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_and_border_zeros(device):
    # Positive inputs and weights: every position inside the map is > 0, every one outside exactly 0.
    x, idx, w, _, conv = make_case(2, 3, 4, 7, 5, 3, 4, 1.0, bias=False, device=device, seed=4)
    x, w = x.abs() + 1, w.abs() + 0.1
    got = laudnet_ops.gather_conv2d(x, idx, w, None, **conv, activation="none")
    torch.testing.assert_close(got, reference.gather_conv2d(x, idx, w, None, **conv, activation="none"))
    rows = idx[:, 1:2].long() * 4 + torch.arange(4, device=device)  # (P, S) output rows
    cols = idx[:, 2:3].long() * 4 + torch.arange(4, device=device)
    inside = ((rows < 7)[:, :, None] & (cols < 5)[:, None, :])[:, None].expand_as(got)
    assert (got[inside] > 0).all() and (got[~inside] == 0).all() and (~inside).any()


@pytest.mark.parametrize("device", DEVICES)
def test_many_patches_cross_chunks(device):
    # More patches than one chunk holds at every S, so chunk boundaries and the parallel split are exercised.
    for S in (1, 2, 7):
        x, idx, w, b, conv = make_case(3, 8, 16, 29, 23, 3, S, 0.7, device=device, seed=S)
        for layout in ("contiguous", "channels_last"):
            got = laudnet_ops.gather_conv2d(to_layout(x, layout), idx, w, b, **conv)
            torch.testing.assert_close(got, reference.gather_conv2d(x, idx, w, b, **conv))


def taps_major(w):
    """The same weight, laid out in memory as (kh, kw, Cin, Cout): the blocks' folded-weight layout."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last", "taps_major"])
@pytest.mark.parametrize("S, stride", [(1, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("Cin", [240, 460])
@pytest.mark.parametrize("Cout", [24, 70])
def test_wide_reduction(device, weight_layout, S, stride, Cin, Cout):
    # Long reductions k*k*Cin on the CPU: 2160, which the per-thread micro-kernel GEMM cuts into
    # blocks, and 4140, above its limit: the chunked multi-threaded product path (two chunks at
    # stride 1), its output cut into 64-column panels (one partial, or a full and a partial one);
    # every weight layout, border patches.
    x, idx, w, b, conv = make_case(2, Cin, Cout, 29, 31, 3, S, 0.6, stride, device=device, seed=11)
    w_in = taps_major(w) if weight_layout == "taps_major" else to_layout(w, weight_layout)
    for layout in ("contiguous", "channels_last"):
        got = laudnet_ops.gather_conv2d(to_layout(x, layout), idx, w_in, b, **conv)
        torch.testing.assert_close(got, reference.gather_conv2d(x, idx, w, b, **conv), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_wide_reduction_float64(weight_layout):
    # float64 takes the BLAS product on the long-reduction path, with the weight in either orientation.
    x, idx, w, b, conv = make_case(1, 460, 70, 9, 11, 3, 2, 0.6, dtype=torch.float64, seed=12)
    got = laudnet_ops.gather_conv2d(to_layout(x, "channels_last"), idx, to_layout(w, weight_layout), b, **conv)
    torch.testing.assert_close(got, reference.gather_conv2d(x, idx, w, b, **conv))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x, idx, w, b, conv = make_case(2, 3, 4, 6, 6, 3, 2, 0.0, device=device)
    assert idx.shape[0] == 0
    got = laudnet_ops.gather_conv2d(x, idx, w, b, **conv)
    assert got.shape == (0, 4, 2, 2)
    empty_batch = torch.empty(0, 3, 6, 6, device=device)
    assert laudnet_ops.gather_conv2d(empty_batch, idx, w, b, **conv).shape == (0, 4, 2, 2)
    # Duplicate rows are fine in the forward pass (it only reads).
    x, idx, w, b, conv = make_case(1, 3, 4, 6, 6, 3, 2, 1.0, device=device)
    dup = torch.cat([idx, idx[:2]])
    torch.testing.assert_close(laudnet_ops.gather_conv2d(x, dup, w, b, **conv),
                               reference.gather_conv2d(x, dup, w, b, **conv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("shape", [(1, 3, 4, 7, 6, 3, 3, 1, 1, 1, 1), (1, 4, 4, 9, 7, 3, 2, 2, 1, 1, 2),
                                   (2, 2, 3, 5, 5, 1, 2, 1, 0, 1, 1)], ids=shape_id)
def test_gradcheck(device, layout, activation, shape):
    N, Cin, Cout, H, W, k, S, stride, padding, dilation, groups = shape
    x, idx, w, b, conv = make_case(N, Cin, Cout, H, W, k, S, 0.6, stride, padding, dilation, groups,
                                   dtype=torch.float64, device=device, seed=5)
    x = to_layout(x, layout).requires_grad_()
    w, b = w.requires_grad_(), b.requires_grad_()
    # "relu": the pre-activations of this seed stay clear of the kink at the finite-difference step.
    fn = lambda x, w, b: laudnet_ops.gather_conv2d(x, idx, w, b, **conv, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    x, idx, w, b, conv = make_case(2, 6, 4, 9, 10, 3, 4, 0.5, stride=2, groups=2, device=device, seed=7)
    grad = torch.randn(idx.shape[0], 4, 4, 4, device=device)
    leaves = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    laudnet_ops.gather_conv2d(leaves[0][0], idx, leaves[0][1], leaves[0][2], **conv).backward(grad)
    reference.gather_conv2d(leaves[1][0], idx, leaves[1][1], leaves[1][2], **conv).backward(grad)
    for got, want in zip(*leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_unfused_matches_reference(device):
    for shape in SHAPES:
        N, Cin, Cout, H, W, k, S, stride, padding, dilation, groups = shape
        x, idx, w, b, conv = make_case(N, Cin, Cout, H, W, k, S, 0.5, stride, padding, dilation, groups,
                                       device=device, seed=8)
        torch.testing.assert_close(unfused.gather_conv2d(x, idx, w, b, **conv),
                                   reference.gather_conv2d(x, idx, w, b, **conv), msg=str(shape))


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        x, idx, w, b, conv = make_case(2, 4, 6, 7, 6, 3, 3, 0.5, groups=2, dtype=torch.float64, seed=11)
        args = (to_layout(x, layout).requires_grad_(), idx, w.requires_grad_(), b.requires_grad_(),
                conv["patch_size"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], "relu")
        torch.library.opcheck(torch.ops.laudnet_ops.gather_conv2d.default, args)
        x, idx, w, _, conv = make_case(2, 4, 6, 9, 8, 3, 2, 0.7, stride=2, padding=0, groups=2, bias=False,
                                       dtype=torch.float64, seed=12)
        args = (to_layout(x, layout), idx, w, None, 2, 2, 0, 1, 2, "none")
        torch.library.opcheck(torch.ops.laudnet_ops.gather_conv2d.default, args)


def test_compile_fullgraph():
    x, idx, w, b, conv = make_case(2, 4, 4, 7, 6, 3, 3, 0.5, seed=12)

    def block(x, i, w, b):
        return laudnet_ops.gather_conv2d(x * 2, i, w, b, **conv) + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, idx, w, b), block(x, idx, w, b))

    def pipeline(mask, x, w, b):
        # patch_indices -> gather_conv2d -> scatter_add: the data-dependent P flows through.
        i = laudnet_ops.patch_indices(mask)
        packed = laudnet_ops.gather_conv2d(x, i, w, b, **conv)
        return laudnet_ops.scatter_add(torch.zeros(2, 4, 7, 6), packed, i)

    mask = torch.zeros(2, 3, 2, dtype=torch.bool)
    mask[0, 1, 1] = mask[1, 2, 0] = mask[1, 0, 0] = True
    compiled = torch.compile(pipeline, fullgraph=True)  # the default (inductor) backend
    torch.testing.assert_close(compiled(mask, x, w, b), pipeline(mask, x, w, b))


def test_compile_backward():
    x, idx, w, b, conv = make_case(1, 3, 4, 6, 6, 3, 2, 0.5, seed=13)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    f = lambda x: laudnet_ops.gather_conv2d(x, idx, w, b, **conv).sum()  # noqa: E731
    torch.compile(f, fullgraph=True, backend="aot_eager")(x1).backward()
    f(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 2), Cin_g=st.integers(1, 3), Cout_g=st.integers(1, 3), groups=st.integers(1, 2),
    H=st.integers(3, 11), W=st.integers(3, 11), k=st.sampled_from([1, 3]), S=st.integers(1, 5),
    stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2), keep=st.floats(0, 1),
    seed=st.integers(0, 9999), channels_last=st.booleans(),
)
def test_property_matches_reference(N, Cin_g, Cout_g, groups, H, W, k, S, stride, padding, dilation, keep, seed,
                                    channels_last):
    if H + 2 * padding < dilation * (k - 1) + 1 or W + 2 * padding < dilation * (k - 1) + 1:
        return
    x, idx, w, b, conv = make_case(N, Cin_g * groups, Cout_g * groups, H, W, k, S, keep, stride, padding, dilation,
                                   groups, seed=seed)
    got = laudnet_ops.gather_conv2d(to_layout(x, "channels_last" if channels_last else "contiguous"), idx, w, b,
                                    **conv)
    torch.testing.assert_close(got, reference.gather_conv2d(x, idx, w, b, **conv))


def _valid():
    x, idx, w, b, conv = make_case(2, 4, 6, 8, 8, 3, 4, 1.0, seed=1)
    return [x, idx, w, b, 4, 1, 1, 1, 1, "relu"]


def _with(**changes):
    names = ["x", "indices", "weight", "bias", "patch_size", "stride", "padding", "dilation", "groups", "activation"]

    def mutate(args):
        args = dict(zip(names, args))
        for key, fn in changes.items():
            args[key] = fn(args)
        return [args[n] for n in names]

    return mutate


def _row(r):
    return lambda a: torch.cat([a["indices"][:-1], torch.tensor([r], dtype=torch.int32)])


ERROR_CASES = [
    ("x rank", _with(x=lambda a: a["x"][0]), "x must be a 4-D tensor, got 3-D"),
    ("integer x", _with(x=lambda a: a["x"].long(), weight=lambda a: a["weight"].long(), bias=lambda a: None),
     "x must be a floating-point tensor, got (Long|torch.int64)"),
    ("weight rank", _with(weight=lambda a: a["weight"][0]), "weight must be a 4-D tensor, got 3-D"),
    ("weight dtype", _with(weight=lambda a: a["weight"].double()), "x and weight must have the same dtype"),
    ("int64 indices", _with(indices=lambda a: a["indices"].long()), "indices must be int32"),
    ("indices shape", _with(indices=lambda a: a["indices"][:, :2]), r"indices must have shape \(P, 3\)"),
    ("patch size", _with(patch_size=lambda a: 0), "patch_size must be at least 1, got 0"),
    ("stride", _with(stride=lambda a: 0), "stride must be at least 1, got 0"),
    ("padding", _with(padding=lambda a: -1), "padding must be non-negative, got -1"),
    ("dilation", _with(dilation=lambda a: 0), "dilation must be at least 1, got 0"),
    ("groups", _with(groups=lambda a: 0), "groups must be at least 1, got 0"),
    ("non-square kernel", _with(weight=lambda a: a["weight"][..., :2]), "weight must have a square kernel"),
    ("groups divide", _with(groups=lambda a: 3), r"groups \(3\) must divide both x's channels \(4\)"),
    ("channel mismatch", _with(weight=lambda a: a["weight"][:, :3]),
     "weight has 3 input channels per group, but x has 4 channels in 1 groups"),
    ("grouped mismatch", _with(groups=lambda a: 2), "weight has 4 input channels per group, but x has 4 channels in 2 groups"),
    ("bias shape", _with(bias=lambda a: a["bias"][:5]), r"bias must have shape \(6,\), got \[5\]"),
    ("bias dtype", _with(bias=lambda a: a["bias"].double()), "x and bias must have the same dtype"),
    ("kernel too big", _with(padding=lambda a: 0, dilation=lambda a: 4),
     r"the 3x3 kernel with dilation 4 \(span 9\) does not fit the 8x8 input with padding 0"),
    ("activation", _with(activation=lambda a: "gelu"), 'activation must be "relu" or "none", got "gelu"'),
]

# Index values are data: only the kernels check them (the fake kernel cannot).
INDEX_ERROR_CASES = [
    ("batch out of range", _with(indices=_row([2, 0, 0])),
     r"= \(2, 0, 0\) is outside the patch grid \(N=2, Hp=2, Wp=2\)"),
    ("row out of range", _with(indices=_row([0, 2, 0])), r"= \(0, 2, 0\) is outside the patch grid"),
    ("negative column", _with(indices=_row([0, 0, -1])), r"= \(0, 0, -1\) is outside the patch grid"),
    # The grid is the output's: stride 2 halves it, so a row valid at stride 1 is out of range.
    ("grid at output resolution",
     _with(stride=lambda a: 2, indices=lambda a: torch.tensor([[0, 0, 0], [1, 1, 1]], dtype=torch.int32)),
     r"row 1 = \(1, 1, 1\) is outside the patch grid \(N=2, Hp=1, Wp=1\)"),
]


@pytest.mark.parametrize("fake", [False, True])
@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, mutate, message, fake):
    args = mutate(_valid())
    fn = torch.ops.laudnet_ops.gather_conv2d.default
    assert_raises_on(fn, args, message, fake)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, mutate, message", INDEX_ERROR_CASES, ids=[c[0] for c in INDEX_ERROR_CASES])
def test_index_errors(device, name, mutate, message):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in mutate(_valid())]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.laudnet_ops.gather_conv2d.default(*args)


def test_backward_needs_unique_rows():
    x, idx, w, b, conv = make_case(1, 2, 2, 6, 6, 3, 2, 1.0, seed=2)
    dup = torch.cat([idx, idx[:1]])
    out = laudnet_ops.gather_conv2d(x.requires_grad_(), dup, w, b, **conv)
    with pytest.raises(RuntimeError, match="rows must be unique"):
        out.sum().backward()


@pytest.mark.cuda
def test_device_mismatch():
    x, idx, w, b, conv = make_case(1, 2, 2, 6, 6, 3, 2, 1.0)
    with pytest.raises(RuntimeError, match="x and weight must be on the same device"):
        laudnet_ops.gather_conv2d(x.cuda(), idx.cuda(), w, None, **conv)
    with pytest.raises(RuntimeError, match="x and indices must be on the same device"):
        laudnet_ops.gather_conv2d(x.cuda(), idx, w.cuda(), None, **conv)
