"""The ``host`` device: the CPU this code runs on, described from /proc/cpuinfo, sysfs and torch.

Cores, SIMD width, clock and cache sizes are detected.  DRAM bandwidth cannot be read from the system, so
the uncalibrated host carries an estimate (``_BW_PER_CORE_GBS`` per core) that ``calibrate`` replaces with a
measured figure.  A CPU core is one PE; its FP32 FMA lanes are SIMD width x two FMA pipes (AVX-512 parts
that split 512-bit operations in two still count 16 lanes: the calibrated compute efficiency absorbs it).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .devices import KB, MB, Device, Efficiency

#: Estimated per-core streaming bandwidth (GB/s) used until the host is calibrated.
_BW_PER_CORE_GBS = 10.0
#: PyTorch eager CPU ops spend a few microseconds in dispatch before any work; calibrate measures it.
_HOST_EFF = Efficiency(compute=0.5, matrix=0.5, simple=0.2, index=0.05, scatter=0.05, memory=1.0, onchip=2.0,
                       segment_bytes=64.0, launch_us=5.0, sync_us=0.0, overlap=0.5, row_block=4.0,
                       output_ops=8.0)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info.setdefault(key.strip(), value.strip())
    return info


def _cache_bytes(level: int) -> int | None:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    if not base.exists():
        return None
    for index in sorted(base.glob("index*")):
        try:
            if int((index / "level").read_text()) != level:
                continue
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        mult = {"K": KB, "M": MB, "G": 1024 * MB}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            return int(digits) * mult
    return None


def _clock_mhz(info: dict[str, str]) -> float:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000.0
    except (OSError, ValueError):
        pass
    try:
        return float(info.get("cpu MHz", ""))
    except ValueError:
        return 2000.0  # unknown clock: a middle-of-the-road guess, refined by calibration


def _cores() -> int:
    try:
        import torch  # the thread count torch uses is what our measurements will use

        return max(1, int(torch.get_num_threads()))
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def detect_host() -> Device:
    """Describe the CPU this process runs on as a :class:`Device` named ``host``."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    if "avx512f" in flags:
        lanes = 16
    elif "avx2" in flags or "avx" in flags:
        lanes = 8
    else:
        lanes = 4  # SSE / NEON width
    fma_pipes = 2
    cores = _cores()
    clock = _clock_mhz(info)
    peak_fp32_tflops = cores * lanes * fma_pipes * 2 * clock * 1e6 / 1e12
    # bf16 dot-product instructions (AVX512_BF16 / AMX) double the FP32 rate; fp16 has no fast path on
    # most x86 parts, so it runs at FP32 speed with half the bytes.
    matrix = {}
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        matrix["bf16"] = 2 * peak_fp32_tflops
    if "avx512_fp16" in flags or "amx_fp16" in flags:
        matrix["fp16"] = 2 * peak_fp32_tflops
    l2 = _cache_bytes(2) or 1 * MB
    l3 = _cache_bytes(3) or 8 * MB
    model = info.get("model name", platform.processor() or "unknown CPU")
    return Device(
        name="host", description=f"{model} ({cores} threads used by torch)", kind="cpu", num_pe=cores,
        fp32_per_pe=lanes * fma_pipes, clock_mhz=clock, dram_gbs=_BW_PER_CORE_GBS * cores,
        onchip_bytes=l3, pe_mem_bytes=l2, txn_bytes=64, matrix_tflops=matrix,
        simd_factor={"fp32": 1.0, "fp16": 1.0, "bf16": 1.0}, default_batch=1, efficiency=_HOST_EFF,
        sources=("detected from /proc/cpuinfo and sysfs", f"bandwidth estimated at {_BW_PER_CORE_GBS} GB/s "
                 "per core until calibrated"),
    )
