import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, TOL, device_dtype_params, random_mask, to_layout


def make_case(N, rest, keep, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    gates = random_mask((N,), keep, gen).to(device)
    residual = torch.randn(N, *rest, generator=gen, dtype=torch.float64).to(device, dtype)
    K = int(gates.sum())
    y = torch.randn(K, *rest, generator=gen, dtype=torch.float64).to(device, dtype)
    sel = reference.sample_gather(residual, gates)[1]
    return residual, y, gates, sel


SHAPES = [(4, (3, 5, 7)), (1, (2, 3, 3)), (5, (6,)), (3, (2, 4, 4)), (2, (1, 1, 1)), (6, (3, 2, 3, 2))]
KEEPS = [0.0, 0.5, 1.0]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("keep", KEEPS)
def test_gather_matches_reference(device, dtype, shape, keep):
    x, _, gates, _ = make_case(*shape, keep, dtype, device, seed=hash((shape, keep)) % 1000)
    got, sel = laudnet_ops.sample_gather(x, gates)
    want, want_sel = reference.sample_gather(x, gates)
    assert sel.dtype == torch.int32 and sel.device == x.device
    torch.testing.assert_close(sel, want_sel, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_scatter_matches_reference(device, dtype, shape, keep, activation):
    residual, y, _, sel = make_case(*shape, keep, dtype, device, seed=hash((shape, keep)) % 1000)
    got = laudnet_ops.sample_scatter_add(residual, y, sel, activation)
    want = reference.sample_scatter_add(residual.double(), y.double(), sel, activation)
    assert got.dtype == dtype and got.shape == residual.shape
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_unordered_sel(device):
    # sel need not be increasing, only unique.
    residual, y, _, _ = make_case(5, (2, 3, 3), 1.0, device=device, seed=2)
    sel = torch.tensor([3, 0, 4], dtype=torch.int32, device=device)
    got = laudnet_ops.sample_scatter_add(residual, y[:3], sel, "none")
    torch.testing.assert_close(got, reference.sample_scatter_add(residual, y[:3], sel, "none"))
    torch.testing.assert_close(torch.ops.laudnet_ops._sample_index(residual, sel), residual[sel.long()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last"])
def test_memory_formats(device, layout, y_layout):
    residual, y, gates, sel = make_case(5, (6, 4, 5), 0.6, device=device, seed=3)
    res = to_layout(residual, layout)
    out = laudnet_ops.sample_scatter_add(res, to_layout(y, y_layout), sel)
    torch.testing.assert_close(out, reference.sample_scatter_add(residual, y, sel))
    gathered, _ = laudnet_ops.sample_gather(res, gates)
    torch.testing.assert_close(gathered, residual[sel.long()])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and gathered.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_inplace_touches_only_selected(device, layout, activation):
    residual, y, gates, sel = make_case(6, (3, 4, 5), 0.5, device=device, seed=4)
    residual = torch.relu(residual) if activation == "relu" else residual
    work = to_layout(residual.clone(), layout)
    out = laudnet_ops.sample_scatter_add_(work, y, sel, activation)
    assert out is work
    torch.testing.assert_close(work, reference.sample_scatter_add(residual, y, sel, activation))
    torch.testing.assert_close(work[~gates], residual[~gates], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_is_not_differentiable(device):
    residual, y, _, sel = make_case(3, (2, 2), 1.0, device=device)
    with pytest.raises(RuntimeError, match="in-place form is for inference"):
        laudnet_ops.sample_scatter_add_(residual, y.requires_grad_(), sel)
    with torch.no_grad():
        laudnet_ops.sample_scatter_add_(residual, y, sel)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(device, activation, layout):
    residual, y, gates, sel = make_case(4, (2, 3, 3), 0.5, torch.float64, device, seed=5)
    residual = residual + 0.1 * torch.sign(residual)  # away from the ReLU kink
    residual = to_layout(residual, layout).requires_grad_()
    y = to_layout(y, layout).requires_grad_()
    assert torch.autograd.gradcheck(lambda r, v: laudnet_ops.sample_scatter_add(r, v, sel, activation), (residual, y))
    assert torch.autograd.gradcheck(lambda r: laudnet_ops.sample_gather(r, gates)[0], (residual,))
    assert torch.autograd.gradgradcheck(lambda v: laudnet_ops.sample_scatter_add(residual.detach(), v, sel, "none"), (y,))


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_block_backward_matches_reference(device):
    # A residual block run on the kept samples only, end to end.
    residual, _, gates, _ = make_case(5, (4, 6, 6), 0.6, device=device, seed=6)
    w = torch.randn(4, 4, 3, 3, device=device) * 0.2
    grad = torch.randn_like(residual)

    def block(fns, x, w):
        kept, sel = fns.sample_gather(x, gates)
        return fns.sample_scatter_add(x, torch.nn.functional.conv2d(kept, w, padding=1), sel)

    leaves = [[t.clone().requires_grad_() for t in (residual, w)] for _ in range(2)]
    block(laudnet_ops, *leaves[0]).backward(grad)
    block(reference, *leaves[1]).backward(grad)
    for got, want in zip(*leaves):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    residual, y, gates, sel = make_case(3, (2, 4, 4), 0.0, device=device)
    torch.testing.assert_close(laudnet_ops.sample_scatter_add(residual, y, sel), torch.relu(residual))
    kept, sel2 = laudnet_ops.sample_gather(residual, gates)
    assert kept.shape == (0, 2, 4, 4) and sel2.shape == (0,)
    empty = residual[:0]
    assert laudnet_ops.sample_scatter_add(empty, y, sel).shape == (0, 2, 4, 4)
    assert laudnet_ops.sample_scatter_add_(empty, y, sel).shape == (0, 2, 4, 4)
    assert laudnet_ops.sample_gather(empty, gates[:0])[0].shape == (0, 2, 4, 4)


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        residual, y, gates, sel = make_case(4, (3, 4, 5), 0.5, torch.float64, seed=11)
        residual, y = to_layout(residual, layout), to_layout(y, layout)
        torch.library.opcheck(torch.ops.laudnet_ops.sample_scatter_add.default,
                              (residual.requires_grad_(), y.requires_grad_(), sel, "relu"))
        torch.library.opcheck(torch.ops.laudnet_ops._sample_index.default, (residual, sel))
        torch.library.opcheck(torch.ops.laudnet_ops.sample_gather.default, (residual, gates))
        with torch.no_grad():
            torch.library.opcheck(torch.ops.laudnet_ops.sample_scatter_add_.default,
                                  (residual.detach().clone(), y.detach(), sel, "none"))


def test_compile_fullgraph():
    residual, _, gates, _ = make_case(5, (4, 6, 6), 0.6, seed=12)
    w = torch.randn(4, 4, 3, 3) * 0.2

    def block(x, gates, w):
        # The data-dependent K flows from sample_gather through the conv into the scatter.
        kept, sel = laudnet_ops.sample_gather(x, gates)
        return laudnet_ops.sample_scatter_add(x, torch.nn.functional.conv2d(kept, w, padding=1), sel) * 2

    want = block(residual, gates, w)
    torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(residual, gates, w), want)

    def pointwise_block(x, gates):
        kept, sel = laudnet_ops.sample_gather(x, gates)
        return laudnet_ops.sample_scatter_add(x, torch.relu(kept * 3 - 1), sel, "none") * 2

    # Inductor with the default backend. (Inductor's own conv2d on an unbacked batch size picks a
    # different output stride than eager in torch 2.14, independent of these ops, so the default
    # backend is exercised on a pointwise block.)
    torch.testing.assert_close(torch.compile(pointwise_block, fullgraph=True)(residual, gates),
                               pointwise_block(residual, gates))


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 6), C=st.integers(1, 4), H=st.integers(1, 6), W=st.integers(1, 6), keep=st.floats(0, 1),
    seed=st.integers(0, 9999), channels_last=st.booleans(), activation=st.sampled_from(["relu", "none"]),
)
def test_property_matches_reference(N, C, H, W, keep, seed, channels_last, activation):
    residual, y, gates, sel = make_case(N, (C, H, W), keep, seed=seed)
    res = to_layout(residual, "channels_last" if channels_last else "contiguous")
    torch.testing.assert_close(laudnet_ops.sample_scatter_add(res, y, sel, activation),
                               reference.sample_scatter_add(residual, y, sel, activation))
    got, got_sel = laudnet_ops.sample_gather(res, gates)
    torch.testing.assert_close(got, residual[gates])
    torch.testing.assert_close(got_sel, sel)


def _valid():
    residual, y, gates, sel = make_case(4, (3, 4, 4), 0.5, seed=1)
    assert sel.shape[0] >= 2
    return residual, y, sel


def _with_last(sel, value):
    return torch.cat([sel[:-1], torch.tensor([value], dtype=torch.int32)])


SCATTER_ERRORS = [
    ("0-D residual", lambda r, y, s: (r[0, 0, 0, 0], y, s, "relu"), "residual must have a sample dimension"),
    ("integer residual", lambda r, y, s: (r.long(), y.long(), s, "relu"), "residual must be a floating-point tensor"),
    ("dtype mismatch", lambda r, y, s: (r, y.double(), s, "relu"), "residual and y must have the same dtype"),
    ("int64 sel", lambda r, y, s: (r, y, s.long(), "relu"), r"sel must be int32 \(as sample_gather returns\), got Long"),
    ("sel rank", lambda r, y, s: (r, y, s[:, None], "relu"), "sel must be a 1-D tensor"),
    ("y shape", lambda r, y, s: (r, y[:, :2], s, "relu"), r"y must have shape \(K, \[3, 4, 4\]\) to match residual"),
    ("y rank", lambda r, y, s: (r, y[0], s, "relu"), r"y must have shape \(K, "),
    ("count mismatch", lambda r, y, s: (r, y[1:], s, "relu"), r"y holds \d+ samples but sel has \d+ entries"),
    ("activation", lambda r, y, s: (r, y, s, "gelu"), 'activation must be "relu" or "none", got "gelu"'),
    ("sel too large", lambda r, y, s: (r, y, _with_last(s, 4), "relu"), r"sel\[\d+\] = 4 is outside the batch \[0, 4\)"),
    ("negative sel", lambda r, y, s: (r, y, _with_last(s, -1), "relu"), r"sel\[\d+\] = -1 is outside the batch"),
    ("duplicate sel", lambda r, y, s: (r, y, _with_last(s, int(s[0])), "relu"), "sel must be unique"),
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name, mutate, message", SCATTER_ERRORS, ids=[c[0] for c in SCATTER_ERRORS])
def test_scatter_errors(name, mutate, message, inplace):
    fn = laudnet_ops.sample_scatter_add_ if inplace else laudnet_ops.sample_scatter_add
    with pytest.raises(RuntimeError, match=message):
        fn(*mutate(*_valid()))


def test_inplace_error_leaves_residual_untouched():
    residual, y, sel = _valid()
    before = residual.clone()
    with pytest.raises(RuntimeError, match="outside the batch"):
        laudnet_ops.sample_scatter_add_(residual, y, _with_last(sel, 9))
    torch.testing.assert_close(residual, before, rtol=0, atol=0)


GATHER_ERRORS = [
    ("0-D x", lambda x, g: (x[0, 0, 0, 0], g), "x must have a sample dimension"),
    ("integer x", lambda x, g: (x.long(), g), "x must be a floating-point tensor, got Long"),
    ("gates dtype", lambda x, g: (x, g.float()), "gates must be a bool tensor, got Float"),
    ("gates shape", lambda x, g: (x, g[:3]), r"gates must have shape \(N,\) = \(4,\), got \[3\]"),
    ("gates rank", lambda x, g: (x, g[:, None]), r"gates must have shape \(N,\) = \(4,\), got \[4, 1\]"),
]


@pytest.mark.parametrize("name, mutate, message", GATHER_ERRORS, ids=[c[0] for c in GATHER_ERRORS])
def test_gather_errors(name, mutate, message):
    x, _, gates, _ = make_case(4, (3, 4, 4), 0.5, seed=1)
    with pytest.raises(RuntimeError, match=message):
        laudnet_ops.sample_gather(*mutate(x, gates))


def test_sample_index_errors():
    x, _, sel = _valid()
    with pytest.raises(RuntimeError, match=r"_sample_index: sel\[\d+\] = 7 is outside the batch \[0, 4\)"):
        torch.ops.laudnet_ops._sample_index(x, _with_last(sel, 7))
    with pytest.raises(RuntimeError, match="_sample_index: sel must be int32"):
        torch.ops.laudnet_ops._sample_index(x, sel.long())


@pytest.mark.cuda
def test_device_mismatch():
    residual, y, sel = _valid()
    with pytest.raises(RuntimeError, match="residual and y must be on the same device"):
        laudnet_ops.sample_scatter_add(residual.cuda(), y, sel.cuda())
    with pytest.raises(RuntimeError, match="residual and sel must be on the same device"):
        laudnet_ops.sample_scatter_add(residual.cuda(), y.cuda(), sel)
    with pytest.raises(RuntimeError, match="x and gates must be on the same device"):
        laudnet_ops.sample_gather(residual.cuda(), torch.ones(4, dtype=torch.bool))


# Rows of whole 16-byte vectors take the experimental vector kernels on CUDA: R * element size a multiple
# of 16 (float16 (8, 3, 5): 240 bytes; float32 (4, 2, 2): 64; float64 (2, 3, 1): 48). A row of 15 float16
# and a view starting one element in (not 16-byte aligned) keep the one-element kernels.
VECTOR_ROWS = [(torch.float16, (8, 3, 5)), (torch.bfloat16, (16, 2, 2)), (torch.float32, (4, 2, 2)),
               (torch.float64, (2, 3, 1)), (torch.float16, (1, 3, 5))]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, rest", VECTOR_ROWS, ids=[f"{str(d)[6:]}-{r}" for d, r in VECTOR_ROWS])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_row_vectors_match_reference(experimental, dtype, rest, offset, activation):
    N = 70000  # more rows than one grid's y extent holds (65535): the row loop's second pass
    gen = torch.Generator().manual_seed(offset)
    flat = torch.randn(N * math.prod(rest) + offset, generator=gen, dtype=torch.float64).cuda().to(dtype)
    residual = flat[offset:].view(N, *rest)
    gates = (torch.rand(N, generator=gen) < 0.5).cuda()
    kept, sel = laudnet_ops.sample_gather(residual, gates)
    want_kept, want_sel = reference.sample_gather(residual, gates)
    assert torch.equal(sel, want_sel.cuda()) and torch.equal(kept, want_kept)
    y = torch.randn(kept.shape, generator=gen, dtype=torch.float64).cuda().to(dtype)
    want = reference.sample_scatter_add(residual.double(), y.double(), sel, activation).to(dtype)
    torch.testing.assert_close(laudnet_ops.sample_scatter_add(residual, y, sel, activation), want, **TOL[dtype])
    in_place = residual.clone()
    laudnet_ops.sample_scatter_add_(in_place, y, sel, activation)
    torch.testing.assert_close(in_place, want.where(gates.view(-1, *[1] * len(rest)), residual), **TOL[dtype])
