"""Measuring latency on a shared, noisy machine: repeated medians with warm-up and synchronisation."""

from __future__ import annotations

import statistics
import time
from typing import Callable

CLOCKS = ("auto", "wall", "thread")
STATISTICS = ("median", "min")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's cap on 64-bit


def steady_allocator() -> bool:
    """Keep freed CPU memory in the process (glibc), so that what is measured is an op's steady-state
    latency rather than the allocator's history.

    PyTorch's CPU tensors come from malloc.  glibc serves large blocks with mmap and returns them to the
    kernel on free (its threshold moves with the process's allocation history), so an eager op may or may
    not page-fault and zero its output afresh on every call: measured up to +60% on a 5 ms block here,
    depending only on what ran before it in the same process.  Raising the mmap and trim thresholds keeps
    freed blocks for reuse, as a long-running inference process (or the CUDA caching allocator) does.
    Process-wide and permanent; returns False where it cannot be set (not glibc)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def resolve_clock(clock: str, device: str) -> str:
    """``auto``: the calling thread's CPU time when torch computes on one CPU thread (it then runs every op
    in this thread, so CPU time is the op's latency with the time other processes held the core left
    out); wall-clock time otherwise (several threads, or a GPU)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock != "auto":
        return clock
    if device.startswith("cuda"):
        return "wall"
    import torch

    return "thread" if torch.get_num_threads() == 1 else "wall"


def measure(fn: Callable[[], object], device: str = "cpu", repeats: int = 7, min_sample_s: float = 0.002,
            warmup: int = 2, statistic: str = "median", clock: str = "auto") -> float:
    """Seconds per call of ``fn``: the ``statistic`` ("median" or "min") over ``repeats`` samples.

    Each sample runs ``fn`` enough times to last ``min_sample_s`` (so microsecond ops are not drowned by
    timer resolution).  The median ignores occasional bursts of other processes; "min" suits a machine
    that is persistently shared, because interference only ever adds time.  ``clock`` is "wall",
    "thread" (CPU time of this thread, for single-threaded CPU runs) or "auto" (see
    :func:`resolve_clock`).  Callers take the median of several such measurements.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    timer = time.thread_time if resolve_clock(clock, device) == "thread" else time.perf_counter
    for _ in range(warmup):
        fn()
    _sync(device)
    start = timer()
    fn()
    _sync(device)
    once = max(timer() - start, 1e-7)
    number = max(1, int(min_sample_s / once))
    samples = []
    for _ in range(repeats):
        start = timer()
        for _ in range(number):
            fn()
        _sync(device)
        samples.append((timer() - start) / number)
    return statistics.median(samples) if statistic == "median" else min(samples)
