"""The CUDA filter formats (docs/design.md section 6.6): every format gives the bits of CUDA
fp32 on random, tied, wide, shifted, streamed and k-near-N data and with the fallback forced;
the filter never changes torch's cuBLAS math mode or TF32 flag; "auto" resolves to the
documented format. The plan tests run anywhere (knn_plan resolves for a device by name);
the rest need a card and are reported as skipped without one."""

from __future__ import annotations

import math

import pytest
import torch

import pdepth
from tests.knn_helpers import float_data, gen, int_data, with_self_matches

pytestmark = pytest.mark.skipif(
    pdepth.backend() != "extension",
    reason=f"the compiled extension is not loaded: {pdepth.build_info()}",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# What filter="auto" resolves to on CUDA: switch together with kCudaAutoFilter (csrc/knn.h)
# once a card has shown the tensor-core formats bit-identical to fp32 (issue 28).
CUDA_AUTO_FILTER = "fp32"
CUDA_FILTERS = ("tf32", "bf16", "bf16x3", "auto")


def assert_same(a, b, what=""):
    assert torch.equal(a[0], b[0]), f"{what}: distances differ"
    assert torch.equal(a[1], b[1]), f"{what}: indices differ"


def _modes(q, s, k, **kw):
    """Every CUDA format against CUDA fp32 on the same inputs; returns the fp32 result."""
    ref = pdepth.knn(q, s, k, filter="fp32", **kw)
    for f in CUDA_FILTERS:
        assert_same(pdepth.knn(q, s, k, filter=f, **kw), ref, f)
    return ref


@pytest.fixture
def fallback_always():
    pdepth._C._knn_test_hooks("", 0.0)
    yield
    pdepth._C._knn_test_hooks("", -1.0)


# ---- the plan: runs without a card -------------------------------------------------------------


def test_cuda_auto_resolves_to_the_documented_format():
    for d in (8, 512, 4096):
        plan = pdepth.knn_plan(d, device="cuda")
        assert plan["filter"] == CUDA_AUTO_FILTER, plan
    assert pdepth.knn_plan(512, dtype=torch.float64, device="cuda")["filter"] == "fp32"


@pytest.mark.parametrize("d", [64, 512, 4096, 30_000, 50_176])
def test_cuda_margins_finite_and_ordered(d):
    """Every CUDA format has a finite margin at the paper's widths (the reduction is blocked:
    the truncating tensor-core accumulation does not grow with D), tighter in the more precise
    format of each fallback step."""
    m = {f: pdepth.knn_plan(d, device="cuda", filter=f)["margin"]
         for f in ("fp32", "tf32", "bf16", "bf16x3")}
    assert all(math.isfinite(v) and 0 < v < 0.0125 for v in m.values()), m
    assert m["fp32"] < m["bf16x3"] < m["bf16"] and m["tf32"] < m["bf16"], m
    assert pdepth.knn_plan(d, device="cuda", filter="bf16")["reduce_block"] == 8192


def test_cuda_margin_covers_the_cpu_terms():
    """CUDA's margin is at least the CPU's for the same format (its accumulation may truncate)."""
    for f in ("fp32", "bf16", "bf16x3"):
        for d in (100, 2048):
            cuda = pdepth.knn_plan(d, device="cuda", filter=f)
            cpu = pdepth.knn_plan(d, filter=f)
            assert cuda["margin"] >= cpu["margin"], (f, d)
            assert cuda["threshold_growth"] <= cpu["threshold_growth"], (f, d)  # 32 lanes


# ---- on a card ---------------------------------------------------------------------------------

SHAPES = [
    # m, n, d, k: round and tile edges, D off multiples of 8/32, wide D across a reduction
    # block (8192), k near N
    (37, 1023, 1, 1),
    (64, 1025, 17, 30),
    (5, 2049, 33, 200),
    (130, 3000, 515, 25),
    (20, 1500, 4097, 10),
    (9, 700, 9000, 5),
    (40, 300, 64, 299),
]


@needs_cuda
@pytest.mark.parametrize("m,n,d,k", SHAPES)
def test_cuda_every_mode_equals_fp32_random(m, n, d, k):
    q, s = float_data(m, n, d, key=("cuda-modes",))
    _modes(q.cuda(), s.cuda(), k)


@needs_cuda
def test_cuda_every_mode_equals_fp32_self_matches_and_cpu():
    q, s = float_data(300, 5000, 515, key=("cuda-self",))
    q, si = with_self_matches(q, s, key=("cuda-self",))
    ref = _modes(q.cuda(), s.cuda(), 25, self_index=si.cuda())
    # small-integer data: every key exact, so CUDA equals the CPU bit for bit
    qi, sn = int_data(200, 3000, 40, key=("cuda-cpu",))
    assert_same(pdepth.knn(qi.cuda(), sn.cuda(), 12, filter="bf16"),
                tuple(t.cuda() for t in pdepth.knn(qi, sn, 12, filter="fp32")), "cpu")
    assert ref[1].shape == (300, 25)


@needs_cuda
def test_cuda_every_mode_equals_fp32_ties():
    q, s = int_data(150, 4000, 24, lo=-1, hi=1, key=("cuda-ties",))
    _modes(q.cuda(), s.cuda(), 40)
    dup = torch.cat([s[:100]] * 20)  # many exact duplicates: every format's worst case
    _modes(q.cuda(), dup.cuda(), 30)


@needs_cuda
def test_cuda_every_mode_equals_fp32_shifted():
    """Features far from the origin (ReLU-like): the rows are centred before the GEMM."""
    g = gen("cuda-shift")
    s = torch.relu(torch.randn(6000, 700, generator=g)) + 3.0
    q = torch.relu(torch.randn(200, 700, generator=g)) + 3.0
    _modes(q.cuda(), s.cuda(), 30)
    _modes(q.cuda().half(), s.cuda().half(), 30)
    _modes(q.cuda().bfloat16(), s.cuda().bfloat16(), 30)


@needs_cuda
def test_cuda_fallback_forced(fallback_always):
    q, s = float_data(100, 300, 300, key=("cuda-fallback",))
    # 20 near-copies of each support row: many pairs within any format's margin of the k-th
    s = torch.cat([s + 1e-3 * torch.randn(s.shape, generator=gen("cuda-fb", i))
                   for i in range(20)])
    ref = pdepth.knn(q.cuda(), s.cuda(), 20, filter="fp32")
    for f in ("tf32", "bf16", "bf16x3"):
        pdepth.knn_stats(reset=True)
        assert_same(pdepth.knn(q.cuda(), s.cuda(), 20, filter=f), ref, f)
        st = pdepth.knn_stats()
        assert st["fallback_tiles"] > 0 and st["pairs_fp32"] > 0, (f, st)


@needs_cuda
def test_cuda_stream_and_vote_every_mode():
    q, s = float_data(90, 4000, 200, key=("cuda-stream",))
    lab = torch.randint(0, 7, (4000,), generator=gen("cuda-stream-lab"))
    qc, sc, lc = q.cuda(), s.cuda(), lab.cuda()
    whole = pdepth.knn(qc, sc, 15, filter="fp32")
    vote = pdepth.knn_vote(qc, sc, lc, 15, 7, filter="fp32")
    for f in CUDA_FILTERS:
        run = pdepth.empty_topk(90, 15, device="cuda")
        for o in range(0, 4000, 777):
            run = pdepth.knn(qc, sc[o:o + 777], 15, prev=run, offset=o, filter=f)
        assert_same(run, whole, f)
        v = pdepth.knn_vote(qc, sc, lc, 15, 7, filter=f)
        assert torch.equal(v.pred, vote.pred) and torch.equal(v.index, vote.index), f


@needs_cuda
def test_cuda_geometric_rounds_count_few_candidates():
    """A fresh top-k takes rounds of about k pairs, doubling, not one round of 1024 at an
    infinite threshold: far fewer canonical keys than pairs in the first 1024 columns."""
    q, s = float_data(500, 20_000, 64, key=("cuda-rounds",))
    pdepth.knn_stats(reset=True)
    pdepth.knn(q.cuda(), s.cuda(), 10, filter="fp32")
    st = pdepth.knn_stats()
    assert 0 < st["candidates"] < 500 * 400, st


@needs_cuda
def test_cuda_auto_runs_the_documented_format():
    q, s = float_data(64, 3000, 256, key=("cuda-auto",))
    pdepth.knn_stats(reset=True)
    pdepth.knn(q.cuda(), s.cuda(), 10)
    st = pdepth.knn_stats()
    per_format = sum(st[f"pairs_{f}"] for f in ("fp32", "tf32", "bf16", "bf16x3"))
    assert per_format == st["pairs"] == 64 * 3000, st
    assert st[f"pairs_{CUDA_AUTO_FILTER}"] > 0, st


@needs_cuda
def test_cuda_filter_leaves_torch_math_mode():
    """pdepth's own cuBLASLt handle: torch's handle's math mode, its TF32 flag and the bits of
    the user's own matmuls are the same before and after every format."""
    mode = torch.ops.pdepth_testing.torch_cublas_math_mode
    q, s = float_data(50, 3000, 300, key=("mode",))
    a = torch.randn(512, 512, device="cuda")
    for allow in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = allow
        before_mode = mode()
        before = a @ a
        for f in ("tf32", "bf16", "bf16x3", "fp32"):
            pdepth.knn(q.cuda(), s.cuda(), 5, filter=f)
            assert torch.backends.cuda.matmul.allow_tf32 is allow, f
            assert mode() == before_mode, f
            assert torch.equal(a @ a, before), f
    torch.backends.cuda.matmul.allow_tf32 = False
