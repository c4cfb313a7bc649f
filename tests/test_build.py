"""The extension is the backend in use, and a visible GPU implies a CUDA build."""

from __future__ import annotations

import pytest
import torch

import pdepth


def test_backend_is_extension():
    assert pdepth.backend() == "extension", pdepth.build_info()
    assert pdepth.backend("cpu") == "extension"
    assert pdepth.backend(torch.device("cpu")) == "extension"


def test_build_info_fields():
    info = pdepth.build_info()
    assert info["backend"] == "extension"
    assert isinstance(info["with_cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_archs"], str)
    # the extension must have been built against the torch it runs with
    assert info["torch_version"] == torch.__version__, (info["torch_version"], torch.__version__)
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] == ""


def test_cuda_backend_matches_build():
    expected = "extension" if pdepth.build_info().get("with_cuda") else "reference"
    assert pdepth.backend("cuda") == expected


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)
def test_cuda_build_when_gpu_visible():
    """A GPU is visible, so the CUDA kernels must be compiled in (else CUDA tensors would
    silently fall back to the slow reference)."""
    info = pdepth.build_info()
    assert info.get("with_cuda") is True, f"GPU visible but no CUDA kernels built: {info}"
    assert pdepth.backend("cuda") == "extension"
    archs = info.get("cuda_archs", "")
    if archs and archs != "native":  # "native": built for the build machine's own GPU
        major, minor = torch.cuda.get_device_capability()
        listed = archs.replace("sm_", "").replace(".", "").replace("+PTX", "")
        assert f"{major}{minor}" in listed, (
            f"device capability {major}.{minor} is not among the built archs {archs!r}"
        )
