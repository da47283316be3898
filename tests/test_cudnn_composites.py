"""The cuDNN-composites switch (csrc/cudnn_composites.h): with it on, every CUDA call of the four
convolution ops -- the ones the tensor-core kernels take included -- runs through its composite.

The composites themselves are tested against the reference on the CPU (test_gather_conv2d_tiles.py,
test_conv1x1_composites.py, test_channel_gated_sample_groups.py). Here, on a GPU (skipped without one),
tensor-core-eligible calls (float16, channels_last, channels a multiple of 8) must launch no
tensor-core kernel, give exactly what the internal composite op gives, and match the reference. CPU
calls ignore the switch.
"""

import pytest
import torch

import laudnet_ops
from laudnet_ops import _library, reference

from helpers import TOL, to_layout
import test_channel_gated_conv2d as channel
import test_conv1x1_scatter_add as conv1x1
import test_gather_conv2d as gather
import test_masker_conv1x1 as masker

needs_extension = pytest.mark.skipif(laudnet_ops.extension_error is not None, reason="needs the compiled extension")
pytestmark = needs_extension
ops = torch.ops.laudnet_ops
HALF = torch.float16


def cl(t):
    return to_layout(t, "channels_last")


def tensor_core_calls(fn):
    """(fn's result, the op calls that ran on tensor cores meanwhile)."""
    start = _library._tensor_core_calls()
    out = fn()
    return out, _library._tensor_core_calls() - start


@pytest.mark.cuda
def test_gather_conv2d_takes_the_tiles(cudnn_composites):
    x, idx, w, b, conv = gather.make_case(2, 16, 24, 9, 11, 3, 4, 0.5, dtype=HALF, device="cuda", seed=1)
    x = cl(x)
    got, calls = tensor_core_calls(lambda: laudnet_ops.gather_conv2d(x, idx, w, b, **conv))
    assert calls == 0
    want = ops._gather_conv2d_by_tiles(x, idx, w, b, conv["patch_size"], conv["stride"], conv["padding"],
                                       conv["dilation"], conv["groups"], "relu")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, reference.gather_conv2d(x.double(), idx, w.double(), b.double(), **conv).to(HALF),
                               **TOL[HALF])


@pytest.mark.cuda
def test_masker_conv1x1_takes_the_dense_convolutions(cudnn_composites):
    x, w, b, wm, mb = masker.make_case(2, 16, 8, 1, 9, 10, dtype=HALF, device="cuda", seed=2)
    x = cl(x)
    got, calls = tensor_core_calls(lambda: laudnet_ops.masker_conv1x1(x, w, b, wm, mb, 4))
    assert calls == 0
    want = ops._masker_conv1x1_by_dense_conv(x, w, b, wm, mb, 4, 1, "relu")
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    ref = reference.masker_conv1x1(x.double(), w.double(), b.double(), wm.double(), mb.double(), 4)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.to(HALF), **TOL[HALF])


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_conv1x1_scatter_add_takes_the_dense_convolution(cudnn_composites, inplace):
    residual, packed, idx, w, b = conv1x1.make_case(2, 16, 24, 9, 10, 4, 0.5, dtype=HALF, device="cuda", seed=3)
    residual, packed = cl(residual), cl(packed)
    want = ops._conv1x1_scatter_add_by_dense_conv(residual, packed, idx, w, b, "relu")
    if inplace:
        got = residual.clone(memory_format=torch.channels_last)
        _, calls = tensor_core_calls(lambda: laudnet_ops.conv1x1_scatter_add_(got, packed, idx, w, b))
        covered = reference.scatter_add(torch.zeros_like(residual, dtype=torch.float64),
                                        torch.ones_like(packed, dtype=torch.float64), idx, "none") > 0
        want = want.where(covered, residual)  # the in-place op leaves uncovered positions as they are
    else:
        got, calls = tensor_core_calls(lambda: laudnet_ops.conv1x1_scatter_add(residual, packed, idx, w, b))
    assert calls == 0
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.cuda
def test_channel_gated_conv2d_takes_the_grouped_convolution(cudnn_composites):
    x, w, b, gin, gout = channel.make_case(3, 16, 24, 7, 9, 3, 8, 0.5, 0.5, dtype=HALF, device="cuda", seed=4)
    x = cl(x)
    got, calls = tensor_core_calls(lambda: laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, 8, padding=1))
    assert calls == 0
    want = ops._channel_gated_conv2d_by_sample_groups(x, w, b, gin, gout, 8, [1, 1], [1, 1], [1, 1], 1, "relu")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    ref = reference.channel_gated_conv2d(x.double(), w.double(), b.double(), gin, gout, 8, padding=1)
    torch.testing.assert_close(got, ref.to(HALF), **TOL[HALF])


def test_cpu_calls_ignore_the_switch(cudnn_composites):
    # The switch names CUDA paths only: a CPU call gives the CPU kernel's result, bit for bit.
    x, idx, w, b, conv = gather.make_case(2, 8, 6, 9, 9, 3, 4, 0.5, seed=5)
    on = laudnet_ops.gather_conv2d(x, idx, w, b, **conv)
    laudnet_ops.set_cudnn_composites(False)
    torch.testing.assert_close(on, laudnet_ops.gather_conv2d(x, idx, w, b, **conv), atol=0, rtol=0)
