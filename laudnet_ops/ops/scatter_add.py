"""scatter_add: packed patches scattered onto a residual map, fused with the add and activation."""

import torch

from . import _checks


def scatter_add(
    residual: torch.Tensor, packed: torch.Tensor, indices: torch.Tensor, activation: str = "relu"
) -> torch.Tensor:
    """``act(residual + packed patches)``, in one pass over the output.

    Args:
        residual: ``(N, C, Ho, Wo)`` floating point, any memory format.
        packed: ``(P, C, S, S)``, same dtype and device; ``S`` is the patch size.
        indices: int32 ``(P, 3)``, unique rows ``(n, py, px)`` as :func:`patch_indices` gives.
        activation: ``"relu"`` or ``"none"``.

    Returns:
        ``out`` of ``residual``'s shape, dtype and memory format (``channels_last`` stays
        ``channels_last``): ``out[n, :, py*S+i, px*S+j] = act(residual[...] + packed[p, :, i, j])``
        for each patch ``p = (n, py, px)`` and each ``(i, j)`` inside the map; ``act(residual)``
        wherever no patch covers. Parts of border patches outside the map are ignored.
        Differentiable in ``residual`` and ``packed``.
    """
    return torch.ops.laudnet_ops.scatter_add.default(residual, packed, indices, activation)


def scatter_add_(
    residual: torch.Tensor, packed: torch.Tensor, indices: torch.Tensor, activation: str = "relu"
) -> torch.Tensor:
    """In-place :func:`scatter_add` that touches only the covered positions; returns ``residual``.

    For inference, where ``residual`` already holds ``act(residual)`` outside the patches:
    the cost grows with the number of patches, not with the map. Not differentiable.
    """
    if torch.is_grad_enabled() and (residual.requires_grad or packed.requires_grad):
        raise RuntimeError(
            "scatter_add_: the in-place form is for inference and has no gradient; "
            "use laudnet_ops.scatter_add, or call this under torch.no_grad()"
        )
    torch.ops.laudnet_ops.scatter_add_.default(residual, packed, indices, activation)
    return residual


def _check_scatter(residual, packed, indices, activation, op):
    _checks.check_dim(residual, 4, op, "residual")
    _checks.check_dim(packed, 4, op, "packed")
    _checks.check_floating(residual, op, "residual")
    _checks.check_same(residual, packed, "dtype", op, "residual", "packed")
    _checks.check_same(residual, packed, "device", op, "residual", "packed")
    _checks.check_same(residual, indices, "device", op, "residual", "indices")
    _checks.check_indices_shape(indices, op)
    S = packed.shape[2]
    _checks.check(S >= 1, op, f"patch size (packed.size(2)) must be at least 1, got {S}")
    _checks.check(packed.shape[3] == S, op, f"packed must have shape (P, C, S, S), got {tuple(packed.shape)}")
    _checks.check(packed.shape[1] == residual.shape[1], op,
                  f"packed has {packed.shape[1]} channels but residual has {residual.shape[1]}")
    _checks.check(packed.shape[0] == indices.shape[0], op,
                  f"packed holds {packed.shape[0]} patches but indices has {indices.shape[0]} rows")
    _checks.check_activation(activation, op)


@torch.library.register_fake("laudnet_ops::scatter_add")
def _scatter_add_fake(residual, packed, indices, activation="relu"):
    _check_scatter(residual, packed, indices, activation, "scatter_add")
    return torch.empty(residual.shape, dtype=residual.dtype, device=residual.device,
                       memory_format=_checks.feature_layout(residual))


@torch.library.register_fake("laudnet_ops::scatter_add_")
def _scatter_add_inplace_fake(residual, packed, indices, activation="relu"):
    _check_scatter(residual, packed, indices, activation, "scatter_add_")


@torch.library.register_fake("laudnet_ops::_gather_patches")
def _gather_patches_fake(x, indices, patch_size):
    op = "_gather_patches"
    _checks.check_dim(x, 4, op, "x")
    _checks.check_floating(x, op, "x")
    _checks.check_same(x, indices, "device", op, "x", "indices")
    _checks.check_indices_shape(indices, op)
    _checks.check(patch_size >= 1, op, f"patch_size must be at least 1, got {patch_size}")
    shape = (indices.shape[0], x.shape[1], patch_size, patch_size)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_checks.feature_layout(x))


def _scatter_add_setup_context(ctx, inputs, output):
    _, packed, indices, activation = inputs
    ctx.activation = activation
    ctx.patch_size = packed.shape[2]
    ctx.save_for_backward(indices, output if activation == "relu" else None)


def _scatter_add_backward(ctx, grad):
    indices, out = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = torch.ops.aten.threshold_backward.default(grad, out, 0)
    grad_residual = grad if ctx.needs_input_grad[0] else None
    grad_packed = None
    if ctx.needs_input_grad[1]:
        grad_packed = torch.ops.laudnet_ops._gather_patches.default(grad, indices, ctx.patch_size)
    return grad_residual, grad_packed, None, None


torch.library.register_autograd(
    "laudnet_ops::scatter_add", _scatter_add_backward, setup_context=_scatter_add_setup_context
)


def _gather_patches_setup_context(ctx, inputs, output):
    x, indices, _ = inputs
    ctx.save_for_backward(indices)
    ctx.map_shape = x.shape
    ctx.layout = _checks.feature_layout(x)


def _gather_patches_backward(ctx, grad):
    # The adjoint of a gather of unique patches is their scatter onto zeros.
    (indices,) = ctx.saved_tensors
    zeros = torch.empty(ctx.map_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout).zero_()
    return torch.ops.laudnet_ops.scatter_add.default(zeros, grad, indices, "none"), None, None


torch.library.register_autograd(
    "laudnet_ops::_gather_patches", _gather_patches_backward, setup_context=_gather_patches_setup_context
)
