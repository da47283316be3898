"""Whole-network latency: ResNet-50/101 and RegNetY-400MF/800MF with stem, head and dense projections.

Every residual block is dynamic with the same block activation rate (the paper's training target t is
the mean of the block rates); the stem, the classifier head and the projection (downsample) branches stay
dense.  Granularity is one value per stage (S for spatial, G for channel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import operators as ops
from ._util import check_rate, choice_error, normalize_dtype, per_stage
from .blocks import FUSED, MODES, RATE_KINDS, BlockLatency, BlockSpec, Schedule, dense_kernels, predict_block
from .devices import Device, get_device
from .tiles import Kernel, KernelCost, price


@dataclass(frozen=True)
class ModelSpec:
    """A backbone: its blocks (in order), stem and head kernels as functions of (batch, dtype)."""

    name: str
    blocks: tuple[BlockSpec, ...]
    stem: Callable[[int, str], list[Kernel]]
    head: Callable[[int, str], list[Kernel]]
    stages: int = 4
    default_spatial: tuple[int, ...] = (4, 4, 2, 1)
    default_channel: tuple[int, ...] = (2, 2, 2, 2)


def _resnet(name: str, depths: Sequence[int], resolution: int = 224) -> ModelSpec:
    blocks: list[BlockSpec] = []
    cin, size = 64, resolution // 4  # after the stride-2 7x7 stem and the stride-2 max-pool
    for stage, (depth, planes) in enumerate(zip(depths, (64, 128, 256, 512))):
        for i in range(depth):
            stride = 2 if (i == 0 and stage > 0) else 1  # torchvision v1.5: stride on the 3x3
            spec = BlockSpec(f"layer{stage + 1}.{i}", cin, planes, planes * 4, size, size, stride, stage=stage)
            blocks.append(spec)
            cin, size = planes * 4, spec.ho

    def stem(n: int, dtype: str) -> list[Kernel]:
        conv = ops.conv2d("stem-conv7x7", n, 3, 64, resolution, resolution, 7, 2, dtype=dtype)
        h = conv.out[2]
        return [conv, ops.pool("stem-maxpool", n, 64, h, h, 3, 2, dtype, padding=1)]

    def head(n: int, dtype: str) -> list[Kernel]:
        return [ops.global_pool("head-avgpool", n, 2048, size, size, dtype),
                ops.linear("head-fc", n, 2048, 1000, dtype)]

    return ModelSpec(name, tuple(blocks), stem, head)


def _regnety(name: str, depths: Sequence[int], widths: Sequence[int], group_width: int,
             resolution: int = 224, se_ratio: float = 0.25) -> ModelSpec:
    """torchvision's RegNetY: bottleneck multiplier 1, SE squeeze = round(0.25 x block input width)."""
    blocks: list[BlockSpec] = []
    cin, size = 32, resolution // 2
    for stage, (depth, width) in enumerate(zip(depths, widths)):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            spec = BlockSpec(f"s{stage + 1}.b{i + 1}", cin, width, width, size, size, stride,
                             groups=width // group_width, se=int(round(se_ratio * cin)), stage=stage)
            blocks.append(spec)
            cin, size = width, spec.ho
    last = widths[-1]

    def stem(n: int, dtype: str) -> list[Kernel]:
        return [ops.conv2d("stem-conv3x3", n, 3, 32, resolution, resolution, 3, 2, dtype=dtype)]

    def head(n: int, dtype: str) -> list[Kernel]:
        return [ops.global_pool("head-avgpool", n, last, size, size, dtype),
                ops.linear("head-fc", n, last, 1000, dtype)]

    return ModelSpec(name, tuple(blocks), stem, head)


_MODELS: dict[str, Callable[[int], ModelSpec]] = {
    "resnet50": lambda r: _resnet("resnet50", (3, 4, 6, 3), r),
    "resnet101": lambda r: _resnet("resnet101", (3, 4, 23, 3), r),
    "regnety400mf": lambda r: _regnety("regnety400mf", (1, 3, 6, 6), (48, 104, 208, 440), 8, r),
    "regnety800mf": lambda r: _regnety("regnety800mf", (1, 3, 8, 2), (64, 144, 320, 784), 16, r),
}
_MODEL_ALIASES = {"resnet-50": "resnet50", "resnet-101": "resnet101", "regnety-400mf": "regnety400mf",
                  "regnety-800mf": "regnety800mf", "regnet_y_400mf": "regnety400mf",
                  "regnet_y_800mf": "regnety800mf", "regnety400m": "regnety400mf", "regnety800m": "regnety800mf"}


def known_models() -> list[str]:
    return sorted(_MODELS)


def get_model(name: str, resolution: int = 224) -> ModelSpec:
    """A model by name; raises ``ValueError`` listing the known models for an unknown name."""
    key = str(name).strip().lower()
    key = _MODEL_ALIASES.get(key, key)
    if key not in _MODELS:
        raise choice_error("model", name, known_models())
    if resolution < 32 or resolution % 32:
        raise ValueError(f"resolution must be a positive multiple of 32, got {resolution!r}")
    return _MODELS[key](resolution)


@dataclass
class NetworkLatency:
    """Predicted latency (seconds) of a whole network, dense and dynamic."""

    device: str
    model: str
    mode: str
    granularity: tuple[int, ...]
    rate: float
    batch: int
    dtype: str
    dense: float
    dynamic: float
    stem: list[KernelCost] = field(default_factory=list)
    head: list[KernelCost] = field(default_factory=list)
    blocks: list[BlockLatency] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense / self.dynamic if self.dynamic > 0 else float("inf")

    def to_dict(self, kernels: bool = False) -> dict[str, Any]:
        """The JSON form printed by the CLI's ``--json`` (times in milliseconds)."""
        return {
            "device": self.device, "model": self.model, "mode": self.mode,
            "granularity": list(self.granularity), "rate": self.rate, "batch": self.batch,
            "dtype": self.dtype, "dense_ms": self.dense * 1e3, "dynamic_ms": self.dynamic * 1e3,
            "speedup": self.speedup,
            "stem_ms": sum(k.latency for k in self.stem) * 1e3,
            "head_ms": sum(k.latency for k in self.head) * 1e3,
            "blocks": [b.to_dict(kernels) for b in self.blocks],
        }


def predict_network(device: str | Device, model: str, mode: str, rate: float,
                    granularity: int | str | Sequence[int] | None = None, batch: int | None = None,
                    dtype: str = "fp32", schedule: Schedule = FUSED, resolution: int = 224,
                    rate_kind: str = "flops", calibration: Any = None) -> NetworkLatency:
    """Predicted latency of ``model`` on ``device`` with every block in ``mode`` at activation ``rate``.

    ``granularity``: S (spatial) or G (channel), one value or one per stage (default: the model's paper
    setting, 4-4-2-1 for S and 2 for G); ``batch`` defaults to the device's (128 server GPUs, 1 edge).
    """
    dev = get_device(device, calibration) if not isinstance(device, Device) else device
    spec = get_model(model, resolution)
    if mode not in MODES:
        raise choice_error("mode", mode, MODES)
    if rate_kind not in RATE_KINDS:
        raise choice_error("rate_kind", rate_kind, RATE_KINDS)
    rate = check_rate(rate)
    dtype = normalize_dtype(dtype)
    n = dev.default_batch if batch is None else int(batch)
    if n < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}")
    if granularity is None:
        gran = {"spatial": spec.default_spatial, "channel": spec.default_channel}.get(mode, (1,) * spec.stages)
    else:
        gran = per_stage(granularity, spec.stages, "granularity")
    if mode not in ("spatial", "channel"):
        gran = (1,) * spec.stages
    blocks = [predict_block(b, dev, mode, rate, gran[b.stage], n, dtype, schedule, rate_kind)
              for b in spec.blocks]
    stem = [price(k, dev) for k in spec.stem(n, dtype)]
    head = [price(k, dev) for k in spec.head(n, dtype)]
    fixed = sum(k.latency for k in stem) + sum(k.latency for k in head)
    return NetworkLatency(
        device=dev.name, model=spec.name, mode=mode, granularity=tuple(gran), rate=rate, batch=n, dtype=dtype,
        dense=fixed + sum(b.dense for b in blocks), dynamic=fixed + sum(b.dynamic for b in blocks),
        stem=stem, head=head, blocks=blocks,
    )


def network_flops(model: str, resolution: int = 224) -> float:
    """Dense FLOPs (2 x MACs) of a model, stem and head included (a sanity check against the literature:
    ResNet-50 ~4.1 GMACs, ResNet-101 ~7.8, RegNetY-400MF ~0.4, RegNetY-800MF ~0.8)."""
    spec = get_model(model, resolution)
    kernels = spec.stem(1, "fp32") + spec.head(1, "fp32")
    for b in spec.blocks:
        kernels += dense_kernels(b, 1, "fp32")
    return sum(k.flops for k in kernels if k.gemm)
