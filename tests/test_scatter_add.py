import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, TOL, device_dtype_params, patch_grid, random_mask, to_layout


def make_case(N, C, H, W, S, keep, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    Hp, Wp = patch_grid(H, W, S)
    indices = reference.patch_indices(random_mask((N, Hp, Wp), keep, gen)).to(device)
    residual = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(device, dtype)
    packed = torch.randn(indices.shape[0], C, S, S, generator=gen, dtype=torch.float64).to(device, dtype)
    return residual, packed, indices


SHAPES = [
    # N, C, H, W, S: divisible maps, borders (map not divisible by S), S = 1, one sample
    (2, 3, 8, 8, 4),
    (2, 5, 7, 9, 4),
    (1, 4, 13, 6, 3),
    (3, 2, 5, 5, 1),
    (2, 8, 14, 14, 7),
    (1, 1, 1, 1, 2),
]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_matches_reference(device, dtype, shape, keep, activation):
    residual, packed, indices = make_case(*shape, keep, dtype, device, seed=hash((shape, keep)) % 1000)
    got = laudnet_ops.scatter_add(residual, packed, indices, activation)
    want = reference.scatter_add(residual.double(), packed.double(), indices, activation)
    assert got.dtype == dtype and got.shape == residual.shape
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("packed_layout", ["contiguous", "channels_last"])
def test_memory_formats(device, layout, packed_layout):
    residual, packed, indices = make_case(2, 6, 9, 11, 4, 0.6, device=device)
    res = to_layout(residual, layout)
    got = laudnet_ops.scatter_add(res, to_layout(packed, packed_layout), indices)
    torch.testing.assert_close(got, reference.scatter_add(residual, packed, indices))
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_inplace_touches_only_patches(device, layout, activation):
    residual, packed, indices = make_case(2, 5, 10, 7, 3, 0.5, device=device, seed=3)
    residual = torch.relu(residual) if activation == "relu" else residual
    work = to_layout(residual.clone(), layout)
    out = laudnet_ops.scatter_add_(work, packed, indices, activation)
    assert out is work
    torch.testing.assert_close(work, reference.scatter_add(residual, packed, indices, activation))
    covered = reference.scatter_add(torch.zeros_like(residual), torch.ones_like(packed), indices, "none") > 0
    torch.testing.assert_close(work[~covered], residual[~covered], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_is_not_differentiable(device):
    residual, packed, indices = make_case(1, 2, 4, 4, 2, 1.0, device=device)
    with pytest.raises(RuntimeError, match="in-place form is for inference"):
        laudnet_ops.scatter_add_(residual, packed.requires_grad_(), indices)
    with torch.no_grad():
        laudnet_ops.scatter_add_(residual, packed, indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 3), (1, 2, 4, 4, 2), (2, 2, 3, 3, 1)])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(device, shape, activation, layout):
    residual, packed, indices = make_case(*shape, 0.6, torch.float64, device, seed=5)
    # Keep values away from the ReLU kink, where finite differences are meaningless.
    residual = residual + 0.1 * torch.sign(residual)
    residual = to_layout(residual, layout).requires_grad_()
    packed = to_layout(packed, layout).requires_grad_()
    fn = lambda r, p: laudnet_ops.scatter_add(r, p, indices, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (residual, packed))
    assert torch.autograd.gradgradcheck(lambda p: laudnet_ops.scatter_add(residual.detach(), p, indices, "none"), (packed,))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    residual, packed, indices = make_case(2, 4, 9, 10, 4, 0.5, device=device, seed=7)
    grad = torch.randn_like(residual)
    r1, p1 = residual.clone().requires_grad_(), packed.clone().requires_grad_()
    r2, p2 = residual.clone().requires_grad_(), packed.clone().requires_grad_()
    laudnet_ops.scatter_add(r1, p1, indices).backward(grad)
    reference.scatter_add(r2, p2, indices).backward(grad)
    torch.testing.assert_close(r1.grad, r2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_patches_matches_reference(device):
    x, _, indices = make_case(3, 4, 10, 7, 4, 0.7, device=device, seed=9)
    for layout in ("contiguous", "channels_last", "strided"):
        got = torch.ops.laudnet_ops._gather_patches(to_layout(x, layout), indices, 4)
        torch.testing.assert_close(got, reference.gather_patches(x, indices, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    # No patches at all, and an empty batch.
    residual, packed, indices = make_case(2, 3, 6, 6, 2, 0.0, device=device)
    torch.testing.assert_close(laudnet_ops.scatter_add(residual, packed, indices), torch.relu(residual))
    empty = torch.empty(0, 3, 6, 6, device=device)
    assert laudnet_ops.scatter_add(empty, packed, indices).shape == (0, 3, 6, 6)
    assert laudnet_ops.scatter_add_(empty, packed, indices).shape == (0, 3, 6, 6)


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        residual, packed, indices = make_case(2, 3, 7, 6, 3, 0.5, torch.float64, seed=11)
        residual, packed = to_layout(residual, layout), to_layout(packed, layout)
        args = (residual.requires_grad_(), packed.requires_grad_(), indices, "relu")
        torch.library.opcheck(torch.ops.laudnet_ops.scatter_add.default, args)
        torch.library.opcheck(torch.ops.laudnet_ops._gather_patches.default, (residual, indices, 3))
        with torch.no_grad():
            torch.library.opcheck(torch.ops.laudnet_ops.scatter_add_.default, (residual.detach().clone(), packed.detach(), indices, "none"))


def test_compile_fullgraph():
    residual, packed, indices = make_case(2, 3, 7, 6, 3, 0.5, seed=12)

    def block(r, p, i):
        return laudnet_ops.scatter_add(r * 2, p, i, "relu") + 1

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(residual, packed, indices), block(residual, packed, indices))

    def pipeline(mask, r, p):
        # patch_indices feeds scatter_add: the data-dependent P flows through the graph.
        idx = laudnet_ops.patch_indices(mask)
        return laudnet_ops.scatter_add(r, p[: idx.shape[0]], idx)

    mask = torch.zeros(2, 3, 2, dtype=torch.bool)
    mask[0, 1, 1] = mask[1, 2, 0] = True
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(mask, residual, packed), pipeline(mask, residual, packed))


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 3), C=st.integers(1, 5), H=st.integers(1, 12), W=st.integers(1, 12),
    S=st.integers(1, 5), keep=st.floats(0, 1), seed=st.integers(0, 9999),
    channels_last=st.booleans(), activation=st.sampled_from(["relu", "none"]),
)
def test_property_matches_reference(N, C, H, W, S, keep, seed, channels_last, activation):
    residual, packed, indices = make_case(N, C, H, W, S, keep, seed=seed)
    res = to_layout(residual, "channels_last" if channels_last else "contiguous")
    torch.testing.assert_close(
        laudnet_ops.scatter_add(res, packed, indices, activation),
        reference.scatter_add(residual, packed, indices, activation),
    )


