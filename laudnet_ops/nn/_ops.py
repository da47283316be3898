"""Access to the compiled ops from the modules, which must import without them.

Modules import cleanly without the extension (their masked path is plain PyTorch); the sparse path
asks for an op here and gets the extension's ImportError, or a clear error naming a missing op.
"""

import torch

from .._library import extension_error, require_extension


def has_op(name: str) -> bool:
    return extension_error is None and hasattr(torch.ops.laudnet_ops, name)


def op(name: str):
    """The public wrapper of op ``name`` from ``laudnet_ops.ops``."""
    require_extension()
    from .. import ops

    fn = getattr(ops, name, None)
    if fn is None:
        raise NotImplementedError(
            f"laudnet_ops.{name} is not available in this build: the sparse path that needs it cannot run; "
            'use laudnet_ops.nn.set_execution(model, "masked")'
        )
    return fn
