"""Every laudnet_ops op in plain PyTorch: the executable contract.

Each function states the op's exact semantics with dense, obviously correct
PyTorch and is differentiable by PyTorch's own autograd. Kernels are tested
against these; they are also a (slow) fallback that needs no compiled code.
"""

import math

import torch

ACTIVATIONS = ("relu", "none")


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f'activation must be "relu" or "none", got "{activation}"')
    return torch.relu(x) if activation == "relu" else x


def _check_indices(indices: torch.Tensor, grid: tuple) -> None:
    if indices.dtype != torch.int32 or indices.dim() != 2 or indices.shape[1] != 3:
        raise ValueError(f"indices must be int32 (P, 3), got {indices.dtype} {tuple(indices.shape)}")
    upper = torch.tensor(grid, device=indices.device)
    if ((indices < 0) | (indices >= upper)).any():
        raise ValueError(f"indices has rows outside the patch grid (N, Hp, Wp) = {grid}")


def _patch_view(canvas: torch.Tensor, S: int) -> torch.Tensor:
    """(N, C, Hp*S, Wp*S) -> a view (N, Hp, Wp, C, S, S) of its patches."""
    N, C, H, W = canvas.shape
    return canvas.view(N, C, H // S, S, W // S, S).permute(0, 2, 4, 1, 3, 5)


def patch_indices(mask: torch.Tensor) -> torch.Tensor:
    """int32 ``(P, 3)``: the ``(n, py, px)`` of every True entry of bool ``mask`` ``(N, Hp, Wp)``."""
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"mask must be a bool (N, Hp, Wp) tensor, got {mask.dtype} {tuple(mask.shape)}")
    return mask.nonzero().to(torch.int32)


