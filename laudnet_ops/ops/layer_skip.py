"""Layer skipping: run a block only on the samples that keep it, add the result back."""

from typing import Tuple

import torch

from . import _checks


def sample_gather(x: torch.Tensor, gates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x[sel], sel)``: the samples whose gate is on, and their indices.

    Args:
        x: ``(N, ...)`` floating point, any memory format.
        gates: bool ``(N,)`` on ``x``'s device.

    Returns:
        ``x[sel]`` of shape ``(K, ...)`` in ``x``'s memory format, and ``sel``, int32 ``(K,)``, the
        increasing indices of the True gates. ``K`` is data dependent (on CUDA, reading it is the
        one host synchronisation). Differentiable in ``x``.
    """
    return torch.ops.laudnet_ops.sample_gather.default(x, gates)


def sample_scatter_add(
    residual: torch.Tensor, y: torch.Tensor, sel: torch.Tensor, activation: str = "relu"
) -> torch.Tensor:
    """``out = act(residual)`` with ``out[sel] = act(residual[sel] + y)``, in one pass over ``out``.

    Args:
        residual: ``(N, ...)`` floating point, any memory format.
        y: ``(K, ...)`` with ``residual``'s trailing shape, dtype and device.
        sel: int32 ``(K,)``, unique indices in ``[0, N)`` (as :func:`sample_gather` returns).
        activation: ``"relu"`` or ``"none"``.

    Returns:
        ``out`` of ``residual``'s shape, dtype and memory format. Differentiable in ``residual``, ``y``.
    """
    return torch.ops.laudnet_ops.sample_scatter_add.default(residual, y, sel, activation)


def sample_scatter_add_(
    residual: torch.Tensor, y: torch.Tensor, sel: torch.Tensor, activation: str = "relu"
) -> torch.Tensor:
    """In-place :func:`sample_scatter_add` that touches only the selected samples; returns ``residual``.

    For inference, where ``residual`` already holds ``act(residual)`` on the unselected samples
    (a post-ReLU map, or ``"none"``): the cost follows ``K``, not ``N``. Not differentiable.
    """
    if torch.is_grad_enabled() and (residual.requires_grad or y.requires_grad):
        raise RuntimeError(
            "sample_scatter_add_: the in-place form is for inference and has no gradient; "
            "use laudnet_ops.sample_scatter_add, or call this under torch.no_grad()"
        )
    torch.ops.laudnet_ops.sample_scatter_add_.default(residual, y, sel, activation)
    return residual


def sample_scatter_add_pool_(
    residual: torch.Tensor, y: torch.Tensor, sel: torch.Tensor, pooled: torch.Tensor, activation: str = "relu"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_scatter_add_` that also keeps the channel means of ``residual`` up to date.

    On a 4-D map ``residual`` ``(N, C, H, W)`` whose channel means ``pooled`` ``(N, C)`` holds, this
    updates the selected samples in place and sets ``pooled[sel]`` to their new means, computed while
    the updated values are in registers; the other rows of both are left as they are. For a chain of
    layer-skipping blocks: the next block's masker pools exactly this map, and needs no pass of its own
    over it. Returns ``(residual, pooled)``. Not differentiable (inference).
    """
    if torch.is_grad_enabled() and (residual.requires_grad or y.requires_grad or pooled.requires_grad):
        raise RuntimeError(
            "sample_scatter_add_pool_: the in-place form is for inference and has no gradient; "
            "call it under torch.no_grad()"
        )
    torch.ops.laudnet_ops.sample_scatter_add_pool_.default(residual, y, sel, pooled, activation)
    return residual, pooled


def _check_rows(t, op, arg):
    _checks.check(t.dim() >= 1, op, f"{arg} must have a sample dimension (at least 1-D), got a 0-D tensor")
    _checks.check_floating(t, op, arg)


def _check_sel(sel, op):
    _checks.check(sel.dtype == torch.int32, op, f"sel must be int32 (as sample_gather returns), got {sel.dtype}")
    _checks.check(sel.dim() == 1, op, f"sel must be a 1-D tensor, got shape {list(sel.shape)}")


def _check_scatter(residual, y, sel, activation, op):
    _check_rows(residual, op, "residual")
    _checks.check_same(residual, y, "dtype", op, "residual", "y")
    _checks.check_same(residual, y, "device", op, "residual", "y")
    _checks.check_same(residual, sel, "device", op, "residual", "sel")
    _check_sel(sel, op)
    _checks.check(y.dim() == residual.dim() and y.shape[1:] == residual.shape[1:], op,
                  f"y must have shape (K, {list(residual.shape[1:])}) to match residual {list(residual.shape)}, "
                  f"got {list(y.shape)}")
    _checks.check(y.shape[0] == sel.shape[0], op, f"y holds {y.shape[0]} samples but sel has {sel.shape[0]} entries")
    _checks.check_activation(activation, op)


