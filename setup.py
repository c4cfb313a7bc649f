"""Builds pdepth._C: C++ CPU kernels always; CUDA kernels when a CUDA toolkit and a CUDA
build of torch are present. FORCE_CUDA=1 makes their absence an error, FORCE_CPU=1 skips
CUDA. The decision is printed."""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Used when no GPU is visible (CI, this machine): Ampere and Hopper.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("FORCE_CPU"):
        return False, "FORCE_CPU=1"
    have_toolkit = CUDA_HOME is not None
    have_torch_cuda = torch.version.cuda is not None
    if have_toolkit and have_torch_cuda:
        return True, f"CUDA toolkit at {CUDA_HOME}, torch built with CUDA {torch.version.cuda}"
    why = []
    if not have_toolkit:
        why.append("no CUDA toolkit found (set CUDA_HOME)")
    if not have_torch_cuda:
        why.append(f"torch {torch.__version__} is a CPU build")
    if _flag("FORCE_CUDA"):
        sys.exit("pdepth: FORCE_CUDA=1 but " + " and ".join(why))
    return False, "; ".join(why)


def _cuda_include_dirs():
    """cuBLAS/cuSPARSE headers: a lean toolkit (nvcc only) lacks them, but the CUDA build of
    torch pulls them in as pip packages (nvidia/cu*/include)."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += glob.glob(os.path.join(root, "*", "include"))
    return [d for d in found if os.path.exists(os.path.join(d, "cublas_v2.h"))][:1]


def _extension():
    with_cuda, reason = _want_cuda()
    include_dirs = []
    sources = ["csrc/knn.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", f'-DPDEPTH_TORCH_VERSION="{torch.__version__}"']
    extra = {"cxx": cxx}
    if with_cuda:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        print(f"pdepth: building with CUDA ({reason}); archs: {archs}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        defines = ["-DPDEPTH_WITH_CUDA", f'-DPDEPTH_CUDA_ARCHS="{archs}"']
        extra["cxx"] = cxx + defines
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines
        ext = CUDAExtension
        include_dirs = _cuda_include_dirs()
    else:
        print(f"pdepth: building CPU only ({reason})")
        ext = CppExtension
    return ext(
        name="pdepth._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
