"""Shared test setup: device parametrisation that runs unchanged on a GPU machine."""

import pytest
import torch

# The references must be exact float32: on Ampere and newer GPUs cuDNN and cuBLAS would otherwise round
# float32 operands to TF32, an error (about 1e-3 on long reductions) above the tests' tolerances.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _switched_on(switch):
    """Turns on the off-by-default switch ``laudnet_ops.set_<switch>`` for a test, then restores it."""
    import laudnet_ops

    if laudnet_ops.extension_error is not None:
        pytest.skip("needs the compiled extension")
    enabled, set_switch = getattr(laudnet_ops, f"{switch}_enabled"), getattr(laudnet_ops, f"set_{switch}")
    before = enabled()
    set_switch(True)
    yield
    set_switch(before)


@pytest.fixture
def experimental():
    """The experimental CUDA paths (not yet run on a GPU) on for the test; the switch restored after."""
    yield from _switched_on("experimental_kernels")


@pytest.fixture
def cudnn_composites():
    """Every CUDA convolution op call through its cuDNN composite for the test; the switch restored after."""
    yield from _switched_on("cudnn_composites")
