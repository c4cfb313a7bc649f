"""Builds pdepth._C: C++ CPU kernels always; CUDA kernels when a usable CUDA toolkit and a
CUDA build of torch are present. The decision is printed ("pdepth: building ...").

- The extension is compiled against the torch already installed, so build without pip's
  build isolation: ``pip install --no-build-isolation .`` (an isolated build stops with a
  message saying so).
- The toolkit: ``$CUDA_HOME`` if set, else ``/usr/local/cuda`` if it exists, else torch's
  guess (from ``nvcc`` on PATH). It is usable when it has ``bin/nvcc`` whose major version is
  torch's, ``cuda_runtime.h`` and a cudart library (under the toolkit or in the
  ``nvidia-cuda-runtime`` wheel torch pulls in).
- Without a usable toolkit the build is CPU-only, with the reason printed; FORCE_CUDA=1 makes
  that an error instead. FORCE_CPU=1 skips CUDA.
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

# Used when no GPU is visible (CI, this machine): Ampere and Hopper.
DEFAULT_CUDA_ARCHS = "8.0;9.0"
HERE = os.path.dirname(os.path.abspath(__file__))
NO_ISOLATION_HINT = (
    "pdepth compiles against the torch you already have installed: install torch first, then "
    "build without pip's build isolation:\n"
    "    pip install --no-build-isolation .      (or: pip install --no-build-isolation -e .)\n"
    "(for `python -m build`, add --no-isolation)"
)
# setup.py commands that need the compiled extension, hence torch. `egg_info` and `sdist`
# (an isolated `python -m build --sdist`) do not; `dist_info` is pip's first step of a wheel
# build, so an isolated `pip install .` stops there, before anything is downloaded or compiled.
BUILD_COMMANDS = {"dist_info", "build", "build_ext", "bdist", "bdist_wheel", "bdist_egg",
                  "install", "develop", "editable_wheel"}


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _metadata_only():
    return not BUILD_COMMANDS.intersection(sys.argv[1:])


def _in_isolated_build_env(path):
    """True when ``path`` lies in a temporary build environment (pip's ``pip-build-env-*``,
    python -m build's ``build-env-*``) rather than the user's environment."""
    parts = os.path.normpath(path).split(os.sep)
    return any(p.startswith(("pip-build-env-", "build-env-")) for p in parts)


def _import_torch():
    """The user's torch, or None for a metadata-only run (sdist) without torch; otherwise a
    missing torch or a torch from an isolated build env stops the build with a clear message."""
    try:
        import torch
    except ImportError:
        if _metadata_only():
            return None
        sys.exit("pdepth: torch is not importable in this build environment.\n" + NO_ISOLATION_HINT)
    if _in_isolated_build_env(torch.__file__) and not _flag("PDEPTH_ALLOW_ISOLATED_BUILD"):
        sys.exit(
            f"pdepth: torch was imported from an isolated build environment ({torch.__file__}): "
            "the extension would be compiled against that torch, not the one you run with.\n"
            + NO_ISOLATION_HINT
        )
    return torch


def _toolkit_candidate(torch_cuda_home):
    """(path, how it was chosen), as the README says: $CUDA_HOME, /usr/local/cuda, torch's guess."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    if os.path.isdir("/usr/local/cuda"):
        return "/usr/local/cuda", "default /usr/local/cuda"
    if torch_cuda_home:
        return torch_cuda_home, "guessed by torch from nvcc on PATH"
    return None, None


def _pip_cuda_lib_dirs():
    """lib folders of the nvidia-* wheels that a CUDA build of torch depends on."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in nvidia.__path__:
        dirs += glob.glob(os.path.join(root, "cuda_runtime", "lib")) + glob.glob(
            os.path.join(root, "cu*", "lib")
        )
    return sorted(set(dirs))


def _find_cudart(home):
    """(folder holding libcudart, file name) under the toolkit, else in the pip wheels."""
    dirs = [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    dirs += sorted(glob.glob(os.path.join(home, "targets", "*", "lib")))
    for d in dirs:
        if os.path.exists(os.path.join(d, "libcudart.so")):
            return d, "libcudart.so"
    for d in dirs + _pip_cuda_lib_dirs():
        versioned = sorted(glob.glob(os.path.join(d, "libcudart.so.*")))
        if versioned:
            return d, os.path.basename(versioned[0])
    return None, None


def _nvcc_version(nvcc):
    try:
        out = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _check_toolkit(home, torch):
    """None when the toolkit at ``home`` can build and link the CUDA kernels, else why not."""
    if not os.path.isdir(home):
        return f"{home} does not exist"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return f"no bin/nvcc in {home}"
    headers = [os.path.join(home, "include")] + glob.glob(os.path.join(home, "targets", "*", "include"))
    if not any(os.path.exists(os.path.join(d, "cuda_runtime.h")) for d in headers):
        return f"no cuda_runtime.h in {home}/include"
    if _find_cudart(home)[0] is None:
        return f"no libcudart in {home}/lib64, {home}/lib, {home}/targets/*/lib or the nvidia pip wheels"
    version = _nvcc_version(nvcc)
    if version is None:
        return f"{nvcc} --version failed"
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"nvcc in {home} is CUDA {version} but torch {torch.__version__} is built with CUDA {torch.version.cuda}"
    return None


def _choose_cuda(torch):
    """(with_cuda, reason, CUDA home or None). Sets $CUDA_HOME to the chosen toolkit so that
    torch.utils.cpp_extension (which reads it at import) uses the same one."""
    if _flag("FORCE_CPU"):
        return False, "FORCE_CPU=1", None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
    else:
        torch_guess = None
        if "torch.utils.cpp_extension" in sys.modules:
            torch_guess = sys.modules["torch.utils.cpp_extension"].CUDA_HOME
        else:
            import shutil

            nvcc = shutil.which("nvcc")
            torch_guess = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
        home, how = _toolkit_candidate(torch_guess)
        if home is None:
            why = "no CUDA toolkit found (set CUDA_HOME, or install one at /usr/local/cuda)"
        else:
            problem = _check_toolkit(home, torch)
            if problem is None:
                os.environ["CUDA_HOME"] = home
                reason = f"CUDA toolkit at {home} ({how}), torch built with CUDA {torch.version.cuda}"
                return True, reason, home
            why = f"the CUDA toolkit at {home} ({how}) is unusable: {problem}; set CUDA_HOME to a full toolkit"
    if _flag("FORCE_CUDA"):
        sys.exit(f"pdepth: FORCE_CUDA=1 but {why}")
    return False, why, None


def _cuda_include_dirs(home):
    """cuBLAS/cuSPARSE headers: a lean toolkit (nvcc only) lacks them, but the CUDA build of
    torch pulls them in as pip packages (nvidia/cu*/include)."""
    if os.path.exists(os.path.join(home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += glob.glob(os.path.join(root, "*", "include"))
    return [d for d in found if os.path.exists(os.path.join(d, "cublas_v2.h"))][:1]


def _cudart_library_dirs(home):
    """Extra -L folders so that torch's `-lcudart` resolves: none when the toolkit has
    lib64/libcudart.so; else the folder with libcudart.so, or one with a libcudart.so link to
    the versioned library (pip wheels ship only libcudart.so.N)."""
    folder, name = _find_cudart(home)
    if folder in (os.path.join(home, "lib64"), os.path.join(home, "lib")) and name == "libcudart.so":
        return []
    if name == "libcudart.so":
        return [folder]
    link_dir = os.path.join(HERE, "build", "pdepth-cudart")
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, "libcudart.so")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.join(folder, name), link)
    return [link_dir]


def _cublaslt_link_args(home):
    """Link flags for cuBLASLt (pdepth's own filter GEMM handle): -lcublasLt when the toolkit
    has libcublasLt.so, else the exact versioned file of the toolkit or of the nvidia pip
    wheel torch loads (-l:libcublasLt.so.N, with its folder as -L)."""
    dirs = [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    dirs += sorted(glob.glob(os.path.join(home, "targets", "*", "lib")))
    for d in dirs:
        if os.path.exists(os.path.join(d, "libcublasLt.so")):
            return [f"-L{d}", "-lcublasLt"]
    for d in dirs + _pip_cuda_lib_dirs():
        versioned = sorted(glob.glob(os.path.join(d, "libcublasLt.so.*")))
        if versioned:
            return [f"-L{d}", f"-l:{os.path.basename(versioned[0])}", f"-Wl,-rpath,{d}"]
    sys.exit(f"pdepth: no libcublasLt in {home} or the nvidia pip wheels; set CUDA_HOME to a full toolkit")


def _extension(torch):
    with_cuda, reason, home = _choose_cuda(torch)
    # imported only now: it reads $CUDA_HOME at import time
    from torch.utils import cpp_extension

    include_dirs, library_dirs = [], []
    sources = ["csrc/knn.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", f'-DPDEPTH_TORCH_VERSION="{torch.__version__}"']
    extra = {"cxx": cxx}
    link = ["-fopenmp"]
    if with_cuda:
        cpp_extension.CUDA_HOME = home  # in case it was imported before $CUDA_HOME was set
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        print(f"pdepth: building with CUDA ({reason}); archs: {archs}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        defines = ["-DPDEPTH_WITH_CUDA", f'-DPDEPTH_CUDA_ARCHS="{archs}"']
        extra["cxx"] = cxx + defines
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines
        ext = cpp_extension.CUDAExtension
        include_dirs = _cuda_include_dirs(home)
        library_dirs = _cudart_library_dirs(home)
        link += _cublaslt_link_args(home)
    else:
        print(f"pdepth: building CPU only ({reason})")
        ext = cpp_extension.CppExtension
    return ext(
        name="pdepth._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args=extra,
        extra_link_args=link,
    )


_torch = _import_torch()
if _torch is None:  # sdist / metadata without torch: nothing to compile
    setup()
else:
    from torch.utils.cpp_extension import BuildExtension

    _ext = _extension(_torch)
    setup(
        ext_modules=[_ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
