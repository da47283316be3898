"""Measuring latency on a shared, noisy machine: repeated medians with warm-up and synchronisation."""

from __future__ import annotations

import statistics
import time
from typing import Callable

CLOCKS = ("auto", "wall", "thread")
STATISTICS = ("median", "min")


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
