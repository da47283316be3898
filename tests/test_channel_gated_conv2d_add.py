"""channel_gated_conv2d_add_: the gated convolution fused with the residual add, in place."""

import pytest
import torch
from hypothesis import given, settings

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, device_dtype_params, to_layout
from test_channel_gated_conv2d import (CONV_STRATEGIES, CONV_TOL, KEEPS, SHAPES, STATIONARY_IDS, STATIONARY_KEEPS,
                                      STATIONARY_SHAPES, make_case, with_two_threads)


def make_residual(case, G, conv, dtype, layout, seed):
    x, w, b, gin, gout = case
    shape = reference.channel_gated_conv2d(x.double(), w.double(), None, None, None, G, **conv).shape
    gen = torch.Generator().manual_seed(seed)
    res = torch.randn(shape, generator=gen, dtype=torch.float64).to(x.device, dtype)
    return to_layout(res, layout)


def run_both(case, residual, G, activation="relu", in_place=False, with_means=True, **conv):
    """(updated residual, reference); ``in_place`` updates ``residual`` itself, else a copy of it. With
    ``with_means`` the op also returns the channel means, checked here against the reference's."""
    x, w, b, gin, gout = case
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    want = reference.channel_gated_conv2d_add(residual.double(), x.double(), w.double(), dbl(b), gin, gout, G,
                                              activation=activation, **conv)
    got = residual if in_place else residual.clone(memory_format=torch.preserve_format)
    means = torch.full(residual.shape[:2], float("nan"), dtype=residual.dtype, device=residual.device)
    out = laudnet_ops.channel_gated_conv2d_add_(got, x, w, b, gin, gout, G, activation=activation,
                                                means=means if with_means else None, **conv)
    assert out is got
    if with_means:
        tol = CONV_TOL[residual.dtype] if residual.dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(means, want.mean((2, 3)).to(residual.dtype), **tol)
    else:
        assert means.isnan().all()
    return got, want


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("keeps", KEEPS, ids=[f"{a}-{b}" for a, b in KEEPS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("with_means", [True, False], ids=["means", "no-means"])
def test_matches_reference(device, dtype, shape, keeps, layout, activation, with_means):
    N, Cin, Cout, H, W, K, G, conv = shape
    seed = hash((shape[:7], keeps)) % 1000
    case = make_case(N, Cin, Cout, H, W, K, G, *keeps, groups=conv.get("groups", 1), dtype=dtype, device=device,
                     seed=seed)
    case = (to_layout(case[0], layout),) + case[1:]
    residual = make_residual(case, G, conv, dtype, layout, seed + 1)
    got, want = run_both(case, residual, G, activation, with_means=with_means, **conv)
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(got, want.to(dtype), **CONV_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_layout, res_layout", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                                  ("channels_last", "strided"), ("strided", "strided")])
def test_residual_in_another_layout(device, x_layout, res_layout):
    # A residual the kernel cannot walk in x's layout is updated through a working copy.
    conv = dict(padding=1)
    case = make_case(3, 8, 8, 9, 7, 3, 4, 0.5, 0.5, device=device, seed=3)
    case = (to_layout(case[0], x_layout),) + case[1:]
    residual = make_residual(case, 4, conv, torch.float32, res_layout, 4)
    strides = residual.stride()
    got, want = run_both(case, residual, 4, in_place=True, **conv)
    assert got is residual and got.stride() == strides
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inactive_outputs_keep_the_activated_residual(device, layout):
    # Every output gate of sample 1 off: its output is act(residual), bias included nowhere.
    case = make_case(2, 8, 8, 6, 5, 1, 4, None, 1.0, device=device, seed=5)
    x, w, b, gin, gout = case
    gout = gout.clone()
    gout[1] = False
    gout[0, 1] = False
    residual = make_residual(case, 4, {}, torch.float32, layout, 6)
    got, _ = run_both((to_layout(x, layout), w, b, gin, gout), residual, 4)
    assert torch.equal(got[1], residual[1].relu())
    assert torch.equal(got[0, 4:], residual[0, 4:].relu())
    assert not torch.equal(got[0, :4], residual[0, :4].relu())


@pytest.mark.parametrize("device", DEVICES)
def test_large_map_spans_several_tiles(device):
    case = make_case(2, 24, 40, 40, 37, 3, 4, 0.5, 0.5, device=device, seed=7)
    residual = make_residual(case, 4, dict(padding=1), torch.float32, "channels_last", 8)
    case = (to_layout(case[0], "channels_last"),) + case[1:]
    got, want = run_both(case, residual, 4, padding=1)
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", STATIONARY_SHAPES, ids=STATIONARY_IDS)
@pytest.mark.parametrize("keeps", STATIONARY_KEEPS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_large_weight_small_map(shape, keeps):
    # The weight-stationary schedule adding into the residual, and the channel means it pools.
    N, Cin, Cout, H, W, K, G, conv = shape
    case = make_case(N, Cin, Cout, H, W, K, G, *keeps, seed=Cout + K + 1)
    residual = make_residual(case, G, conv, torch.float32, "channels_last", 11)
    case = (to_layout(case[0], "channels_last"),) + case[1:]
    got, want = with_two_threads(lambda: run_both(case, residual, G, **conv))
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("K", [1, 3])
def test_one_sample_split_over_threads(layout, K):
    # Fewer samples than threads: the map is cut into tiles for the idle threads; the channel means
    # are summed over those tiles.
    conv = dict(padding=K // 2)
    case = make_case(1, 16, 24, 13, 11, K, 4, 0.5, 0.5, seed=9)
    residual = make_residual(case, 4, conv, torch.float32, layout, 10)
    got, want = with_two_threads(lambda: run_both((to_layout(case[0], layout),) + case[1:], residual, 4, **conv))
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_is_a_no_op(device):
    x, w, b, gin, gout = make_case(2, 8, 8, 5, 5, 1, 4, 0.5, 0.5, device=device, seed=9)
    residual = torch.empty(0, 8, 5, 5, device=device)
    laudnet_ops.channel_gated_conv2d_add_(residual, x[:0], w, b, gin[:0], gout[:0], 4,
                                          means=torch.empty(0, 8, device=device))
    assert residual.shape == (0, 8, 5, 5)


@settings(max_examples=30, deadline=None)
@given(**CONV_STRATEGIES)
def test_property_matches_reference(N, cin_groups, cout_groups, G, H, W, K, stride, padding, keep_in, keep_out, seed,
                                    channels_last, activation):
    if H + 2 * padding < K or W + 2 * padding < K:
        return
    layout = "channels_last" if channels_last else "contiguous"
    conv = dict(stride=stride, padding=padding)
    case = make_case(N, cin_groups * G, cout_groups * G, H, W, K, G, keep_in, keep_out, seed=seed)
    case = (to_layout(case[0], layout),) + case[1:]
    residual = make_residual(case, G, conv, torch.float32, layout, seed + 1)
    got, want = run_both(case, residual, G, activation, **conv)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:6], ids=[str(i) for i in range(6)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unfused_fallback_matches_reference(shape, layout):
    # The kernel devices without a fused one (CUDA) run: the gated convolution, then the add and ReLU.
    # Reached here by dispatching to it explicitly with CPU tensors.
    N, Cin, Cout, H, W, K, G, conv = shape
    case = make_case(N, Cin, Cout, H, W, K, G, 0.5, 0.5, groups=conv.get("groups", 1), seed=21)
    case = (to_layout(case[0], layout),) + case[1:]
    residual = make_residual(case, G, conv, torch.float32, layout, 22)
    _, want = run_both(case, residual, G, **conv)
    got = residual.clone(memory_format=torch.preserve_format)
    means = torch.empty(residual.shape[:2])
    pair = lambda v: [v, v]  # noqa: E731
    args = (got, *case, G, pair(conv.get("stride", 1)), pair(conv.get("padding", 0)), pair(conv.get("dilation", 1)),
            conv.get("groups", 1), "relu", means)
    unfused = torch._C.DispatchKey.CompositeExplicitAutograd
    torch.ops.laudnet_ops.channel_gated_conv2d_add_.default._op_dk(unfused, *args)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(means, want.mean((2, 3)).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="channel_gated_conv2d_add_: residual must have the output's shape"):
        torch.ops.laudnet_ops.channel_gated_conv2d_add_.default._op_dk(unfused, got[:, :G], *args[1:])


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        x, w, b, gin, gout = make_case(2, 4, 4, 5, 5, 3, 2, 0.5, 0.5, dtype=torch.float64, seed=13)
        x = to_layout(x, layout)
        residual = to_layout(torch.randn(2, 4, 3, 5, dtype=torch.float64), layout)
        op = torch.ops.laudnet_ops.channel_gated_conv2d_add_.default
        # Schema, fake kernel and in-place aliasing; the op has no autograd formula (inference only).
        tests = ("test_schema", "test_faketensor")
        torch.library.opcheck(op, (residual, x, w, b, gin, gout, 2, [2, 1], [1, 1], [1, 1], 1, "relu"),
                              test_utils=tests)
        torch.library.opcheck(op, (residual, x, w, None, None, gout, 2, [2, 1], [1, 1], [1, 1], 1, "none"),
                              test_utils=tests)
        means = torch.empty(2, 4, dtype=torch.float64)
        torch.library.opcheck(op, (residual, x, w, b, gin, gout, 2, [2, 1], [1, 1], [1, 1], 1, "relu", means),
                              test_utils=tests)


def test_compile_fullgraph():
    x, w, b, gin, gout = make_case(2, 8, 8, 6, 6, 3, 4, 0.5, 0.5, seed=14)

    def block(x, residual):
        residual = residual * 1  # a tensor the graph owns, updated in place
        return laudnet_ops.channel_gated_conv2d_add_(residual, x, w, b, gin, gout, 4, padding=1) + 1

    residual = torch.randn(2, 8, 6, 6)
    want = block(x, residual)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(x, residual), want)
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, residual), want)


def _valid():
    x, w, b, gin, gout = make_case(2, 8, 8, 6, 6, 3, 2, 0.5, 0.5, seed=1)
    return dict(residual=torch.randn(2, 8, 6, 6), x=x, weight=w, bias=b, in_gates=gin, out_gates=gout,
                group_size=2, padding=1)


ERROR_CASES = [
    ("residual rank", dict(residual=lambda a: a["residual"][0]), "residual must be a 4-D tensor, got 3-D"),
    ("residual shape", dict(residual=lambda a: a["residual"][:, :4]),
     r"residual must have the output's shape \(N, Cout, Ho, Wo\) = \(2, 8, 6, 6\), got \[2, 4, 6, 6\]"),
    ("residual dtype", dict(residual=lambda a: a["residual"].double()), "x and residual must have the same dtype"),
    ("residual broadcast", dict(residual=lambda a: torch.randn(1, 8, 6, 6).expand(2, 8, 6, 6)),
     "residual has overlapping elements"),
    ("residual is x", dict(residual=lambda a: a["x"]), "residual and x share memory"),
    ("gate shape", dict(in_gates=lambda a: a["in_gates"][:, :3]),
     r"channel_gated_conv2d_add_: in_gates must have shape \(N, channels / group_size\) = \(2, 4\)"),
    ("activation", dict(activation=lambda a: "gelu"), 'activation must be "relu" or "none", got "gelu"'),
    ("means shape", dict(means=lambda a: torch.empty(2, 4)), r"means must have shape \(N, Cout\) = \(2, 8\)"),
    ("means dtype", dict(means=lambda a: torch.empty(2, 8, dtype=torch.float64)),
     "residual and means must have the same dtype"),
    ("means is residual", dict(means=lambda a: a["residual"].view(-1)[:16].view(2, 8)),
     "residual and means share memory"),
]


@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, mutate, message):
    args = _valid()
    args.update({k: f(args) for k, f in mutate.items()})
    with pytest.raises(RuntimeError, match=message):
        laudnet_ops.channel_gated_conv2d_add_(**args)


def test_refuses_gradients():
    args = _valid()
    args["weight"].requires_grad_()
    with pytest.raises(RuntimeError, match="for inference and has no gradient"):
        laudnet_ops.channel_gated_conv2d_add_(**args)
    with torch.no_grad():
        laudnet_ops.channel_gated_conv2d_add_(**args)


@pytest.mark.cuda
def test_device_mismatch():
    args = _valid()
    with pytest.raises(RuntimeError, match="x and residual must be on the same device"):
        laudnet_ops.channel_gated_conv2d_add_(**{**args, "residual": args["residual"].cuda()})
