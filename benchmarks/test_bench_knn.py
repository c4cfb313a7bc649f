"""pytest-benchmark suite: ``pdepth.knn_vote`` against faiss-cpu, scikit-learn and plain torch
on the CPU at a moderate size (the ratio tables and targets are in ``bench_knn.py``).

    pytest benchmarks/ --benchmark-only            # a few minutes on 2 cores
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-sort=mean

Not part of the test suite (``testpaths = ["tests"]``). Each D is its own benchmark group,
so pytest-benchmark's table compares the methods (and pdepth in every CPU filter mode) side
by side. Nothing here asserts on wall time; the assertions are that every method predicts
what pdepth predicts on at least 99% of the queries (``extra_info["agreement"]``), that
every filter mode's output is bit-identical to ``filter="fp32"``'s, and that
``bench_knn.py --quick`` runs and passes its own checks.
"""

from __future__ import annotations

import functools

import _repo  # noqa: F401  (the working tree's pdepth, before `import pdepth`)
import pytest
import torch
from _baselines import (
    agreement,
    faiss_available,
    faiss_vote,
    sklearn_vote,
    torch_pipeline_vote,
    torch_vote,
)
from _data import KnnData, make_data, make_relu_data

import pdepth

pytest.importorskip("pytest_benchmark")

N, M, K, NUM_CLASSES = 10_000, 2_000, 30, 10
DIMS = (64, 512, 2048)
MATMUL_SIZE = 2048
MIN_AGREEMENT = 0.99
FILTERS = ("fp32", "bf16", "bf16x3", "auto")


@functools.cache
def _data(d: int) -> KnnData:
    return make_data(N, M, d, NUM_CLASSES, seed=d)


@functools.cache
def _pdepth_pred(d: int) -> torch.Tensor:
    data = _data(d)
    return pdepth.knn_vote(data.queries, data.support, data.labels, K, NUM_CLASSES).pred


def _pdepth(data, filter="auto"):
    return pdepth.knn_vote(data.queries, data.support, data.labels, K, NUM_CLASSES,
                           filter=filter).pred


def _pdepth_mode(filter):
    return functools.partial(_pdepth, filter=filter)


def _faiss(data):
    return faiss_vote(data.queries, data.support, data.labels, K, NUM_CLASSES)[0]


def _sklearn(data):
    return sklearn_vote(data.queries, data.support, data.labels, K)


def _torch(data):
    return torch_pipeline_vote(data.queries, data.support, data.labels, K, NUM_CLASSES)[0]


METHODS = {
    "pdepth": _pdepth,
    **{f"pdepth-{f}": _pdepth_mode(f) for f in FILTERS if f != "auto"},
    "faiss": pytest.param(
        _faiss, marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
    ),
    "sklearn": _sklearn,
    "torch": _torch,
}


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("method", list(METHODS.values()), ids=list(METHODS))
def test_knn_vote(benchmark, method, d):
    data = _data(d)
    benchmark.group = f"knn_vote N={N} Q={M} k={K} D={d}"
    benchmark.extra_info.update(
        {
            "n": N,
            "m": M,
            "d": d,
            "k": K,
            "num_classes": NUM_CLASSES,
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "gflop": 2 * M * N * d / 1e9,
        }
    )
    pred = benchmark.pedantic(method, args=(data,), rounds=3, warmup_rounds=1, iterations=1)
    agree = agreement(pred, _pdepth_pred(d))
    benchmark.extra_info["agreement"] = agree
    assert agree >= MIN_AGREEMENT


def test_matmul(benchmark):
    """The roofline: ``torch.matmul`` float32 at MATMUL_SIZE^3 (``extra_info["gflop"]``)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn((MATMUL_SIZE, MATMUL_SIZE), generator=gen)
    b = torch.randn((MATMUL_SIZE, MATMUL_SIZE), generator=gen)
    benchmark.group = "matmul float32"
    benchmark.extra_info.update({"size": MATMUL_SIZE, "gflop": 2 * MATMUL_SIZE**3 / 1e9})
    benchmark.pedantic(torch.matmul, args=(a, b), rounds=5, warmup_rounds=1, iterations=1)


def test_torch_vote_matches_pdepth_vote():
    """The baselines' vote follows pdepth's rule (largest count, ties to the lowest class)."""
    gen = torch.Generator().manual_seed(0)
    for k, classes in ((30, 10), (4, 3), (2, 100)):
        labels = torch.randint(0, classes, (5000, k), generator=gen)
        assert torch.equal(torch_vote(labels, classes), pdepth.vote(labels, classes))


@pytest.mark.parametrize("kind", ["gaussian", "relu"])
@pytest.mark.parametrize("d", DIMS)
def test_filters_bit_identical(kind, d):
    """Every CPU filter mode returns fp32's pred, dist and index, bit for bit."""
    data = _data(d) if kind == "gaussian" else make_relu_data(N, M, d, NUM_CLASSES, seed=d)
    args = (data.queries, data.support, data.labels, K, NUM_CLASSES)
    want = pdepth.knn_vote(*args, filter="fp32")
    for f in FILTERS:
        got = pdepth.knn_vote(*args, filter=f)
        assert torch.equal(got.pred, want.pred), f
        assert torch.equal(got.index, want.index), f
        assert torch.equal(got.dist.view(torch.int32), want.dist.view(torch.int32)), f


def test_bench_knn_quick(tmp_path):
    """``bench_knn.py --quick`` (main and paper suites, no memory runs) exits 0: every mode
    bit-identical to fp32 and the baselines agree."""
    import bench_knn

    out = tmp_path / "quick.json"
    argv = ["--quick", "--no-memory", "--suites", "main,paper", "--json", str(out)]
    assert bench_knn.main(argv) == 0
    assert out.exists()
    assert bench_knn.main(["--from-json", str(out)]) == 0
