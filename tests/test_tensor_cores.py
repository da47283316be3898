"""Tensor-core (CUTLASS/CuTe) CUDA kernels: the switch, the build facts, and -- on a GPU -- every
kernel against the float32 reference, plus the SIMT fallback of every ineligible call.

The CUDA cases skip without a GPU and run unchanged on one (benchmarks/gpu_check.sh runs them).
"""

import math
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import laudnet_ops
from laudnet_ops import _library, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_extension = pytest.mark.skipif(laudnet_ops.extension_error is not None, reason="needs the compiled extension")

# fp16/bf16 inputs, fp32 accumulation over K, one rounding of the output: compared with the float32
# reference on data of unit scale (weights scaled by 1/sqrt(fan_in)).
TC_TOL = {torch.float16: dict(atol=6e-3, rtol=6e-3), torch.bfloat16: dict(atol=4e-2, rtol=3e-2)}
TC_DTYPES = [torch.float16, torch.bfloat16]


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT)


# ---------------------------------------------------------------- the switch (CPU-side)


@needs_extension
def test_built_flag_is_consistent_with_the_build():
    built = laudnet_ops.tensor_cores_built()
    assert isinstance(built, bool)
    if not laudnet_ops.cuda_kernels_built():
        assert not built, "tensor-core kernels cannot exist without the CUDA kernels"
    if "LAUDNET_OPS_EXPECT_TENSOR_CORES" in os.environ:  # CI states which build it made
        assert built == (os.environ["LAUDNET_OPS_EXPECT_TENSOR_CORES"] == "1")


@needs_extension
def test_on_by_default_where_built():
    out = run_python("import laudnet_ops; print(laudnet_ops.tensor_cores_enabled())", LAUDNET_OPS_TENSOR_CORES="")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(laudnet_ops.tensor_cores_built())
    assert "LAUDNET_OPS_TENSOR_CORES" not in out.stderr