def _valid():
    return make_case(2, 3, 8, 8, 4, 0.5, seed=1)


ERROR_CASES = [
    ("residual rank", lambda r, p, i: (r[0], p, i, "relu"), "residual must be a 4-D tensor, got 3-D"),
    ("packed rank", lambda r, p, i: (r, p[..., 0], i, "relu"), "packed must be a 4-D tensor, got 3-D"),
    ("integer residual", lambda r, p, i: (r.long(), p.long(), i, "relu"), "residual must be a floating-point tensor, got Long"),
    ("dtype mismatch", lambda r, p, i: (r, p.double(), i, "relu"), "residual and packed must have the same dtype, got Float and Double"),
    ("int64 indices", lambda r, p, i: (r, p, i.long(), "relu"), "indices must be int32 .as patch_indices returns., got Long"),
    ("indices shape", lambda r, p, i: (r, p, i[:, :2], "relu"), r"indices must have shape \(P, 3\), got \[\d+, 2\]"),
    ("non-square patch", lambda r, p, i: (r, p[..., :3], i, "relu"), "packed must have shape .P, C, S, S."),
    ("zero patch size", lambda r, p, i: (r, p[:, :, :0, :0], i, "relu"), "patch size .packed.size.2.. must be at least 1, got 0"),
    ("channel mismatch", lambda r, p, i: (r, p[:, :2], i, "relu"), "packed has 2 channels but residual has 3"),
    ("count mismatch", lambda r, p, i: (r, p[1:], i, "relu"), r"packed holds \d+ patches but indices has \d+ rows"),
    ("activation", lambda r, p, i: (r, p, i, "gelu"), 'activation must be "relu" or "none", got "gelu"'),
    ("batch out of range", lambda r, p, i: (r, p, torch.cat([i[:-1], torch.tensor([[2, 0, 0]], dtype=torch.int32)]), "relu"),
     r"indices row \d+ = \(2, 0, 0\) is outside the patch grid \(N=2, Hp=2, Wp=2\)"),
    ("negative index", lambda r, p, i: (r, p, torch.cat([i[:-1], torch.tensor([[0, -1, 0]], dtype=torch.int32)]), "relu"),
     r"= \(0, -1, 0\) is outside the patch grid"),
    ("column out of range", lambda r, p, i: (r, p, torch.cat([i[:-1], torch.tensor([[1, 0, 2]], dtype=torch.int32)]), "relu"),
     r"= \(1, 0, 2\) is outside the patch grid"),
    ("duplicate rows", lambda r, p, i: (r, p, torch.cat([i[:-1], i[:1]]), "relu"), "rows must be unique"),
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, mutate, message, inplace):
    residual, packed, indices = _valid()
    assert indices.shape[0] >= 2
    fn = laudnet_ops.scatter_add_ if inplace else laudnet_ops.scatter_add
    with pytest.raises(RuntimeError, match=message):
        fn(*mutate(residual, packed, indices))


