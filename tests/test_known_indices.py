"""Index tensors the library made and nobody has changed since (csrc/known_indices.cpp).

patch_indices' rows and sample_gather's sel are valid by construction; with the experimental switch
on, the CUDA ops skip reading their device-side validation back for them (one host synchronisation
fewer per op). These tests pin down what counts as "made here and unchanged" through the internal op
_known_indices, on the CPU; the CUDA cases (skipped without a GPU) check that unknown bad indices
still get their errors with the switch on.
"""

import pytest
import torch

import laudnet_ops

from helpers import random_mask

needs_extension = pytest.mark.skipif(laudnet_ops.extension_error is not None, reason="needs the compiled extension")
pytestmark = needs_extension


def known(t, extent):
    return torch.ops.laudnet_ops._known_indices(t, list(extent))


def rows(N=2, Hp=3, Wp=4, seed=0, device="cpu"):
    mask = random_mask((N, Hp, Wp), 0.5, torch.Generator().manual_seed(seed)).to(device)
    return laudnet_ops.patch_indices(mask)


def test_patch_rows_are_known_for_their_grid_and_larger_ones():
    idx = rows()
    assert known(idx, (2, 3, 4)) and known(idx, (3, 3, 4)) and known(idx, (2, 5, 9))
    assert not known(idx, (1, 3, 4)) and not known(idx, (2, 2, 4)) and not known(idx, (2, 3, 3))
    assert not known(idx, (2, 3)) and not known(idx, (2, 3, 4, 1))  # another rank


def test_sel_is_known_for_its_batch_and_larger_ones():
    x = torch.randn(6, 3, 2, 2)
    _, sel = laudnet_ops.sample_gather(x, torch.tensor([True, False, True, True, False, True]))
    assert known(sel, (6,)) and known(sel, (9,))
    assert not known(sel, (5,)) and not known(sel, (6, 1))


def test_an_in_place_write_forgets_it():
    idx = rows(seed=1)
    idx[0, 0] = 1
    assert not known(idx, (2, 3, 4))
    _, sel = laudnet_ops.sample_gather(torch.randn(4, 2), torch.tensor([True, True, False, True]))
    sel.add_(0)  # same values, but written: the version counter moved
    assert not known(sel, (4,))


def test_copies_and_views_are_not_known():
    idx = rows(seed=2)
    assert known(idx, (2, 3, 4))
    assert not known(idx.clone(), (2, 3, 4))
    assert not known(idx[1:], (2, 3, 4))
    assert not known(idx.view(-1, 3), (2, 3, 4))
    assert not known(torch.tensor(idx.tolist(), dtype=torch.int32), (2, 3, 4))
    assert known(idx.contiguous(), (2, 3, 4))  # already contiguous: the same tensor


def test_only_the_most_recent_are_remembered():
    first = rows(seed=3)
    later = [rows(seed=4 + i) for i in range(64)]
    assert not known(first, (2, 3, 4))
    assert known(later[0], (2, 3, 4)) and known(later[-1], (2, 3, 4))


def test_inference_mode_results_are_not_known():
    # Inference tensors have no version counter: a write to them could not be seen.
    with torch.inference_mode():
        idx = rows(seed=6)
        _, sel = laudnet_ops.sample_gather(torch.randn(3, 2), torch.tensor([True, False, True]))
    assert not known(idx, (2, 3, 4)) and not known(sel, (3,))


def test_an_empty_result_is_known_too():
    idx = laudnet_ops.patch_indices(torch.zeros(2, 3, 4, dtype=torch.bool))
    assert idx.shape == (0, 3) and known(idx, (2, 3, 4))


# ---------------------------------------------------------------- the CUDA ops' use of it (GPU)


@pytest.mark.cuda
def test_cuda_ops_still_reject_bad_indices_they_did_not_make(experimental):
    residual = torch.randn(2, 4, 8, 8, device="cuda")
    packed = torch.randn(2, 4, 4, 4, device="cuda")
    outside = torch.tensor([[0, 0, 0], [2, 0, 0]], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="outside the patch grid"):
        laudnet_ops.scatter_add(residual, packed, outside)
    twice = torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="rows must be unique"):
        laudnet_ops.scatter_add_(residual, packed, twice)
    y = torch.randn(2, 4, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="sel must be unique"):
        laudnet_ops.sample_scatter_add_(residual, y, torch.tensor([1, 1], dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="outside the batch"):
        laudnet_ops.sample_scatter_add(residual, y, torch.tensor([0, 2], dtype=torch.int32, device="cuda"))


@pytest.mark.cuda
def test_cuda_ops_take_the_indices_they_made_without_a_check(experimental):
    idx = rows(2, 2, 2, seed=5, device="cuda")
    assert known(idx, (2, 2, 2))
    residual = torch.randn(2, 4, 8, 8, device="cuda")
    packed = torch.randn(idx.shape[0], 4, 4, 4, device="cuda")
    laudnet_ops.set_experimental_kernels(False)
    want = laudnet_ops.scatter_add(residual, packed, idx)
    laudnet_ops.set_experimental_kernels(True)
    torch.testing.assert_close(laudnet_ops.scatter_add(residual, packed, idx), want, atol=0, rtol=0)
