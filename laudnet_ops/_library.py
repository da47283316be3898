"""Loading of the compiled extension, laudnet_ops._C.

Importing laudnet_ops never fails because of the extension: the pure-Python
parts (the reference ops, the latency predictor) work without it. The error
is raised, with the fix, when an op is first used.
"""

from typing import Optional

import torch

_REBUILD = (
    "Rebuild it against the installed torch from the source tree with\n"
    "    pip install --no-build-isolation --no-deps --force-reinstall .\n"
    "(or `pip install --no-build-isolation -e .` for a development checkout)."
)


def _load() -> Optional[ImportError]:
    try:
        from . import _C  # noqa: F401  (importing it registers the ops)
    except ImportError as exc:
        return ImportError(
            f"laudnet_ops: the compiled extension laudnet_ops._C could not be loaded: {exc}\n"
            f"It must be built for this torch ({torch.__version__}, CUDA {torch.version.cuda}). " + _REBUILD
        )
    if not hasattr(torch.ops.laudnet_ops, "patch_indices"):
        return ImportError(
            "laudnet_ops: laudnet_ops._C loaded but registered no ops; it was built from other sources. "
            + _REBUILD
        )
    return None


extension_error: Optional[ImportError] = _load()


def require_extension() -> None:
    """Raise the ImportError that explains how to rebuild, if the extension is missing."""
    if extension_error is not None:
        raise ImportError(str(extension_error))


def cuda_kernels_built() -> bool:
    """Whether the compiled extension carries CUDA kernels (it may, without a visible GPU)."""
    if extension_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("laudnet_ops::patch_indices", "CUDA")