def gather_patches(x: torch.Tensor, indices: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(P, C, S, S)``: ``out[p, :, i, j] = x[n, :, py*S+i, px*S+j]``, zero outside the map."""
    N, C, H, W = x.shape
    S = patch_size
    Hp, Wp = math.ceil(H / S), math.ceil(W / S)
    _check_indices(indices, (N, Hp, Wp))
    canvas = torch.nn.functional.pad(x, (0, Wp * S - W, 0, Hp * S - H))
    n, py, px = indices.long().unbind(1)
    return _patch_view(canvas, S)[n, py, px]


def scatter_add(
    residual: torch.Tensor, packed: torch.Tensor, indices: torch.Tensor, activation: str = "relu"
) -> torch.Tensor:
    """``act(residual + patches)``: patch ``p = (n, py, px)`` of ``packed`` ``(P, C, S, S)`` lands at
    rows ``py*S ...`` and columns ``px*S ...`` of sample ``n``; parts outside the map are dropped."""
    N, C, H, W = residual.shape
    S = packed.shape[2]
    Hp, Wp = math.ceil(H / S), math.ceil(W / S)
    _check_indices(indices, (N, Hp, Wp))
    if torch.unique(indices, dim=0).shape[0] != indices.shape[0]:
        raise ValueError("indices rows must be unique")
    canvas = residual.new_zeros(N, C, Hp * S, Wp * S)
    n, py, px = indices.long().unbind(1)
    patches = _patch_view(canvas, S).index_put((n, py, px), packed)
    canvas = patches.permute(0, 3, 1, 4, 2, 5).reshape(N, C, Hp * S, Wp * S)
    return _activate(residual + canvas[:, :, :H, :W], activation)


def conv1x1_scatter_add(
    residual: torch.Tensor,
    packed: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias=None,
    activation: str = "relu",
) -> torch.Tensor:
    """``scatter_add`` of the 1x1 convolution of the packed patches: ``packed`` ``(P, Cin, S, S)``,
    ``weight`` ``(Cout, Cin, 1, 1)``, ``bias`` ``(Cout,)`` or None, ``residual`` ``(N, Cout, Ho, Wo)``."""
    if weight.shape[2:] != (1, 1):
        raise ValueError("weight must be a 1x1 kernel")
    return scatter_add(residual, torch.nn.functional.conv2d(packed, weight, bias), indices, activation)


def _gate_mask(gates: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool ``(N, C / G)`` gates -> bool ``(N, C, 1, 1)``: each gate repeated over its ``G`` channels."""
    return gates.repeat_interleave(group_size, dim=1)[:, :, None, None]


def channel_gated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias,
    in_gates,
    out_gates,
    group_size: int,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    activation: str = "relu",
) -> torch.Tensor:
    """``act(conv2d(x * in_mask, weight, bias, ...))`` where the output channel's group is on, else 0.

    ``in_gates`` bool ``(N, Cin / G)``, ``out_gates`` bool ``(N, Cout / G)`` (None: all on); the masks
    repeat each gate over its ``G = group_size`` consecutive channels."""
    for gates, C in ((in_gates, x.shape[1]), (out_gates, weight.shape[0])):
        if C % group_size:
            raise ValueError(f"channels ({C}) must be divisible by group_size ({group_size})")
        if gates is not None and (gates.dtype != torch.bool or tuple(gates.shape) != (x.shape[0], C // group_size)):
            raise ValueError(f"gates must be bool (N, C / G) = {(x.shape[0], C // group_size)}, got {tuple(gates.shape)}")
    if in_gates is not None:
        x = torch.where(_gate_mask(in_gates, group_size), x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = _activate(torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups), activation)
    if out_gates is not None:
        y = torch.where(_gate_mask(out_gates, group_size), y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y


def channel_gated_conv2d_add(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias, in_gates,
                             out_gates, group_size: int, stride=1, padding=0, dilation=1, groups: int = 1,
                             activation: str = "relu") -> torch.Tensor:
    """``act(residual + channel_gated_conv2d(..., activation="none"))``: what ``channel_gated_conv2d_add_``
    writes into ``residual`` (an inactive output channel adds nothing)."""
    y = channel_gated_conv2d(x, weight, bias, in_gates, out_gates, group_size, stride, padding, dilation, groups,
                             "none")
    if tuple(residual.shape) != tuple(y.shape):
        raise ValueError(f"residual must have the output's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    return _activate(residual + y, activation)


def sample_gather(x: torch.Tensor, gates: torch.Tensor):
    """``(x[sel], sel)``: ``sel`` int32, the increasing indices of the True entries of bool ``gates`` ``(N,)``."""
    if gates.dtype != torch.bool or tuple(gates.shape) != (x.shape[0],):
        raise ValueError(f"gates must be bool (N,) = ({x.shape[0]},), got {gates.dtype} {tuple(gates.shape)}")
    sel = gates.nonzero().flatten().to(torch.int32)
    return x[sel.long()], sel


def sample_scatter_add(
    residual: torch.Tensor, y: torch.Tensor, sel: torch.Tensor, activation: str = "relu"
) -> torch.Tensor:
    """``out = act(residual)`` with ``out[sel] = act(residual[sel] + y)``; ``sel`` unique, in range."""
    if sel.dtype != torch.int32 or sel.dim() != 1 or y.shape[0] != sel.shape[0]:
        raise ValueError(f"sel must be int32 (K,) with K = y.shape[0], got {sel.dtype} {tuple(sel.shape)}")
    if ((sel < 0) | (sel >= residual.shape[0])).any():
        raise ValueError(f"sel has entries outside [0, {residual.shape[0]})")
    if torch.unique(sel).shape[0] != sel.shape[0]:
        raise ValueError("sel entries must be unique")
    return _activate(residual.index_add(0, sel.long(), y), activation)


def sample_scatter_add_pool(residual: torch.Tensor, y: torch.Tensor, sel: torch.Tensor, pooled: torch.Tensor,
                            activation: str = "relu"):
    """``(out, pooled_out)``: ``out`` as ``sample_scatter_add`` computes it on the selected samples (the
    others unchanged), ``pooled_out`` = ``pooled`` with rows ``sel`` replaced by ``out[sel]``'s channel
    means: what ``sample_scatter_add_pool_`` writes in place."""
    out = residual.clone()
    rows = sel.long()
    out[rows] = sample_scatter_add(residual, y, sel, activation)[rows]
    pooled_out = pooled.clone()
    pooled_out[rows] = out[rows].mean((2, 3))
    return out, pooled_out


def gather_conv2d(
    x: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias,
    patch_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    activation: str = "relu",
) -> torch.Tensor:
    """``(P, Cout, S, S)``: the dense ``act(conv2d(x, ...))`` map, read at each patch of ``indices``
    (zero where a border patch leaves the output map)."""
    out = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return gather_patches(_activate(out, activation), indices, patch_size)


def masked_conv1x1(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias=None,
                   activation: str = "relu") -> torch.Tensor:
    """``act(conv1x1(x, weight, bias))`` where bool ``mask`` ``(N, H, W)`` keeps a pixel, 0 elsewhere."""
    if weight.shape[2:] != (1, 1):
        raise ValueError("weight must be a 1x1 kernel")
    if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"mask must be a bool (N, H, W) tensor, got {mask.dtype} {tuple(mask.shape)}")
    y = torch.einsum("nchw,oc->nohw", x, weight[:, :, 0, 0])  # F.conv2d refuses zero-sized maps
    if bias is not None:
        y = y + bias[:, None, None]
    return _activate(y, activation).masked_fill(~mask[:, None], 0)


def masker_conv1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias,
    mask_weight: torch.Tensor,
    mask_bias,
    patch_size: int,
    stride: int = 1,
    activation: str = "relu",
):
    """``(y, logits)``: ``y = act(conv1x1(x, weight, bias))``; ``logits[n, :, py, px]`` is the mean
    of ``conv1x1(x, mask_weight, mask_bias)`` over input rows ``[py*S*stride, min((py+1)*S*stride, H))``
    and the same columns (the mask grid is ``ceil(ceil(H / stride) / S)`` rows)."""
    if mask_weight.shape[0] < 1:
        raise ValueError("mask_weight must have at least one masker channel")
    y = _activate(torch.nn.functional.conv2d(x, weight, bias), activation)
    m = torch.nn.functional.conv2d(x, mask_weight, mask_bias)
    N, M, H, W = m.shape
    window = patch_size * stride
    Hq = math.ceil(math.ceil(H / stride) / patch_size)
    Wq = math.ceil(math.ceil(W / stride) / patch_size)
    # Sum each window of a zero-padded copy, and divide by how many real pixels it holds.
    pad = (0, Wq * window - W, 0, Hq * window - H)
    sums = torch.nn.functional.pad(m, pad).view(N, M, Hq, window, Wq, window).sum((3, 5))
    ones = torch.nn.functional.pad(m.new_ones(1, 1, H, W), pad)
    counts = ones.view(1, 1, Hq, window, Wq, window).sum((3, 5))
    return y, sums / counts
