"""Loading the compiled extension ``pdepth._C`` (which registers ``torch.ops.pdepth.*``): what
it was built with (:func:`build_info`), which implementation serves a device
(:func:`backend`), and, when it cannot be loaded, why and what to do, in words."""

from __future__ import annotations

import glob
import os
import sys

import torch

__all__ = ["backend", "build_info"]


def _installed_extension_elsewhere(pkg_dir, search_path=None):
    """The compiled ``pdepth/_C*.so`` of another pdepth on ``search_path`` (default
    ``sys.path``, plus where the installed distribution's files are), or None."""
    here = os.path.realpath(pkg_dir)
    found = []
    for entry in sys.path if search_path is None else search_path:
        found += glob.glob(os.path.join(entry or os.getcwd(), "pdepth", "_C*.so"))
    if search_path is None:
        try:
            from importlib.metadata import PackageNotFoundError, distribution

            dist = distribution("pdepth")
            files = dist.files or []
            found += [str(dist.locate_file(f)) for f in files if f.name.startswith("_C")]
        except (PackageNotFoundError, OSError):
            pass
    for so in found:
        if os.path.isfile(so) and os.path.dirname(os.path.realpath(so)) != here:
            return so
    return None


def _load_failure_message(exc, pkg_dir=None, search_path=None):
    """Why ``from . import _C`` failed, and what to do, in words (the bare ImportError of a
    missing submodule talks of 'a circular import')."""
    pkg_dir = pkg_dir or os.path.dirname(os.path.abspath(__file__))
    built = glob.glob(os.path.join(pkg_dir, "_C*.so"))
    if built:
        return (
            f"{built[0]} failed to load ({type(exc).__name__}: {exc}); it was probably built "
            f"against another torch than the running {torch.__version__}: rebuild it with "
            "`pip install --no-build-isolation .` (or `-e .` for a checkout)"
        )
    root = os.path.dirname(pkg_dir)
    source_tree = os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(
        os.path.join(root, "csrc")
    )
    if source_tree:
        installed = _installed_extension_elsewhere(pkg_dir, search_path)
        if installed:
            why = "it is the current directory" if root == os.getcwd() else "see sys.path"
            return (
                f"pdepth was imported from the source tree {pkg_dir}, which has no built "
                f"extension, and it shadows the installed pdepth (with {installed}) because "
                f"the source tree comes first on sys.path ({why}); run from outside the "
                "source tree, or build in place with `pip install --no-build-isolation -e .`"
            )
        return (
            f"no compiled pdepth/_C*.so in the source tree {pkg_dir}: build it with "
            "`pip install --no-build-isolation -e .` (or `make build`)"
        )
    return (
        f"no compiled pdepth/_C*.so in {pkg_dir}: reinstall with "
        "`pip install --no-build-isolation .` (see the README, Install)"
    )


try:
    from . import _C  # noqa: F401  (registers torch.ops.pdepth.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _LOAD_ERROR = ImportError(_load_failure_message(exc))
    _LOAD_ERROR.__cause__ = exc


def build_info() -> dict:
    """What the extension was built with: torch and CUDA versions, CUDA archs, OpenMP, and
    what the CPU offers the k-NN filter (``avx512_bf16``, ``amx_bf16``, the ``bf16_gemm``
    backend; :func:`pdepth.knn_plan` says which filter ``"auto"`` picks for a width).

    Returns ``{"backend": "reference", "error": ...}`` when the extension is not loaded."""
    if _C is None:
        return {"backend": "reference", "error": str(_LOAD_ERROR)}
    return {"backend": "extension", **_C.build_info()}


def backend(device: torch.device | str | None = None) -> str:
    """``"extension"`` when the compiled ops serve ``device`` (default CPU), else
    ``"reference"`` (the pure-torch fallback)."""
    device = torch.device(device or "cpu")
    if _C is None:
        return "reference"
    if device.type == "cuda" and not _C.build_info()["with_cuda"]:
        return "reference"
    return "extension"
