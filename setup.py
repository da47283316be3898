"""Build of laudnet_ops: one compiled extension, laudnet_ops._C.

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build
and nvcc is found -- no GPU is needed to compile them. Environment switches:

  LAUDNET_OPS_CUDA=1|0      force the CUDA kernels on or off (default: auto)
  LAUDNET_OPS_CUTLASS_DIR   CUTLASS include directory (default: the nvidia-cutlass
                            package's headers, when installed)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default with no visible GPU: 8.0;9.0)
  MAX_JOBS                  parallel compile jobs
  CUDA_HOME                 CUDA toolkit root (default: /usr/local/cuda, or nvcc's folder)

Install with `pip install --no-build-isolation .` so the extension is built
against the torch already installed.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc_root():
    """The CUDA toolkit root: the conventional folder, else the parent of nvcc's bin/."""
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# torch.utils.cpp_extension reads CUDA_HOME at import time and otherwise guesses
# the parent of the nvcc on PATH, which is wrong for wrapper scripts.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    root = _nvcc_root()
    if root:
        os.environ["CUDA_HOME"] = root

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"laudnet_ops build: {name} must be 1, 0 or auto, got {os.environ[name]!r}")


def _resolve_cuda():
    forced = _flag("LAUDNET_OPS_CUDA")
    torch_cuda = torch.version.cuda is not None
    # torch's CUDA_HOME is None in CPU-only builds; look for the toolkit ourselves to tell why.
    toolkit = CUDA_HOME or os.environ.get("CUDA_HOME") or _nvcc_root()
    nvcc_found = toolkit is not None and os.path.isfile(os.path.join(toolkit, "bin", "nvcc"))
    if forced is False:
        return False, "off (LAUDNET_OPS_CUDA=0)"
    if torch_cuda and nvcc_found:
        return True, f"on (torch {torch.__version__}, CUDA {torch.version.cuda}, toolkit {CUDA_HOME})"
    reason = []
    if not torch_cuda:
        reason.append(f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
    if not nvcc_found:
        reason.append("nvcc was not found; install the CUDA toolkit or set CUDA_HOME to its root")
    if forced:
        sys.exit("laudnet_ops build: LAUDNET_OPS_CUDA=1 but CUDA kernels cannot be built: "
                 + "; ".join(reason) + ". Fix that, or set LAUDNET_OPS_CUDA=0 for a CPU-only build.")
    return False, "off (" + "; ".join(reason) + ")"


def _resolve_archs(with_cuda):
    if not with_cuda:
        return None
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"] + " (TORCH_CUDA_ARCH_LIST)"
    if torch.cuda.is_available():
        return "visible GPUs (torch default)"
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return "8.0;9.0 (default: no visible GPU and no TORCH_CUDA_ARCH_LIST)"


def _cutlass_dir():
    env = os.environ.get("LAUDNET_OPS_CUTLASS_DIR")
    if env:
        if not os.path.isfile(os.path.join(env, "cutlass", "cutlass.h")):
            sys.exit(f"laudnet_ops build: LAUDNET_OPS_CUTLASS_DIR={env} has no cutlass/cutlass.h")
        return env
    try:
        import cutlass_library  # the nvidia-cutlass package ships the headers beside it
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isfile(os.path.join(path, "cutlass", "cutlass.h")) else None


def _extra_cuda_includes():
    """CUDA headers that pip-installed toolkit pieces keep inside site-packages."""
    found = []
    for site in sys.path:
        for sub in ("cu13", "cu12"):
            path = os.path.join(site, "nvidia", sub, "include")
            if os.path.isdir(path):
                found.append(path)
    return found[:1]


def _extension():
    with_cuda, cuda_reason = _resolve_cuda()
    archs = _resolve_archs(with_cuda)
    cutlass = _cutlass_dir() if with_cuda else None

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is left to torch: recent releases need C++20, older ones C++17.
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs serially unless the kernels are compiled with OpenMP (ATen's backend);
        # libgomp is the one torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # The tensor-core kernels need CUTLASS's headers; without them one small file answers
        # "not built" for their entry points, so the SIMT files never need an #ifdef.
        if cutlass:
            sources += sorted(glob.glob("csrc/cuda/tensor_core/*.cu"))
        else:
            sources.append("csrc/cuda/tensor_core_absent.cpp")
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        include_dirs += _extra_cuda_includes()
        if cutlass:
            include_dirs.append(cutlass)

    print("laudnet_ops build configuration:")
    print(f"  torch:   {torch.__version__}")
    print(f"  CUDA:    {cuda_reason}")
    if with_cuda:
        print(f"  archs:   {archs}")
        print(f"  CUTLASS: {cutlass or 'not found (pip install --no-deps nvidia-cutlass, or set LAUDNET_OPS_CUTLASS_DIR)'}")
        print(f"  tensor cores: {'built (on at run time unless LAUDNET_OPS_TENSOR_CORES=0)' if cutlass else 'not built (no CUTLASS)'}")
    print(f"  sources: {len(sources)} files, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")

    cls = CUDAExtension if with_cuda else CppExtension
    # py_limited_api: module.cpp uses only Python's stable ABI and nothing links libtorch_python,
    # so the extension is one _C.abi3.so for every later Python on the same torch.
    return cls("laudnet_ops._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
               extra_link_args=link, py_limited_api=True)


setup(
    packages=find_packages(include=["laudnet_ops", "laudnet_ops.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
