"""Parity tests of the k-NN op (pdepth.knn) against the float64 oracle (pdepth.reference),
following the rules of docs/design.md section 2.

Sizes straddle the kernels' tiles: CPU query block 128, support tile 1024, scan width 16;
CUDA query blocks / support tiles up to 4096 / 16384 and candidate rounds of 1024.
Every parity test runs on CPU and (when a GPU is visible) CUDA; on CUDA the result is also
compared with the CPU op (exactly, on integer-valued inputs).
"""

from __future__ import annotations

import pytest
import torch
from knn_helpers import (
    assert_same_topk,
    check_close_to_reference,
    check_exact_reference,
    check_structure,
    compute_dtype,
    first_difference,
    float_data,
    gen,
    int_data,
    separated_rows,
    usable_k,
    with_self_matches,
)

import pdepth
from pdepth import reference

# The CUDA kernel keeps at most this many neighbours (k plus a dropped nearest).
CUDA_MAX_K = 1024

POLICIES = ("exclude", "include", "drop_nearest")

# (M, N, D, k): M around the query block, N around the scan width and the support tiles,
# k from 1 to N.
FLOAT_CASES = [
    (1, 1, 1, 1),
    (1, 15, 3, 5),
    (127, 16, 17, 16),
    (128, 17, 1, 5),
    (129, 17, 100, 17),
    (5, 256, 17, 256),
    (129, 1023, 64, 30),
    (300, 1024, 17, 30),
    (128, 1025, 100, 5),
    (127, 1025, 1, 30),
    (129, 2049, 3, 256),
    (1, 2049, 64, 1),
    (300, 2049, 100, 1),
    (300, 300, 17, 299),
    (3, 4097, 5, 30),
    (2, 16385, 3, 5),
    (4097, 1025, 3, 5),
]

INT_CASES = [
    (1, 16, 1, 15),
    (127, 15, 3, 15),
    (128, 1024, 64, 5),
    (129, 17, 100, 1),
    (129, 2049, 17, 30),
    (300, 1025, 3, 256),
    (5, 1023, 5, 1022),
    (2, 16385, 2, 30),
]


def _case_id(case):
    return "M{}-N{}-D{}-k{}".format(*case)


def _self_setup(q, s, policy, k, key):
    """Queries / self indices / k for a policy: under "exclude" some queries are copies of a
    support row with that row as their self index (so excluding it matters)."""
    q, si = with_self_matches(q, s, key=key)
    k = usable_k(k, s.shape[0], policy, si)
    if k < 1:  # N == 1 under "exclude": no self match possible
        si = torch.full_like(si, -1)
        k = 1
    return q, si, k


# --------------------------------------------------------------------------------------
# 2. random float data vs the oracle (within the documented tolerance)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["include", "exclude"])
@pytest.mark.parametrize("case", FLOAT_CASES, ids=_case_id)
def test_random_float32_matches_reference(device, case, policy):
    m, n, d, k = case
    q, s = float_data(m, n, d, key=(policy,))
    q, si, k = _self_setup(q, s, policy, k, key=case)
    out = pdepth.knn(q.to(device), s.to(device), k, self_index=si.to(device), self_match=policy)
    check_structure(out, m, n, k, dist_dtype=torch.float32, device=device,
                    self_index=si if policy == "exclude" else None)
    rd, ri, tol = check_close_to_reference(out, q, s, k, self_index=si, self_match=policy)
    if device.type == "cuda":
        # Exact CPU/CUDA agreement is only promised for exactly representable distances
        # (test_integer_data_exact); here: the same neighbours wherever there are no near
        # ties, and distances within the tolerance of each other.
        c = pdepth.knn(q, s, k, self_index=si, self_match=policy)
        same_set = (c.index.sort(1).values == ri.sort(1).values).all(1)
        rows = separated_rows(rd, tol) & same_set
        assert torch.equal(out.index.cpu()[rows], c.index[rows])
        assert bool(((out.dist.cpu().double() - c.dist.double()).abs() <= 2 * tol).all())


@pytest.mark.parametrize(
    "case", [(1, 15, 3, 5), (129, 1025, 17, 30), (300, 2049, 64, 256), (128, 16, 100, 16)],
    ids=_case_id,
)
@pytest.mark.parametrize("policy", ["include", "exclude"])
def test_random_float64_matches_reference(device, case, policy):
    m, n, d, k = case
    q, s = float_data(m, n, d, dtype=torch.float64, key=("f64", policy))
    q, si, k = _self_setup(q, s, policy, k, key=case)
    out = pdepth.knn(q.to(device), s.to(device), k, self_index=si.to(device), self_match=policy)
    check_structure(out, m, n, k, dist_dtype=torch.float64, device=device,
                    self_index=si if policy == "exclude" else None)
    rd, ri, _ = check_close_to_reference(out, q, s, k, self_index=si, self_match=policy)
    # Random normal data has no distances within float64 tolerance of each other, so the
    # neighbour lists must be exactly the oracle's.
    assert torch.equal(out.index.cpu(), ri)


@pytest.mark.parametrize("case", [(129, 1025, 17, 30), (300, 2049, 3, 5), (5, 17, 64, 16)],
                         ids=_case_id)
def test_drop_nearest_is_include_k_plus_1_minus_first(device, case):
    """drop_nearest = take k+1 (self included) and drop the first: bit-identical."""
    m, n, d, k = case
    q, s = float_data(m, n, d, key=("drop",))
    q, si = with_self_matches(q, s, key=case)
    q, s = q.to(device), s.to(device)
    # self_index is ignored under drop_nearest
    got = pdepth.knn(q, s, k, self_index=si.to(device), self_match="drop_nearest")
    full = pdepth.knn(q, s, k + 1, self_match="include")
    check_structure(got, m, n, k, dist_dtype=torch.float32, device=device)
    assert_same_topk(got, (full.dist[:, 1:], full.index[:, 1:]), what="drop_nearest")


