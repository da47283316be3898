"""The compiled extension: it loads, carries the kernels the build promised, and fails helpfully."""

import os
import subprocess
import sys

import pytest
import torch

import laudnet_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_loads():
    assert laudnet_ops.extension_error is None
    for op in ("patch_indices", "scatter_add", "scatter_add_", "_gather_patches"):
        assert hasattr(torch.ops.laudnet_ops, op)


@pytest.mark.skipif("LAUDNET_OPS_EXPECT_CUDA" not in os.environ, reason="CI states which build it made")
def test_cuda_kernels_match_the_build():
    # CI builds one flavour with CUDA and one without; a silent CPU-only fallback must fail here.
    assert laudnet_ops.cuda_kernels_built() == (os.environ["LAUDNET_OPS_EXPECT_CUDA"] == "1")


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT)


def test_missing_extension_raises_import_error_with_fix():
    code = (
        "import sys; sys.modules['laudnet_ops._C'] = None\n"
        "import laudnet_ops\n"
        "from laudnet_ops import reference  # pure-Python parts still import\n"
        "try:\n"
        "    laudnet_ops.patch_indices\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout
    assert "could not be loaded" in out.stdout
    assert "pip install --no-build-isolation" in out.stdout
    assert torch.__version__ in out.stdout


def test_forcing_cuda_without_toolkit_names_the_fix(tmp_path):
    out = subprocess.run(
        [sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "LAUDNET_OPS_CUDA": "1", "CUDA_HOME": str(tmp_path)},
    )
    assert out.returncode != 0
    assert "LAUDNET_OPS_CUDA=1 but CUDA kernels cannot be built" in out.stderr
    assert "LAUDNET_OPS_CUDA=0" in out.stderr


def test_bad_switch_value_is_rejected():
    out = subprocess.run(
        [sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "LAUDNET_OPS_CUDA": "maybe"},
    )
    assert out.returncode != 0
    assert "LAUDNET_OPS_CUDA must be 1, 0 or auto, got 'maybe'" in out.stderr