def test_inplace_error_leaves_residual_untouched():
    residual, packed, indices = _valid()
    before = residual.clone()
    bad = torch.cat([indices[:-1], torch.tensor([[5, 0, 0]], dtype=torch.int32)])
    with pytest.raises(RuntimeError, match="outside the patch grid"):
        laudnet_ops.scatter_add_(residual, packed, bad)
    torch.testing.assert_close(residual, before, rtol=0, atol=0)


@pytest.mark.cuda
def test_device_mismatch():
    residual, packed, indices = _valid()
    with pytest.raises(RuntimeError, match="residual and packed must be on the same device"):
        laudnet_ops.scatter_add(residual.cuda(), packed, indices.cuda())
    with pytest.raises(RuntimeError, match="residual and indices must be on the same device"):
        laudnet_ops.scatter_add(residual.cuda(), packed.cuda(), indices)


# channels_last maps whose pixels are whole 16-byte vectors of channels take the experimental vector
# kernels on CUDA (float16 C = 8 and 16, bfloat16 8, float32 4, float64 2); float16 C = 6 keeps the
# one-element kernels. Maps not divisible by S put border patches partly outside the map.
VECTOR_PIXELS = [(torch.float16, 8), (torch.float16, 16), (torch.bfloat16, 8), (torch.float32, 4),
                 (torch.float64, 2), (torch.float16, 6)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, C", VECTOR_PIXELS, ids=[f"{str(d)[6:]}-C{c}" for d, c in VECTOR_PIXELS])
@pytest.mark.parametrize("H, W, S", [(8, 8, 4), (7, 9, 4), (5, 5, 1)])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_channel_vectors_match_reference(experimental, dtype, C, H, W, S, activation):
    residual, packed, indices = make_case(3, C, H, W, S, 0.5, dtype, "cuda", seed=C + H)
    residual, packed = to_layout(residual, "channels_last"), to_layout(packed, "channels_last")
    want = reference.scatter_add(residual.double(), packed.double(), indices, activation).to(dtype)
    got = laudnet_ops.scatter_add(residual, packed, indices, activation)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, **TOL[dtype])
    in_place = residual.clone()
    laudnet_ops.scatter_add_(in_place, packed, indices, activation)
    covered = reference.scatter_add(torch.zeros_like(residual, dtype=torch.float64),
                                    torch.ones_like(packed, dtype=torch.float64), indices, "none") > 0
    torch.testing.assert_close(in_place, want.where(covered, residual), **TOL[dtype])