# --------------------------------------------------------------------------------------
# 3. exactness on integer-valued inputs; ties
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", INT_CASES, ids=_case_id)
def test_integer_data_exact(device, case, policy):
    m, n, d, k = case
    q, s = int_data(m, n, d, key=(policy,))
    q, si, k = _self_setup(q, s, policy, k, key=case)
    out = pdepth.knn(q.to(device), s.to(device), k, self_index=si.to(device), self_match=policy)
    check_structure(out, m, n, k, dist_dtype=torch.float32, device=device,
                    self_index=si if policy == "exclude" else None)
    check_exact_reference(out, q, s, k, self_index=si, self_match=policy)
    if device.type == "cuda":
        assert_same_topk(out, pdepth.knn(q, s, k, self_index=si, self_match=policy),
                         what="CUDA vs CPU")


@pytest.mark.parametrize("policy", POLICIES)
def test_integer_data_exact_float64(device, policy):
    q, s = int_data(129, 1025, 17, dtype=torch.float64, lo=-50, hi=50)
    q, si, k = _self_setup(q, s, policy, 30, key="f64int")
    out = pdepth.knn(q.to(device), s.to(device), k, self_index=si.to(device), self_match=policy)
    assert out.dist.dtype == torch.float64
    check_exact_reference(out, q, s, k, self_index=si, self_match=policy)


def test_duplicate_support_rows_lower_index_wins(device):
    """Copies of the query at indices straddling the scan width and support tiles."""
    n, d = 2049, 4
    s = torch.full((n, d), 5.0)
    dup = [3, 15, 16, 1023, 1024, 1040, 2048]
    s[dup] = 0.0
    q = torch.zeros(2, d)
    s, q = s.to(device), q.to(device)
    out = pdepth.knn(q, s, 7, self_match="include")
    assert out.index.cpu().tolist() == [dup, dup]
    assert out.dist.cpu().tolist() == [[0.0] * 7] * 2
    out = pdepth.knn(q, s, 9, self_match="include")
    assert out.index.cpu().tolist() == [dup + [0, 1]] * 2
    assert out.dist.cpu().tolist() == [[0.0] * 7 + [100.0] * 2] * 2
    out = pdepth.knn(q, s, 3, self_index=torch.tensor([1023, 3], device=device))
    assert out.index.cpu().tolist() == [[3, 15, 16], [15, 16, 1023]]
    out = pdepth.knn(q, s, 3, self_match="drop_nearest")
    assert out.index.cpu().tolist() == [[15, 16, 1023]] * 2


def test_equidistant_points_lower_index_wins(device):
    """Points on a sphere around the query (different positions, equal distance)."""
    d = 3
    g = gen("equidistant")
    n = 70
    s = torch.full((n, d), 7.0) + torch.randint(0, 3, (n, d), generator=g)
    pos = torch.randperm(n, generator=g)[:7].tolist()
    ring = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
    for p, v in zip(pos[:6], ring, strict=True):
        s[p] = torch.tensor(v, dtype=torch.float32)
    s[pos[6]] = torch.tensor([1.0, 1.0, 0.0])  # distance 2
    q = torch.zeros(1, d)
    out = pdepth.knn(q.to(device), s.to(device), 7, self_match="include")
    assert out.index.cpu().tolist() == [sorted(pos[:6]) + [pos[6]]]
    assert out.dist.cpu().tolist() == [[1.0] * 6 + [2.0]]
    out = pdepth.knn(q.to(device), s.to(device), 4, self_match="include")
    assert out.index.cpu().tolist() == [sorted(pos[:6])[:4]]


def test_duplicate_float_rows_lower_index_wins(device):
    """Bit-identical (non-integer) support rows have exactly equal distances to any query,
    so they must come back in index order, wherever they sit in the support tiles."""
    g = gen("float-dup")
    n, d = 2049, 17
    s = 3 * torch.randn(n, d, generator=g)
    p = torch.randn(d, generator=g)
    dup = [3, 15, 16, 1023, 1024, 1040, 2048]
    s[dup] = p
    q = p[None] + 0.5 * torch.randn(200, d, generator=g)
    out = pdepth.knn(q.to(device), s.to(device), len(dup), self_match="include")
    idx, dist = out.index.cpu(), out.dist.cpu()
    assert bool((idx.sort(1).values == torch.tensor(dup)).all()), "not the duplicates"
    bad = (dist != dist[:, :1]).any(1) | (idx != torch.tensor(dup)).any(1)
    r = int(bad.nonzero()[0, 0]) if bad.any() else 0
    ok = not bool(bad.any())
    assert ok, (
        f"{int(bad.sum())} of 200 rows: identical support rows got different distances or "
        f"order; row {r}: index {idx[r].tolist()} dist {dist[r].tolist()}"
    )


