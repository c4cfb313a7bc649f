"""Fixtures shared by the pdepth tests.

``device`` parametrizes a test over CPU and CUDA; the CUDA case is reported as skipped (with
the reason) where ``torch.cuda.is_available()`` is false, as docs/design.md section 3 asks.
"""

from __future__ import annotations

import pytest
import torch

CUDA_SKIP_REASON = "no CUDA device: torch.cuda.is_available() is False"

DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON),
        ],
    ),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> torch.device:
    """The device a parity test runs on: "cpu" always, "cuda" when a GPU is visible."""
    return torch.device(request.param)


@pytest.fixture
def restore_num_threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    saved = torch.get_num_threads()
    yield saved
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished real run (Fashion-MNIST, run_helpers.TINY settings), shared read-only by
    the protocol and report tests: they change copies (run_helpers.copy_run)."""
    from run_helpers import FMNIST_MISSING, HAVE_FMNIST, TINY

    from pdepth.cli import main

    if not HAVE_FMNIST:
        pytest.skip(FMNIST_MISSING)
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["run", *TINY, "--out", str(out)]) == 0
    return out
