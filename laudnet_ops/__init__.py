"""laudnet_ops: latency-aware dynamic networks with kernels that skip real work.

The ops live in ``torch.ops.laudnet_ops``; this package gives them typed
wrappers, fake kernels (for ``torch.compile``) and autograd formulas.
``laudnet_ops.reference`` defines every op in plain PyTorch.
"""

from . import reference
from . import unfused  # plain PyTorch: usable without the compiled extension
from ._library import cuda_kernels_built, extension_error, require_extension
from ._library import set_tensor_cores, tensor_cores_built, tensor_cores_enabled
from ._library import experimental_kernels_enabled, set_experimental_kernels
from ._library import cudnn_composites_enabled, set_cudnn_composites

__version__ = "0.1.0"

_OPS = ("patch_indices", "scatter_add", "scatter_add_")
_OPS += ("channel_gated_conv2d", "channel_gated_conv2d_add_")
_OPS += ("sample_gather", "sample_scatter_add", "sample_scatter_add_", "sample_scatter_add_pool_")
_OPS += ("gather_conv2d", "masker_conv1x1", "masked_conv1x1", "conv1x1_scatter_add", "conv1x1_scatter_add_")

if extension_error is None:
    from .ops import patch_indices, scatter_add, scatter_add_  # noqa: F401
    from .ops import channel_gated_conv2d, channel_gated_conv2d_add_  # noqa: F401
    from .ops import sample_gather, sample_scatter_add, sample_scatter_add_, sample_scatter_add_pool_  # noqa: F401
    from .ops import gather_conv2d, masker_conv1x1, masked_conv1x1  # noqa: F401
    from .ops import conv1x1_scatter_add, conv1x1_scatter_add_  # noqa: F401


def __getattr__(name):
    # Reached only when an op was not imported above: explain why and how to fix it.
    if name in _OPS or name == "ops":
        require_extension()
    raise AttributeError(f"module 'laudnet_ops' has no attribute {name!r}")


__all__ = ["reference", "cuda_kernels_built", "require_extension", "__version__", *_OPS]
__all__ += ["set_tensor_cores", "tensor_cores_built", "tensor_cores_enabled"]
__all__ += ["experimental_kernels_enabled", "set_experimental_kernels"]
__all__ += ["cudnn_composites_enabled", "set_cudnn_composites"]
__all__ += ["unfused"]

# Modules and models: plain PyTorch until their sparse path runs, so importable without the extension.
from . import models, nn  # noqa: E402
from .nn import ChannelGatedConv2d, GatherConv2d  # noqa: E402

__all__ += ["nn", "models", "GatherConv2d", "ChannelGatedConv2d"]