def _rows_like(x, K):
    return torch.empty((K, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=_checks.feature_layout(x))


@torch.library.register_fake("laudnet_ops::sample_gather")
def _sample_gather_fake(x, gates):
    op = "sample_gather"
    _check_rows(x, op, "x")
    _checks.check(gates.dtype == torch.bool, op, f"gates must be a bool tensor, got {gates.dtype}")
    _checks.check(gates.dim() == 1 and gates.shape[0] == x.shape[0], op,
                  f"gates must have shape (N,) = ({x.shape[0]},), got {list(gates.shape)}")
    _checks.check_same(x, gates, "device", op, "x", "gates")
    # K <= N; the bound can only be given when N is a plain int.
    N = x.shape[0]
    K = torch.library.get_ctx().new_dynamic_size(max=N if isinstance(N, int) else None)
    return _rows_like(x, K), gates.new_empty((K,), dtype=torch.int32)


@torch.library.register_fake("laudnet_ops::sample_scatter_add")
def _sample_scatter_add_fake(residual, y, sel, activation="relu"):
    _check_scatter(residual, y, sel, activation, "sample_scatter_add")
    return torch.empty(residual.shape, dtype=residual.dtype, device=residual.device,
                       memory_format=_checks.feature_layout(residual))


@torch.library.register_fake("laudnet_ops::sample_scatter_add_")
def _sample_scatter_add_inplace_fake(residual, y, sel, activation="relu"):
    _check_scatter(residual, y, sel, activation, "sample_scatter_add_")


@torch.library.register_fake("laudnet_ops::sample_scatter_add_pool_")
def _sample_scatter_add_pool_fake(residual, y, sel, pooled, activation="relu"):
    op = "sample_scatter_add_pool_"
    _check_scatter(residual, y, sel, activation, op)
    _checks.check(residual.dim() == 4, op,
                  f"residual must be a 4-D (N, C, H, W) map to be pooled, got shape {list(residual.shape)}")
    _checks.check(pooled.dim() == 2 and tuple(pooled.shape) == tuple(residual.shape[:2]), op,
                  f"pooled must have shape (N, C) = ({residual.shape[0]}, {residual.shape[1]}), "
                  f"got {list(pooled.shape)}")
    _checks.check_same(residual, pooled, "dtype", op, "residual", "pooled")
    _checks.check_same(residual, pooled, "device", op, "residual", "pooled")


@torch.library.register_fake("laudnet_ops::_sample_index")
def _sample_index_fake(x, sel):
    op = "_sample_index"
    _check_rows(x, op, "x")
    _checks.check_same(x, sel, "device", op, "x", "sel")
    _check_sel(sel, op)
    return _rows_like(x, sel.shape[0])


def _scatter_onto_zeros(grad, sel, shape, layout):
    # The adjoint of gathering unique rows is scattering them onto zeros.
    zeros = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout).zero_()
    return torch.ops.laudnet_ops.sample_scatter_add.default(zeros, grad, sel, "none")


def _sample_gather_setup_context(ctx, inputs, output):
    x, _ = inputs
    _, sel = output
    ctx.mark_non_differentiable(sel)
    ctx.save_for_backward(sel)
    ctx.shape = x.shape
    ctx.layout = _checks.feature_layout(x)


def _sample_gather_backward(ctx, grad, _grad_sel):
    (sel,) = ctx.saved_tensors
    return _scatter_onto_zeros(grad, sel, ctx.shape, ctx.layout), None


torch.library.register_autograd(
    "laudnet_ops::sample_gather", _sample_gather_backward, setup_context=_sample_gather_setup_context
)


def _sample_index_setup_context(ctx, inputs, output):
    x, sel = inputs
    ctx.save_for_backward(sel)
    ctx.shape = x.shape
    ctx.layout = _checks.feature_layout(x)


def _sample_index_backward(ctx, grad):
    (sel,) = ctx.saved_tensors
    return _scatter_onto_zeros(grad, sel, ctx.shape, ctx.layout), None


torch.library.register_autograd(
    "laudnet_ops::_sample_index", _sample_index_backward, setup_context=_sample_index_setup_context
)


def _scatter_setup_context(ctx, inputs, output):
    _, _, sel, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(sel, output if activation == "relu" else None)


def _scatter_backward(ctx, grad):
    sel, out = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = torch.ops.aten.threshold_backward.default(grad, out, 0)
    grad_residual = grad if ctx.needs_input_grad[0] else None
    grad_y = torch.ops.laudnet_ops._sample_index.default(grad, sel) if ctx.needs_input_grad[1] else None
    return grad_residual, grad_y, None, None


torch.library.register_autograd(
    "laudnet_ops::sample_scatter_add", _scatter_backward, setup_context=_scatter_setup_context
)
