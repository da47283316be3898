"""sample_scatter_add_pool_: the in-place layer-skipping scatter that keeps the channel means up to date."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, TOL, device_dtype_params, to_layout

OP = torch.ops.laudnet_ops.sample_scatter_add_pool_.default


def make_case(N, C, H, W, kept, dtype=torch.float32, device="cpu", seed=0, layout="channels_last"):
    gen = torch.Generator().manual_seed(seed)
    residual = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    y = torch.randn(len(kept), C, H, W, generator=gen, dtype=torch.float64)
    pooled = torch.randn(N, C, generator=gen, dtype=torch.float64)
    sel = torch.tensor(kept, dtype=torch.int32)
    move = lambda t: t.to(device, dtype)  # noqa: E731
    return (to_layout(move(residual), layout), to_layout(move(y), layout), sel.to(device), move(pooled))


def run_both(case, activation="relu"):
    residual, y, sel, pooled = case
    want = reference.sample_scatter_add_pool(residual.double(), y.double(), sel, pooled.double(), activation)
    got = (residual.clone(memory_format=torch.preserve_format), pooled.clone())
    out = laudnet_ops.sample_scatter_add_pool_(got[0], y, sel, got[1], activation)
    assert out[0] is got[0] and out[1] is got[1]
    return got, want


SHAPES = [(4, 8, 5, 7), (3, 16, 1, 1), (2, 3, 9, 4), (5, 64, 17, 13), (2, 300, 40, 40)]
KEPT = [[], [0], [1, 3], [3, 0, 2], [0, 1, 2, 3]]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("kept", KEPT, ids=[str(k) for k in KEPT])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_matches_reference(device, dtype, shape, kept, layout, activation):
    N = shape[0]
    kept = [k for k in kept if k < N]
    case = make_case(*shape, kept, dtype=dtype, device=device, seed=sum(shape) + len(kept), layout=layout)
    (res, pooled), (want_res, want_pooled) = run_both(case, activation)
    tol = TOL[dtype] if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res, want_res.to(dtype), **tol)
    torch.testing.assert_close(pooled, want_pooled.to(dtype), **tol)
    # The samples not selected are untouched in both tensors, bit for bit.
    others = [n for n in range(N) if n not in kept]
    assert torch.equal(res[others], case[0][others]) and torch.equal(pooled[others], case[3][others])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_residual_and_pooled(device):
    residual, y, sel, pooled = make_case(4, 8, 6, 5, [2, 0], device=device, seed=3)
    residual = to_layout(residual, "strided")
    pooled = torch.randn(8, 4, device=device).t()  # (N, C), not contiguous
    want = reference.sample_scatter_add_pool(residual.double(), y.double(), sel, pooled.double())
    strides = residual.stride(), pooled.stride()
    laudnet_ops.sample_scatter_add_pool_(residual, y, sel, pooled)
    assert (residual.stride(), pooled.stride()) == strides
    torch.testing.assert_close(residual, want[0].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want[1].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unfused_fallback_matches_reference(layout):
    # The kernel devices without a fused one (CUDA) run, reached by dispatching to it with CPU tensors.
    residual, y, sel, pooled = make_case(4, 8, 6, 5, [3, 1], seed=5, layout=layout)
    want = reference.sample_scatter_add_pool(residual.double(), y.double(), sel, pooled.double())
    unfused = torch._C.DispatchKey.CompositeExplicitAutograd
    OP._op_dk(unfused, residual, y, sel, pooled, "relu")
    torch.testing.assert_close(residual, want[0].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want[1].float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"pooled must have shape \(N, C\) = \(4, 8\)"):
        OP._op_dk(unfused, residual, y, sel, pooled[:, :4], "relu")


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 5), C=st.integers(1, 40), H=st.integers(1, 9), W=st.integers(1, 9),
       seed=st.integers(0, 9999), channels_last=st.booleans(), activation=st.sampled_from(["relu", "none"]),
       data=st.data())
def test_property_matches_reference(N, C, H, W, seed, channels_last, activation, data):
    kept = data.draw(st.lists(st.integers(0, N - 1), unique=True, max_size=N))
    case = make_case(N, C, H, W, kept, seed=seed, layout="channels_last" if channels_last else "contiguous")
    (res, pooled), (want_res, want_pooled) = run_both(case, activation)
    torch.testing.assert_close(res, want_res.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want_pooled.float(), atol=1e-5, rtol=1e-5)


def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        residual, y, sel, pooled = make_case(4, 6, 5, 3, [2, 0], dtype=torch.float64, layout=layout)
        # Schema, fake kernel and in-place aliasing; the op has no autograd formula (inference only).
        torch.library.opcheck(OP, (residual, y, sel, pooled, "relu"), test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    residual, y, sel, pooled = make_case(4, 8, 5, 5, [1, 2], seed=7)

    def step(residual, pooled):
        residual, pooled = residual * 1, pooled * 1  # tensors the graph owns, updated in place
        out, means = laudnet_ops.sample_scatter_add_pool_(residual, y, sel, pooled)
        return out + 1, means * 2

    want = step(residual, pooled)
    with torch.no_grad():
        for backend in ("aot_eager", "inductor"):
            got = torch.compile(step, fullgraph=True, backend=backend)(residual, pooled)
            torch.testing.assert_close(got, want)


def _valid():
    residual, y, sel, pooled = make_case(4, 8, 5, 5, [1, 3], seed=9)
    return dict(residual=residual, y=y, sel=sel, pooled=pooled)


ERROR_CASES = [
    ("pooled shape", dict(pooled=lambda a: a["pooled"][:3]),
     r"pooled must have shape \(N, C\) = \(4, 8\), got \[3, 8\]"),
    ("pooled dtype", dict(pooled=lambda a: a["pooled"].double()), "residual and pooled must have the same dtype"),
    ("residual rank", dict(residual=lambda a: a["residual"][:, :, 0], y=lambda a: a["y"][:, :, 0]),
     r"residual must be a 4-D \(N, C, H, W\) map to be pooled"),
    ("sel out of range", dict(sel=lambda a: torch.tensor([1, 4], dtype=torch.int32)),
     r"sel\[1\] = 4 is outside the batch \[0, 4\)"),
    ("y shape", dict(y=lambda a: a["y"][:1]), "y holds 1 samples but sel has 2 entries"),
    ("activation", dict(activation=lambda a: "gelu"), 'activation must be "relu" or "none", got "gelu"'),
]


@pytest.mark.parametrize("name, mutate, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_leave_both_untouched(name, mutate, message):
    args = dict(_valid(), activation="relu")
    args.update({k: f(args) for k, f in mutate.items()})
    before = [t.clone() for t in (args["residual"], args["pooled"])]
    with pytest.raises(RuntimeError, match=message):
        laudnet_ops.sample_scatter_add_pool_(**args)
    assert torch.equal(args["residual"], before[0]) and torch.equal(args["pooled"], before[1])


def test_refuses_gradients():
    args = _valid()
    args["y"].requires_grad_()
    with pytest.raises(RuntimeError, match="for inference and has no gradient"):
        laudnet_ops.sample_scatter_add_pool_(**args)
