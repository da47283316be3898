"""gather_conv2d: a convolution evaluated only on the kept output patches."""

from typing import Optional

import torch

from . import _checks, _spatial_checks

def gather_conv2d(
    x: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    patch_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    activation: str = "relu",
) -> torch.Tensor:
    """``act(conv2d(x, weight, bias, ...))`` at the kept ``S x S`` output patches only, packed.

    Args:
        x: ``(N, Cin, H, W)`` floating point, the dense input map, any memory format.
        indices: int32 ``(P, 3)``, rows ``(n, py, px)`` of the output patch grid
            ``(N, ceil(Ho / S), ceil(Wo / S))``, as :func:`patch_indices` gives.
        weight: ``(Cout, Cin / groups, k, k)``, a square kernel; same dtype and device.
        bias: ``(Cout,)`` or ``None``.
        patch_size: ``S >= 1``, the patch side at the output resolution.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d` (single ints).
        activation: ``"relu"`` or ``"none"``.

    Returns:
        ``packed`` ``(P, Cout, S, S)`` in ``x``'s memory format (``channels_last`` stays
        ``channels_last``): ``packed[p, :, i, j]`` is the convolution's output at
        ``(py*S + i, px*S + j)`` of sample ``n``, and 0 where a border patch leaves the
        ``Ho x Wo`` output map. Differentiable in ``x``, ``weight`` and ``bias`` (the backward
        needs unique rows).
    """
    return torch.ops.laudnet_ops.gather_conv2d.default(
        x, indices, weight, bias, patch_size, stride, padding, dilation, groups, activation
    )


@torch.library.register_fake("laudnet_ops::gather_conv2d")
def _gather_conv2d_fake(x, indices, weight, bias, patch_size, stride=1, padding=0, dilation=1, groups=1,
                        activation="relu"):
    _spatial_checks.check_gather_conv_args(
        x, indices, weight, bias, patch_size, stride, padding, dilation, groups, activation)
    shape = (indices.shape[0], weight.shape[0], patch_size, patch_size)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_checks.feature_layout(x))


def _setup_context(ctx, inputs, output):
    x, indices, weight, bias, patch_size, stride, padding, dilation, groups, activation = inputs
    ctx.conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ctx.has_bias = bias is not None
    ctx.activation = activation
    K = weight.shape[2]
    ctx.out_map = (x.shape[0], weight.shape[0],
                   *(_spatial_checks.conv_output_size(s, K, stride, padding, dilation) for s in x.shape[2:]))
    ctx.layout = _checks.feature_layout(x)
    ctx.save_for_backward(x, indices, weight, output if activation == "relu" else None)


def _backward(ctx, grad):
    # The masked training path is dense anyway: the gradient of the kept positions is
    # scattered onto a zero output map and handed to the dense convolution backward.
    # Positions outside the kept patches (and outside the map) have zero gradient, so
    # this is exact; it costs one dense convolution backward, not P-proportional work.
    x, indices, weight, packed = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = torch.ops.aten.threshold_backward.default(grad, packed, 0)
    zeros = torch.empty(ctx.out_map, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout).zero_()
    grad_map = torch.ops.laudnet_ops.scatter_add.default(zeros, grad, indices, "none")
    c = ctx.conv
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward.default(
        grad_map, x, weight, [weight.shape[0]] if ctx.has_bias else None,
        [c["stride"]] * 2, [c["padding"]] * 2, [c["dilation"]] * 2, False, [0, 0], c["groups"],
        [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]],
    )
    return grad_x, None, grad_w, grad_b, None, None, None, None, None, None


torch.library.register_autograd("laudnet_ops::gather_conv2d", _backward, setup_context=_setup_context)
