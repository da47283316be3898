"""channel_gated_conv2d: a convolution computing, per sample, only its active channel groups."""

from typing import Optional, Sequence, Tuple, Union

import torch

from . import _checks

IntPair = Union[int, Sequence[int]]

_OP = "channel_gated_conv2d"
_OP_ADD = "channel_gated_conv2d_add_"


def _pair(v: IntPair) -> Tuple[int, ...]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(e) for e in v)


def channel_gated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_gates: Optional[torch.Tensor],
    out_gates: Optional[torch.Tensor],
    group_size: int,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    activation: str = "relu",
) -> torch.Tensor:
    """``act(conv2d(x * in_mask, weight, bias))`` on the active output channels, exact 0 elsewhere.

    Args:
        x: ``(N, Cin, H, W)`` floating point, any memory format.
        weight: ``(Cout, Cin / groups, KH, KW)``, same dtype and device.
        bias: ``(Cout,)`` or None.
        in_gates: bool ``(N, Cin / group_size)`` or None (all on); ``in_mask`` repeats each gate
            over its ``group_size`` consecutive channels.
        out_gates: bool ``(N, Cout / group_size)`` or None (all on).
        group_size: channels per gate group ``G``; must divide ``Cin / groups`` and ``Cout / groups``.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d` (zero padding).
        activation: ``"relu"`` or ``"none"``.

    Returns:
        ``(N, Cout, Ho, Wo)`` in ``x``'s dtype and memory format (``channels_last`` stays
        ``channels_last``). Each sample computes only its active output channels from its active
        input channels, the whole batch in one call. Differentiable in ``x``, ``weight``, ``bias``.
    """
    return torch.ops.laudnet_ops.channel_gated_conv2d.default(
        x, weight, bias, in_gates, out_gates, group_size, _pair(stride), _pair(padding), _pair(dilation),
        groups, activation,
    )


def channel_gated_conv2d_add_(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_gates: Optional[torch.Tensor],
    out_gates: Optional[torch.Tensor],
    group_size: int,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    activation: str = "relu",
    means: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In place, ``residual = act(residual + channel_gated_conv2d(x, ..., activation="none"))``; returns it.

    The last convolution of a channel-skipping block fused with the block's residual add and
    activation: on the CPU the convolution's output goes straight into ``residual``, one pass instead
    of a convolution, an add and a ReLU over the whole map. An inactive output channel adds nothing
    (``act(residual)`` there). Other devices run the convolution, then the add and activation.

    Args:
        residual: ``(N, Cout, Ho, Wo)``, the convolution's output shape, same dtype and device as
            ``x``; may share no memory with ``x`` or ``weight``. Updated in place.
        x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups,
            activation: as :func:`channel_gated_conv2d`.
        means: None, or ``(N, Cout)`` in ``residual``'s dtype and device, which receives the channel
            means of the updated ``residual`` (pooled on the CPU while each output is in cache): the
            input of the next block's channel masker.

    For inference: not differentiable (use :func:`channel_gated_conv2d` and an add to train).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (residual, x, weight, bias, means)):
        raise RuntimeError(
            f"{_OP_ADD}: the in-place form is for inference and has no gradient; use "
            "laudnet_ops.channel_gated_conv2d and an add, or call this under torch.no_grad()"
        )
    torch.ops.laudnet_ops.channel_gated_conv2d_add_.default(
        residual, x, weight, bias, in_gates, out_gates, group_size, _pair(stride), _pair(padding), _pair(dilation),
        groups, activation, means,
    )
    return residual


def _check_gates(gates, x, count, arg, op):
    if gates is None:
        return
    _checks.check(gates.dtype == torch.bool, op, f"{arg} must be a bool tensor, got {gates.dtype}")
    _checks.check(
        gates.dim() == 2 and gates.shape[0] == x.shape[0] and gates.shape[1] == count, op,
        f"{arg} must have shape (N, channels / group_size) = ({x.shape[0]}, {count}), got {tuple(gates.shape)}",
    )
    _checks.check_same(x, gates, "device", op, "x", arg)


