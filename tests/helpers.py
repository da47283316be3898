"""Test helpers: devices, dtypes with tolerances, random masks and patch data."""

import math

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Tolerances for comparing a kernel with the reference in the same dtype.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def dtypes_for(device):
    """The dtypes every op supports on a device (docs/ops.md)."""
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    return [torch.float32, torch.float64]


def device_dtype_params():
    """(device, dtype) pairs, CUDA ones marked so they skip without a GPU."""
    params = [pytest.param("cpu", d, id=f"cpu-{str(d)[6:]}") for d in dtypes_for("cpu")]
    params += [pytest.param("cuda", d, id=f"cuda-{str(d)[6:]}", marks=pytest.mark.cuda) for d in dtypes_for("cuda")]
    return params


def random_mask(shape, keep, generator=None, device="cpu"):
    """Bool mask with a fraction ``keep`` of True entries (exactly all/none for 1.0/0.0)."""
    if keep >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if keep <= 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return (torch.rand(shape, generator=generator) < keep).to(device)


def patch_grid(H, W, S):
    return math.ceil(H / S), math.ceil(W / S)


def to_layout(t, layout):
    """Return ``t`` in a named layout: contiguous, channels_last, or a non-contiguous view."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # Same values, every stride doubled along W: not contiguous in any format.
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(layout)


def assert_raises_on(fn, args, message, fake=False):
    """``fn(*args)`` raises a RuntimeError matching ``message``; with ``fake``, on fake copies of the
    tensors, so the op's fake kernel (torch.compile, torch.export) is held to the same check."""
    if not fake:
        with pytest.raises(RuntimeError, match=message):
            fn(*args)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=message):
            fn(*args)
