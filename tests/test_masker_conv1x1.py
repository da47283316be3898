import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference, unfused

from helpers import DEVICES, TOL, assert_raises_on, device_dtype_params, to_layout


def make_case(N, Cin, Cout, M, H, W, bias=True, mask_bias=True, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    x = randn(N, Cin, H, W)
    w = randn(Cout, Cin, 1, 1, scale=1 / math.sqrt(Cin))
    wm = randn(M, Cin, 1, 1, scale=1 / math.sqrt(Cin))
    return x, w, randn(Cout) if bias else None, wm, randn(M) if mask_bias else None


def double(t):
    return None if t is None else t.double()


# N, Cin, Cout, M, H, W, S, stride
SHAPES = [
    (2, 8, 6, 1, 8, 8, 4, 1),     # divisible
    (2, 5, 7, 2, 9, 7, 4, 1),     # map not divisible by S: clipped border cells
    (1, 4, 3, 1, 11, 13, 2, 2),   # stride 2 with odd sizes: grid ceil(ceil(11/2)/2) = 3
    (3, 3, 4, 2, 6, 5, 1, 1),     # S = 1: one cell per pixel
    (1, 6, 2, 3, 5, 5, 7, 1),     # S larger than the map: one cell
    (2, 16, 12, 1, 14, 14, 7, 2), # window 14 = the whole map
    (1, 2, 2, 1, 1, 1, 1, 1),     # 1x1 map
]


def shape_id(s):
    return "N{}_C{}-{}_M{}_{}x{}_S{}_s{}".format(*s)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_matches_reference(device, dtype, shape, activation):
    N, Cin, Cout, M, H, W, S, stride = shape
    x, w, b, wm, bm = make_case(N, Cin, Cout, M, H, W, dtype=dtype, device=device, seed=hash(shape) % 1000)
    y, logits = laudnet_ops.masker_conv1x1(x, w, b, wm, bm, S, stride, activation)
    want_y, want_logits = reference.masker_conv1x1(x.double(), w.double(), b.double(), wm.double(), bm.double(),
                                                   S, stride, activation)
    Hq, Wq = math.ceil(math.ceil(H / stride) / S), math.ceil(math.ceil(W / stride) / S)
    assert y.shape == (N, Cout, H, W) and logits.shape == (N, M, Hq, Wq)
    assert y.dtype == logits.dtype == dtype
    torch.testing.assert_close(y, want_y.to(dtype), **TOL[dtype])
    torch.testing.assert_close(logits, want_logits.to(dtype), **TOL[dtype])


def test_reference_pools_the_issue_windows():
    # The reference against the issue's words, pixel by pixel: the mean over rows
    # [py*S*stride, min((py+1)*S*stride, H)) and likewise for columns.
    x, w, b, wm, bm = make_case(1, 3, 2, 2, 9, 7, dtype=torch.float64, seed=1)
    S, stride = 2, 2
    _, logits = reference.masker_conv1x1(x, w, b, wm, bm, S, stride)
    m = F.conv2d(x, wm, bm)
    for py in range(logits.shape[2]):
        for px in range(logits.shape[3]):
            win = m[:, :, py * S * stride:min((py + 1) * S * stride, 9), px * S * stride:min((px + 1) * S * stride, 7)]
            torch.testing.assert_close(logits[:, :, py, px], win.mean((2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("weight_layout", ["contiguous", "strided", "taps_major", "sliced"])
def test_memory_formats(device, layout, weight_layout):
    x, w, b, wm, bm = make_case(2, 6, 5, 2, 9, 11, device=device, seed=3)
    wl = {
        "contiguous": lambda t: t,
        "strided": lambda t: t.transpose(2, 3),
        # (1, 1, Cin, Cout) in memory: the spatial blocks' folded conv1 weight, read in place on the CPU
        "taps_major": lambda t: t.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1),
        "sliced": lambda t: torch.stack([t, t], 2).flatten(1, 2)[:, ::2],
    }[weight_layout]
    y, logits = laudnet_ops.masker_conv1x1(to_layout(x, layout), wl(w), b, wl(wm), bm, 4, 1)
    want_y, want_logits = reference.masker_conv1x1(x, w, b, wm, bm, 4, 1)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(logits, want_logits)
    for t in (y, logits):
        if layout == "channels_last":
            assert t.is_contiguous(memory_format=torch.channels_last)
        else:
            assert t.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_optional_biases_and_large_maps(device):
    # Large enough for several chunks per sample and both threads; no biases.
    x, w, _, wm, _ = make_case(3, 32, 16, 2, 37, 29, bias=False, mask_bias=False, device=device, seed=4)
    for layout in ("contiguous", "channels_last"):
        for S, stride in ((1, 1), (4, 1), (2, 2)):
            got = laudnet_ops.masker_conv1x1(to_layout(x, layout), w, None, wm, None, S, stride)
            want = reference.masker_conv1x1(x, w, None, wm, None, S, stride)
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for N, H, W in ((0, 5, 5), (2, 0, 4), (1, 3, 0)):
        x, w, b, wm, bm = make_case(N, 3, 4, 1, H, W, device=device)
        y, logits = laudnet_ops.masker_conv1x1(x, w, b, wm, bm, 2, 1)
        assert y.shape == (N, 4, H, W) and logits.shape == (N, 1, math.ceil(H / 2), math.ceil(W / 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 2, 5, 7, 2, 1), (1, 4, 3, 1, 7, 6, 2, 2)], ids=shape_id)
def test_gradcheck(device, layout, activation, shape):
    N, Cin, Cout, M, H, W, S, stride = shape
    x, w, b, wm, bm = make_case(N, Cin, Cout, M, H, W, dtype=torch.float64, device=device, seed=5)
    x = to_layout(x, layout).requires_grad_()
    params = [t.requires_grad_() for t in (w, b, wm, bm)]
    fn = lambda x, w, b, wm, bm: laudnet_ops.masker_conv1x1(x, w, b, wm, bm, S, stride, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    x, w, b, wm, bm = make_case(2, 6, 5, 2, 9, 10, device=device, seed=7)
    leaves = [[t.clone().requires_grad_() for t in (x, w, b, wm, bm)] for _ in range(2)]
    outs = [fn(*lv, 3, 2) for fn, lv in zip((laudnet_ops.masker_conv1x1, reference.masker_conv1x1), leaves)]
    gy, gl = torch.randn_like(outs[1][0]), torch.randn_like(outs[1][1])
    for y, logits in outs:
        torch.autograd.backward([y, logits], [gy, gl])
    for got, want in zip(*leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
    # Through the logits alone: a masker trained through the fused op.
    leaves = [[t.clone().requires_grad_() for t in (x, wm, bm)] for _ in range(2)]
    for fn, (xx, wwm, bbm) in zip((laudnet_ops.masker_conv1x1, reference.masker_conv1x1), leaves):
        fn(xx, w, b, wwm, bbm, 3, 2)[1].sum().backward()
    for got, want in zip(*leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_unfused_matches_reference(device):
    for shape in SHAPES:
        N, Cin, Cout, M, H, W, S, stride = shape
        x, w, b, wm, bm = make_case(N, Cin, Cout, M, H, W, device=device, seed=8)
        got = unfused.masker_conv1x1(x, w, b, wm, bm, S, stride)
        want = reference.masker_conv1x1(x, w, b, wm, bm, S, stride)
        torch.testing.assert_close(got, want, msg=str(shape))


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        x, w, b, wm, bm = make_case(2, 4, 3, 2, 7, 6, dtype=torch.float64, seed=11)
        args = (to_layout(x, layout).requires_grad_(), w.requires_grad_(), b.requires_grad_(),
                wm.requires_grad_(), bm.requires_grad_(), 2, 2, "relu")
        torch.library.opcheck(torch.ops.laudnet_ops.masker_conv1x1.default, args)
        torch.library.opcheck(torch.ops.laudnet_ops.masker_conv1x1.default, (x, w, None, wm, None, 3, 1, "none"))


def test_compile_fullgraph():
    x, w, b, wm, bm = make_case(2, 4, 3, 1, 7, 6, seed=12)

    def block(x, w, b, wm, bm):
        y, logits = laudnet_ops.masker_conv1x1(x, w, b, wm, bm, 2, 1)
        return y * 2, (logits > 0).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, wm, bm), block(x, w, b, wm, bm))
    compiled = torch.compile(block, fullgraph=True)  # the default (inductor) backend
    torch.testing.assert_close(compiled(x, w, b, wm, bm), block(x, w, b, wm, bm))


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 2), Cin=st.integers(1, 6), Cout=st.integers(1, 5), M=st.integers(1, 3),
    H=st.integers(1, 13), W=st.integers(1, 13), S=st.integers(1, 5), stride=st.integers(1, 3),
    seed=st.integers(0, 9999), channels_last=st.booleans(), activation=st.sampled_from(["relu", "none"]),
)
def test_property_matches_reference(N, Cin, Cout, M, H, W, S, stride, seed, channels_last, activation):
    x, w, b, wm, bm = make_case(N, Cin, Cout, M, H, W, seed=seed)
    got = laudnet_ops.masker_conv1x1(to_layout(x, "channels_last" if channels_last else "contiguous"),
                                     w, b, wm, bm, S, stride, activation)
    torch.testing.assert_close(got, reference.masker_conv1x1(x, w, b, wm, bm, S, stride, activation))


def _valid():
    x, w, b, wm, bm = make_case(2, 4, 6, 1, 8, 8, seed=1)
    return [x, w, b, wm, bm, 4, 1, "relu"]


def _with(**changes):
    names = ["x", "weight", "bias", "mask_weight", "mask_bias", "patch_size", "stride", "activation"]

    def mutate(args):
        args = dict(zip(names, args))
        for key, fn in changes.items():
            args[key] = fn(args)
        return [args[n] for n in names]

    return mutate


ERROR_CASES = [
    ("x rank", _with(x=lambda a: a["x"][0]), "x must be a 4-D tensor, got 3-D"),
    ("integer x", _with(x=lambda a: a["x"].long()), "x must be a floating-point tensor, got (Long|torch.int64)"),
    ("weight rank", _with(weight=lambda a: a["weight"][..., 0]), "weight must be a 4-D tensor, got 3-D"),
    ("weight dtype", _with(weight=lambda a: a["weight"].double()), "x and weight must have the same dtype"),
    ("weight not 1x1", _with(weight=lambda a: a["weight"].expand(6, 4, 3, 3)),
     r"weight must be a 1x1 kernel, shape \(Cout, Cin, 1, 1\), got \[6, 4, 3, 3\]"),
    ("weight channels", _with(weight=lambda a: a["weight"][:, :3]), "weight has 3 input channels but x has 4"),
    ("mask_weight channels", _with(mask_weight=lambda a: a["mask_weight"][:, :2]),
     "mask_weight has 2 input channels but x has 4"),
    ("mask_weight not 1x1", _with(mask_weight=lambda a: a["mask_weight"].expand(1, 4, 2, 2)),
     r"mask_weight must be a 1x1 kernel, shape \(M, Cin, 1, 1\)"),
    ("mask_weight dtype", _with(mask_weight=lambda a: a["mask_weight"].double()),
     "x and mask_weight must have the same dtype"),
    ("no masker channel", _with(mask_weight=lambda a: a["mask_weight"][:0], mask_bias=lambda a: None),
     "mask_weight must have at least one masker channel"),
    ("bias shape", _with(bias=lambda a: a["bias"][:5]), r"bias must have shape \(6,\), got \[5\]"),
    ("mask_bias shape", _with(mask_bias=lambda a: torch.zeros(2)), r"mask_bias must have shape \(1,\), got \[2\]"),
    ("mask_bias dtype", _with(mask_bias=lambda a: a["mask_bias"].double()), "x and mask_bias must have the same dtype"),
    ("patch size", _with(patch_size=lambda a: 0), "patch_size must be at least 1, got 0"),
    ("stride", _with(stride=lambda a: 0), "stride must be at least 1, got 0"),
    ("activation", _with(activation=lambda a: "gelu"), 'activation must be "relu" or "none", got "gelu"'),
]


@pytest.mark.parametrize("fake", [False, True])
@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, mutate, message, fake):
    args = mutate(_valid())
    fn = torch.ops.laudnet_ops.masker_conv1x1.default
    assert_raises_on(fn, args, message, fake)


@pytest.mark.cuda
def test_device_mismatch():
    x, w, b, wm, bm = make_case(1, 2, 2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="x and weight must be on the same device"):
        laudnet_ops.masker_conv1x1(x.cuda(), w, None, wm.cuda(), None, 2)
    with pytest.raises(RuntimeError, match="x and mask_weight must be on the same device"):
        laudnet_ops.masker_conv1x1(x.cuda(), w.cuda(), None, wm, None, 2)