@pytest.mark.parametrize("k", [1, 16, 17, 256, 1025])
def test_all_support_equal(device, k):
    """Every distance ties: the neighbours are the k lowest indices, minus the self match."""
    n = 2049
    s = torch.ones(n, 5, device=device)
    q = torch.ones(3, 5, device=device)
    if device == "cuda" and k > CUDA_MAX_K:
        with pytest.raises(ValueError, match="supports k up to 1024"):
            pdepth.knn(q, s, k, self_match="include")
        return
    out = pdepth.knn(q, s, k, self_match="include")
    assert torch.equal(out.index.cpu(), torch.arange(k).expand(3, k))
    assert bool((out.dist == 0).all())
    si = torch.tensor([0, min(k - 1, 7), -1], device=device)
    out = pdepth.knn(q, s, k, self_index=si)
    for r in range(3):
        exp = [j for j in range(k + 1) if j != int(si[r])][:k]
        assert out.index[r].cpu().tolist() == exp


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1025])
def test_k_equals_n_and_n_minus_1(device, n):
    if device == "cuda" and n > CUDA_MAX_K:
        pytest.skip(f"the CUDA kernel keeps at most {CUDA_MAX_K} neighbours")
    q, s = int_data(129, n, 3, key=("kN",))
    qd, sd = q.to(device), s.to(device)
    out = pdepth.knn(qd, sd, n, self_match="include")
    check_exact_reference(out, q, s, n, self_match="include")
    assert torch.equal(out.index.cpu().sort(1).values, torch.arange(n).expand(129, n))
    out = pdepth.knn(qd, sd, 1, self_match="include")
    check_exact_reference(out, q, s, 1, self_match="include")
    if n > 1:
        q2, si = with_self_matches(q, s, frac=1.0, key=("kN", n))
        out = pdepth.knn(q2.to(device), sd, n - 1, self_index=si.to(device))
        check_exact_reference(out, q2, s, n - 1, self_index=si)
        exp = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, n)]) for i in si])
        assert torch.equal(out.index.cpu().sort(1).values, exp)
        out = pdepth.knn(q2.to(device), sd, n - 1, self_match="drop_nearest")
        check_exact_reference(out, q2, s, n - 1, self_match="drop_nearest")


def test_exclude_without_self_index_is_include(device):
    q, s = int_data(50, 40, 3, key=("noself",))
    q, s = q.to(device), s.to(device)
    assert_same_topk(pdepth.knn(q, s, 40), pdepth.knn(q, s, 40, self_match="include"))
    minus1 = torch.full((50,), -1, dtype=torch.int64, device=device)
    assert_same_topk(pdepth.knn(q, s, 40, self_index=minus1),
                     pdepth.knn(q, s, 40, self_match="include"))


# --------------------------------------------------------------------------------------
# 4. streaming: chunks merged with prev / offset equal one call
# --------------------------------------------------------------------------------------


def _stream(q, s, k, chunk, *, start="empty", order=None, **kw):
    """Feeds support chunks of ``chunk`` rows (in ``order`` of chunk starts) to pdepth.knn.

    start="empty": begin from empty_topk; start="none": first chunk with prev=None."""
    n = s.shape[0]
    starts = list(range(0, n, chunk)) if order is None else order
    prev = None
    if start == "empty":
        prev = pdepth.empty_topk(q.shape[0], k, compute_dtype(q.dtype), q.device)
    for o in starts:
        prev = pdepth.knn(q, s[o:o + chunk], k, prev=prev, offset=o, **kw)
    return prev


STREAM_CHUNKS = [1, 7, 29, 30, 31, 64, 1000, 1024, 1025]


@pytest.mark.parametrize("chunk", STREAM_CHUNKS)
@pytest.mark.parametrize("policy", ["include", "exclude"])
def test_streaming_integer_data_exact(device, chunk, policy):
    m, n, d, k = 129, 2049, 5, 30
    q, s = int_data(m, n, d, key=("stream",))
    q, si = with_self_matches(q, s, key=("stream", chunk))  # self indices in every chunk
    kw = {"self_index": si.to(device), "self_match": policy}
    qd, sd = q.to(device), s.to(device)
    one = pdepth.knn(qd, sd, k, **kw)
    got = _stream(qd, sd, k, chunk, **kw)
    assert_same_topk(got, one, what=f"stream chunk={chunk}")
    check_exact_reference(got, q, s, k, self_index=si, self_match=policy)
    if chunk >= k and policy == "include":
        got = _stream(qd, sd, k, chunk, start="none", **kw)
        assert_same_topk(got, one, what=f"stream chunk={chunk} prev=None")


@pytest.mark.parametrize("chunk", [31, 100, 1024])
def test_streaming_exclude_first_chunk_prev_none(device, chunk):
    """Starting with prev=None under "exclude": the first call is checked like a single
    call, so self indices beyond its chunk must be passed as -1 there (they cannot match
    it anyway); later calls take the global self indices. The result equals one call."""
    m, n, d, k = 129, 2049, 5, 30
    q, s = int_data(m, n, d, key=("stream-none",))
    q, si = with_self_matches(q, s, key=("stream-none", chunk))
    qd, sd, sid = q.to(device), s.to(device), si.to(device)
    one = pdepth.knn(qd, sd, k, self_index=sid)
    if bool((si >= chunk).any()):
        with pytest.raises(ValueError, match="self_index value .* out of range"):
            pdepth.knn(qd, sd[:chunk], k, self_index=sid)
    first = torch.where(sid < chunk, sid, torch.full_like(sid, -1))
    prev = pdepth.knn(qd, sd[:chunk], k, self_index=first)
    for o in range(chunk, n, chunk):
        prev = pdepth.knn(qd, sd[o:o + chunk], k, self_index=sid, prev=prev, offset=o)
    assert_same_topk(prev, one, what="prev=None start")


