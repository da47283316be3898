"""Public functional ops. Importing this package loads the compiled extension."""

from .._library import require_extension

require_extension()

from .patch_indices import patch_indices  # noqa: E402
from .scatter_add import scatter_add, scatter_add_  # noqa: E402

from .channel_gated_conv2d import channel_gated_conv2d, channel_gated_conv2d_add_  # noqa: E402
from .layer_skip import sample_gather, sample_scatter_add, sample_scatter_add_, sample_scatter_add_pool_  # noqa: E402
from .gather_conv2d import gather_conv2d  # noqa: E402
from .masker_conv1x1 import masker_conv1x1  # noqa: E402
from .masked_conv1x1 import masked_conv1x1  # noqa: E402
from .conv1x1_scatter_add import conv1x1_scatter_add, conv1x1_scatter_add_  # noqa: E402

__all__ = ["patch_indices", "scatter_add", "scatter_add_"]
__all__ += ["channel_gated_conv2d", "channel_gated_conv2d_add_"]
__all__ += ["sample_gather", "sample_scatter_add", "sample_scatter_add_", "sample_scatter_add_pool_"]
__all__ += ["gather_conv2d", "masker_conv1x1", "masked_conv1x1", "conv1x1_scatter_add", "conv1x1_scatter_add_"]
