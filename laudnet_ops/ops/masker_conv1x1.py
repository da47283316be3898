"""masker_conv1x1: a block's first 1x1 convolution and its spatial masker, from one read of x."""

from typing import Optional, Tuple

import torch

from . import _checks, _spatial_checks


def masker_conv1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask_weight: torch.Tensor,
    mask_bias: Optional[torch.Tensor],
    patch_size: int,
    stride: int = 1,
    activation: str = "relu",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = act(conv1x1(x, weight, bias))`` and the patch-pooled masker logits.

    Args:
        x: ``(N, Cin, H, W)`` floating point, any memory format.
        weight: ``(Cout, Cin, 1, 1)``; bias: ``(Cout,)`` or ``None``.
        mask_weight: ``(M, Cin, 1, 1)``, ``M >= 1`` masker channels; mask_bias: ``(M,)`` or ``None``.
        patch_size: ``S >= 1``, the patch side at the block's output resolution.
        stride: the block's stride: the mask grid lives at ``ceil(H / stride) x ceil(W / stride)``.
        activation: ``"relu"`` or ``"none"`` (applies to ``y`` only).

    Returns:
        ``(y, logits)`` in ``x``'s memory format: ``y`` ``(N, Cout, H, W)``; ``logits``
        ``(N, M, ceil(Ho / S), ceil(Wo / S))`` with ``Ho = ceil(H / stride)``, where
        ``logits[n, :, py, px]`` is the mean of ``conv1x1(x, mask_weight, mask_bias)`` over
        input rows ``[py*S*stride, min((py+1)*S*stride, H))`` and the same columns.
        Differentiable in ``x``, both weights and both biases, through ``y`` and ``logits``.
    """
    return torch.ops.laudnet_ops.masker_conv1x1.default(
        x, weight, bias, mask_weight, mask_bias, patch_size, stride, activation
    )


@torch.library.register_fake("laudnet_ops::masker_conv1x1")
def _masker_conv1x1_fake(x, weight, bias, mask_weight, mask_bias, patch_size, stride=1, activation="relu"):
    Hq, Wq = _spatial_checks.check_masker_args(
        x, weight, bias, mask_weight, mask_bias, patch_size, stride, activation)
    layout = _checks.feature_layout(x)
    N, _, H, W = x.shape
    y = torch.empty((N, weight.shape[0], H, W), dtype=x.dtype, device=x.device, memory_format=layout)
    logits = torch.empty((N, mask_weight.shape[0], Hq, Wq), dtype=x.dtype, device=x.device, memory_format=layout)
    return y, logits


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_weight, mask_bias, patch_size, stride, activation = inputs
    ctx.window = patch_size * stride
    ctx.has_bias = (bias is not None, mask_bias is not None)
    ctx.activation = activation
    y = output[0]
    ctx.save_for_backward(x, weight, mask_weight, y if activation == "relu" else None)


def _backward(ctx, grad_y, grad_logits):
    x, weight, mask_weight, y = ctx.saved_tensors
    if ctx.activation == "relu":
        grad_y = torch.ops.aten.threshold_backward.default(grad_y, y, 0)
    # Each logit is the mean of its clipped window of masker values: the adjoint spreads
    # grad / area over the window. That is avg_pool2d (kernel = stride = window, no padding,
    # ceil_mode), whose border windows are divided by their clipped size.
    N, _, H, W = x.shape
    M = mask_weight.shape[0]
    shape_only = grad_logits.new_empty((N, M, H, W))
    w = ctx.window
    grad_m = torch.ops.aten.avg_pool2d_backward.default(grad_logits, shape_only, [w, w], [w, w], [0, 0],
                                                        True, True, None)
    # Both branches are 1x1 convolutions of the same x: one backward with the weights stacked.
    Cout = weight.shape[0]
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward.default(
        torch.cat([grad_y, grad_m], 1), x, torch.cat([weight, mask_weight], 0), [Cout + M],
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[3],
         ctx.needs_input_grad[2] or ctx.needs_input_grad[4]],
    )
    gw = (grad_w[:Cout], grad_w[Cout:]) if grad_w is not None else (None, None)
    gb = (grad_b[:Cout], grad_b[Cout:]) if grad_b is not None else (None, None)
    return (
        grad_x,
        gw[0] if ctx.needs_input_grad[1] else None,
        gb[0] if ctx.has_bias[0] and ctx.needs_input_grad[2] else None,
        gw[1] if ctx.needs_input_grad[3] else None,
        gb[1] if ctx.has_bias[1] and ctx.needs_input_grad[4] else None,
        None, None, None,
    )


torch.library.register_autograd("laudnet_ops::masker_conv1x1", _backward, setup_context=_setup_context)