@pytest.mark.parametrize("policy", ["include", "exclude"])
def test_streaming_chunks_in_any_order(device, policy):
    """Merging is by (distance, index), so the chunk order does not matter (ties included)."""
    m, n, d, k = 40, 300, 2, 50
    q, s = int_data(m, n, d, lo=-1, hi=1, key=("order",))
    q, si = with_self_matches(q, s, key=("order",))
    kw = {"self_index": si.to(device), "self_match": policy}
    qd, sd = q.to(device), s.to(device)
    one = pdepth.knn(qd, sd, k, **kw)
    starts = list(range(0, n, 37))
    for order in (starts[::-1], starts[1::2] + starts[0::2]):
        assert_same_topk(_stream(qd, sd, k, 37, order=order, **kw), one, what=str(order))


def test_streaming_fewer_than_k_points(device):
    """A stream with fewer than k points in total keeps empty slots (inf, -1) at the end."""
    q, s = int_data(20, 12, 3, key=("short",))
    qd, sd = q.to(device), s.to(device)
    prev = pdepth.empty_topk(20, 16, device=device)
    assert bool(torch.isinf(prev.dist).all()) and bool((prev.index == -1).all())
    assert prev.dist.dtype == torch.float32 and prev.index.dtype == torch.int64
    got = _stream(qd, sd, 16, 5, self_match="include")
    check_structure(got, 20, 12, 16, dist_dtype=torch.float32, device=device, allow_empty=True)
    assert bool((got.index[:, 12:] == -1).all()) and bool(torch.isinf(got.dist[:, 12:]).all())
    one = pdepth.knn(qd, sd, 12, self_match="include")
    assert_same_topk((got.dist[:, :12], got.index[:, :12]), one)
    exp = reference.knn(q, s, 16, self_match="include", prev=pdepth.empty_topk(20, 16))
    assert_same_topk(got, exp, compare_dtype=False)


def test_streaming_empty_chunk_keeps_prev(device):
    q, s = float_data(10, 40, 3, key=("emptychunk",))
    qd, sd = q.to(device), s.to(device)
    prev = pdepth.knn(qd, sd, 5, self_match="include")
    got = pdepth.knn(qd, sd[:0], 5, self_match="include", prev=prev, offset=40)
    assert_same_topk(got, prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_streaming_random_float_exact(device, chunk, dtype):
    """Streaming a support set chunk by chunk gives exactly the result of one call
    (pdepth.knn docstring; docs/design.md section 8), also on random float data."""
    m, n, d, k = 129, 2049, 17, 30
    q, s = float_data(m, n, d, dtype=dtype, key=("streamf",))
    q, si = with_self_matches(q, s, key=("streamf",))
    qd, sd, sid = q.to(device), s.to(device), si.to(device)
    one = pdepth.knn(qd, sd, k, self_index=sid)
    got = _stream(qd, sd, k, chunk, self_index=sid)
    assert_same_topk(got, one, what=f"stream chunk={chunk} {dtype}")


def test_streaming_near_duplicates_same_neighbours(device):
    """Support rows that are near-duplicates (1e-7 apart): streaming must still return the
    neighbour lists of one call (the op's docstring promises the exact result)."""
    g = gen("near-dup")
    m, n, d, k = 64, 1500, 17, 30
    q = torch.randn(m, d, generator=g)
    s = torch.randn(n, d, generator=g)
    s[1::2] = s[0::2][: s[1::2].shape[0]] + 1e-7 * torch.randn(s[1::2].shape, generator=g)
    qd, sd = q.to(device), s.to(device)
    one = pdepth.knn(qd, sd, k, self_match="include")
    got = _stream(qd, sd, k, 7, self_match="include")
    same = torch.equal(got.index.cpu(), one.index.cpu())
    assert same, f"index {first_difference(got.index.cpu(), one.index.cpu())}"


@pytest.mark.parametrize("chunk", [7, 1000])
def test_streaming_random_float_within_tolerance(device, chunk):
    """Whatever the bit-level outcome, a streamed result meets the accuracy contract."""
    m, n, d, k = 129, 2049, 17, 30
    q, s = float_data(m, n, d, key=("streamf",))
    q, si = with_self_matches(q, s, key=("streamf",))
    got = _stream(q.to(device), s.to(device), k, chunk, self_index=si.to(device))
    check_structure(got, m, n, k, dist_dtype=torch.float32, device=device, self_index=si)
    check_close_to_reference(got, q, s, k, self_index=si)


# --------------------------------------------------------------------------------------
# 5. determinism
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [(5, 1024, 100, 30), (1, 2049, 17, 5), (7, 5000, 64, 30), (300, 2049, 64, 30),
     (129, 1025, 3, 256)],
    ids=_case_id,
)
def test_thread_count_does_not_change_output(restore_num_threads, case):
    """docs/design.md section 9: the same output on every thread count (CPU)."""
    m, n, d, k = case
    q, s = float_data(m, n, d, key=("threads",))
    q, si = with_self_matches(q, s, key=("threads",))
    outs = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        outs[t] = pdepth.knn(q, s, k, self_index=si)
    assert_same_topk(outs[1], outs[2], what="1 vs 2 threads")


def test_thread_count_integer_data(restore_num_threads):
    q, s = int_data(300, 2049, 17, key=("threads-int",))
    outs = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        outs[t] = pdepth.knn(q, s, 30, self_match="include")
    assert_same_topk(outs[1], outs[2], what="1 vs 2 threads")


def test_repeated_calls_identical(device):
    q, s = float_data(300, 2049, 64, key=("repeat",))
    q, s = q.to(device), s.to(device)
    first = pdepth.knn(q, s, 30, self_match="include")
    for _ in range(3):
        assert_same_topk(pdepth.knn(q, s, 30, self_match="include"), first)


