import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laudnet_ops
from laudnet_ops import reference

from helpers import DEVICES, random_mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (4, 7, 7), (3, 1, 9), (1, 57, 3)])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.5, 1.0])
def test_matches_reference(device, shape, keep):
    gen = torch.Generator().manual_seed(hash((shape, keep)) % 2**31)
    mask = random_mask(shape, keep, gen, device)
    got = laudnet_ops.patch_indices(mask)
    assert got.dtype == torch.int32 and got.device.type == device
    assert got.shape == (int(mask.sum()), 3)
    torch.testing.assert_close(got, reference.patch_indices(mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 3), (2, 0, 4), (2, 3, 0)])
def test_empty_mask(device, shape):
    got = laudnet_ops.patch_indices(torch.ones(shape, dtype=torch.bool, device=device))
    assert got.shape == (0, 3) and got.dtype == torch.int32


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_mask(device):
    base = torch.rand(5, 6, 8, device=device) > 0.5
    mask = base.transpose(1, 2)[:, ::2]
    assert not mask.is_contiguous()
    torch.testing.assert_close(laudnet_ops.patch_indices(mask), reference.patch_indices(mask))


@pytest.mark.parametrize("device", DEVICES)
def test_large_grid_keeps_row_major_order(device):
    # Enough rows for several parallel chunks on the CPU and several blocks on CUDA.
    mask = torch.rand(8, 97, 131, device=device) > 0.7
    torch.testing.assert_close(laudnet_ops.patch_indices(mask), reference.patch_indices(mask))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 4), hp=st.integers(0, 9), wp=st.integers(0, 9), keep=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_property_matches_nonzero(n, hp, wp, keep, seed):
    mask = random_mask((n, hp, wp), keep, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(laudnet_ops.patch_indices(mask), reference.patch_indices(mask))


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(2, 3, dtype=torch.bool), "mask must be a 3-D tensor, got 2-D"),
        (torch.ones(1, 2, 3, 4, dtype=torch.bool), "mask must be a 3-D tensor, got 4-D"),
        (torch.ones(2, 3, 4), "mask must be a bool tensor, got Float"),
        (torch.ones(2, 3, 4, dtype=torch.int32), "mask must be a bool tensor, got Int"),
    ],
)
def test_errors(mask, message):
    with pytest.raises(RuntimeError, match=message):
        laudnet_ops.patch_indices(mask)


def test_opcheck():
    for mask in (torch.rand(3, 4, 5) > 0.5, torch.zeros(2, 2, 2, dtype=torch.bool)):
        torch.library.opcheck(torch.ops.laudnet_ops.patch_indices.default, (mask,))


def test_compile_fullgraph():
    mask = torch.rand(3, 6, 5) > 0.5
    compiled = torch.compile(laudnet_ops.patch_indices, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(mask), reference.patch_indices(mask))
