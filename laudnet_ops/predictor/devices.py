"""Device descriptions: the paper's table, modern datasheet GPUs, the host CPU, and user files.

A device is a set of processing engines (PEs: GPU streaming multiprocessors, CPU cores) with three memory
levels: off-chip DRAM, on-chip global memory (GPU L2, CPU last-level cache) and memory inside each PE
(shared memory / registers, CPU L1+L2).  The figures below are hardware properties; the ``Efficiency``
constants are model constants that say how much of that hardware an ordinary kernel reaches.  The defaults
are assumptions, and ``calibrate`` replaces them with values fitted on the machine at hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ._util import choice_error

KB = 1024
MB = 1024 * 1024


@dataclass(frozen=True)
class Efficiency:
    """Model constants that turn peak hardware figures into what kernels actually reach.

    compute:  fraction of FP32 FMA peak reached by convolution / GEMM inner loops.
    matrix:   fraction of the dense tensor-core (or CPU bf16 dot-product) peak reached by FP16/BF16 GEMMs.
    simple:   fraction of one-operation-per-unit-per-cycle reached by element-wise and pooling kernels.
    index:    the same for index-driven gather copies (index_select-style kernels).
    scatter:  the same for index-driven scatter writes (index_copy / index_add-style kernels).
    memory:   fraction of the DRAM bandwidth reached by streaming reads/writes.
    onchip:   on-chip global memory (L2 / LLC) bandwidth as a multiple of DRAM bandwidth.
    segment_bytes: extra byte-equivalents paid per scattered contiguous segment (latency of a random access
              that no prefetcher hides); short segments at small granularity pay it most often.
    launch_us: fixed cost of issuing one kernel (CUDA launch, or PyTorch eager dispatch on the CPU).
    sync_us:  host round trip when a kernel's output size depends on data (nonzero-style index lists).
    overlap:  0 = compute and data movement add up (the paper's simulator), 1 = they fully overlap.
    row_block: output positions along a row that a PE's GEMM inner loop works on at once (CPU
              micro-kernels block over the output width); tiles narrower than this leave lanes idle.
              1 on GPUs, whose implicit GEMM spans images, rows and columns alike.
    blas:     fraction of FP32 FMA peak reached by GEMMs that go through a BLAS call (``Kernel.blas``: the
              CPU's MKL sgemm behind ``at::mm``, which the library's channel-gated conv calls per
              sample); 0 = the same as ``compute``.  On the CPU it is measurably below oneDNN's and the
              brgemm micro-kernel's rate (csrc/cpu/row_gemm.h: 33.1 vs 24.0 ms on one shape).
    output_ops: per-output-element work of a GEMM kernel besides its multiply-adds (epilogue, stores,
              loop overhead), in MAC equivalents; it dominates convolutions with few input channels.
    """

    compute: float = 0.7
    matrix: float = 0.7
    simple: float = 0.5
    index: float = 0.25
    scatter: float = 0.25
    memory: float = 1.0
    onchip: float = 4.0
    segment_bytes: float = 0.0
    launch_us: float = 8.0
    sync_us: float = 10.0
    overlap: float = 0.5
    row_block: float = 1.0
    output_ops: float = 0.0
    blas: float = 0.0

    def replace(self, **changes: float) -> "Efficiency":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Device:
    """Hardware properties of one device (see the module docstring for the PE / memory model)."""

    name: str
    description: str
    kind: str  # "gpu" or "cpu"
    num_pe: int  # SMs or cores
    fp32_per_pe: int  # FP32 FMA lanes per PE
    clock_mhz: float
    dram_gbs: float  # off-chip bandwidth, GB/s (1e9 bytes / s)
    onchip_bytes: int  # on-chip global memory: GPU L2, CPU last-level cache
    pe_mem_bytes: int  # memory inside a PE: GPU shared memory per SM, CPU L2 per core
    txn_bytes: int = 32  # smallest memory transaction: 32-byte GPU sector, 64-byte CPU cache line
    #: cycles between dependent floating-point adds (x86 FP add latency: 3-4): a serial reduction's pace
    chain_cycles: float = 3.0
    #: Dense matrix-unit rates in TFLOP/s per dtype (tensor cores; CPU bf16 dot-product instructions).
    matrix_tflops: Mapping[str, float] = field(default_factory=dict)
    #: Non-matrix throughput of a dtype relative to FP32 (packed half2 math on GPUs).
    simd_factor: Mapping[str, float] = field(default_factory=lambda: {"fp32": 1.0, "fp16": 2.0, "bf16": 1.0})
    default_batch: int = 128
    efficiency: Efficiency = field(default_factory=Efficiency)
    sources: tuple[str, ...] = ()
    calibrated: bool = False

    @property
    def fp32_peak_flops(self) -> float:
        """FP32 FLOP/s with every FMA lane busy (an FMA counts as two FLOPs)."""
        return self.num_pe * self.fp32_per_pe * 2.0 * self.clock_mhz * 1e6

    @property
    def max_tile_outputs(self) -> int:
        """Largest output tile a PE can hold: fp32 accumulators in half of the PE memory (GPU register
        file is at least as large as shared memory), never below one FMA lane's worth of work."""
        return max(self.fp32_per_pe, self.pe_mem_bytes // 8)

    def replace(self, **changes: Any) -> "Device":
        return dataclasses.replace(self, **changes)

    def __hash__(self) -> int:  # the mapping fields are dicts; hash their items so prices can be cached
        return hash((self.name, self.kind, self.num_pe, self.fp32_per_pe, self.clock_mhz, self.dram_gbs,
                     self.onchip_bytes, self.pe_mem_bytes, self.txn_bytes, self.chain_cycles,
                     tuple(sorted(self.matrix_tflops.items())), tuple(sorted(self.simd_factor.items())),
                     self.efficiency))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["matrix_tflops"] = dict(self.matrix_tflops)
        data["simd_factor"] = dict(self.simd_factor)
        data["sources"] = list(self.sources)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Device":
        """Build a device from a mapping (user JSON/YAML); ``efficiency`` may be a partial mapping."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown device field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        missing = [k for k in ("name", "num_pe", "fp32_per_pe", "clock_mhz", "dram_gbs") if k not in data]
        if missing:
            raise ValueError(f"device {data.get('name', '?')!r} lacks required field(s) {missing}")
        eff = data.pop("efficiency", None) or {}
        if isinstance(eff, Efficiency):
            efficiency = eff
        else:
            eff_fields = {f.name for f in dataclasses.fields(Efficiency)}
            bad = sorted(set(eff) - eff_fields)
            if bad:
                raise ValueError(f"unknown efficiency field(s) {bad}; known: {', '.join(sorted(eff_fields))}")
            efficiency = Efficiency(**{k: float(v) for k, v in eff.items()})
        data.setdefault("description", data["name"])
        data.setdefault("kind", "gpu")
        if data["kind"] not in ("gpu", "cpu"):
            raise choice_error("device kind", data["kind"], ["gpu", "cpu"])
        data.setdefault("onchip_bytes", 4 * MB)
        data.setdefault("pe_mem_bytes", 64 * KB)
        data["sources"] = tuple(data.get("sources", ()))
        return cls(efficiency=efficiency, **data)


# ---------------------------------------------------------------------------------------------------------
# Built-in devices.
#
# The paper's five devices use the paper's Table IV figures (PEs, FP32 units per PE, clock, bandwidth and
# the test batch size) exactly as printed, even where the datasheet differs (V100 700 GB/s vs 900 GB/s
# datasheet; RTX 3090 1250 MHz vs 1695 MHz boost): the table is the authors' effective figure, so
# ``memory`` efficiency is 1.0 for them.  Cache sizes and tensor-core rates, which the table lacks, come
# from the vendors' whitepapers; tensor rates are dense (datasheets often print the 2:4-sparse rate, twice
# the dense one) and, for the paper's devices, derived from per-SM rates at the table's clock.
# Launch cost 8 us is the paper simulator's constant; for the modern GPUs 4 us is an assumption (typical
# CUDA launch + framework dispatch), not a datasheet figure.  ``calibrate`` on the device refines both.
# ---------------------------------------------------------------------------------------------------------

# Uncalibrated GPUs add compute and data-movement time (overlap 0), the paper simulator's "add" mode:
# a conservative bound that calibration on the device replaces with a fitted overlap.
_PAPER_EFF = Efficiency(compute=0.7, matrix=0.7, simple=0.5, index=0.25, memory=1.0, onchip=4.0,
                        segment_bytes=0.0, launch_us=8.0, sync_us=10.0, overlap=0.0)
# Modern datasheet GPUs: ~90% of datasheet DRAM bandwidth is what copies reach (measured on H100/H200:
# ~3.0 of 3.35 TB/s and ~4.3 of 4.8 TB/s); ~80% of dense bf16 tensor peak in large GEMMs (770-800 of 989).
_MODERN_EFF = Efficiency(compute=0.7, matrix=0.75, simple=0.5, index=0.25, memory=0.9, onchip=3.0,
                         segment_bytes=0.0, launch_us=4.0, sync_us=10.0, overlap=0.0)


def _gpu(name: str, description: str, num_pe: int, fp32_per_pe: int, clock_mhz: float, dram_gbs: float,
         l2: int, smem: int, matrix_flop_per_clk_pe: float, bf16: bool, batch: int, eff: Efficiency,
         sources: Iterable[str], matrix_tflops: Mapping[str, float] | None = None,
         fp16_simd: float = 2.0) -> Device:
    if matrix_tflops is None:
        rate = num_pe * clock_mhz * 1e6 * matrix_flop_per_clk_pe / 1e12 if matrix_flop_per_clk_pe else 0.0
        matrix_tflops = {"fp16": rate, "bf16": rate if bf16 else 0.0} if rate else {}
    return Device(name=name, description=description, kind="gpu", num_pe=num_pe, fp32_per_pe=fp32_per_pe,
                  clock_mhz=clock_mhz, dram_gbs=dram_gbs, onchip_bytes=l2, pe_mem_bytes=smem, txn_bytes=32,
                  matrix_tflops=dict(matrix_tflops),
                  simd_factor={"fp32": 1.0, "fp16": fp16_simd, "bf16": fp16_simd if bf16 else 1.0},
                  default_batch=batch, efficiency=eff, sources=tuple(sources))


def _builtin_gpus() -> dict[str, Device]:
    devices = [
        # Tesla V100: paper Table IV (80 SMs, 64 FP32/SM, 1500 MHz, 700 GB/s). L2 6 MB, 96 KB shared
        # memory per SM, 8 tensor cores x 64 FP16 FMA/clk per SM = 1024 FLOP/clk/SM: NVIDIA Tesla V100
        # GPU Architecture whitepaper (2017). No BF16.
        _gpu("v100", "NVIDIA Tesla V100 (paper Table IV)", 80, 64, 1500, 700, 6 * MB, 96 * KB, 1024, False,
             128, _PAPER_EFF, ["paper Table IV", "NVIDIA Tesla V100 architecture whitepaper"]),
        # RTX 3090: paper Table IV (82 SMs, 128 FP32/SM, 1250 MHz, 936 GB/s). L2 6 MB, 100 KB shared
        # memory per SM, dense FP16/BF16 tensor rate with FP32 accumulate 512 FLOP/clk/SM (GeForce parts
        # run FP32-accumulate at half the FP16-accumulate rate): NVIDIA Ampere GA102 whitepaper.
        _gpu("rtx3090", "NVIDIA GeForce RTX 3090 (paper Table IV)", 82, 128, 1250, 936, 6 * MB, 100 * KB, 512,
             True, 128, _PAPER_EFF, ["paper Table IV", "NVIDIA Ampere GA102 GPU architecture whitepaper"]),
        # RTX 3060: paper Table IV (28 SMs, 128 FP32/SM, 1777 MHz, 360 GB/s). GA106: L2 3 MB, 100 KB
        # shared memory per SM, same SM as GA102 (512 FLOP/clk/SM dense FP32-accumulate tensor rate).
        _gpu("rtx3060", "NVIDIA GeForce RTX 3060 (paper Table IV)", 28, 128, 1777, 360, 3 * MB, 100 * KB, 512,
             True, 128, _PAPER_EFF, ["paper Table IV", "NVIDIA Ampere GA102 GPU architecture whitepaper"]),
        # Jetson TX2: paper Table IV (2 SMs, 128 FP32/SM, 1300 MHz, 59.7 GB/s). Pascal GP10B: 512 KB L2,
        # 64 KB shared memory per SM, no tensor cores, FP16 at twice the FP32 rate (half2): NVIDIA Jetson
        # TX2 module data sheet.
        _gpu("tx2", "NVIDIA Jetson TX2 (paper Table IV)", 2, 128, 1300, 59.7, 512 * KB, 64 * KB, 0, False,
             1, _PAPER_EFF, ["paper Table IV", "NVIDIA Jetson TX2 module data sheet"]),
        # Jetson Nano: paper Table IV (1 SM, 128 FP32/SM, 921 MHz, 25.6 GB/s). Maxwell GM20B: 256 KB L2,
        # 64 KB shared memory per SM, no tensor cores, FP16 at twice FP32: NVIDIA Jetson Nano data sheet.
        _gpu("nano", "NVIDIA Jetson Nano (paper Table IV)", 1, 128, 921, 25.6, 256 * KB, 64 * KB, 0, False,
             1, _PAPER_EFF, ["paper Table IV", "NVIDIA Jetson Nano module data sheet"]),
        # A100 SXM4 80 GB: 108 SMs, 64 FP32/SM, 1410 MHz boost, 2039 GB/s, 40 MB L2, 164 KB shared
        # memory per SM; dense FP16/BF16 tensor 312 TFLOP/s (624 with 2:4 sparsity): NVIDIA A100 Tensor
        # Core GPU datasheet and Ampere GA100 architecture whitepaper.
        _gpu("a100", "NVIDIA A100 SXM4 80GB (datasheet)", 108, 64, 1410, 2039, 40 * MB, 164 * KB, 0, True,
             128, _MODERN_EFF, ["NVIDIA A100 datasheet", "NVIDIA Ampere GA100 architecture whitepaper"],
             matrix_tflops={"fp16": 312.0, "bf16": 312.0}),
        # H100 SXM5 80 GB: 132 SMs, 128 FP32/SM, 1980 MHz boost (67 TFLOP/s FP32), 3350 GB/s HBM3, 50 MB
        # L2, 228 KB shared memory per SM; dense FP16/BF16 tensor 989 TFLOP/s (datasheet prints 1979 with
        # sparsity): NVIDIA H100 Tensor Core GPU datasheet and Hopper architecture whitepaper.
        _gpu("h100", "NVIDIA H100 SXM5 80GB (datasheet)", 132, 128, 1980, 3350, 50 * MB, 228 * KB, 0, True,
             128, _MODERN_EFF, ["NVIDIA H100 datasheet", "NVIDIA Hopper architecture whitepaper"],
             matrix_tflops={"fp16": 989.0, "bf16": 989.0}),
        # H200 SXM 141 GB: the H100 SXM compute die (132 SMs, 128 FP32/SM, 1980 MHz, 50 MB L2, 228 KB
        # shared memory, 989 TFLOP/s dense FP16/BF16) with 4800 GB/s HBM3e: NVIDIA H200 Tensor Core GPU
        # datasheet.
        _gpu("h200", "NVIDIA H200 SXM 141GB (datasheet)", 132, 128, 1980, 4800, 50 * MB, 228 * KB, 0, True,
             128, _MODERN_EFF, ["NVIDIA H200 datasheet", "NVIDIA Hopper architecture whitepaper"],
             matrix_tflops={"fp16": 989.0, "bf16": 989.0}),
    ]
    return {d.name: d for d in devices}


_BUILTIN: dict[str, Device] = _builtin_gpus()
_USER: dict[str, Device] = {}
_ALIASES = {"3090": "rtx3090", "3060": "rtx3060", "jetson-tx2": "tx2", "jetson_tx2": "tx2",
            "jetson-nano": "nano", "jetson_nano": "nano", "cpu": "host", "tesla-v100": "v100"}
#: The device names whose figures come from the paper's Table IV.
PAPER_DEVICES = ("v100", "rtx3090", "rtx3060", "tx2", "nano")


def _lazy_host() -> Device:
    from .host import detect_host  # reading /proc and sysfs is deferred until someone asks for "host"

    return detect_host()


_LAZY: dict[str, Callable[[], Device]] = {"host": _lazy_host}


def known_devices() -> list[str]:
    """Names accepted by :func:`get_device`: built-in, ``host`` and registered user devices."""
    return sorted(set(_BUILTIN) | set(_LAZY) | set(_USER))


def register_device(device: Device) -> Device:
    """Make a user-defined device available by name (overrides a built-in of the same name)."""
    if not isinstance(device, Device):
        raise TypeError(f"register_device expects a Device, got {type(device).__name__}")
    _USER[device.name.lower()] = device
    return device


def load_devices(path: str | os.PathLike[str]) -> list[Device]:
    """Read user devices from a JSON or YAML file and register them.

    The file holds one device mapping, a list of them, or ``{"devices": [...]}``; fields are those of
    :class:`Device` (``name``, ``num_pe``, ``fp32_per_pe``, ``clock_mhz``, ``dram_gbs`` required), with an
    optional partial ``efficiency`` mapping.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional dependency
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("reading YAML device files needs PyYAML: pip install pyyaml") from exc
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, Mapping) and "devices" in data:
        data = data["devices"]
    entries = [data] if isinstance(data, Mapping) else list(data)
    return [register_device(Device.from_dict(entry)) for entry in entries]