# --------------------------------------------------------------------------------------
# 6. dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(129, 1025, 17, 30), (5, 16, 100, 16)], ids=_case_id)
def test_half_inputs_equal_float32_op(device, dtype, case):
    m, n, d, k = case
    q, s = float_data(m, n, d, dtype=dtype, key=("half",))
    q, si = with_self_matches(q, s, key=("half",))
    si = si if k < n else torch.full_like(si, -1)
    q, s, si = q.to(device), s.to(device), si.to(device)
    got = pdepth.knn(q, s, k, self_index=si)
    assert got.dist.dtype == torch.float32 and got.index.dtype == torch.int64
    assert_same_topk(got, pdepth.knn(q.float(), s.float(), k, self_index=si))
    labels = torch.arange(n, device=device) % 3
    v = pdepth.knn_vote(q, s, labels, k, self_index=si)
    v32 = pdepth.knn_vote(q.float(), s.float(), labels, k, self_index=si)
    assert torch.equal(v.pred, v32.pred)
    assert_same_topk((v.dist, v.index), (v32.dist, v32.index))


@pytest.mark.parametrize(
    "dtype,dist_dtype",
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
     (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_output_dtypes(device, dtype, dist_dtype):
    q, s = int_data(10, 20, 3, dtype=dtype, key=("dtypes",))
    q, s = q.to(device), s.to(device)
    out = pdepth.knn(q, s, 4)
    assert out.dist.dtype == dist_dtype and out.index.dtype == torch.int64
    assert out.dist.device == q.device and out.index.device == q.device
    v = pdepth.knn_vote(q, s, torch.zeros(20, dtype=torch.int64, device=device), 4)
    assert v.pred.dtype == torch.int64 and v.dist.dtype == dist_dtype
    assert v.index.dtype == torch.int64
    check_exact_reference(out, q, s, 4)
    e = pdepth.empty_topk(10, 4, dist_dtype, device)
    assert e.dist.dtype == dist_dtype and e.dist.device == q.device


# --------------------------------------------------------------------------------------
# 7. layouts and empty inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transposed", "strided", "expanded"])
def test_non_contiguous_inputs(device, kind):
    m, n, d, k = 129, 1025, 17, 30
    g = gen("layout", kind)

    def randn(*shape):  # made on the device, so that the views below stay views there
        return torch.randn(*shape, generator=g).to(device)

    if kind == "transposed":
        q, s = randn(d, m).t(), randn(d, n).t()
    elif kind == "strided":
        q = randn(2 * m, 2 * d)[::2, 1::2]
        s = randn(3 * n, d + 5)[::3, 2:2 + d]
    else:
        q = randn(1, d).expand(m, d)
        s = randn(n, 1).expand(n, d)
    assert not q.is_contiguous() and not s.is_contiguous()
    si_full = torch.randint(-1, n, (2 * m,), generator=g).to(device)
    si = si_full[::2]
    labels = (torch.arange(2 * n, device=device) % 4)[::2]
    exp = pdepth.knn(q.contiguous(), s.contiguous(), k, self_index=si.contiguous())
    assert_same_topk(pdepth.knn(q, s, k, self_index=si), exp, what=kind)
    v = pdepth.knn_vote(q, s, labels, k, 4, self_index=si)
    ve = pdepth.knn_vote(q.contiguous(), s.contiguous(), labels.contiguous(), k, 4,
                         self_index=si.contiguous())
    assert torch.equal(v.pred, ve.pred)
    assert_same_topk((v.dist, v.index), (ve.dist, ve.index))
    # a non-contiguous running top-k
    prev = pdepth.knn(q, s[:500], k, self_index=torch.where(si < 500, si, -1))
    pd, pi = prev.dist.t().contiguous().t(), prev.index.t().contiguous().t()
    assert not pd.is_contiguous()
    got = pdepth.knn(q, s[500:], k, self_index=si, prev=(pd, pi), offset=500)
    want = pdepth.knn(q, s[500:], k, self_index=si, prev=prev, offset=500)
    assert_same_topk(got, want)


def test_vote_non_contiguous(device):
    labels = torch.randint(0, 5, (30, 200), generator=gen("vote-nc")).to(device)
    assert torch.equal(pdepth.vote(labels.t(), 5), pdepth.vote(labels.t().contiguous(), 5))
    assert torch.equal(pdepth.vote(labels[::3, ::2], 5),
                       pdepth.vote(labels[::3, ::2].contiguous(), 5))


@pytest.mark.parametrize("k", [1, 5, 50])
def test_empty_queries(device, k):
    q = torch.empty(0, 3, device=device)
    s = torch.randn(20, 3, device=device)
    for policy in POLICIES:
        out = pdepth.knn(q, s, k, self_index=torch.empty(0, dtype=torch.int64, device=device),
                         self_match=policy)
        assert out.dist.shape == (0, k) and out.index.shape == (0, k)
        assert out.dist.dtype == torch.float32 and out.index.dtype == torch.int64
    prev = pdepth.empty_topk(0, k, device=device)
    out = pdepth.knn(q, s, k, prev=prev, offset=3)
    assert out.dist.shape == (0, k)
    v = pdepth.knn_vote(q, s, torch.zeros(20, dtype=torch.int64, device=device), k, 2)
    assert v.pred.shape == (0,) and v.dist.shape == (0, k) and v.index.shape == (0, k)
    assert pdepth.vote(torch.empty(0, k, dtype=torch.int64, device=device), 3).shape == (0,)


# --------------------------------------------------------------------------------------
# 10. knn_vote and vote
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", [(129, 1025, 5, 30), (300, 64, 3, 7), (1, 17, 2, 16)],
                         ids=_case_id)
@pytest.mark.parametrize("num_classes", [2, 10])
def test_knn_vote_integer_data_exact(device, case, policy, num_classes):
    m, n, d, k = case
    q, s = int_data(m, n, d, key=("vote", policy))
    q, si, k = _self_setup(q, s, policy, k, key=case)
    labels = torch.randint(0, num_classes, (n,), generator=gen("labels", n, num_classes))
    got = pdepth.knn_vote(q.to(device), s.to(device), labels.to(device), k, num_classes,
                          self_index=si.to(device), self_match=policy)
    pred, rd, ri = reference.knn_vote(q, s, labels, k, num_classes, self_index=si,
                                      self_match=policy)
    assert got.pred.dtype == torch.int64 and got.pred.shape == (m,)
    assert torch.equal(got.pred.cpu(), pred)
    assert_same_topk((got.dist, got.index), (rd, ri), compare_dtype=False)
    # the fused op equals knn followed by vote
    nb = pdepth.knn(q.to(device), s.to(device), k, self_index=si.to(device), self_match=policy)
    assert_same_topk((got.dist, got.index), nb)
    assert torch.equal(got.pred, pdepth.vote(labels.to(device)[nb.index], num_classes))
    if device.type == "cuda":
        c = pdepth.knn_vote(q, s, labels, k, num_classes, self_index=si, self_match=policy)
        assert torch.equal(got.pred.cpu(), c.pred)


@pytest.mark.parametrize("case", [(300, 2049, 17, 30), (129, 1025, 64, 5)], ids=_case_id)
def test_knn_vote_random_float(device, case):
    m, n, d, k = case
    q, s = float_data(m, n, d, key=("vote-f",))
    q, si = with_self_matches(q, s, key=("vote-f",))
    labels = torch.randint(0, 10, (n,), generator=gen("vote-f-labels"))
    got = pdepth.knn_vote(q.to(device), s.to(device), labels.to(device), k, 10,
                          self_index=si.to(device))
    pred, rd, ri = reference.knn_vote(q, s, labels, k, 10, self_index=si)
    same = (got.index.cpu() == ri).all(1)
    assert bool(same.float().mean() > 0.9), "neighbour lists should mostly match the oracle"
    assert torch.equal(got.pred.cpu()[same], pred[same])
    # the vote is always the vote of the op's own neighbours
    assert torch.equal(got.pred.cpu(), reference.vote(labels[got.index.cpu()], 10))
    check_close_to_reference((got.dist, got.index), q, s, k, self_index=si)


def test_knn_vote_defaults(device):
    q, s = int_data(40, 100, 3, key=("vote-defaults",))
    labels = torch.randint(0, 4, (100,), generator=gen("vote-defaults")).to(device)
    labels[7] = 5  # default num_classes = max + 1 = 6
    qd, sd = q.to(device), s.to(device)
    got = pdepth.knn_vote(qd, sd, labels, self_match="include")  # k=30 by default
    assert got.dist.shape == (40, 30)
    exp = pdepth.knn_vote(qd, sd, labels, 30, 6, self_match="include")
    assert torch.equal(got.pred, exp.pred)


def test_knn_vote_tie_lowest_class(device):
    """Four equidistant neighbours labelled 2, 1, 2, 1: a 2-2 tie goes to class 1."""
    s = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1], [9, 9]], device=device)
    q = torch.zeros(1, 2, device=device)
    labels = torch.tensor([2, 1, 2, 1, 0], device=device)
    v = pdepth.knn_vote(q, s, labels, 4, 3, self_match="include")
    assert v.index.cpu().tolist() == [[0, 1, 2, 3]]
    assert v.pred.cpu().tolist() == [1]
    v = pdepth.knn_vote(q, s, torch.tensor([3, 0, 3, 0, 1], device=device), 5, 4,
                        self_match="include")
    assert v.pred.cpu().tolist() == [0]  # 0: 2 votes, 3: 2 votes, 1: 1 vote


