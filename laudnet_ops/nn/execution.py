"""Choice of execution path for every dynamic block of a model."""

from typing import Optional

from torch import nn

from .blocks import EXECUTIONS, DynamicBlock

__all__ = ["set_execution"]


def set_execution(model: nn.Module, execution: Optional[str]) -> nn.Module:
    """Run every dynamic block of ``model`` on the ``"sparse"`` or ``"masked"`` path.

    None restores the default: masked in training, sparse in eval. Both paths use the same weights
    and, in eval with hard masks, give the same output. Returns ``model``.
    """
    if execution is not None and execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS} or None, got {execution!r}")
    for module in model.modules():
        if isinstance(module, DynamicBlock):
            module.execution = execution
    return model