def _check_pair(v, arg, least, op):
    _checks.check(len(v) == 2, op, f"{arg} must have 2 elements, got {len(v)}")
    _checks.check(v[0] >= least and v[1] >= least, op, f"{arg} must be at least {least}, got {list(v)}")


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv(x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups, activation,
                op=_OP):
    """Mirror of check_channel_conv_args in csrc/channel_geometry.h; returns the output shape."""
    _checks.check_dim(x, 4, op, "x")
    _checks.check_dim(weight, 4, op, "weight")
    _checks.check_floating(x, op, "x")
    _checks.check_same(x, weight, "dtype", op, "x", "weight")
    _checks.check_same(x, weight, "device", op, "x", "weight")
    _check_pair(stride, "stride", 1, op)
    _check_pair(padding, "padding", 0, op)
    _check_pair(dilation, "dilation", 1, op)
    _checks.check(groups >= 1, op, f"groups must be at least 1, got {groups}")
    _checks.check(group_size >= 1, op, f"group_size must be at least 1, got {group_size}")
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    _checks.check(KH >= 1 and KW >= 1, op, f"weight must have a kernel of at least 1x1, got {list(weight.shape)}")
    _checks.check(Cin % groups == 0 and Cout % groups == 0, op,
                  f"groups = {groups} must divide both Cin = {Cin} and Cout = {Cout}")
    _checks.check(weight.shape[1] == Cin // groups, op,
                  f"weight must have shape (Cout, Cin / groups, KH, KW) with Cin / groups = {Cin // groups}, "
                  f"got {list(weight.shape)}")
    _checks.check(Cin % group_size == 0, op, f"Cin = {Cin} is not divisible by group_size = {group_size}")
    _checks.check(Cout % group_size == 0, op, f"Cout = {Cout} is not divisible by group_size = {group_size}")
    _checks.check(
        (Cin // groups) % group_size == 0 and (Cout // groups) % group_size == 0, op,
        f"group_size = {group_size} must divide the channels of each convolution group (Cin / groups = "
        f"{Cin // groups}, Cout / groups = {Cout // groups}) so that no gate group straddles two convolution groups",
    )
    if bias is not None:
        _checks.check(bias.dim() == 1 and bias.shape[0] == Cout, op,
                      f"bias must have shape (Cout,) = ({Cout},), got {list(bias.shape)}")
        _checks.check_same(x, bias, "dtype", op, "x", "bias")
        _checks.check_same(x, bias, "device", op, "x", "bias")
    _check_gates(in_gates, x, Cin // group_size, "in_gates", op)
    _check_gates(out_gates, x, Cout // group_size, "out_gates", op)
    kh, kw = dilation[0] * (KH - 1) + 1, dilation[1] * (KW - 1) + 1
    ph, pw = H + 2 * padding[0], W + 2 * padding[1]
    _checks.check(ph >= kh and pw >= kw, op,
                  f"the padded input ({ph}x{pw}) is smaller than the dilated kernel ({kh}x{kw})")
    _checks.check_activation(activation, op)
    return (N, Cout, _out_size(H, KH, stride[0], padding[0], dilation[0]),
            _out_size(W, KW, stride[1], padding[1], dilation[1]))


@torch.library.register_fake("laudnet_ops::channel_gated_conv2d")
def _channel_gated_conv2d_fake(x, weight, bias, in_gates, out_gates, group_size, stride=(1, 1), padding=(0, 0),
                               dilation=(1, 1), groups=1, activation="relu"):
    shape = _check_conv(x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups,
                        activation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_checks.feature_layout(x))


def _check_residual(residual, x, weight, shape, means):
    """Mirror of check_channel_residual and check_channel_means in csrc/channel_geometry.h (not the
    overlap checks, which need storage)."""
    _checks.check_dim(residual, 4, _OP_ADD, "residual")
    _checks.check(tuple(residual.shape) == tuple(shape), _OP_ADD,
                  f"residual must have the output's shape (N, Cout, Ho, Wo) = {tuple(shape)}, "
                  f"got {tuple(residual.shape)}")
    _checks.check_same(x, residual, "dtype", _OP_ADD, "x", "residual")
    _checks.check_same(x, residual, "device", _OP_ADD, "x", "residual")
    if means is not None:
        _checks.check(means.dim() == 2 and tuple(means.shape) == tuple(shape[:2]), _OP_ADD,
                      f"means must have shape (N, Cout) = ({shape[0]}, {shape[1]}), got {list(means.shape)}")
        _checks.check_same(residual, means, "dtype", _OP_ADD, "residual", "means")
        _checks.check_same(residual, means, "device", _OP_ADD, "residual", "means")


@torch.library.register_fake("laudnet_ops::channel_gated_conv2d_add_")
def _channel_gated_conv2d_add_fake(residual, x, weight, bias, in_gates, out_gates, group_size, stride=(1, 1),
                                   padding=(0, 0), dilation=(1, 1), groups=1, activation="relu", means=None):
    shape = _check_conv(x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups,
                        activation, _OP_ADD)
    _check_residual(residual, x, weight, shape, means)


def _channel_mask(gates: Optional[torch.Tensor], group_size: int, dtype) -> Optional[torch.Tensor]:
    """bool (N, C / G) gates -> (N, C, 1, 1) multiplier of 0 and 1 in ``dtype``."""
    if gates is None:
        return None
    N, groups_of_gates = gates.shape
    mask = gates.unsqueeze(2).expand(N, groups_of_gates, group_size).reshape(N, groups_of_gates * group_size)
    return mask.to(dtype)[:, :, None, None]


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups, activation = inputs
    ctx.conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ctx.group_size = group_size
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, in_gates, out_gates, output if activation == "relu" else None)


def _backward(ctx, grad):
    # The masked convolution is linear in x (through x * in_mask) and in weight and bias, so its
    # gradient is a dense convolution backward of the masked gradient on the masked input. Training
    # runs the masked network densely anyway; the sparse kernel pays off at inference.
    x, weight, in_gates, out_gates, out = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = torch.ops.aten.threshold_backward.default(grad, out, 0)
    out_mask = _channel_mask(out_gates, ctx.group_size, grad.dtype)
    in_mask = _channel_mask(in_gates, ctx.group_size, x.dtype)
    if out_mask is not None:
        grad = grad * out_mask
    x_in = x * in_mask if in_mask is not None else x
    c = ctx.conv
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward.default(
        grad, x_in, weight, [weight.shape[0]] if ctx.has_bias else None, list(c["stride"]), list(c["padding"]),
        list(c["dilation"]), False, [0, 0], c["groups"], needs,
    )
    if grad_x is not None and in_mask is not None:
        grad_x = grad_x * in_mask
    return (grad_x, grad_w, grad_b) + (None,) * 8


torch.library.register_autograd("laudnet_ops::channel_gated_conv2d", _backward, setup_context=_setup_context)