@pytest.mark.parametrize(
    "rows,num_classes,expected",
    [
        ([[2, 1, 2, 1]], 3, [1]),
        ([[3, 0, 3, 0, 5]], 6, [0]),
        ([[4, 4, 1, 1, 2, 2]], 5, [1]),
        ([[5, 4, 3, 2, 1, 0]], 6, [0]),
        ([[0]], 1, [0]),
        ([[2, 2, 2]], 3, [2]),
        ([[1, 2, 2, 1, 1]], 3, [1]),
        ([[2, 2, 0], [1, 0, 1], [0, 1, 2]], 3, [2, 1, 0]),
    ],
)
def test_vote_hand_built(device, rows, num_classes, expected):
    labels = torch.tensor(rows, device=device)
    assert pdepth.vote(labels, num_classes).cpu().tolist() == expected
    assert reference.vote(labels.cpu(), num_classes).tolist() == expected


@pytest.mark.parametrize("k,num_classes", [(1, 1), (1, 5), (2, 2), (4, 3), (30, 10),
                                           (30, 2), (7, 1000), (256, 3)])
def test_vote_random_matches_reference(device, k, num_classes):
    labels = torch.randint(0, num_classes, (513, k), generator=gen("vote", k, num_classes))
    got = pdepth.vote(labels.to(device), num_classes)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), reference.vote(labels, num_classes))


