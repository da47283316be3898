"""conv1x1_scatter_add: a block's last 1x1 convolution on packed patches, fused with scatter_add."""

from typing import Optional

import torch

from . import _checks


def conv1x1_scatter_add(
    residual: torch.Tensor,
    packed: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "relu",
) -> torch.Tensor:
    """``scatter_add(residual, conv2d(packed, weight, bias), indices, activation)`` without writing the
    convolution's ``(P, Cout, S, S)`` output to memory.

    Args:
        residual: ``(N, Cout, Ho, Wo)`` floating point, any memory format.
        packed: ``(P, Cin, S, S)``, same dtype and device; ``S`` is the patch size.
        indices: int32 ``(P, 3)``, unique rows ``(n, py, px)`` as :func:`patch_indices` gives.
        weight: ``(Cout, Cin, 1, 1)``; bias: ``(Cout,)`` or ``None``.
        activation: ``"relu"`` or ``"none"``.

    Returns:
        ``out`` of ``residual``'s shape, dtype and memory format:
        ``out[n, :, py*S+i, px*S+j] = act(residual[...] + conv1x1(packed, weight, bias)[p, :, i, j])``
        for each patch ``p = (n, py, px)`` and each ``(i, j)`` inside the map; ``act(residual)``
        elsewhere. Differentiable in ``residual``, ``packed``, ``weight`` and ``bias``.
    """
    return torch.ops.laudnet_ops.conv1x1_scatter_add.default(residual, packed, indices, weight, bias, activation)


def conv1x1_scatter_add_(
    residual: torch.Tensor,
    packed: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "relu",
) -> torch.Tensor:
    """In-place :func:`conv1x1_scatter_add` that touches only the covered positions; returns ``residual``.

    For inference, where ``residual`` already holds ``act(residual)`` outside the patches: the cost
    grows with the number of patches, not with the map. Not differentiable.
    """
    inputs = (residual, packed, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise RuntimeError(
            "conv1x1_scatter_add_: the in-place form is for inference and has no gradient; "
            "use laudnet_ops.conv1x1_scatter_add, or call this under torch.no_grad()"
        )
    torch.ops.laudnet_ops.conv1x1_scatter_add_.default(residual, packed, indices, weight, bias, activation)
    return residual


def _check_args(residual, packed, indices, weight, bias, activation, op):
    """Mirrors check_conv1x1_scatter_args (csrc/conv1x1_scatter.h), in the same order."""
    _checks.check_dim(residual, 4, op, "residual")
    _checks.check_dim(packed, 4, op, "packed")
    _checks.check_dim(weight, 4, op, "weight")
    _checks.check_floating(residual, op, "residual")
    _checks.check_same(residual, packed, "dtype", op, "residual", "packed")
    _checks.check_same(residual, weight, "dtype", op, "residual", "weight")
    _checks.check_same(residual, packed, "device", op, "residual", "packed")
    _checks.check_same(residual, weight, "device", op, "residual", "weight")
    _checks.check_same(residual, indices, "device", op, "residual", "indices")
    _checks.check_indices_shape(indices, op)
    S = packed.shape[2]
    _checks.check(S >= 1, op, f"patch size (packed.size(2)) must be at least 1, got {S}")
    _checks.check(packed.shape[3] == S, op, f"packed must have shape (P, Cin, S, S), got {list(packed.shape)}")
    _checks.check(weight.shape[2] == 1 and weight.shape[3] == 1, op,
                  f"weight must be a 1x1 kernel, shape (Cout, Cin, 1, 1), got {list(weight.shape)}")
    _checks.check(weight.shape[1] == packed.shape[1], op,
                  f"weight has {weight.shape[1]} input channels but packed has {packed.shape[1]}")
    _checks.check(weight.shape[0] == residual.shape[1], op,
                  f"weight has {weight.shape[0]} output channels but residual has {residual.shape[1]}")
    if bias is not None:
        _checks.check(bias.dim() == 1 and bias.shape[0] == weight.shape[0], op,
                      f"bias must have shape ({weight.shape[0]},), got {list(bias.shape)}")
        _checks.check_same(residual, bias, "dtype", op, "residual", "bias")
        _checks.check_same(residual, bias, "device", op, "residual", "bias")
    _checks.check(packed.shape[0] == indices.shape[0], op,
                  f"packed holds {packed.shape[0]} patches but indices has {indices.shape[0]} rows")
    _checks.check_activation(activation, op)


@torch.library.register_fake("laudnet_ops::conv1x1_scatter_add")
def _conv1x1_scatter_add_fake(residual, packed, indices, weight, bias=None, activation="relu"):
    _check_args(residual, packed, indices, weight, bias, activation, "conv1x1_scatter_add")
    return torch.empty(residual.shape, dtype=residual.dtype, device=residual.device,
                       memory_format=_checks.feature_layout(residual))


@torch.library.register_fake("laudnet_ops::conv1x1_scatter_add_")
def _conv1x1_scatter_add_inplace_fake(residual, packed, indices, weight, bias=None, activation="relu"):
    _check_args(residual, packed, indices, weight, bias, activation, "conv1x1_scatter_add_")


def _setup_context(ctx, inputs, output):
    _, packed, indices, weight, bias, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(packed, indices, weight, output if activation == "relu" else None)


def _backward(ctx, grad):
    packed, indices, weight, out = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = torch.ops.aten.threshold_backward.default(grad, out, 0)
    grad_residual = grad if ctx.needs_input_grad[0] else None
    grad_packed = grad_weight = grad_bias = None
    need_packed, need_weight = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    need_bias = ctx.has_bias and ctx.needs_input_grad[4]
    if need_packed or need_weight or need_bias:
        # The convolution's output gradient: the map's gradient at each patch, zero where a border
        # patch leaves the map (those outputs were dropped). Then a plain 1x1 conv backward.
        grad_conv = torch.ops.laudnet_ops._gather_patches.default(grad, indices, packed.shape[2])
        grad_packed, grad_weight, grad_bias = torch.ops.aten.convolution_backward.default(
            grad_conv, packed, weight, [weight.shape[0]] if ctx.has_bias else None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_packed, need_weight, need_bias],
        )
    return grad_residual, grad_packed, None, grad_weight, grad_bias, None


torch.library.register_autograd(
    "laudnet_ops::conv1x1_scatter_add", _backward, setup_context=_setup_context
)
