"""Loading of the compiled extension, laudnet_ops._C.

Importing laudnet_ops never fails because of the extension: the pure-Python
parts (the reference ops, the latency predictor) work without it. The error
is raised, with the fix, when an op is first used.
"""

import os
import warnings
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


# ---------------------------------------------------------------- tensor-core switch
# The tensor-core (CUTLASS/CuTe) CUDA kernels are compiled when the build finds CUDA and the CUTLASS
# headers. Validated against the reference on an H200 (benchmarks/results/gpu-*.md), they are on by
# default where built; LAUDNET_OPS_TENSOR_CORES=0 at import (or set_tensor_cores(False)) keeps every call
# on the SIMT kernels.
_TENSOR_CORES_ENV = "LAUDNET_OPS_TENSOR_CORES"


def _compiled_module():
    from . import _C

    return _C


def tensor_cores_built() -> bool:
    """Whether the extension carries the tensor-core CUDA kernels (False without the extension)."""
    if extension_error is not None:
        return False
    return bool(_compiled_module().tensor_cores_built())


def tensor_cores_enabled() -> bool:
    """Whether eligible CUDA calls (float16/bfloat16, channels_last, channels % 8 == 0) use tensor cores."""
    if extension_error is not None:
        return False
    return bool(_compiled_module().tensor_cores_enabled())


def set_tensor_cores(enabled: bool) -> None:
    """Switch the tensor-core kernels on or off for this process (default: on when the build has them,
    unless the environment variable LAUDNET_OPS_TENSOR_CORES=0 was set at import).

    Raises ImportError without the compiled extension, and RuntimeError when turning them on in a
    build without them (a CPU-only build, or a CUDA build made without the CUTLASS headers)."""
    require_extension()
    _compiled_module().set_tensor_cores(bool(enabled))


def _apply_tensor_core_env() -> None:
    value = os.environ.get(_TENSOR_CORES_ENV, "").strip().lower()
    if extension_error is not None or value == "" or value in ("1", "true", "yes", "on") and tensor_cores_built():
        return  # the default stands (or the op's first use raises the extension error with its fix)
    if value in ("0", "false", "no", "off"):
        set_tensor_cores(False)
    elif value in ("1", "true", "yes", "on"):
        warnings.warn(
            f"laudnet_ops: {_TENSOR_CORES_ENV}=1 but this build has no tensor-core kernels (it needs CUDA and the "
            "CUTLASS headers at build time: pip install --no-deps nvidia-cutlass, then rebuild); using SIMT kernels"
        )
    else:
        warnings.warn(f"laudnet_ops: {_TENSOR_CORES_ENV} must be 1 or 0, got {value!r}; using the default "
                      f"(tensor cores {'on' if tensor_cores_built() else 'not built'})")


_apply_tensor_core_env()


# ---------------------------------------------------------------- experimental kernels
# CUDA paths that compile and pass every CPU-side test (the tensor-core index math runs in CPU
# emulations, the ATen composites on CPU tensors) but have not yet run on a GPU. Off by default: the
# GPU-validated path serves those calls until a GPU run validates them (benchmarks/gpu_check.sh runs
# the CUDA tests with them on). docs/ops.md lists them.
_EXPERIMENTAL_ENV = "LAUDNET_OPS_EXPERIMENTAL"


def experimental_kernels_enabled() -> bool:
    """Whether CUDA calls take the paths that have not yet run on a GPU (False without the extension)."""
    if extension_error is not None:
        return False
    return bool(_compiled_module().experimental_kernels_enabled())


def set_experimental_kernels(enabled: bool) -> None:
    """Let CUDA calls take the paths not yet validated on a GPU (see docs/ops.md, "Experimental CUDA
    paths"), or stop them (the default, unless LAUDNET_OPS_EXPERIMENTAL=1 was set at import).

    Raises ImportError without the compiled extension."""
    require_extension()
    _compiled_module().set_experimental_kernels(bool(enabled))


def _apply_off_by_default_env(name: str, setter, what: str) -> None:
    """Turn on an off-by-default switch from the environment variable ``name`` at import."""
    value = os.environ.get(name, "").strip().lower()
    if extension_error is not None or value in ("", "0", "false", "no", "off"):
        return
    if value in ("1", "true", "yes", "on"):
        setter(True)
    else:
        warnings.warn(f"laudnet_ops: {name} must be 1 or 0, got {value!r}; {what} stay off")


_apply_off_by_default_env(_EXPERIMENTAL_ENV, set_experimental_kernels, "experimental kernels")


# ---------------------------------------------------------------- cuDNN composites
# Every CUDA call of gather_conv2d, masker_conv1x1, conv1x1_scatter_add(_) and channel_gated_conv2d
# through its cuDNN composite (gathered data, dense cuDNN convolution, scatter), the calls the
# tensor-core kernels take included: which of the two is faster is a measurement per GPU and shape
# (benchmarks/gpu_check.sh times both). Experimental like the composites: off by default.
_COMPOSITES_ENV = "LAUDNET_OPS_CUDNN_COMPOSITES"


def cudnn_composites_enabled() -> bool:
    """Whether every CUDA convolution op call runs through its cuDNN composite (False without the extension)."""
    if extension_error is not None:
        return False
    return bool(_compiled_module().cudnn_composites_enabled())


def set_cudnn_composites(enabled: bool) -> None:
    """Send every CUDA call of the convolution ops through its cuDNN composite (see docs/ops.md,
    "Experimental CUDA paths"), or only the calls no kernel of the library takes (the default, unless
    LAUDNET_OPS_CUDNN_COMPOSITES=1 was set at import). CPU calls are unaffected.

    Raises ImportError without the compiled extension."""
    require_extension()
    _compiled_module().set_cudnn_composites(bool(enabled))


_apply_off_by_default_env(_COMPOSITES_ENV, set_cudnn_composites, "cuDNN composites")


def _tensor_core_calls() -> int:
    """How many op calls ran on tensor cores in this process (for tests and benchmarks)."""
    if extension_error is not None:
        return 0
    return int(_compiled_module().tensor_core_calls())