# --------------------------------------------------------------------------------------
# property test (hypothesis): small integer data, every policy, exact
# --------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@st.composite
def _knn_problem(draw):
    m = draw(st.integers(0, 40))
    n = draw(st.integers(1, 70))
    d = draw(st.integers(1, 6))
    lo = draw(st.integers(-3, 0))
    hi = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    policy = draw(st.sampled_from(POLICIES))
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (m, d), generator=g).float()
    s = torch.randint(lo, hi + 1, (n, d), generator=g).float()
    si = torch.randint(-1, n, (m,), generator=g)
    kmax = usable_k(n, n, policy, si)
    if kmax < 1:
        si = torch.full_like(si, -1)
        kmax = usable_k(n, n, policy, si)
    hypothesis.assume(kmax >= 1)
    k = draw(st.integers(1, kmax))
    chunk = draw(st.integers(1, n))
    return q, s, si, k, policy, chunk


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(_knn_problem())
def test_property_integer_data_exact(problem):
    q, s, si, k, policy, chunk = problem
    out = pdepth.knn(q, s, k, self_index=si, self_match=policy)
    check_exact_reference(out, q, s, k, self_index=si, self_match=policy)
    labels = (torch.arange(s.shape[0]) * 7) % 3
    v = pdepth.knn_vote(q, s, labels, k, 3, self_index=si, self_match=policy)
    assert torch.equal(v.pred, reference.knn_vote(q, s, labels, k, 3, self_index=si,
                                                  self_match=policy)[0])
    if policy != "drop_nearest":
        streamed = _stream(q, s, k, chunk, self_index=si, self_match=policy)
        assert_same_topk(streamed, out, what=f"stream chunk={chunk}")


