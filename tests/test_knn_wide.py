"""The wide-row path of the CPU k-NN op (D >= 8192, docs/design.md 6.5): the cross terms of a
query chunk against the whole support set first, thresholds from all of them, canonical keys
for the pairs under them. Its oracle is the op with every pair a candidate (the exhaustive
test hook: canonical keys for all pairs, no threshold involved), so a threshold that cut a
true neighbour shows as a difference in the bits; chunks, streaming, self matches, skip,
float64, shifted and unshifted rows and every filter format are covered."""

from __future__ import annotations

import os

import pytest
import torch

import pdepth
from tests.knn_helpers import float_data, gen, int_data, with_self_matches

pytestmark = pytest.mark.skipif(
    pdepth.backend() != "extension",
    reason=f"the compiled extension is not loaded: {pdepth.build_info()}",
)

FILTERS = ("fp32", "bf16", "bf16x3", "auto")


@pytest.fixture(autouse=True)
def _reset_hooks():
    yield
    pdepth._C._knn_test_hooks()
    pdepth._C._knn_low_chunk(True, 0)


@pytest.fixture
def two_threads():
    """Two threads, so that a support set of 1,025+ rows gives the bf16 formats' chunk GEMM
    (low_chunk_dot) its two units per thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def exhaustive(fn):
    """fn() with every pair a candidate."""
    pdepth._C._knn_test_hooks(exhaustive=True)
    try:
        return fn()
    finally:
        pdepth._C._knn_test_hooks()


def check(fn, *, chunk_rows=0):
    """fn(filter) in every format, with `chunk_rows` per chunk, against the exhaustive run."""
    want = exhaustive(lambda: fn("fp32"))
    for f in FILTERS:
        pdepth._C._knn_test_hooks(wide_chunk_rows=chunk_rows)
        got = fn(f)
        assert torch.equal(got[0], want[0]), f"filter={f}: distances differ"
        assert torch.equal(got[1], want[1]), f"filter={f}: indices differ"


def relu_like(m, n, d, key):
    """Sparse non-negative rows far from the origin: the path that shifts by the mean (the
    coarse formats; fp32 reads wide rows unshifted)."""
    g = gen("relu", m, n, d, *key)
    centers = torch.randn(8, d, generator=g)
    rows = centers[torch.randint(0, 8, (m + n,), generator=g)]
    x = torch.relu(rows + 0.3 * torch.randn(m + n, d, generator=g) + 0.5)
    return x[:m], x[m:]


@pytest.mark.parametrize("d", [8192, 8200, 9001])
@pytest.mark.parametrize("kind", ["gaussian", "relu"])
def test_matches_exhaustive(d, kind):
    if kind == "gaussian":
        q, s = float_data(37, 900, d, key=("wide", d))
    else:
        q, s = relu_like(37, 900, d, ("wide",))
    check(lambda f: pdepth.knn(q, s, 12, filter=f))


def test_small_support_two_passes():
    """D = 2048 with a support set that fits in the cache takes the two passes too."""
    q, s = relu_like(40, 700, 2048, ("cached",))
    q, si = with_self_matches(q, s, key=("cached",))
    check(lambda f: pdepth.knn(q, s, 10, self_index=si, filter=f), chunk_rows=9)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
@pytest.mark.slow
def test_chunks_self_matches_and_ties(chunk_rows):
    """Integer rows (exact ties everywhere), self matches excluded, small chunks."""
    q, s = int_data(50, 700, 8200, lo=-1, hi=1, key=("wide-ties",))
    q, si = with_self_matches(q, s, key=("wide-ties",))
    check(lambda f: pdepth.knn(q, s, 15, self_index=si, filter=f), chunk_rows=chunk_rows)
    check(lambda f: pdepth.knn(q, s, 15, self_index=si, self_match="include", filter=f),
          chunk_rows=chunk_rows)


def test_drop_nearest():
    q, s = relu_like(30, 600, 8192, ("drop",))
    check(lambda f: pdepth.knn(q, s, 9, self_match="drop_nearest", filter=f), chunk_rows=8)


def test_streaming_with_prev_and_offset():
    """Support chunks streamed with prev= and offset=: rows whose heap is full from earlier
    chunks take their threshold from both the heap and this chunk's own GEMM keys."""
    q, s = float_data(40, 1500, 8192, key=("wide-stream",))
    q, si = with_self_matches(q, s, key=("wide-stream",))

    def run(f):
        top = pdepth.empty_topk(q.shape[0], 11, dtype=torch.float32)
        for lo, hi in [(0, 500), (500, 520), (520, 1500)]:
            top = pdepth.knn(q, s[lo:hi], 11, self_index=si, prev=top, offset=lo, filter=f)
        return top

    check(run, chunk_rows=16)
    # and the same bits as one call
    one = pdepth.knn(q, s, 11, self_index=si, filter="fp32")
    streamed = run("auto")
    assert torch.equal(one[0], streamed[0]) and torch.equal(one[1], streamed[1])


