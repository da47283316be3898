"""masked_conv1x1: a 1x1 convolution computed only on the pixels a mask keeps."""

from typing import Optional

import torch

from . import _checks, _spatial_checks


def masked_conv1x1(
    x: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "relu",
) -> torch.Tensor:
    """``act(conv1x1(x, weight, bias))`` on the pixels ``mask`` keeps, exactly 0 on the others.

    A spatial block's first convolution restricted to the input pixels its kept output patches
    read (``laudnet_ops.nn.halo_mask``), so the 3x3 gather convolution after it finds every value
    it needs and nothing else is computed.

    Args:
        x: ``(N, Cin, H, W)`` floating point, any memory format.
        mask: bool ``(N, H, W)``, on ``x``'s device.
        weight: ``(Cout, Cin, 1, 1)``; bias: ``(Cout,)`` or ``None``.
        activation: ``"relu"`` or ``"none"``.

    Returns:
        ``(N, Cout, H, W)`` in ``x``'s memory format. Differentiable in ``x``, ``weight`` and
        ``bias`` (the gradient is zero at the pixels the mask drops).
    """
    return torch.ops.laudnet_ops.masked_conv1x1.default(x, mask, weight, bias, activation)


@torch.library.register_fake("laudnet_ops::masked_conv1x1")
def _masked_conv1x1_fake(x, mask, weight, bias=None, activation="relu"):
    _spatial_checks.check_masked_conv_args(x, mask, weight, bias, activation)
    N, _, H, W = x.shape
    return torch.empty((N, weight.shape[0], H, W), dtype=x.dtype, device=x.device,
                       memory_format=_checks.feature_layout(x))


def _setup_context(ctx, inputs, output):
    x, mask, weight, bias, activation = inputs
    ctx.has_bias = bias is not None
    ctx.activation = activation
    ctx.save_for_backward(x, mask, weight, output if activation == "relu" else None)


def _backward(ctx, grad_y):
    x, mask, weight, y = ctx.saved_tensors
    # Dropped pixels are constant zeros; with ReLU, y > 0 only where the mask keeps.
    if ctx.activation == "relu":
        grad_y = torch.ops.aten.threshold_backward.default(grad_y, y, 0)
    else:
        grad_y = grad_y.masked_fill(mask.logical_not().unsqueeze(1), 0)
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward.default(
        grad_y, x, weight, [weight.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]],
    )
    return grad_x, None, grad_w, grad_b if ctx.has_bias else None, None


torch.library.register_autograd("laudnet_ops::masked_conv1x1", _backward, setup_context=_setup_context)