@st.composite
def _float_problem(draw):
    m = draw(st.integers(1, 60))
    n = draw(st.integers(1, 300))
    d = draw(st.sampled_from([1, 2, 3, 7, 16, 17, 64]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    shift = draw(st.sampled_from([0.0, 10.0, 1000.0]))  # large common offset: cancellation
    seed = draw(st.integers(0, 2**31 - 1))
    policy = draw(st.sampled_from(["include", "exclude"]))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64) * scale + shift
    s = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift
    q, s = q.float(), s.float()
    si = torch.randint(-1, n, (m,), generator=g)
    kmax = usable_k(n, n, policy, si)
    if kmax < 1:
        si = torch.full_like(si, -1)
        kmax = n
    k = draw(st.integers(1, kmax))
    return q, s, si, k, policy


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(_float_problem())
def test_property_random_float_within_tolerance(problem):
    q, s, si, k, policy = problem
    out = pdepth.knn(q, s, k, self_index=si, self_match=policy)
    check_structure(out, q.shape[0], s.shape[0], k, dist_dtype=torch.float32, device="cpu",
                    self_index=si if policy == "exclude" else None)
    check_close_to_reference(out, q, s, k, self_index=si, self_match=policy)


@pytest.mark.parametrize("offset", [1000.0, -3000.0])
@pytest.mark.parametrize("d", [3, 64, 300])
def test_data_far_from_origin_exact(device, offset, d):
    """Distances are translation invariant: integer data shifted far from the origin (as
    ReLU features are) gives exactly the neighbours of the unshifted data. Exercises the
    filter margin of the GEMM keys against the canonical keys (knn.h)."""
    q, s = int_data(150, 1100, d, key=("far",))
    base = pdepth.knn(q.to(device), s.to(device), 30, self_match="include")
    out = pdepth.knn((q + offset).to(device), (s + offset).to(device), 30, self_match="include")
    assert torch.equal(out.index.cpu(), base.index.cpu())
    assert torch.equal(out.dist.cpu(), base.dist.cpu())
    check_exact_reference(out, q + offset, s + offset, 30, self_match="include")


def test_few_queries_many_tiles_matches_reference(restore_num_threads):
    """Few queries and many support tiles: the CPU kernel splits the tiles over threads and
    merges per-thread heaps; the result is the one-thread result and the oracle's."""
    q, s = int_data(3, 5000, 8, key=("split",))
    si = torch.tensor([-1, 4000, 17])
    torch.set_num_threads(2)
    out = pdepth.knn(q, s, 40, self_index=si)
    check_exact_reference(out, q, s, 40, self_index=si)
    s[2500, 3] = float("inf")
    with pytest.raises(ValueError, match=r"support contains NaN or Inf \(first at row 2500\)"):
        pdepth.knn(q, s, 40)


# --------------------------------------------------------------------------------------
# metric="cosine" (docs/design.md section 2, "The cosine metric")
# --------------------------------------------------------------------------------------


def _fmnist_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Fashion-MNIST test images as float32 rows in [0, 1], and labels."""
    from run_helpers import FMNIST_MISSING, HAVE_FMNIST

    if not HAVE_FMNIST:
        pytest.skip(FMNIST_MISSING)
    images, labels = pdepth.load_fashion_mnist(split="test")
    return images[:n].reshape(n, -1).float() / 255, labels[:n].long()


def test_cosine_matches_sklearn_brute_force_on_fashion_mnist():
    """Neighbours, distances (1 - cos = d2 / 2) and votes of scikit-learn's brute-force
    cosine k-NN on real images, up to near ties (cosine distances within 1e-6)."""
    sk = pytest.importorskip("sklearn.neighbors")
    x, y = _fmnist_rows(900)
    s, q, ys, k = x[:700], x[700:], y[:700], 7
    nn = sk.NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute")
    sk_d, sk_i = nn.fit(s.double().numpy()).kneighbors(q.double().numpy())
    got = pdepth.knn(q, s, k, metric="cosine")
    torch.testing.assert_close(got.dist.double() / 2, torch.from_numpy(sk_d[:, :k]),
                               atol=1e-6, rtol=0)
    # sklearn's exact cosine distance of every support point, to judge near ties
    qd, sd = q.double(), s.double()
    true = 1 - (qd / qd.norm(dim=1, keepdim=True)) @ (sd / sd.norm(dim=1, keepdim=True)).T
    kth = torch.from_numpy(sk_d[:, k - 1])
    assert (true.gather(1, got.index) <= kth[:, None] + 1e-6).all()
    clear = torch.from_numpy(sk_d[:, k] - sk_d[:, k - 1] > 1e-6)  # no tie at the k-th place
    assert clear.sum() > 150
    same = torch.sort(got.index, 1).values == torch.sort(torch.from_numpy(sk_i[:, :k]), 1).values
    assert same[clear].all()
    clf = sk.KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    want = torch.from_numpy(clf.fit(s.double().numpy(), ys.numpy()).predict(q.double().numpy()))
    pred = pdepth.knn_vote(q, s, ys, k, 10, metric="cosine").pred
    assert torch.equal(pred[clear], want[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cosine_is_the_euclidean_rule_on_normalize_rows(dtype, device):
    """Every op entry point under metric="cosine" gives the bits of the Euclidean call on
    hand-normalised rows, streamed chunks included."""
    q, s = float_data(60, 230, 17, dtype=dtype, key=("cosine",))
    q, s = (q * 50).to(device), (s - 3).to(device)  # not unit rows
    si = torch.randint(-1, 230, (60,), generator=gen("cos-si")).to(device)
    labels = torch.randint(0, 5, (230,), generator=gen("cos-labels")).to(device)
    nq, ns = pdepth.normalize_rows(q), pdepth.normalize_rows(s)
    assert nq.dtype == compute_dtype(dtype)
    want = pdepth.knn(nq, ns, 9, self_index=si)
    assert_same_topk(pdepth.knn(q, s, 9, self_index=si, metric="cosine"), want)
    vote = pdepth.knn_vote(q, s, labels, 9, 5, self_index=si, metric="cosine")
    assert torch.equal(vote.pred, pdepth.knn_vote(nq, ns, labels, 9, 5, self_index=si).pred)
    top = pdepth.empty_topk(60, 9, compute_dtype(dtype), device)
    for s0 in range(0, 230, 64):
        top = pdepth.knn(q, s[s0:s0 + 64], 9, self_index=si, prev=top, offset=s0,
                         metric="cosine")
    assert_same_topk(top, want)
    # the oracle normalises with its own code, in float64
    if dtype == torch.float64:
        ref = reference.knn(q.cpu(), s.cpu(), 9, self_index=si.cpu(), metric="cosine")
        assert torch.equal(want.index.cpu(), ref[1])


def test_normalize_rows_rule():
    """Unit rows, row by row (a batch never changes a row), zero rows stay zero, float64
    rows far out of float32 range stay in range; close to the oracle's x / |x|."""
    x = float_data(1, 300, 33, key=("norm",))[1] * 1e3
    x[5] = 0
    u = pdepth.normalize_rows(x)
    assert torch.equal(u[5], torch.zeros(33))
    assert ((u.double().norm(dim=1) - 1).abs()[torch.arange(300) != 5] < 1e-6).all()
    for i in (0, 5, 151, 299):
        assert torch.equal(pdepth.normalize_rows(x[i:i + 1])[0], u[i])
    assert torch.equal(pdepth.normalize_rows(x[100:250]), u[100:250])
    torch.testing.assert_close(u.double(), reference.cosine_rows(x), atol=1e-7, rtol=0)
    big = torch.tensor([[3e300, -4e300], [3e-310, 4e-310]], dtype=torch.float64)
    torch.testing.assert_close(pdepth.normalize_rows(big),
                               torch.tensor([[0.6, -0.8], [0.6, 0.8]], dtype=torch.float64))
    one_hot = torch.eye(4) * 7
    assert torch.equal(pdepth.normalize_rows(one_hot), torch.eye(4))
    # a lone long row (torch's sum splits it across threads) as in its batch, to the bit
    long = torch.randn(6, 40_000, generator=gen("long"), dtype=torch.float64)
    u = pdepth.normalize_rows(long)
    assert all(torch.equal(pdepth.normalize_rows(long[i:i + 1])[0], u[i]) for i in range(6))


def test_cosine_zero_rows():
    """A zero row stays zero: its squared distance to a unit row is |u|^2 (exactly 1 for a
    one-hot row), to another zero row 0; ties go to the lower index as always."""
    s = torch.cat([torch.eye(5) * 3, torch.zeros(2, 5)])  # rows 5 and 6 are zero
    q = torch.cat([torch.zeros(1, 5), torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0]])])
    out = pdepth.knn(q, s, 7, self_match="include", metric="cosine")
    assert out.index[0].tolist() == [5, 6, 0, 1, 2, 3, 4]
    assert out.dist[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert out.index[1].tolist() == [1, 5, 6, 0, 2, 3, 4]
    assert out.dist[1].tolist() == [0, 1, 1, 2, 2, 2, 2]
    ref_d, ref_i = reference.knn(q, s, 7, self_match="include", metric="cosine")
    assert torch.equal(ref_i, out.index) and torch.equal(ref_d.float(), out.dist)


@pytest.mark.parametrize("metric", ["l1", "COSINE", None, 2])
def test_bad_metric_is_one_line_naming_it(metric):
    q, s = float_data(3, 10, 4)
    for call in (lambda: pdepth.knn(q, s, 2, metric=metric),
                 lambda: pdepth.knn_vote(q, s, torch.zeros(10, dtype=torch.long), 2,
                                         metric=metric)):
        with pytest.raises(ValueError, match="metric") as err:
            call()
        assert repr(metric) in str(err.value) and "\n" not in str(err.value)
