"""patch_indices: the (n, py, px) rows of every kept patch."""

import torch

from . import _checks


def patch_indices(mask: torch.Tensor) -> torch.Tensor:
    """Rows ``(n, py, px)`` of every True entry of ``mask``, in row-major order.

    Args:
        mask: bool ``(N, Hp, Wp)``, the patch grid of each sample.

    Returns:
        int32 ``(P, 3)`` with ``P = mask.sum()``, ordered like ``mask.nonzero()``.
        On CUDA the only host synchronisation is reading ``P``.
    """
    return torch.ops.laudnet_ops.patch_indices.default(mask)


@torch.library.register_fake("laudnet_ops::patch_indices")
def _patch_indices_fake(mask):
    op = "patch_indices"
    _checks.check_dim(mask, 3, op, "mask")
    _checks.check(mask.dtype == torch.bool, op, f"mask must be a bool tensor, got {mask.dtype}")
    count = torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty((count, 3), dtype=torch.int32)