def test_float64():
    q, s = float_data(20, 500, 8192, dtype=torch.float64, key=("wide64",))
    check(lambda f: pdepth.knn(q, s, 10, filter=f if f in ("fp32", "auto") else "fp32"),
          chunk_rows=6)


def test_fewer_support_rows_than_k():
    q, s = float_data(9, 25, 8192, key=("wide-small",))
    check(lambda f: pdepth.knn(q, s, 25, self_match="include", filter=f))


@pytest.mark.parametrize("kind", ["gaussian", "relu"])
def test_candidates_near_k(kind):
    """With thresholds from all N GEMM keys, the canonical step computes few more keys than k
    per query (fp32 about k + a few). ReLU-like rows sit far from the origin, where fp32
    reads them unshifted (design.md 6.5, the shift): its margin stays far below their k-th
    distances, in the general and the symmetric op alike."""
    if kind == "gaussian":
        q, s = float_data(64, 3000, 8192, key=("wide-cand",))
    else:
        q, s = relu_like(64, 3000, 8192, ("wide-cand",))
    pdepth.knn_stats(reset=True)
    pdepth.knn(q, s, 20, filter="fp32")
    st = pdepth.knn_stats()
    assert st["seeded_rows"] == 64
    assert st["candidates"] <= 64 * 2 * 20, st
    pdepth.knn_stats(reset=True)
    pdepth.ops.knn_sym(s[:600], 20, filter="fp32")
    assert pdepth.knn_stats()["candidates"] <= 600 * 2 * 20


def test_keys_of_the_best_pairs_first():
    """The two stages of the wide path's keys: the kk pairs of smallest upper bound first,
    then the rest under the k-th of those canonical keys rather than under the kk-th upper
    bound. On ReLU-like rows the one-stage window (2 m (|a|^2 + |b|^2) wide) let 29 keys per
    query through in fp32 (k = 20); two stages 24. Same bits in every format."""
    q, s = relu_like(64, 3000, 8192, ("wide-cand",))
    want = pdepth.knn(q, s, 20, filter="fp32")
    for f in ("fp32", "bf16"):
        pdepth.knn_stats(reset=True)
        got = pdepth.knn(q, s, 20, filter=f)
        assert pdepth.knn_stats()["candidates"] <= 64 * 26, (f, pdepth.knn_stats())
        assert torch.equal(got.dist, want.dist) and torch.equal(got.index, want.index)


def test_exhaustive_hook_computes_every_pair():
    """The oracle above is only an oracle if the hook really computes every pair."""
    q, s = float_data(10, 300, 8192, key=("wide-hook",))
    pdepth.knn_stats(reset=True)
    exhaustive(lambda: pdepth.knn(q, s, 5, filter="fp32"))
    assert pdepth.knn_stats()["candidates"] == 10 * 300


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_holds_no_copy_of_the_queries():
    """The op's working memory on wide rows is its chunk of cross terms, not a copy of the
    query block (the embedding store sizes its query blocks on it, docs/design.md section
    12). Regression: the queries' mean through ATen's sum(dtype=double), which on CPU cast the
    whole block to double first (twice its bytes)."""
    from pdepth.protocol.stages import stage

    g = gen("wide-memory")
    q = torch.rand(8000, 8192, generator=g)  # 250 MiB, non-negative: the mean shift is taken
    s = torch.rand(1000, 8192, generator=g)
    pdepth.knn(q[:64], s, 5)  # threads and their scratch exist before the measurement
    rss = _status_bytes("VmRSS")
    with stage({}) as rec:
        pdepth.knn(q, s, 5)
    extra = rec["peak_rss_bytes"] - rss
    assert extra < q.numel() * q.element_size() // 2, (extra, q.numel() * q.element_size())


