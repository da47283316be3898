import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, TOL, device_dtype_params, patch_grid, random_mask, to_layout


def make_case(N, Cin, Cout, H, W, S, keep, dtype=torch.float32, device="cpu", seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    Hp, Wp = patch_grid(H, W, S)
    indices = reference.patch_indices(random_mask((N, Hp, Wp), keep, gen)).to(device)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype)

    residual = randn(N, Cout, H, W)
    packed = randn(indices.shape[0], Cin, S, S)
    weight = randn(Cout, Cin, 1, 1, scale=1 / math.sqrt(max(Cin, 1)))
    b = randn(Cout) if bias else None
    return residual, packed, indices, weight, b


def taps_major(w):
    """The (Cin, Cout)-ordered weight the blocks pass for channels_last maps."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def ref(residual, packed, indices, weight, bias, activation="relu"):
    args = [t.double() if t is not None else None for t in (residual, packed)] + [indices]
    args += [weight.double(), bias.double() if bias is not None else None]
    return reference.conv1x1_scatter_add(*args, activation).to(residual.dtype)


SHAPES = [
    # N, Cin, Cout, H, W, S: divisible maps, borders (map not divisible by S), S = 1, one sample, odd channels
    (2, 8, 16, 8, 8, 4),
    (2, 5, 7, 7, 9, 4),
    (1, 3, 4, 13, 6, 3),
    (3, 6, 2, 5, 5, 1),
    (2, 9, 11, 14, 14, 7),
    (1, 1, 1, 1, 1, 2),
    (2, 33, 70, 9, 10, 2),
]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(device, dtype, shape, keep, layout):
    seed = hash((shape, keep)) % 1000
    residual, packed, indices, weight, bias = make_case(*shape, keep, dtype, device, seed=seed)
    for activation in ("relu", "none"):
        res, pk = to_layout(residual, layout), to_layout(packed, layout)
        got = laudnet_ops.conv1x1_scatter_add(res, pk, indices, weight, bias, activation)
        assert got.dtype == dtype and got.shape == residual.shape
        torch.testing.assert_close(got, ref(residual, packed, indices, weight, bias, activation), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("packed_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("weight_layout", ["contiguous", "taps_major"])
def test_memory_formats(device, layout, packed_layout, weight_layout):
    residual, packed, indices, weight, bias = make_case(2, 6, 10, 9, 11, 4, 0.6, device=device)
    w = taps_major(weight) if weight_layout == "taps_major" else weight
    got = laudnet_ops.conv1x1_scatter_add(to_layout(residual, layout), to_layout(packed, packed_layout), indices, w, bias)
    torch.testing.assert_close(got, ref(residual, packed, indices, weight, bias))
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_bias_none_and_large_chunks(device):
    # Enough patches for several CPU chunks per thread, and no bias.
    residual, packed, indices, weight, _ = make_case(3, 40, 96, 30, 29, 2, 0.7, device=device, seed=4, bias=False)
    for layout in ("contiguous", "channels_last"):
        got = laudnet_ops.conv1x1_scatter_add(to_layout(residual, layout), to_layout(packed, layout), indices, weight)
        torch.testing.assert_close(got, ref(residual, packed, indices, weight, None), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unordered_indices(device, layout):
    # Rows in any order (not patch_indices' row-major one): the patches of a chunk are not consecutive.
    residual, packed, indices, weight, bias = make_case(2, 7, 12, 17, 15, 2, 0.6, device=device, seed=8)
    order = torch.randperm(indices.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
    indices, packed = indices[order], packed[order]
    got = laudnet_ops.conv1x1_scatter_add(to_layout(residual, layout), to_layout(packed, layout), indices, weight, bias)
    torch.testing.assert_close(got, ref(residual, packed, indices, weight, bias))
    work = to_layout(torch.relu(residual), layout)
    laudnet_ops.conv1x1_scatter_add_(work, to_layout(packed, layout), indices, weight, bias)
    torch.testing.assert_close(work, ref(torch.relu(residual), packed, indices, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_inplace_equals_out_of_place(device, layout, activation):
    residual, packed, indices, weight, bias = make_case(2, 5, 6, 10, 7, 3, 0.5, device=device, seed=3)
    residual = torch.relu(residual) if activation == "relu" else residual  # a post-activation map
    work = to_layout(residual.clone(), layout)
    out = laudnet_ops.conv1x1_scatter_add_(work, packed, indices, weight, bias, activation)
    assert out is work
    expected = laudnet_ops.conv1x1_scatter_add(residual, packed, indices, weight, bias, activation)
    torch.testing.assert_close(work, expected, rtol=0, atol=0)
    ones = residual.new_ones(packed.shape[0], residual.shape[1], 3, 3)
    covered = reference.scatter_add(torch.zeros_like(residual), ones, indices, "none") > 0
    torch.testing.assert_close(work[~covered], residual[~covered], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_is_not_differentiable(device):
    residual, packed, indices, weight, bias = make_case(1, 2, 3, 4, 4, 2, 1.0, device=device)
    for name in ("residual", "packed", "weight", "bias"):
        args = dict(residual=residual.clone(), packed=packed.clone(), weight=weight.clone(), bias=bias.clone())
        args[name].requires_grad_()
        with pytest.raises(RuntimeError, match="in-place form is for inference"):
            laudnet_ops.conv1x1_scatter_add_(args["residual"], args["packed"], indices, args["weight"], args["bias"])
    with torch.no_grad():
        laudnet_ops.conv1x1_scatter_add_(residual, packed.requires_grad_(), indices, weight, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 7, 3), (1, 2, 2, 4, 4, 2), (2, 3, 2, 3, 3, 1)])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(device, shape, activation, layout, with_bias):
    residual, packed, indices, weight, bias = make_case(*shape, 0.6, torch.float64, device, seed=5, bias=with_bias)
    # Keep values away from the ReLU kink, where finite differences are meaningless.
    residual = residual + 0.5 * torch.sign(residual)
    inputs = [to_layout(residual, layout), to_layout(packed, layout), weight] + ([bias] if with_bias else [])
    inputs = [t.requires_grad_() for t in inputs]

    def fn(r, p, w, b=None):
        return laudnet_ops.conv1x1_scatter_add(r, p, indices, w, b, activation)

    assert torch.autograd.gradcheck(fn, inputs)
    if activation == "none" and shape[0] == 1:  # twice differentiable; slow, so on the smallest case
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    residual, packed, indices, weight, bias = make_case(2, 4, 6, 9, 10, 4, 0.5, device=device, seed=7)
    grad = torch.randn_like(residual)
    a = [t.clone().requires_grad_() for t in (residual, packed, weight, bias)]
    b = [t.clone().requires_grad_() for t in (residual, packed, weight, bias)]
    laudnet_ops.conv1x1_scatter_add(a[0], a[1], indices, a[2], a[3]).backward(grad)
    reference.conv1x1_scatter_add(b[0], b[1], indices, b[2], b[3]).backward(grad)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    # No patches at all, and an empty batch.
    residual, packed, indices, weight, bias = make_case(2, 3, 4, 6, 6, 2, 0.0, device=device)
    assert packed.shape[0] == 0
    torch.testing.assert_close(laudnet_ops.conv1x1_scatter_add(residual, packed, indices, weight, bias),
                               torch.relu(residual))
    before = residual.clone()
    laudnet_ops.conv1x1_scatter_add_(residual, packed, indices, weight, bias)
    torch.testing.assert_close(residual, before, rtol=0, atol=0)
    empty = torch.empty(0, 4, 6, 6, device=device)
    assert laudnet_ops.conv1x1_scatter_add(empty, packed, indices, weight, bias).shape == (0, 4, 6, 6)
    assert laudnet_ops.conv1x1_scatter_add_(empty, packed, indices, weight, bias).shape == (0, 4, 6, 6)
    # Gradients of P = 0: only the residual's.
    r, p, w = residual.clone().requires_grad_(), packed.clone().requires_grad_(), weight.clone().requires_grad_()
    laudnet_ops.conv1x1_scatter_add(r, p, indices, w, None, "none").sum().backward()
    torch.testing.assert_close(r.grad, torch.ones_like(r))
    torch.testing.assert_close(w.grad, torch.zeros_like(w))


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        residual, packed, indices, weight, bias = make_case(2, 3, 5, 7, 6, 3, 0.5, torch.float64, seed=11)
        residual, packed = to_layout(residual, layout), to_layout(packed, layout)
        args = (residual.requires_grad_(), packed.requires_grad_(), indices, weight.requires_grad_(),
                bias.requires_grad_(), "relu")
        torch.library.opcheck(torch.ops.laudnet_ops.conv1x1_scatter_add.default, args)
        torch.library.opcheck(torch.ops.laudnet_ops.conv1x1_scatter_add.default, args[:4] + (None, "none"))
        with torch.no_grad():
            detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(torch.ops.laudnet_ops.conv1x1_scatter_add_.default,
                                  (detached[0].clone(),) + detached[1:])


def test_compile_fullgraph():
    residual, packed, indices, weight, bias = make_case(2, 4, 3, 7, 6, 3, 0.5, seed=12)

    def block(r, p, i, w, b):
        return laudnet_ops.conv1x1_scatter_add(r * 2, p, i, w, b, "relu") + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(residual, packed, indices, weight, bias),
                               block(residual, packed, indices, weight, bias))

    def pipeline(mask, r, p, w, b):
        # patch_indices feeds the op: the data-dependent P flows through the graph.
        idx = laudnet_ops.patch_indices(mask)
        return laudnet_ops.conv1x1_scatter_add(r, p[: idx.shape[0]], idx, w, b)

    mask = torch.zeros(2, 3, 2, dtype=torch.bool)
    mask[0, 1, 1] = mask[1, 2, 0] = True
    compiled = torch.compile(pipeline, fullgraph=True)  # the default (inductor) backend
    torch.testing.assert_close(compiled(mask, residual, packed, weight, bias),
                               pipeline(mask, residual, packed, weight, bias))


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 3), Cin=st.integers(1, 9), Cout=st.integers(1, 9), H=st.integers(1, 11),
    W=st.integers(1, 11), S=st.integers(1, 5), keep=st.floats(0, 1), seed=st.integers(0, 9999),
    channels_last=st.booleans(), activation=st.sampled_from(["relu", "none"]), with_bias=st.booleans(),
)
def test_property_matches_reference(N, Cin, Cout, H, W, S, keep, seed, channels_last, activation, with_bias):
    residual, packed, indices, weight, bias = make_case(N, Cin, Cout, H, W, S, keep, seed=seed, bias=with_bias)
    layout = "channels_last" if channels_last else "contiguous"
    got = laudnet_ops.conv1x1_scatter_add(to_layout(residual, layout), to_layout(packed, layout), indices, weight,
                                          bias, activation)
    torch.testing.assert_close(got, ref(residual, packed, indices, weight, bias, activation))


def _valid():
    return make_case(2, 3, 4, 8, 8, 4, 0.5, seed=1)


def _row(values):
    return torch.tensor([values], dtype=torch.int32)


ERROR_CASES = [
    ("residual rank", lambda r, p, i, w, b: (r[0], p, i, w, b, "relu"), "residual must be a 4-D tensor, got 3-D"),
    ("packed rank", lambda r, p, i, w, b: (r, p[..., 0], i, w, b, "relu"), "packed must be a 4-D tensor, got 3-D"),
    ("weight rank", lambda r, p, i, w, b: (r, p, i, w[..., 0], b, "relu"), "weight must be a 4-D tensor, got 3-D"),
    ("integer residual", lambda r, p, i, w, b: (r.long(), p.long(), i, w.long(), b.long(), "relu"),
     "residual must be a floating-point tensor, got Long"),
    ("packed dtype", lambda r, p, i, w, b: (r, p.double(), i, w, b, "relu"),
     "residual and packed must have the same dtype, got Float and Double"),
    ("weight dtype", lambda r, p, i, w, b: (r, p, i, w.double(), b, "relu"),
     "residual and weight must have the same dtype, got Float and Double"),
    ("bias dtype", lambda r, p, i, w, b: (r, p, i, w, b.double(), "relu"),
     "residual and bias must have the same dtype, got Float and Double"),
    ("int64 indices", lambda r, p, i, w, b: (r, p, i.long(), w, b, "relu"),
     "indices must be int32 .as patch_indices returns., got Long"),
    ("indices shape", lambda r, p, i, w, b: (r, p, i[:, :2], w, b, "relu"), r"indices must have shape \(P, 3\), got \[\d+, 2\]"),
    ("non-square patch", lambda r, p, i, w, b: (r, p[..., :3], i, w, b, "relu"), r"packed must have shape \(P, Cin, S, S\)"),
    ("zero patch size", lambda r, p, i, w, b: (r, p[:, :, :0, :0], i, w, b, "relu"),
     r"patch size \(packed.size\(2\)\) must be at least 1, got 0"),
    ("3x3 weight", lambda r, p, i, w, b: (r, p, i, w.expand(-1, -1, 3, 3), b, "relu"),
     r"weight must be a 1x1 kernel, shape \(Cout, Cin, 1, 1\), got \[4, 3, 3, 3\]"),
    ("weight input channels", lambda r, p, i, w, b: (r, p[:, :2], i, w, b, "relu"),
     "weight has 3 input channels but packed has 2"),
    ("weight output channels", lambda r, p, i, w, b: (r[:, :3], p, i, w, b, "relu"),
     "weight has 4 output channels but residual has 3"),
    ("bias shape", lambda r, p, i, w, b: (r, p, i, w, b[:3], "relu"), r"bias must have shape \(4,\), got \[3\]"),
    ("bias rank", lambda r, p, i, w, b: (r, p, i, w, b[None], "relu"), r"bias must have shape \(4,\), got \[1, 4\]"),
    ("count mismatch", lambda r, p, i, w, b: (r, p[1:], i, w, b, "relu"), r"packed holds \d+ patches but indices has \d+ rows"),
    ("activation", lambda r, p, i, w, b: (r, p, i, w, b, "gelu"), 'activation must be "relu" or "none", got "gelu"'),
    ("batch out of range", lambda r, p, i, w, b: (r, p, torch.cat([i[:-1], _row([2, 0, 0])]), w, b, "relu"),
     r"indices row \d+ = \(2, 0, 0\) is outside the patch grid \(N=2, Hp=2, Wp=2\)"),
    ("negative index", lambda r, p, i, w, b: (r, p, torch.cat([i[:-1], _row([0, -1, 0])]), w, b, "relu"),
     r"indices row \d+ = \(0, -1, 0\) is outside the patch grid"),
    ("column out of range", lambda r, p, i, w, b: (r, p, torch.cat([i[:-1], _row([1, 0, 2])]), w, b, "relu"),
     r"indices row \d+ = \(1, 0, 2\) is outside the patch grid"),
    ("duplicate rows", lambda r, p, i, w, b: (r, p, torch.cat([i[:-1], i[:1]]), w, b, "relu"), "rows must be unique"),
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, mutate, message, inplace):
    residual, packed, indices, weight, bias = _valid()
    assert indices.shape[0] >= 2
    fn = laudnet_ops.conv1x1_scatter_add_ if inplace else laudnet_ops.conv1x1_scatter_add
    op = "conv1x1_scatter_add_" if inplace else "conv1x1_scatter_add"
    with pytest.raises(RuntimeError, match=message) as error:
        fn(*mutate(residual, packed, indices, weight, bias))
    assert str(error.value).startswith(f"{op}: ")


@pytest.mark.parametrize("name, mutate, message", ERROR_CASES[:-4], ids=[c[0] for c in ERROR_CASES[:-4]])
def test_fake_kernel_errors(name, mutate, message):
    # The fake kernel (torch.compile, torch.export) rejects the same calls with the same words.
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = mutate(*_valid())
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        # Python prints dtypes and sizes its own way: compare the words before the value.
        with pytest.raises(RuntimeError, match="conv1x1_scatter_add: " + message.split(", got")[0]):
            torch.ops.laudnet_ops.conv1x1_scatter_add.default(*fake)


def test_inplace_error_leaves_residual_untouched():
    residual, packed, indices, weight, bias = _valid()
    before = residual.clone()
    for bad in (torch.cat([indices[:-1], _row([5, 0, 0])]), torch.cat([indices[:-1], indices[:1]])):
        with pytest.raises(RuntimeError, match="outside the patch grid|rows must be unique"):
            laudnet_ops.conv1x1_scatter_add_(residual, packed, bad, weight, bias)
        torch.testing.assert_close(residual, before, rtol=0, atol=0)


@pytest.mark.cuda
def test_device_mismatch():
    residual, packed, indices, weight, bias = _valid()
    r, p, i, w, b = (t.cuda() for t in (residual, packed, indices, weight, bias))
    cases = [((r, packed, i, w, b), "residual and packed must be on the same device"),
             ((r, p, i, weight, b), "residual and weight must be on the same device"),
             ((r, p, i, w, bias), "residual and bias must be on the same device"),
             ((r, p, indices, w, b), "residual and indices must be on the same device")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            laudnet_ops.conv1x1_scatter_add(*args)