@needs_extension
def test_environment_switches_them_off_at_import():
    out = run_python("import laudnet_ops; print(laudnet_ops.tensor_cores_enabled())", LAUDNET_OPS_TENSOR_CORES="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@needs_extension
def test_environment_asks_for_them_and_warns_when_not_built():
    out = run_python("import laudnet_ops; print(laudnet_ops.tensor_cores_enabled())", LAUDNET_OPS_TENSOR_CORES="1")
    assert out.returncode == 0, out.stderr
    if laudnet_ops.tensor_cores_built():
        assert out.stdout.strip() == "True"
    else:
        assert out.stdout.strip() == "False"
        assert "no tensor-core kernels" in out.stderr


@needs_extension
def test_bad_environment_value_warns_and_keeps_the_default():
    out = run_python("import laudnet_ops; print(laudnet_ops.tensor_cores_enabled())", LAUDNET_OPS_TENSOR_CORES="maybe")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(laudnet_ops.tensor_cores_built())
    assert "LAUDNET_OPS_TENSOR_CORES must be 1 or 0" in out.stderr


@pytest.fixture
def restore_switch():
    before = laudnet_ops.tensor_cores_enabled()
    yield
    laudnet_ops.set_tensor_cores(before)


@needs_extension
def test_set_get_round_trip(restore_switch):
    laudnet_ops.set_tensor_cores(False)
    assert laudnet_ops.tensor_cores_enabled() is False
    if laudnet_ops.tensor_cores_built():
        laudnet_ops.set_tensor_cores(True)
        assert laudnet_ops.tensor_cores_enabled() is True
        laudnet_ops.set_tensor_cores(False)
        assert laudnet_ops.tensor_cores_enabled() is False
    else:
        with pytest.raises(RuntimeError, match="tensor-core kernels were not built into this extension"):
            laudnet_ops.set_tensor_cores(True)
        assert laudnet_ops.tensor_cores_enabled() is False


@pytest.mark.parametrize("getters, setter, env, printed", [
    ("laudnet_ops.tensor_cores_built(), laudnet_ops.tensor_cores_enabled()", "set_tensor_cores",
     {"LAUDNET_OPS_TENSOR_CORES": "1"}, "False False"),
    ("laudnet_ops.experimental_kernels_enabled()", "set_experimental_kernels", {"LAUDNET_OPS_EXPERIMENTAL": "1"},
     "False"),
    ("laudnet_ops.cudnn_composites_enabled()", "set_cudnn_composites", {"LAUDNET_OPS_CUDNN_COMPOSITES": "1"},
     "False"),
], ids=["tensor_cores", "experimental", "cudnn_composites"])
def test_switch_without_extension_says_why(getters, setter, env, printed):
    code = (
        "import sys; sys.modules['laudnet_ops._C'] = None\n"
        "import laudnet_ops\n"
        f"print({getters})\n"
        "try:\n"
        f"    laudnet_ops.{setter}(True)\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    out = run_python(code, **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(printed)
    assert "IMPORTERROR" in out.stdout and "could not be loaded" in out.stdout


OFF_BY_DEFAULT_SWITCHES = [("experimental_kernels", "LAUDNET_OPS_EXPERIMENTAL"),
                           ("cudnn_composites", "LAUDNET_OPS_CUDNN_COMPOSITES")]


@needs_extension
@pytest.mark.parametrize("switch, env", OFF_BY_DEFAULT_SWITCHES, ids=[s for s, _ in OFF_BY_DEFAULT_SWITCHES])
def test_off_by_default_switch_and_the_environment_turns_it_on(switch, env):
    code = f"import laudnet_ops; print(laudnet_ops.{switch}_enabled())"
    for value, expected in (("", "False"), ("0", "False"), ("1", "True"), ("on", "True")):
        out = run_python(code, **{env: value})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected, value
    out = run_python(code, **{env: "maybe"})
    assert out.stdout.strip() == "False"
    assert f"{env} must be 1 or 0, got 'maybe'" in out.stderr


@needs_extension
@pytest.mark.parametrize("switch", [s for s, _ in OFF_BY_DEFAULT_SWITCHES])
def test_off_by_default_switch_round_trip(switch):
    enabled, set_switch = getattr(laudnet_ops, f"{switch}_enabled"), getattr(laudnet_ops, f"set_{switch}")
    before = enabled()
    try:
        for on in (True, False, True):
            set_switch(on)
            assert enabled() is on
    finally:
        set_switch(before)


@needs_extension
def test_the_fused_scatter_entry_point_is_registered():
    assert hasattr(torch.ops.laudnet_ops, "_tensor_core_conv1x1_scatter_add_")
    if laudnet_ops.cuda_kernels_built():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            "laudnet_ops::_tensor_core_conv1x1_scatter_add_", "CUDA")


# ---------------------------------------------------------------- build and CI facts (CPU-side)


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_tensor_core_sources_say_where_they_were_run():
    folder = os.path.join(ROOT, "csrc", "cuda", "tensor_core")
    files = sorted(f for f in os.listdir(folder) if f.endswith((".cu", ".cuh")))
    assert files
    for name in files:
        head = read(os.path.join("csrc", "cuda", "tensor_core", name))[:1500]
        assert "RUN ON AN NVIDIA H200 (sm_90)" in head and "never run on sm_80" in head, name


def test_ci_cuda_flavour_installs_cutlass_without_dependencies_and_cpu_flavour_does_not():
    ci = read(".ci/run")
    flavours = {name: rest for name, rest in re.findall(r"^time flavour (\w+) (.*)$", ci, re.M)}
    assert "nvidia-cutlass" in flavours["cuda"]
    assert "nvidia-cutlass" not in flavours["cpu"]
    assert re.search(r"pip\" install -q --no-deps \$3", ci)


def test_setup_compiles_tensor_core_kernels_only_with_cutlass():
    setup = read("setup.py")
    assert 'glob.glob("csrc/cuda/tensor_core/*.cu")' in setup
    assert "csrc/cuda/tensor_core_absent.cpp" in setup
    # The SIMT files reach the tensor-core kernels only through the entry-point header.
    for op in ("gather_conv2d", "masker_conv1x1", "channel_gated_conv2d"):
        src = read(f"csrc/cuda/{op}.cu")
        assert '#include "tensor_core.h"' in src
        assert "#ifdef" not in src and "#if " not in src


def test_gpu_check_fits_one_device_call():
    script = read("benchmarks/gpu_check.sh")
    # (the build-only step is a device call of its own)
    caps = [int(s) for s in re.findall(r"\bstep (?!build-only)[\w-]+ (\d+) ", script)]
    assert len(caps) >= 5
    assert sum(caps) <= 540, caps
    assert "LAUDNET_OPS_TENSOR_CORES=1" in script
    assert "bench_tensor_cores.py" in script


# ---------------------------------------------------------------- kernels (GPU)

cuda = pytest.mark.cuda


@pytest.fixture
def tensor_cores():
    """Tensor cores on for the test (skips when the build has none); the switch restored after."""
    if not laudnet_ops.tensor_cores_built():
        pytest.skip("the extension was built without the tensor-core kernels (no CUTLASS)")
    before = laudnet_ops.tensor_cores_enabled()
    laudnet_ops.set_tensor_cores(True)
    yield
    laudnet_ops.set_tensor_cores(before)


class Calls:
    """Counts the op calls that ran on tensor cores inside a with-block."""

    def __enter__(self):
        self.start = _library._tensor_core_calls()
        return self

    def __exit__(self, *exc):
        self.count = _library._tensor_core_calls() - self.start


def seed_of(*parts):
    """A seed that is the same in every process (str hashes are not)."""
    return zlib.crc32(repr(parts).encode()) % 1000


def randn(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def cl(t, dtype):
    return t.to("cuda", dtype).contiguous(memory_format=torch.channels_last)


def assert_close_to_reference(got, ref, dtype):
    torch.testing.assert_close(got.float(), ref.float(), **TC_TOL[dtype])


# --- gather_conv2d

# N, Cin, Cout, H, W, k, S, stride, padding, dilation
GATHER_SHAPES = [
    (2, 16, 24, 9, 11, 3, 4, 1, 1, 1),     # odd map: border patches; Cout not a multiple of the tile
    (1, 32, 136, 13, 10, 3, 2, 2, 1, 1),   # stride 2, N = 1, two column tiles
    (2, 8, 8, 7, 7, 1, 3, 1, 0, 1),        # 1x1, K = one vector
    (1, 40, 16, 12, 12, 3, 4, 1, 2, 2),    # dilation 2; K = 45 vectors, not a multiple of the 4-vector stage
    (2, 24, 32, 8, 9, 5, 8, 1, 2, 1),      # 5x5, S larger than the map
    (3, 64, 64, 21, 21, 3, 4, 1, 1, 1),    # several row tiles
]


# N, Cin, Cout, H, W, k, S, stride, padding, dilation, groups: one GEMM per group (z = group)
GROUPED_GATHER_SHAPES = [
    (2, 32, 32, 9, 11, 3, 4, 1, 1, 1, 4),     # RegNet-like: 8 channels a group, odd map
    (1, 48, 24, 13, 10, 3, 2, 2, 1, 1, 3),    # stride 2, Cog = 8, Cg = 16 (two vectors a tap)
    (2, 16, 272, 7, 7, 3, 4, 1, 1, 1, 2),     # Cog = 136: two column tiles per group
    (1, 64, 64, 12, 12, 3, 4, 1, 2, 2, 8),    # dilation 2, 8 groups
    (2, 24, 6, 8, 9, 1, 3, 1, 0, 1, 3),       # 1x1, Cog = 2
]


def gather_case(shape, keep, dtype, seed, device="cuda"):
    N, Cin, Cout, H, W, k, S, stride, padding, dilation = shape
    gen = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    mask = torch.rand(N, math.ceil(Ho / S), math.ceil(Wo / S), generator=gen) < keep
    idx = reference.patch_indices(mask).to(device)
    x = randn(N, Cin, H, W, gen=gen)
    w = randn(Cout, Cin, k, k, gen=gen, scale=1 / math.sqrt(Cin * k * k))
    b = randn(Cout, gen=gen)
    conv = dict(patch_size=S, stride=stride, padding=padding, dilation=dilation)
    return x, idx, w, b, conv


@cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_S{}_s{}_p{}_d{}".format(*s))
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_gather_conv2d_matches_reference(tensor_cores, dtype, shape, keep):
    x, idx, w, b, conv = gather_case(shape, keep, dtype, seed=seed_of(shape, keep))
    for activation in ("relu", "none"):
        with Calls() as calls:
            got = laudnet_ops.gather_conv2d(cl(x, dtype), idx, cl(w, dtype), b.to("cuda", dtype), **conv,
                                            activation=activation)
        assert calls.count == (1 if idx.shape[0] else 0)  # no patch: nothing to launch
        # The reference sees the same rounded inputs, in float32.
        ref = reference.gather_conv2d(cl(x, dtype).float(), idx, cl(w, dtype).float(), b.to("cuda", dtype).float(),
                                      **conv, activation=activation)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_close_to_reference(got, ref, dtype)


@cuda
def test_gather_conv2d_without_bias(tensor_cores):
    x, idx, w, _, conv = gather_case(GATHER_SHAPES[0], 0.5, torch.float16, seed=1)
    with Calls() as calls:
        got = laudnet_ops.gather_conv2d(cl(x, torch.float16), idx, cl(w, torch.float16), None, **conv)
    assert calls.count == 1
    ref = reference.gather_conv2d(cl(x, torch.float16).float(), idx, cl(w, torch.float16).float(), None, **conv)
    assert_close_to_reference(got, ref, torch.float16)


# Each ineligible call keeps the SIMT kernel: no tensor-core call, and still the reference's result.
GATHER_FALLBACKS = {
    "float32": dict(dtype=torch.float32, layout="channels_last", shape=GATHER_SHAPES[0], groups=1),
    "nchw": dict(dtype=torch.float16, layout="contiguous", shape=GATHER_SHAPES[0], groups=1),
    "cin_not_multiple_of_8": dict(dtype=torch.float16, layout="channels_last", shape=(2, 12, 8, 9, 9, 3, 4, 1, 1, 1),
                                  groups=1),
    "grouped": dict(dtype=torch.float16, layout="channels_last", shape=(2, 32, 32, 9, 9, 3, 4, 1, 1, 1), groups=4),
}


@cuda
@pytest.mark.parametrize("case", list(GATHER_FALLBACKS))
def test_gather_conv2d_ineligible_calls_fall_back_to_simt(tensor_cores, case):
    spec = GATHER_FALLBACKS[case]
    dtype, groups = spec["dtype"], spec["groups"]
    x, idx, w, b, conv = gather_case(spec["shape"], 0.5, dtype, seed=3)
    w = w[:, : w.shape[1] // groups].contiguous()
    xd = x.to("cuda", dtype)
    xd = xd.contiguous(memory_format=torch.channels_last) if spec["layout"] == "channels_last" else xd.contiguous()
    with Calls() as calls:
        got = laudnet_ops.gather_conv2d(xd, idx, w.to("cuda", dtype), b.to("cuda", dtype), **conv, groups=groups)
    # (grouped calls take the tensor cores when the experimental paths are on, as in gpu_check.sh's third run)
    assert calls.count == int(case == "grouped" and laudnet_ops.experimental_kernels_enabled())
    ref = reference.gather_conv2d(xd.double(), idx, w.to("cuda", dtype).double(), b.to("cuda", dtype).double(),
                                  **conv, groups=groups)
    tol = TC_TOL.get(dtype, dict(atol=1e-4, rtol=1e-4))
    torch.testing.assert_close(got.double(), ref, **tol)


@cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GROUPED_GATHER_SHAPES,
                         ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_S{}_s{}_p{}_d{}_g{}".format(*s))
def test_grouped_gather_conv2d_on_tensor_cores_is_experimental(tensor_cores, experimental, dtype, shape):
    groups = shape[-1]
    x, idx, w, b, conv = gather_case(shape[:-1], 0.5, dtype, seed=seed_of(shape, "cuda"))
    w = w[:, : w.shape[1] // groups].contiguous()
    args = (cl(x, dtype), idx, cl(w, dtype), b.to("cuda", dtype))
    with Calls() as calls:
        got = laudnet_ops.gather_conv2d(*args, **conv, groups=groups)
    assert calls.count == (1 if idx.shape[0] else 0)
    ref = reference.gather_conv2d(*(t.float() if t.is_floating_point() else t for t in args), **conv, groups=groups)
    assert_close_to_reference(got, ref, dtype)
    laudnet_ops.set_experimental_kernels(False)  # the validated default: grouped calls stay on SIMT
    with Calls() as calls:
        laudnet_ops.gather_conv2d(*args, **conv, groups=groups)
    assert calls.count == 0


@cuda
def test_switch_toggles_the_path(tensor_cores):
    x, idx, w, b, conv = gather_case(GATHER_SHAPES[1], 0.5, torch.float16, seed=5)
    args = (cl(x, torch.float16), idx, cl(w, torch.float16), b.to("cuda", torch.float16))
    results = []
    for on in (False, True, False, True):
        laudnet_ops.set_tensor_cores(on)
        with Calls() as calls:
            results.append(laudnet_ops.gather_conv2d(*args, **conv))
        assert calls.count == int(on)
    torch.testing.assert_close(results[0], results[2], atol=0, rtol=0)  # SIMT is deterministic
    torch.testing.assert_close(results[1], results[3], atol=0, rtol=0)  # so is the tensor-core GEMM
    torch.testing.assert_close(results[0].float(), results[1].float(), **TC_TOL[torch.float16])


# --- masker_conv1x1

# N, Cin, Cout, M, H, W, S, stride
MASKER_SHAPES = [
    (2, 16, 24, 1, 9, 11, 2, 1),     # odd map: clipped border cells
    (1, 64, 130, 2, 14, 14, 4, 2),   # stride 2, Cout + M over one column tile, N = 1
    (3, 8, 8, 1, 5, 7, 1, 1),        # S = 1: a cell per pixel
    (2, 40, 64, 3, 17, 13, 7, 2),    # K = 5 vectors, not a multiple of the stage
]


@cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKER_SHAPES, ids=lambda s: "N{}_C{}-{}_M{}_{}x{}_S{}_s{}".format(*s))
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_masker_conv1x1_matches_reference(tensor_cores, dtype, shape, activation):
    N, Cin, Cout, M, H, W, S, stride = shape
    gen = torch.Generator().manual_seed(seed_of(shape))
    x = cl(randn(N, Cin, H, W, gen=gen), dtype)
    w = randn(Cout, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).to("cuda", dtype)
    b = randn(Cout, gen=gen).to("cuda", dtype)
    mw = randn(M, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).to("cuda", dtype)
    mb = randn(M, gen=gen).to("cuda", dtype)
    with Calls() as calls:
        y, logits = laudnet_ops.masker_conv1x1(x, w, b, mw, mb, S, stride, activation)
    assert calls.count == 1
    ry, rl = reference.masker_conv1x1(x.float(), w.float(), b.float(), mw.float(), mb.float(), S, stride, activation)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype and logits.dtype == dtype
    assert_close_to_reference(y, ry, dtype)
    assert_close_to_reference(logits, rl, dtype)


@cuda
@pytest.mark.parametrize("case", ["float32", "nchw", "cin_not_multiple_of_8"])
def test_masker_conv1x1_ineligible_calls_fall_back_to_simt(tensor_cores, case):
    dtype = torch.float32 if case == "float32" else torch.float16
    Cin = 12 if case == "cin_not_multiple_of_8" else 16
    gen = torch.Generator().manual_seed(7)
    x = randn(2, Cin, 9, 10, gen=gen).to("cuda", dtype)
    x = x.contiguous() if case == "nchw" else x.contiguous(memory_format=torch.channels_last)
    w = randn(8, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).to("cuda", dtype)
    mw = randn(1, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).to("cuda", dtype)
    with Calls() as calls:
        y, logits = laudnet_ops.masker_conv1x1(x, w, None, mw, None, 2, 1)
    assert calls.count == 0
    ry, rl = reference.masker_conv1x1(x.double(), w.double(), None, mw.double(), None, 2, 1)
    tol = TC_TOL.get(dtype, dict(atol=1e-4, rtol=1e-4))
    torch.testing.assert_close(y.double(), ry, **tol)
    torch.testing.assert_close(logits.double(), rl, **tol)


# --- channel_gated_conv2d

# N, Cin, Cout, H, W, k, stride, padding, dilation, G
CHANNEL_SHAPES = [
    (2, 32, 48, 9, 11, 3, 1, 1, 1, 8),     # odd map
    (3, 64, 136, 10, 7, 3, 2, 1, 1, 8),    # stride 2, Cout over one column tile
    (1, 16, 32, 8, 8, 1, 1, 0, 1, 16),     # 1x1, one sample, G = 16
    (2, 48, 24, 12, 13, 3, 1, 2, 2, 8),    # dilation 2
]

# N, Cin, Cout, H, W, k, stride, padding, dilation, G, groups: one GEMM per (sample, conv group)
GROUPED_CHANNEL_SHAPES = [
    (2, 32, 32, 9, 11, 3, 1, 1, 1, 8, 2),     # two gate groups per conv group, odd map
    (1, 64, 64, 8, 7, 3, 2, 1, 1, 16, 4),     # one gate group per conv group, stride 2
    (2, 48, 96, 7, 7, 3, 1, 1, 1, 8, 6),      # 8 input, 16 output channels a group
    (2, 16, 272, 6, 6, 1, 1, 0, 1, 8, 2),     # 136 output channels a group: two column tiles
    (1, 64, 64, 12, 12, 3, 1, 2, 2, 8, 8),    # dilation 2, RegNet's group width 8
]


@cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_s{}_p{}_d{}_G{}".format(*s))
@pytest.mark.parametrize("gates", ["random", "all_on", "all_off", "none", "inputs_off"])
def test_channel_gated_conv2d_matches_reference(tensor_cores, dtype, shape, gates):
    N, Cin, Cout, H, W, k, stride, padding, dilation, G = shape
    gen = torch.Generator().manual_seed(seed_of(shape, gates))
    x = cl(randn(N, Cin, H, W, gen=gen), dtype)
    w = randn(Cout, Cin, k, k, gen=gen, scale=1 / math.sqrt(Cin * k * k)).to("cuda", dtype)
    b = randn(Cout, gen=gen).to("cuda", dtype)
    if gates == "none":
        gin = gout = None
    else:
        keep = {"random": 0.5, "all_on": 1.0, "all_off": 0.0, "inputs_off": 0.0}[gates]
        gin = (torch.rand(N, Cin // G, generator=gen) < keep).cuda()
        gout = (torch.rand(N, Cout // G, generator=gen) < (1.0 if gates == "inputs_off" else keep)).cuda()
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    for activation in ("relu", "none"):
        with Calls() as calls:
            got = laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, **conv, activation=activation)
        assert calls.count == 1
        ref = reference.channel_gated_conv2d(x.float(), w.float(), b.float(), gin, gout, G, **conv,
                                             activation=activation)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_close_to_reference(got, ref, dtype)
        if gout is not None:  # inactive output channels are exact zeros
            off = ~gout.repeat_interleave(G, 1)
            assert (got.permute(0, 2, 3, 1)[off[:, None, None, :].expand(-1, got.shape[2], got.shape[3], -1)] == 0).all()


@cuda
@pytest.mark.parametrize("case", ["float32", "nchw", "group_size_4", "grouped"])
def test_channel_gated_conv2d_ineligible_calls_fall_back_to_simt(tensor_cores, case):
    dtype = torch.float32 if case == "float32" else torch.float16
    G = 4 if case == "group_size_4" else 8
    groups = 2 if case == "grouped" else 1
    gen = torch.Generator().manual_seed(11)
    x = randn(2, 32, 9, 9, gen=gen).to("cuda", dtype)
    x = x.contiguous() if case == "nchw" else x.contiguous(memory_format=torch.channels_last)
    w = randn(32, 32 // groups, 3, 3, gen=gen, scale=1 / math.sqrt(32 * 9 // groups)).to("cuda", dtype)
    gin = (torch.rand(2, 32 // G, generator=gen) < 0.5).cuda()
    gout = (torch.rand(2, 32 // G, generator=gen) < 0.5).cuda()
    with Calls() as calls:
        got = laudnet_ops.channel_gated_conv2d(x, w, None, gin, gout, G, padding=1, groups=groups)
    # (grouped calls take the tensor cores when the experimental paths are on, as in gpu_check.sh's third run)
    assert calls.count == int(case == "grouped" and laudnet_ops.experimental_kernels_enabled())
    ref = reference.channel_gated_conv2d(x.double(), w.double(), None, gin, gout, G, padding=1, groups=groups)
    tol = TC_TOL.get(dtype, dict(atol=1e-4, rtol=1e-4))
    torch.testing.assert_close(got.double(), ref, **tol)


@cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GROUPED_CHANNEL_SHAPES,
                         ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_s{}_p{}_d{}_G{}_g{}".format(*s))
@pytest.mark.parametrize("gates", ["random", "none"])
def test_grouped_channel_gated_conv2d_on_tensor_cores_is_experimental(tensor_cores, experimental, dtype, shape,
                                                                       gates):
    N, Cin, Cout, H, W, k, stride, padding, dilation, G, groups = shape
    gen = torch.Generator().manual_seed(seed_of(shape, gates, "cuda"))
    x = cl(randn(N, Cin, H, W, gen=gen), dtype)
    w = randn(Cout, Cin // groups, k, k, gen=gen, scale=1 / math.sqrt(Cin // groups * k * k)).to("cuda", dtype)
    b = randn(Cout, gen=gen).to("cuda", dtype)
    gin, gout = channel_gates(gates, N, Cin, Cout, G, gen, "cuda")
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    with Calls() as calls:
        got = laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, **conv)
    assert calls.count == 1
    ref = reference.channel_gated_conv2d(x.float(), w.float(), b.float(), gin, gout, G, **conv)
    assert_close_to_reference(got, ref, dtype)
    laudnet_ops.set_experimental_kernels(False)  # the validated default: grouped calls stay on SIMT
    with Calls() as calls:
        laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, **conv)
    assert calls.count == 0


# --- the fused 1x1 conv + scatter-add epilogue (entry point for conv1x1_scatter_add)

# N, Cin, Cout, Ho, Wo, S
SCATTER_SHAPES = [
    (2, 16, 64, 9, 11, 4),     # border patches partly outside the map
    (1, 64, 256, 14, 14, 7),   # a ResNet stage-3 expansion, two column tiles
    (3, 8, 24, 5, 6, 2),
]


def covered(idx, like, S):
    """Bool (N, 1, H, W): the positions of like's map that a patch of idx (patch size S) covers."""
    N, _, H, W = like.shape
    ones = torch.ones(idx.shape[0], 1, S, S, dtype=torch.float32, device=like.device)
    return reference.scatter_add(like.new_zeros(N, 1, H, W, dtype=torch.float32), ones, idx, "none") > 0


@cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SCATTER_SHAPES, ids=lambda s: "N{}_C{}-{}_{}x{}_S{}".format(*s))
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_conv1x1_scatter_add_matches_conv_then_scatter(tensor_cores, dtype, shape, keep, activation):
    N, Cin, Cout, Ho, Wo, S = shape
    gen = torch.Generator().manual_seed(seed_of(shape, keep))
    mask = torch.rand(N, math.ceil(Ho / S), math.ceil(Wo / S), generator=gen) < keep
    idx = reference.patch_indices(mask).cuda()
    P = idx.shape[0]
    packed = cl(randn(P, Cin, S, S, gen=gen), dtype)
    w = randn(Cout, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).to("cuda", dtype)
    b = randn(Cout, gen=gen).to("cuda", dtype)
    residual = cl(randn(N, Cout, Ho, Wo, gen=gen), dtype)
    out = residual.clone()
    with Calls() as calls:
        ran = torch.ops.laudnet_ops._tensor_core_conv1x1_scatter_add_(out, packed, idx, w, b, activation)
    assert ran and calls.count == (1 if P else 0)  # no patch: nothing to launch
    expected = residual.float().contiguous(memory_format=torch.channels_last)
    laudnet_ops.scatter_add_(expected, F.conv2d(packed.float(), w.float(), b.float()), idx, activation)
    # scatter_add_ activates the whole map; the fused epilogue leaves positions without a patch untouched.
    expected = torch.where(covered(idx, residual, S), expected, residual.float())
    assert_close_to_reference(out, expected, dtype)


@cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SCATTER_SHAPES, ids=lambda s: "N{}_C{}-{}_{}x{}_S{}".format(*s))
@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_public_conv1x1_scatter_add_takes_tensor_cores(tensor_cores, dtype, shape, in_place, activation):
    # The public ops dispatch to the fused tensor-core epilogue for channels_last half maps, with the
    # op's contract (out of place: act(residual) where no patch covers).
    N, Cin, Cout, Ho, Wo, S = shape
    gen = torch.Generator().manual_seed(seed_of(shape, in_place))
    mask = torch.rand(N, math.ceil(Ho / S), math.ceil(Wo / S), generator=gen) < 0.5
    idx = reference.patch_indices(mask).cuda()
    packed = cl(randn(idx.shape[0], Cin, S, S, gen=gen), dtype)
    w = randn(Cout, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).to("cuda", dtype)
    b = randn(Cout, gen=gen).to("cuda", dtype)
    residual = cl(randn(N, Cout, Ho, Wo, gen=gen), dtype)
    if in_place and activation == "relu":
        residual = residual.relu()  # the in-place form's precondition: a post-activation map
    want = reference.conv1x1_scatter_add(residual.double(), packed.double(), idx, w.double(), b.double(), activation)
    with Calls() as calls:
        if in_place:
            got = residual.clone()
            laudnet_ops.conv1x1_scatter_add_(got, packed, idx, w, b, activation)
        else:
            got = laudnet_ops.conv1x1_scatter_add(residual, packed, idx, w, b, activation)
    assert calls.count == 1
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(got, want, dtype)


@cuda
def test_conv1x1_scatter_add_entry_point_declines_ineligible_calls(tensor_cores):
    gen = torch.Generator().manual_seed(2)
    idx = reference.patch_indices(torch.ones(1, 2, 2, dtype=torch.bool)).cuda()
    w = randn(8, 12, 1, 1, gen=gen).to("cuda", torch.float16)
    packed = cl(randn(4, 12, 2, 2, gen=gen), torch.float16)  # Cin = 12: not whole 16-byte vectors
    out = cl(randn(1, 8, 4, 4, gen=gen), torch.float16)
    before = out.clone()
    assert not torch.ops.laudnet_ops._tensor_core_conv1x1_scatter_add_(out, packed, idx, w, None, "relu")
    assert torch.equal(out, before)
    laudnet_ops.set_tensor_cores(False)
    packed = cl(randn(4, 16, 2, 2, gen=gen), torch.float16)
    w = randn(8, 16, 1, 1, gen=gen).to("cuda", torch.float16)
    assert not torch.ops.laudnet_ops._tensor_core_conv1x1_scatter_add_(out, packed, idx, w, None, "relu")
    assert torch.equal(out, before)


# ---------------------------------------------------------------- the kernels' index math, on the CPU
# The emulation ops run each tensor-core kernel's Problem (the gather addresses, the zeros, the
# epilogue's positions, pooling and gate lists) on the host in float32, output by output, so the
# index math is validated here without a GPU. They exist in builds with the tensor-core kernels.

def emulated(name):
    full = f"laudnet_ops::_tensor_core_emulate_{name}"
    if laudnet_ops.extension_error is not None or not torch._C._dispatch_has_kernel_for_dispatch_key(full, "CPU"):
        pytest.skip("the extension was built without the tensor-core kernels")
    return getattr(torch.ops.laudnet_ops, f"_tensor_core_emulate_{name}")


EXACT = dict(atol=1e-4, rtol=1e-4)  # float32 both sides, sums in a different order


@pytest.fixture(params=["validated", "experimental"])
def kernel_variant(request):
    """The emulated kernel: the GPU-validated one (k state from each k index, each value's store on
    its own), or with the experimental switch on the stepped k state and the row-by-row epilogue,
    walking every tile, thread and loader column as the kernel does."""
    before = laudnet_ops.experimental_kernels_enabled()
    laudnet_ops.set_experimental_kernels(request.param == "experimental")
    yield request.param
    laudnet_ops.set_experimental_kernels(before)


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_S{}_s{}_p{}_d{}".format(*s))
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_emulated_gather_conv2d_index_math(kernel_variant, shape, keep):
    op = emulated("gather_conv2d")
    x, idx, w, b, conv = gather_case(shape, keep, torch.float32, seed=seed_of(shape, keep), device="cpu")
    x, w, b = x.float(), w.float(), b.float()
    for activation, bias in (("relu", b), ("none", None)):
        got = op(x, idx, w, bias, conv["patch_size"], conv["stride"], conv["padding"], conv["dilation"], 1,
                 activation)
        ref = reference.gather_conv2d(x, idx, w, bias, **conv, activation=activation)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, ref, **EXACT)


@pytest.mark.parametrize("shape", GROUPED_GATHER_SHAPES,
                         ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_S{}_s{}_p{}_d{}_g{}".format(*s))
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_emulated_grouped_gather_conv2d_index_math(kernel_variant, shape, keep):
    op = emulated("gather_conv2d")
    groups = shape[-1]
    x, idx, w, b, conv = gather_case(shape[:-1], keep, torch.float32, seed=seed_of(shape, keep), device="cpu")
    x, w, b = x.float(), w[:, : w.shape[1] // groups].float().contiguous(), b.float()
    for activation, bias in (("relu", b), ("none", None)):
        got = op(x, idx, w, bias, conv["patch_size"], conv["stride"], conv["padding"], conv["dilation"], groups,
                 activation)
        ref = reference.gather_conv2d(x, idx, w, bias, **conv, groups=groups, activation=activation)
        torch.testing.assert_close(got, ref, **EXACT)


@pytest.mark.parametrize("shape", MASKER_SHAPES, ids=lambda s: "N{}_C{}-{}_M{}_{}x{}_S{}_s{}".format(*s))
def test_emulated_masker_conv1x1_index_math(kernel_variant, shape):
    op = emulated("masker_conv1x1")
    N, Cin, Cout, M, H, W, S, stride = shape
    gen = torch.Generator().manual_seed(seed_of(shape))
    x = randn(N, Cin, H, W, gen=gen).float()
    w = randn(Cout, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).float()
    b = randn(Cout, gen=gen).float()
    mw = randn(M, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).float()
    mb = randn(M, gen=gen).float()
    for activation in ("relu", "none"):
        y, logits = op(x, w, b, mw, mb, S, stride, activation)
        ry, rl = reference.masker_conv1x1(x, w, b, mw, mb, S, stride, activation)
        torch.testing.assert_close(y, ry, **EXACT)
        torch.testing.assert_close(logits, rl, **EXACT)


@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_s{}_p{}_d{}_G{}".format(*s))
@pytest.mark.parametrize("gates", ["random", "all_on", "all_off", "none", "inputs_off"])
def test_emulated_channel_gated_conv2d_index_math(kernel_variant, shape, gates):
    op = emulated("channel_gated_conv2d")
    N, Cin, Cout, H, W, k, stride, padding, dilation, G = shape
    gen = torch.Generator().manual_seed(seed_of(shape, gates))
    x = randn(N, Cin, H, W, gen=gen).float()
    w = randn(Cout, Cin, k, k, gen=gen, scale=1 / math.sqrt(Cin * k * k)).float()
    b = randn(Cout, gen=gen).float()
    if gates == "none":
        gin = gout = None
    else:
        keep = {"random": 0.5, "all_on": 1.0, "all_off": 0.0, "inputs_off": 0.0}[gates]
        gin = torch.rand(N, Cin // G, generator=gen) < keep
        gout = torch.rand(N, Cout // G, generator=gen) < (1.0 if gates == "inputs_off" else keep)
    for activation in ("relu", "none"):
        got = op(x, w, b, gin, gout, G, [stride] * 2, [padding] * 2, [dilation] * 2, 1, activation)
        ref = reference.channel_gated_conv2d(x, w, b, gin, gout, G, stride, padding, dilation, activation=activation)
        torch.testing.assert_close(got, ref, **EXACT)


def channel_gates(kind, N, Cin, Cout, G, gen, device="cpu"):
    """(in_gates, out_gates) of a named kind: random, all_off, none (both None) or inputs_off."""
    if kind == "none":
        return None, None
    keep = {"random": 0.5, "all_off": 0.0, "inputs_off": 0.0}[kind]
    gin = torch.rand(N, Cin // G, generator=gen) < keep
    gout = torch.rand(N, Cout // G, generator=gen) < (1.0 if kind == "inputs_off" else keep)
    return gin.to(device), gout.to(device)


@pytest.mark.parametrize("shape", GROUPED_CHANNEL_SHAPES,
                         ids=lambda s: "N{}_C{}-{}_{}x{}_k{}_s{}_p{}_d{}_G{}_g{}".format(*s))
@pytest.mark.parametrize("gates", ["random", "all_off", "none", "inputs_off"])
def test_emulated_grouped_channel_gated_conv2d_index_math(kernel_variant, shape, gates):
    op = emulated("channel_gated_conv2d")
    N, Cin, Cout, H, W, k, stride, padding, dilation, G, groups = shape
    gen = torch.Generator().manual_seed(seed_of(shape, gates))
    x = randn(N, Cin, H, W, gen=gen).float()
    w = randn(Cout, Cin // groups, k, k, gen=gen, scale=1 / math.sqrt(Cin // groups * k * k)).float()
    b = randn(Cout, gen=gen).float()
    gin, gout = channel_gates(gates, N, Cin, Cout, G, gen)
    for activation in ("relu", "none"):
        got = op(x, w, b, gin, gout, G, [stride] * 2, [padding] * 2, [dilation] * 2, groups, activation)
        ref = reference.channel_gated_conv2d(x, w, b, gin, gout, G, stride, padding, dilation, groups,
                                             activation=activation)
        torch.testing.assert_close(got, ref, **EXACT)


@pytest.mark.parametrize("shape", SCATTER_SHAPES, ids=lambda s: "N{}_C{}-{}_{}x{}_S{}".format(*s))
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_emulated_conv1x1_scatter_add_index_math(kernel_variant, shape, keep):
    op = emulated("conv1x1_scatter_add_")
    N, Cin, Cout, Ho, Wo, S = shape
    gen = torch.Generator().manual_seed(seed_of(shape, keep))
    idx = reference.patch_indices(torch.rand(N, math.ceil(Ho / S), math.ceil(Wo / S), generator=gen) < keep)
    packed = randn(idx.shape[0], Cin, S, S, gen=gen).float().contiguous(memory_format=torch.channels_last)
    w = randn(Cout, Cin, 1, 1, gen=gen, scale=1 / math.sqrt(Cin)).float()
    b = randn(Cout, gen=gen).float()
    residual = randn(N, Cout, Ho, Wo, gen=gen).float().contiguous(memory_format=torch.channels_last)
    for activation in ("relu", "none"):
        out = residual.clone()
        op(out, packed, idx, w, b, activation)
        expected = reference.scatter_add(residual, F.conv2d(packed, w, b), idx, activation)
        expected = torch.where(covered(idx, residual, S), expected, residual)  # untouched outside the patches
        torch.testing.assert_close(out, expected, **EXACT)


def test_emulation_rejects_what_the_kernels_cannot_take():
    op = emulated("gather_conv2d")
    x = torch.randn(1, 12, 6, 6)
    idx = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="channels per group must be a multiple of 8, got 12"):
        op(x, idx, torch.randn(4, 12, 3, 3), None, 2, 1, 1, 1, 1, "relu")
    with pytest.raises(RuntimeError, match="channels per group must be a multiple of 8, got 4"):
        op(torch.randn(1, 16, 6, 6), idx, torch.randn(4, 4, 3, 3), None, 2, 1, 1, 1, 4, "relu")
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        op(x[:, :8].double(), idx, torch.randn(4, 8, 3, 3).double(), None, 2, 1, 1, 1, 1, "relu")


# ---------------------------------------------------------------- the benchmark (CPU-side)


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tensor_cores", os.path.join(ROOT, "benchmarks",
                                                                                    "bench_tensor_cores.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_peaks_come_from_the_device_name_or_the_overrides():
    bench = load_bench()
    none = type("Args", (), {"peak_tflops": None, "peak_gbs": None})()
    assert bench.peaks_for("NVIDIA H100 80GB HBM3", none) == (989.0, 3350.0)
    assert bench.peaks_for("NVIDIA H100 PCIe", none) == (756.0, 2000.0)
    assert bench.peaks_for("NVIDIA H200", none) == (989.0, 4800.0)
    assert bench.peaks_for("NVIDIA A100-SXM4-80GB", none) == (312.0, 2039.0)
    override = type("Args", (), {"peak_tflops": 100.0, "peak_gbs": 900.0})()
    assert bench.peaks_for("NVIDIA H100 80GB HBM3", override) == (100.0, 900.0)
    with pytest.raises(SystemExit, match="pass --peak-tflops and --peak-gbs"):
        bench.peaks_for("Some Future GPU", none)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("script", ["bench_tensor_cores.py", "bench_experimental.py"])
def test_benchmark_without_a_gpu_says_so(script):
    out = subprocess.run([sys.executable, os.path.join("benchmarks", script)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "needs a CUDA GPU" in out.stderr