@pytest.mark.parametrize("piece_rows", [0, 1, 13])
@pytest.mark.parametrize("kind", ["gaussian", "relu"])
@pytest.mark.slow
def test_low_chunk_path(kind, piece_rows, two_threads):
    """The bf16 formats' chunk GEMM that converts each side once per query piece
    (low_chunk_dot, 512-row support units: 2,100 rows give 5, the last one partial; D = 8200
    ends in a partial reduction block; query pieces of 1, 13 and the default rows): the
    exhaustive result in every format, self matches excluded, and the cross terms of the
    per-piece path (centred_dot) to the bit, seen as the same candidates and seeds. The
    fallback is off, so that Gaussian rows (which bf16 lets through by the hundred) keep the
    format too."""
    if kind == "gaussian":
        q, s = float_data(40, 2100, 8200, key=("low", piece_rows))
    else:
        q, s = relu_like(40, 2100, 8200, ("low", piece_rows))
    q, si = with_self_matches(q, s, key=("low",))

    def run(f):  # a budget that never falls back: every chunk in the requested format
        pdepth._C._knn_test_hooks(fallback_budget=2.0, wide_chunk_rows=17)
        pdepth._C._knn_low_chunk(True, piece_rows)
        return pdepth.knn(q, s, 12, self_index=si, filter=f)

    check(run)
    pdepth._C._knn_test_hooks(fallback_budget=2.0)
    for f in ("bf16", "bf16x3"):
        pdepth.knn_stats(reset=True)
        pdepth._C._knn_low_chunk(True, piece_rows)
        got = pdepth.knn(q, s, 12, self_index=si, filter=f)
        low = pdepth.knn_stats(reset=True)
        pdepth._C._knn_low_chunk(False, 0)
        want = pdepth.knn(q, s, 12, self_index=si, filter=f)
        per_piece = pdepth.knn_stats(reset=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert low[f"pairs_{f}"] > 0, low  # the format ran, so the low path did
        if pdepth.build_info()["bf16_gemm"] == "avx512_bf16 kernel":
            # the kernel's sums do not depend on the block shape (gemm_bf16.h): same bits
            keys = ("candidates", "seeded_rows", "fallback_tiles", f"pairs_{f}")
            assert {k: low[k] for k in keys} == {k: per_piece[k] for k in keys}


@pytest.mark.parametrize("d", [64, 8192])
def test_stats_time_split(d):
    """knn_stats() reports the time of each phase of the kernel (ns_*), on both paths."""
    q, s = relu_like(20, 600, d, ("split",))
    pdepth.knn_stats(reset=True)
    pdepth.knn(q, s, 5, filter="bf16")
    st = pdepth.knn_stats(reset=True)
    for phase in ("gemm", "norms", "seeds", "keys", "select"):
        assert st[f"ns_{phase}"] > 0, (phase, st)
    assert pdepth.knn_stats()["ns_gemm"] == 0  # reset


@pytest.mark.parametrize("f", ["fp32", "bf16"])
def test_stats_time_split_symmetric(f):
    """The symmetric op reports the same phases (its shifted norms: bf16 only)."""
    x, _ = relu_like(600, 0, 8192, ("split-sym",))
    pdepth.knn_stats(reset=True)
    pdepth.ops.knn_sym(x, 5, filter=f)
    st = pdepth.knn_stats(reset=True)
    for phase in ("gemm", "seeds", "keys", "select") + (("norms",) if f == "bf16" else ()):
        assert st[f"ns_{phase}"] > 0, (phase, st)
