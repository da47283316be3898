"""Choice of execution path for every dynamic block of a model."""

from typing import Optional

from torch import nn

from .blocks import EXECUTIONS, DynamicBlock, missing_sparse_ops

__all__ = ["set_execution"]


def set_execution(model: nn.Module, execution: Optional[str]) -> nn.Module:
    """Run every dynamic block of ``model`` on the ``"sparse"`` or ``"masked"`` path.

    None restores the default: masked in training, sparse in eval (masked where the sparse path's
    compiled ops are not built). Both paths use the same weights and, in eval with hard masks, give
    the same output. Returns ``model``.

    Raises NotImplementedError for ``"sparse"`` if a block's mode needs ops this build lacks.
    """
    if execution is not None and execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS} or None, got {execution!r}")
    blocks = [m for m in model.modules() if isinstance(m, DynamicBlock)]
    if execution == "sparse":
        for mode in sorted({b.mode for b in blocks}):
            missing = missing_sparse_ops(mode)
            if missing:
                raise NotImplementedError(
                    f"set_execution: the sparse {mode} path needs the ops {missing}, which this build of "
                    "laudnet_ops lacks; use the masked path"
                )
    for block in blocks:
        block.execution = execution
    return model
