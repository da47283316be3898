"""Dynamic residual blocks: ResNet's bottleneck and RegNetY's block, with spatial, channel or layer skipping.

One set of weights, two execution paths:

- masked (training, and the reference): dense convolutions multiplied by the masks -- the paper's
  mask-and-compute formulation, differentiable through the straight-through Gumbel masks;
- sparse (inference): the fused kernels compute only what the masks keep, with batch norm folded
  into the convolutions.

Where the masks multiply (laudnet-facts.md): a channel mask after the first and second conv, a
spatial or layer mask on the residual branch before the add; the projection shortcut stays dense.
A channel-mode sample with every group off skips its residual branch (so ``force_keep=0`` leaves
only the shortcut, in every mode). In a RegNetY spatial block the squeeze-excitation pools the
kept pixels only, since the sparse path has no others.

Parameter names follow torchvision's ``Bottleneck`` and ``ResBottleneckBlock``, so their state dicts
load; the masker (``masker.*``) is the only extra key.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import has_op, op
from .._cpu_dispatch import runs_dense_grouped
from .folding import FoldedWeights
from .gather_conv import expand_group_mask, expand_patch_mask, halo_mask
from .maskers import ChannelMasker, LayerMasker, SpatialMasker
from .stats import BlockRecord

__all__ = ["DynamicBlock", "DynamicBottleneck", "DynamicRegNetYBlock", "MODES", "EXECUTIONS", "SPARSE_OPS",
           "missing_sparse_ops"]

MODES = ("dense", "spatial", "channel", "layer")
EXECUTIONS = ("masked", "sparse")

# The compiled ops each mode's sparse path calls (dense mode needs none: folded F.conv2d only).
SPARSE_OPS = {
    "dense": (),
    "spatial": ("masker_conv1x1", "masked_conv1x1", "patch_indices", "gather_conv2d", "conv1x1_scatter_add",
                "conv1x1_scatter_add_"),
    "channel": ("channel_gated_conv2d", "channel_gated_conv2d_add_"),
    "layer": ("sample_gather", "sample_scatter_add", "sample_scatter_add_", "sample_scatter_add_pool_"),
}

# Devices whose spatial blocks run the masker first and conv1 on the read pixels only by default
# (conv1_on_halo, channels_last maps): those where masked_conv1x1 has a kernel of its own.
_MASKED_CONV1_DEVICES = ("cpu",)


def missing_sparse_ops(mode: str) -> list:
    return [name for name in SPARSE_OPS[mode] if not has_op(name)]


def _conv_macs(conv: nn.Conv2d, out_hw: tuple) -> float:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.out_channels * (conv.in_channels // conv.groups) * k * out_hw[0] * out_hw[1]


def _masker_macs(masker, channels: int, in_hw: tuple, units: int) -> float:
    pooling = channels * in_hw[0] * in_hw[1]
    if isinstance(masker, ChannelMasker):
        return pooling + masker.fc1.in_features * masker.fc1.out_features + masker.fc2.in_features * masker.groups
    return pooling + channels * units


class DynamicBlock(nn.Module):
    """Mode, granularity, masker and execution path shared by the dynamic blocks.

    Subclasses define the computation (``_masked`` and the ``_sparse_<mode>`` methods) and its FLOPs.
    ``execution`` is None (masked in training, sparse in eval), ``"masked"`` or ``"sparse"``.
    """

    def __init__(self, mode: str, granularity: int, in_channels: int, width: int, stride: int,
                 force_keep: Optional[float] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if granularity < 1:
            raise ValueError(f"granularity must be at least 1, got {granularity}")
        if mode == "channel" and width % granularity:
            raise ValueError(f"channel mode: granularity G={granularity} must divide the block width {width}")
        self.mode = mode
        self.granularity = granularity if mode in ("spatial", "channel") else 1
        self.execution: Optional[str] = None
        # Set by a model on blocks whose input it owns and knows is post-ReLU: the sparse path may
        # then add the residual branch into the input in place.
        self.owns_activated_input = False
        # Spatial mode, sparse path: conv1 only on the input pixels the kept patches' halo reads, after a
        # separate masker (True), or on every pixel fused with the masker (False); None picks the
        # former for channels_last maps on the CPU, where it is faster (see _spatial_conv1).
        self.conv1_on_halo: Optional[bool] = None
        self._folded = FoldedWeights()
        self._laud_record: Optional[BlockRecord] = None
        kw = dict(force_keep=force_keep)
        if mode == "spatial":
            self.masker = SpatialMasker(in_channels, granularity, stride, **kw)
        elif mode == "channel":
            self.masker = ChannelMasker(in_channels, width // granularity, **kw)
        elif mode == "layer":
            self.masker = LayerMasker(in_channels, **kw)

    def resolved_execution(self) -> str:
        if self.execution is None:
            # Without the compiled ops (a pure-Python install) eval falls back to the masked path,
            # which gives the same output at dense cost.
            if self.training or missing_sparse_ops(self.mode):
                return "masked"
            return "sparse"
        if self.execution == "sparse" and self.training:
            raise RuntimeError(
                'the sparse execution path is for inference (batch norm is folded): call model.eval(), '
                'or use laudnet_ops.nn.set_execution(model, "masked") to train'
            )
        return self.execution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resolved_execution() == "masked":
            return self._masked(x)
        # Inference only: the in-place kernels and the folded weights carry no gradient.
        with torch.no_grad():
            return getattr(self, f"_sparse_{self.mode}")(x)

    def forward_with_means(self, x: torch.Tensor, means: Optional[torch.Tensor] = None) -> tuple:
        """``(self(x), the output's channel means or None)``, given ``x``'s channel means ``(N, C)`` or None.

        The models chain their blocks through this. On the sparse paths of layer and channel skipping,
        the kernel that writes a block's output pools it on the way (``sample_scatter_add_pool_`` when a
        layer-skipping block updates its own input, ``channel_gated_conv2d_add_`` always), so the next
        block's masker, or the network's head, pools nothing itself. Elsewhere it is ``self(x)`` and
        None. Module hooks of a block do not run on the pooled path.
        """
        if self.mode not in ("layer", "channel") or self.resolved_execution() != "sparse":
            return self(x), None
        with torch.no_grad():
            return getattr(self, f"_sparse_{self.mode}")(x, means, want_means=True)

    def _record(self, x: torch.Tensor, out_hw: tuple, mask: Optional[torch.Tensor]) -> None:
        in_hw = tuple(x.shape[2:])
        parts = self._dense_parts(in_hw, out_hw)
        geometry = {}
        if self.mode != "dense":
            units = mask[0].numel() if mask.dim() > 1 else 1
            parts["masker"] = _masker_macs(self.masker, x.shape[1], in_hw, units)
        if self.mode == "spatial":
            geometry = dict(patch_size=self.granularity, stride=self.stride, in_hw=in_hw, out_hw=out_hw)
        self._laud_record = BlockRecord(self.mode, x.shape[0], parts, mask, geometry)

    def _fold(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, layout: Optional[str] = None) -> tuple:
        return self._folded(name, conv, bn, layout)

    # Attribute holding the (conv, bn) projection shortcut, or None for an identity shortcut;
    # named as in torchvision so state dicts load.
    _projection_attr = "downsample"

    def _projection(self) -> Optional[nn.Module]:
        return getattr(self, self._projection_attr)

    def _identity(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut on the sparse path, batch norm folded into the projection."""
        proj = self._projection()
        if proj is None:
            return x
        w, b = self._fold(self._projection_attr, proj[0], proj[1])
        return F.conv2d(x, w, b, proj[0].stride, proj[0].padding)

    def _masked_output(self, x, identity, h, mask, out_hw, kept=None):
        """``relu(identity + h · mask)`` on the masked path; ``kept`` is the expanded patch mask."""
        if self.mode == "spatial":
            h = h * (kept if kept is not None else expand_patch_mask(mask, self.granularity, *out_hw))
        elif self.mode == "channel":
            h = h * _alive(mask)
        elif self.mode == "layer":
            h = h * mask[:, None, None, None]
        self._record(x, out_hw, mask)
        return F.relu(identity + h)

    def _in_place_residual(self) -> bool:
        # The identity is this block's own post-ReLU input only without a projection shortcut.
        return self.owns_activated_input and self._projection() is None

    def _writable_identity(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut in a tensor this block may update in place: the projection's fresh output,
        the block's own input, or else a copy of the input."""
        identity = self._identity(x)
        if self._projection() is None and not self.owns_activated_input:
            identity = identity.clone(memory_format=torch.preserve_format)
        return identity

    def _gated_residual_add(self, x, h, weight, bias, gates, want_means=False):
        """``relu(identity + conv(h))``, the channel block's last conv reading the active input groups,
        fused with the residual add; with ``want_means`` also the output's channel means. A sample with
        every group off skips its branch: its output gates are all off, so it adds nothing (and no host
        synchronisation decides that)."""
        G = self.granularity
        alive = gates.any(1, keepdim=True).expand(-1, weight.shape[0] // G)
        identity = self._writable_identity(x)
        means = identity.new_empty(identity.shape[:2]) if want_means else None
        out = op("channel_gated_conv2d_add_")(identity, h, weight, bias, gates, alive, G, activation="relu",
                                              means=means)
        return (out, means) if want_means else out

    def _channel_gates(self, x, means):
        """Bool (N, groups): the channel masker's decisions, from ``x``'s channel means if known."""
        means = x.mean((2, 3)) if means is None else means
        return self.masker.decide(self.masker.logits_from_means(means)) > 0

    def _residual_add(self, identity, packed, indices, weight, bias):
        """``relu(identity + conv1x1(packed, weight, bias))`` at the patches, the block's last conv fused
        with the scatter (its (P, Cout, S, S) output never reaches memory): in place when this block
        owns a post-ReLU input."""
        if self._in_place_residual():
            return op("conv1x1_scatter_add_")(identity, packed, indices, weight, bias, "relu")
        if self._projection() is not None:
            # The identity is this block's own projection output: add into it, then one ReLU pass (as
            # _scatter_layer does), rather than write a second full map.
            return F.relu_(op("conv1x1_scatter_add_")(identity, packed, indices, weight, bias, "none"))
        return op("conv1x1_scatter_add")(identity, packed, indices, weight, bias, "relu")

    def _sparse_layer(self, x, means=None, want_means=False):
        """Layer skipping: the branch runs on the kept samples only, scattered back with the residual.

        ``means``: ``x``'s channel means if known (else pooled here). With ``want_means`` it returns
        ``(out, out's channel means or None)``."""
        if means is None:
            means = x.mean((2, 3))
        gates = self.masker.decide(self.masker.logits_from_means(means)) > 0
        identity = self._identity(x)
        self._record(x, tuple(identity.shape[2:]), gates)
        # The gather's compaction is the block's one host synchronisation; the kept count comes with it.
        selected, sel = op("sample_gather")(x, gates)
        if sel.shape[0] == x.shape[0]:  # every sample kept: the plain block, no scatter
            out = F.relu_(self._branch(x).add_(identity))
            return (out, None) if want_means else out
        y = self._branch(selected)
        if self._in_place_residual() and want_means:
            # The skipped samples keep their values, hence their means; the scatter pools the others.
            return op("sample_scatter_add_pool_")(identity, y, sel, means, "relu")
        out = self._scatter_layer(identity, y, sel)
        return (out, None) if want_means else out

    def _scatter_layer(self, identity, y, sel):
        """``relu(identity + y)`` on the samples ``sel``, ``relu(identity)`` on the others."""
        if self._in_place_residual():
            return op("sample_scatter_add_")(identity, y, sel, "relu")
        if self._projection() is not None:
            # The identity is this block's own projection output: add into it, then one ReLU pass.
            # Cheaper than the out-of-place op, whose fresh N-sample result costs an allocation
            # and a first touch of every page.
            return F.relu_(op("sample_scatter_add_")(identity, y, sel, "none"))
        return op("sample_scatter_add")(identity, y, sel, "relu")

    def _spatial_conv1(self, x: torch.Tensor, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
        """``(relu(conv1(x)), bool patch mask (N, Hp, Wp))`` for a spatial block, batch norm folded.

        With ``conv1_on_halo`` (by default for a channels_last map on the CPU) the masker runs first,
        on ``x`` pooled to the patch grid (one cheap pass), and conv1 then only on the input pixels
        the kept patches' 3x3 halo reads: the pixels the gather convolution after it reads, no
        others (``masked_conv1x1``). Otherwise conv1 runs on every pixel, fused with the masker
        (``masker_conv1x1``, one read of x). Not the default elsewhere: the masked kernel computes in
        channels_last, so an NCHW map would pay two layout copies, and its GPU kernel is the dense
        fallback.
        """
        S = self.granularity
        on_halo = self.conv1_on_halo
        if on_halo is None:
            on_halo = x.device.type in _MASKED_CONV1_DEVICES and _computed_channels_last(x)
        if not on_halo:
            w, b = self._fold(name, conv, bn, "taps_major")
            masker = self.masker.conv
            y1, logits = op("masker_conv1x1")(x, w, b, masker.weight, masker.bias, S, self.stride, "relu")
            return y1, self.masker.decide(logits[:, 0]) > 0
        mask = self.masker.decide(self.masker.logits(x)) > 0
        in_hw = tuple(x.shape[2:])
        out_hw = tuple(-(-d // self.stride) for d in in_hw)  # the 3x3, padding 1 conv after conv1
        read = halo_mask(mask, S, self.stride, in_hw, out_hw)[:, 0]
        w, b = self._fold(name, conv, bn, "taps_major")
        return op("masked_conv1x1")(x, read, w, b, "relu"), mask

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, granularity={self.granularity}, execution={self.execution!r}"


def _computed_channels_last(x: torch.Tensor) -> bool:
    """Whether the kernels compute ``x`` as a channels_last map (the ops' feature-layout rule)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _weight_layout(x: torch.Tensor) -> Optional[str]:
    """The weight layout the channel-gated and conv1x1_scatter_add CPU kernels read without re-laying
    it: (ky, kx, Cin, Cout) for a channels_last map, plain contiguous otherwise."""
    return "taps_major" if _computed_channels_last(x) else None


def conv_weight_layout(x: torch.Tensor) -> Optional[str]:
    """The weight layout oneDNN convolves a map of ``x``'s layout with: channels_last weights for a
    channels_last map, so F.conv2d does not re-lay a 3x3 weight on every call."""
    return "channels_last" if _computed_channels_last(x) else None


def _alive(gates: torch.Tensor) -> torch.Tensor:
    """(N, 1, 1, 1) float: whether a sample keeps any channel group (else its branch is skipped)."""
    return (gates.detach() > 0).any(1).to(gates.dtype)[:, None, None, None]


class DynamicBottleneck(DynamicBlock):
    """torchvision's ResNet v1.5 ``Bottleneck`` (stride on the 3x3 conv) with a skipping mode.

    Args:
        inplanes, planes, stride, downsample, groups, base_width, dilation: as torchvision's.
        mode: "dense", "spatial", "channel" or "layer".
        granularity: patch size S (spatial) or channels per group G (channel); ignored otherwise.
        force_keep: passed to the masker.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, mode: str = "dense",
                 granularity: int = 1, force_keep: Optional[float] = None):
        width = int(planes * (base_width / 64.0)) * groups
        super().__init__(mode, granularity, inplanes, width, stride, force_keep)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, groups=groups,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        if mode == "spatial" and dilation != 1:
            raise ValueError("spatial mode supports dilation 1 only (the halo accounting assumes it)")

    # -- masked path -------------------------------------------------------------------------

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        mask = None if self.mode == "dense" else self.masker(x)
        cm = expand_group_mask(mask, self.granularity) if self.mode == "channel" else 1.0
        h = F.relu(self.bn1(self.conv1(x))) * cm
        h = F.relu(self.bn2(self.conv2(h))) * cm
        h = self.bn3(self.conv3(h))
        return self._masked_output(x, identity, h, mask, tuple(h.shape[2:]))

    # -- sparse path -------------------------------------------------------------------------

    def _conv(self, x, name, activation=True):
        conv, bn = getattr(self, f"conv{name}"), getattr(self, f"bn{name}")
        w, b = self._fold(f"conv{name}", conv, bn, conv_weight_layout(x))
        y = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.relu_(y) if activation else y

    def _branch(self, x):
        return self._conv(self._conv(self._conv(x, 1), 2), 3, activation=False)

    def _sparse_dense(self, x):
        y = self._branch(x)
        self._record(x, tuple(y.shape[2:]), None)
        return F.relu_(y.add_(self._identity(x)))

    def _sparse_spatial(self, x):
        S = self.granularity
        # (Cin, Cout)-ordered weights: the CPU kernels' GEMM operands, read without a copy per call.
        w2, b2 = self._fold("conv2", self.conv2, self.bn2, "taps_major")
        w3, b3 = self._fold("conv3", self.conv3, self.bn3, _weight_layout(x))
        c2 = self.conv2
        y1, mask = self._spatial_conv1(x, "conv1", self.conv1, self.bn1)
        indices = op("patch_indices")(mask)
        packed = op("gather_conv2d")(y1, indices, w2, b2, S, self.stride, c2.padding[0], c2.dilation[0],
                                     c2.groups, "relu")
        identity = self._identity(x)
        self._record(x, tuple(identity.shape[2:]), mask)
        return self._residual_add(identity, packed, indices, w3, b3)

    def _sparse_channel(self, x, means=None, want_means=False):
        G = self.granularity
        gates = self._channel_gates(x, means)
        gated = op("channel_gated_conv2d")
        layout = _weight_layout(x)
        w1, b1 = self._fold("conv1", self.conv1, self.bn1, layout)
        w2, b2 = self._fold("conv2", self.conv2, self.bn2, layout)
        w3, b3 = self._fold("conv3", self.conv3, self.bn3, layout)
        c2 = self.conv2
        y = gated(x, w1, b1, None, gates, G, activation="relu")
        y = gated(y, w2, b2, gates, gates, G, c2.stride[0], c2.padding[0], c2.dilation[0], c2.groups, "relu")
        self._record(x, tuple(y.shape[2:]), gates)
        return self._gated_residual_add(x, y, w3, b3, gates, want_means)

    def _dense_parts(self, in_hw, out_hw) -> dict:
        parts = {"conv1": _conv_macs(self.conv1, in_hw), "conv2": _conv_macs(self.conv2, out_hw),
                 "conv3": _conv_macs(self.conv3, out_hw)}
        if self.downsample is not None:
            parts["downsample"] = _conv_macs(self.downsample[0], out_hw)
        return parts


class _SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation`` (names fc1, fc2), with the pooled input given."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def scale(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(N, C, 1, 1)`` channel scale from the ``(N, C, 1, 1)`` pooled map."""
        # The 1x1 convs as matrix products: PyTorch runs a convolution of a 1x1 map on its slow
        # reference path.
        h = F.relu(F.linear(pooled.flatten(1), self.fc1.weight.flatten(1), self.fc1.bias))
        return torch.sigmoid(F.linear(h, self.fc2.weight.flatten(1), self.fc2.bias))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x.mean((2, 3), keepdim=True))


def _conv_bn(cin, cout, kernel, stride=1, groups=1, relu=True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _RegNetTransform(nn.Module):
    """torchvision's ``BottleneckTransform`` layout: a (1x1), b (grouped 3x3), se, c (1x1)."""

    def __init__(self, width_in, width_out, stride, group_width, se_ratio):
        super().__init__()
        groups = width_out // group_width
        self.a = _conv_bn(width_in, width_out, 1)
        self.b = _conv_bn(width_out, width_out, 3, stride, groups)
        self.se = _SqueezeExcitation(width_out, int(round(se_ratio * width_in)))
        self.c = _conv_bn(width_out, width_out, 1, relu=False)


class DynamicRegNetYBlock(DynamicBlock):
    """torchvision's RegNetY ``ResBottleneckBlock`` (bottleneck multiplier 1, SE) with a skipping mode.

    Args:
        width_in, width_out, stride, group_width, se_ratio: as torchvision's.
        mode, granularity, force_keep: as :class:`DynamicBottleneck`. Layer skipping skips the SE too.
    """

    _projection_attr = "proj"

    def __init__(self, width_in: int, width_out: int, stride: int = 1, group_width: int = 8,
                 se_ratio: float = 0.25, mode: str = "dense", granularity: int = 1,
                 force_keep: Optional[float] = None):
        super().__init__(mode, granularity, width_in, width_out, stride, force_keep)
        if mode == "channel" and group_width % granularity:
            raise ValueError(f"channel mode: G={granularity} must divide the group width {group_width}")
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = _conv_bn(width_in, width_out, 1, stride, relu=False)
        self.f = _RegNetTransform(width_in, width_out, stride, group_width, se_ratio)
        self.activation = nn.ReLU(inplace=True)
        self.stride = stride

    # -- masked path -------------------------------------------------------------------------

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        f = self.f
        identity = x if self.proj is None else self.proj(x)
        mask = None if self.mode == "dense" else self.masker(x)
        cm = expand_group_mask(mask, self.granularity) if self.mode == "channel" else 1.0
        h = f.a(x) * cm
        h = f.b(h) * cm
        out_hw = tuple(h.shape[2:])
        if self.mode == "spatial":
            kept = expand_patch_mask(mask, self.granularity, *out_hw)
            pooled = (h * kept).sum((2, 3), keepdim=True) / kept.sum((2, 3), keepdim=True).clamp(min=1)
        else:
            pooled = h.mean((2, 3), keepdim=True)
        h = f.c(h * f.se.scale(pooled))
        return self._masked_output(x, identity, h, mask, out_hw, kept if self.mode == "spatial" else None)

    # -- sparse path -------------------------------------------------------------------------

    def _folded_convs(self, layout: Optional[str] = None):
        f = self.f
        return [self._fold(name, getattr(f, name)[0], getattr(f, name)[1], layout) for name in ("a", "b", "c")]

    def _branch(self, x):
        (wa, ba), (wb, bb), (wc, bc) = self._folded_convs(conv_weight_layout(x))
        b = self.f.b[0]
        h = F.relu_(F.conv2d(x, wa, ba))
        h = F.relu_(F.conv2d(h, wb, bb, b.stride, b.padding, 1, b.groups))
        h = h.mul_(self.f.se.scale(h.mean((2, 3), keepdim=True)))
        return F.conv2d(h, wc, bc)

    def _sparse_dense(self, x):
        y = self._branch(x)
        self._record(x, tuple(y.shape[2:]), None)
        return F.relu_(y.add_(self._identity(x)))

    def _sparse_spatial(self, x):
        S = self.granularity
        wb, bb = self._fold("b", self.f.b[0], self.f.b[1])
        y1, mask = self._spatial_conv1(x, "a", self.f.a[0], self.f.a[1])
        indices = op("patch_indices")(mask)
        b = self.f.b[0]
        packed = op("gather_conv2d")(y1, indices, wb, bb, S, self.stride, b.padding[0], 1, b.groups, "relu")
        identity = self._identity(x)
        out_hw = tuple(identity.shape[2:])
        # SE over the kept pixels: packed patches are zero outside the map, so sums are exact.
        N, C = x.shape[0], packed.shape[1]
        sample = indices[:, 0].long()
        sums = packed.new_zeros(N, C).index_add_(0, sample, packed.sum((2, 3)))
        counts = expand_patch_mask(mask, S, *out_hw).sum((1, 2, 3)).clamp(min=1).to(sums.dtype)
        scale = self.f.se.scale((sums / counts[:, None])[:, :, None, None])[:, :, 0, 0]
        # The SE scales conv c's input channels, so conv c still fuses with the scatter after it.
        packed = packed * scale[sample][:, :, None, None]
        self._record(x, out_hw, mask)
        wc, bc = self._fold("c", self.f.c[0], self.f.c[1], _weight_layout(x))
        return self._residual_add(identity, packed, indices, wc, bc)

    def _sparse_channel(self, x, means=None, want_means=False):
        G = self.granularity
        gates = self._channel_gates(x, means)
        gated = op("channel_gated_conv2d")
        (wa, ba), (wb, bb), (wc, bc) = self._folded_convs(_weight_layout(x))
        b = self.f.b[0]
        y = gated(x, wa, ba, None, gates, G, activation="relu")
        # y is exactly 0 on its off channels, so conv b's in_gates only ever skip work; where the op
        # runs a dense grouped convolution they would skip none and cost a gated copy of y instead.
        in_gates = None if runs_dense_grouped(y, b.out_channels, b.groups) else gates
        y = gated(y, wb, bb, in_gates, gates, G, b.stride[0], b.padding[0], 1, b.groups, "relu")
        y = y.mul_(self.f.se.scale(y.mean((2, 3), keepdim=True)))
        self._record(x, tuple(y.shape[2:]), gates)
        return self._gated_residual_add(x, y, wc, bc, gates, want_means)

    def _dense_parts(self, in_hw, out_hw) -> dict:
        f = self.f
        se = f.se.fc1.in_channels * f.se.fc1.out_channels * 2 + f.se.fc1.in_channels * out_hw[0] * out_hw[1]
        parts = {"conv1": _conv_macs(f.a[0], in_hw), "conv2": _conv_macs(f.b[0], out_hw), "se": se,
                 "conv3": _conv_macs(f.c[0], out_hw)}
        if self.proj is not None:
            parts["downsample"] = _conv_macs(self.proj[0], out_hw)
        return parts