def calibration_dir() -> Path:
    """Where ``calibrate`` saves and predictions look for calibration files
    (``$LAUDNET_PREDICTOR_CALIBRATION_DIR`` or ``~/.cache/laudnet_ops/predictor``)."""
    env = os.environ.get("LAUDNET_PREDICTOR_CALIBRATION_DIR")
    return Path(env) if env else Path.home() / ".cache" / "laudnet_ops" / "predictor"


def default_calibration_path(name: str) -> Path:
    return calibration_dir() / f"calibration-{name}.json"


def get_device(device: str | Device, calibration: str | os.PathLike[str] | bool | None = None) -> Device:
    """Look a device up by name (case-insensitive).

    ``calibration``: a calibration file to apply; ``None`` applies the default calibration file of that
    device if one exists (see :func:`calibration_dir`); ``False`` uses the uncalibrated constants.
    Raises ``ValueError`` listing the known devices for an unknown name.
    """
    if isinstance(device, Device):
        base = device
    else:
        key = str(device).strip().lower()
        key = _ALIASES.get(key, key)
        if key in _USER:
            base = _USER[key]
        elif key in _BUILTIN:
            base = _BUILTIN[key]
        elif key in _LAZY:
            base = _LAZY[key]()
        else:
            raise choice_error("device", device, known_devices())
    if calibration is False:
        return base
    from .calibrate import apply_calibration, load_calibration  # local: calibrate imports this module

    if calibration is None or calibration is True:
        path = default_calibration_path(base.name)
        if not path.exists():
            return base
        calibration = path
    return apply_calibration(base, load_calibration(calibration))
