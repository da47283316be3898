"""Argument checks of the fake kernels, mirroring csrc/checks.h.

Fake kernels run under torch.compile and torch.export, where the C++ checks do
not; they must reject the same calls with the same words.
"""

import torch

ACTIVATIONS = ("relu", "none")


def check(cond, op: str, message: str) -> None:
    torch._check(cond, lambda: f"{op}: {message}")


def check_dim(t: torch.Tensor, dim: int, op: str, arg: str) -> None:
    check(t.dim() == dim, op, f"{arg} must be a {dim}-D tensor, got {t.dim()}-D tensor of shape {tuple(t.shape)}")


def check_floating(t: torch.Tensor, op: str, arg: str) -> None:
    check(t.dtype.is_floating_point, op, f"{arg} must be a floating-point tensor, got {t.dtype}")


def check_same(a, b, what: str, op: str, arg_a: str, arg_b: str) -> None:
    va, vb = getattr(a, what), getattr(b, what)
    check(va == vb, op, f"{arg_a} and {arg_b} must have the same {what}, got {va} and {vb}")


def check_indices_shape(indices: torch.Tensor, op: str) -> None:
    check(indices.dtype == torch.int32, op, f"indices must be int32 (as patch_indices returns), got {indices.dtype}")
    check(indices.dim() == 2 and indices.shape[1] == 3, op, f"indices must have shape (P, 3), got {tuple(indices.shape)}")


def check_activation(activation: str, op: str) -> None:
    check(activation in ACTIVATIONS, op, f'activation must be "relu" or "none", got "{activation}"')


def feature_layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels compute a feature map in (see csrc/checks.h)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
