"""Small helpers shared by the predictor modules: argument errors, dtypes, progress bars."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

#: Bytes per element of the precisions the model knows.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
}


def choice_error(argument: str, value: object, choices: Iterable[object]) -> ValueError:
    """A ValueError naming the argument, the bad value and the known choices."""
    known = ", ".join(str(c) for c in choices)
    return ValueError(f"unknown {argument} {value!r}; known {argument}s: {known}")


def normalize_dtype(dtype: object) -> str:
    """Map 'float16', torch.float16, 'half', ... to one of 'fp32', 'fp16', 'bf16'."""
    key = str(dtype).lower()
    if key not in _DTYPE_ALIASES:
        raise choice_error("dtype", dtype, sorted(DTYPE_BYTES))
    return _DTYPE_ALIASES[key]


def check_rate(rate: float, argument: str = "rate") -> float:
    """Activation rates live in [0, 1]; anything else is a caller error."""
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{argument} must lie in [0, 1], got {rate!r}")
    return rate


def per_stage(value: object, stages: int, argument: str) -> tuple[int, ...]:
    """Expand one granularity (int) or a per-stage sequence / '4-4-2-1' string to one int per stage."""
    if isinstance(value, str):
        parts = [p for p in value.replace(",", "-").replace(" ", "-").split("-") if p]
        if len(parts) == 1 and len(parts[0]) == stages and stages > 1 and parts[0].isdigit():
            parts = list(parts[0])  # the paper's "2222" notation
        value = [int(p) for p in parts]
    if isinstance(value, int):
        values: Sequence[int] = [value] * stages
    else:
        values = [int(v) for v in value]  # type: ignore[union-attr]
        if len(values) == 1:
            values = values * stages
    if len(values) != stages:
        raise ValueError(f"{argument} needs one value or {stages} (one per stage), got {list(values)!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"{argument} values must be >= 1, got {list(values)!r}")
    return tuple(values)


def progress(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """tqdm progress bar when tqdm is installed and enabled; a plain iterator otherwise."""
    if enabled:
        try:
            from tqdm import tqdm  # optional dependency
        except ImportError:
            pass
        else:
            yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False)
            return
    yield from items
