"""The filter formats of the k-NN ops (docs/design.md section 6): every format gives the bits
of filter="fp32" (the canonical-key result) on random, tied, adversarial and streamed data,
with every bfloat16 GEMM backend; the margins hold on data built to make the low-precision
keys err as much as rounding allows; candidate control falls back when the filter is too
loose; bad values raise."""

from __future__ import annotations

import math

import pytest
import torch

import pdepth
from pdepth import reference
from tests.knn_helpers import float_data, gen, int_data, with_self_matches

pytestmark = pytest.mark.skipif(
    pdepth.backend() != "extension",
    reason=f"the compiled extension is not loaded: {pdepth.build_info()}",
)

LOW = ("bf16", "bf16x3")
CPU_FILTERS = ("fp32", "bf16", "bf16x3", "auto")


def _backends():
    from pdepth import _C

    feats = _C._cpu_features() if _C is not None else {}
    out = ["sgemm"]
    if feats.get("mkl_bf16"):
        out.append("mkl")
    if feats.get("avx512_bf16"):
        out.append("kernel")
    return out


@pytest.fixture(params=_backends())
def bf16_gemm(request):
    """Each bfloat16 GEMM backend this machine has, forced through the test hook."""
    pdepth._C._knn_test_hooks(request.param, -1.0)
    yield request.param
    pdepth._C._knn_test_hooks("", -1.0)


@pytest.fixture
def fallback_always():
    pdepth._C._knn_test_hooks("", 0.0)
    yield
    pdepth._C._knn_test_hooks("", -1.0)


def assert_same(a, b, what=""):
    assert torch.equal(a[0], b[0]), f"{what}: distances differ"
    assert torch.equal(a[1], b[1]), f"{what}: indices differ"


def _modes(q, s, k, **kw):
    ref = pdepth.knn(q, s, k, filter="fp32", **kw)
    for f in LOW + ("auto",):
        assert_same(pdepth.knn(q, s, k, filter=f, **kw), ref, f)
    return ref


# ---- every format == fp32 ------------------------------------------------------------------

SHAPES = [
    # m, n, d, k: tile edges (1024), D off multiples of 16/32, across a reduction block (1024)
    (37, 1023, 1, 1),
    (37, 1024, 3, 5),
    (64, 1025, 17, 30),
    (5, 2049, 33, 200),
    (130, 1100, 300, 7),
    (20, 1500, 1025, 10),
    (9, 1030, 2049, 3),
]


@pytest.mark.parametrize("m,n,d,k", SHAPES)
def test_every_filter_matches_fp32(bf16_gemm, m, n, d, k):
    q, s = float_data(m, n, d, key=("filter",))
    _modes(q, s, k)


@pytest.mark.parametrize("policy", ["exclude", "include", "drop_nearest"])
def test_every_filter_with_self_matches(bf16_gemm, policy):
    q, s = float_data(90, 1300, 260, key=("self",))
    q, si = with_self_matches(q, s, key=("filter",))
    _modes(q, s, 12, self_index=si, self_match=policy)


def test_integer_ties_equal_the_reference(bf16_gemm):
    """Small integers: many exact ties, every key exact; each format gives the oracle's
    neighbours (ties to the lower index)."""
    q, s = int_data(150, 2100, 300, lo=-1, hi=1, key=("filter",))
    ref_d, ref_i = reference.knn(q, s, 25)
    for f in CPU_FILTERS:
        d, i = pdepth.knn(q, s, 25, filter=f)
        assert torch.equal(i, ref_i), f
        assert torch.equal(d, ref_d.float()), f


def test_streaming_with_prev(bf16_gemm):
    q, s = float_data(70, 2600, 400, key=("stream",))
    q, si = with_self_matches(q, s, key=("stream",))
    whole = pdepth.knn(q, s, 9, self_index=si, filter="fp32")
    for f in LOW:
        top = pdepth.empty_topk(q.shape[0], 9, dtype=torch.float32)
        for lo, hi in ((0, 700), (700, 2050), (2050, 2600)):
            top = pdepth.knn(q, s[lo:hi], 9, self_index=si, prev=top, offset=lo, filter=f)
        assert_same(top, whole, f)


def test_knn_vote_every_filter(bf16_gemm):
    q, s = float_data(100, 1200, 350, key=("vote",))
    labels = torch.randint(0, 7, (1200,), generator=gen("vote-labels"))
    ref = pdepth.knn_vote(q, s, labels, 15, 7, filter="fp32")
    for f in LOW + ("auto",):
        out = pdepth.knn_vote(q, s, labels, 15, 7, filter=f)
        for a, b in zip(out, ref, strict=True):
            assert torch.equal(a, b), f


def test_half_inputs(bf16_gemm):
    q, s = float_data(40, 1100, 280, dtype=torch.float16, key=("half",))
    ref = pdepth.knn(q.float(), s.float(), 6, filter="fp32")
    for f in LOW:
        assert_same(pdepth.knn(q, s, 6, filter=f), ref, f)


# ---- adversarial data for the margins ------------------------------------------------------


def _off_grid(shape, g, *, scale=1.0):
    """Values about half a bfloat16 step away from a grid point, all rounding the same way:
    the bfloat16 rounding errors of a dot product add up instead of cancelling."""
    base = torch.randint(128, 256, shape, generator=g).float() / 128.0  # grid: step 2^-7
    return scale * (base + (2.0**-8) * (1 - 2.0**-12))  # just below the midpoint


def test_values_just_off_bf16_grid(bf16_gemm):
    g = gen("offgrid")
    s = _off_grid((1500, 512), g)
    q = _off_grid((60, 512), g)
    _modes(q, s, 20)


def test_far_from_origin_near_ties_wide(bf16_gemm):
    """Rows far from the origin (a ReLU-like offset), wide D, and many support rows at nearly
    the same distance from each query: the k-th distance sits inside a crowd."""
    g = gen("crowd")
    d = 6000
    q = 1000.0 + torch.rand(24, d, generator=g)
    dirs = torch.randn(1200, d, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    radii = 5.0 * (1 + 1e-6 * torch.randn(1200, generator=g))
    s = q[torch.arange(1200) % 24] + radii[:, None] * dirs
    _modes(q, s, 30)


def test_large_d_near_ties(bf16_gemm):
    g = gen("wide-ties")
    d = 20000
    q = torch.randn(8, d, generator=g)
    s = q[torch.arange(1100) % 8] + 1e-3 * torch.randn(1100, d, generator=g)
    _modes(q, s, 40)


def test_nearly_duplicated_rows_fall_back():
    """Rows that differ far below bfloat16's resolution: the bf16 filter lets almost every
    pair through, the tile falls back to fp32 (counted), and the result is unchanged."""
    g = gen("dups")
    base = torch.randn(1, 400, generator=g) + 3.0
    s = base + 1e-5 * torch.randn(2100, 400, generator=g)
    q = base + 1e-5 * torch.randn(50, 400, generator=g)
    ref = pdepth.knn(q, s, 10, filter="fp32")
    pdepth.knn_stats(reset=True)
    assert_same(pdepth.knn(q, s, 10, filter="bf16"), ref, "bf16")
    stats = pdepth.knn_stats()
    assert stats["fallback_tiles"] > 0
    # the next format: fp32, or bf16x3 on AMX (docs/design.md 6.5)
    assert stats["pairs_fp32"] + stats["pairs_bf16x3"] > 0


def _aligned_rounding_data(d, g):
    """Queries x and -x (their mean is exactly 0, so the centred rows are the rows), with
    every value just below a midpoint between bfloat16 grid points in [1, 1.03): each one
    rounds down by almost half a step, so the bfloat16 errors of q.s all have one sign, and
    the support holds the queries themselves (a = b: Cauchy-Schwarz is tight)."""
    base = 1 + torch.randint(0, 4, (15, d), generator=g).float() * 2.0**-7
    x = base + 2.0**-8 * (1 - 2.0**-14)
    q = torch.cat([x, -x])
    s = torch.cat([q, q + 2.0**-7 * torch.randint(-1, 2, (30, d), generator=g).float()])
    return q, s


def _filter_dot(a, b, f):
    """The cross terms pdepth's bf16 / bf16x3 filter computes for one reduction block."""
    from pdepth import _C

    def mm(x, y):
        if _C._cpu_features()["avx512_bf16"]:
            return _C._gemm_bf16(x, y)
        return x.float() @ y.float().T  # exact products, float32 sums: the same model

    ha, hb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if f == "bf16":
        return mm(ha, hb)
    la = (a - ha.float()).to(torch.bfloat16)
    lb = (b - hb.float()).to(torch.bfloat16)
    return mm(torch.cat([ha, ha, la], 1), torch.cat([hb, lb, hb], 1))


@pytest.mark.parametrize("f", LOW)
def test_margin_bound_holds_and_is_nearly_attained(f):
    """The rule itself, on the real GEMM, for every pair: lower <= canonical key * grow
    (docs/design.md 6.2), on data that drives the bfloat16 error to its worst case. For bf16
    the worst pair comes within 30% of the margin: a margin a third smaller would drop a
    true neighbour, so this test would catch it."""
    d = 700
    q, s = _aligned_rounding_data(d, gen("bound"))
    n = s.shape[0]
    d_all, i_all = pdepth.knn(q, s, n, self_match="include", filter="fp32")
    canon = torch.empty(q.shape[0], n).scatter_(1, i_all, d_all)
    assert float(q.double().sum(0).abs().max()) == 0.0
    qn = (q.double() ** 2).sum(1).float()
    sn = (s.double() ** 2).sum(1).float()
    plan = pdepth.knn_plan(d, filter=f)
    keep = torch.tensor(1 - plan["margin"], dtype=torch.float32)
    total = qn[:, None] + sn[None, :]
    lower = total * keep - 2 * _filter_dot(q, s, f)
    assert bool((lower <= canon * (1 + plan["threshold_growth"])).all())
    worst = float(((lower - canon) / total).max()) / plan["margin"]
    if f == "bf16":
        assert worst > -0.3, worst
    for mode in ("fp32", f):
        assert_same(pdepth.knn(q, s, 7, filter=mode), pdepth.knn(q, s, 7, filter="fp32"), mode)


def test_fallback_forced_by_hook(fallback_always):
    q, s = float_data(60, 2100, 300, key=("hook",))
    ref = pdepth.knn(q, s, 8, filter="fp32")
    pdepth.knn_stats(reset=True)
    assert_same(pdepth.knn(q, s, 8, filter="bf16"), ref, "bf16")
    stats = pdepth.knn_stats()
    assert stats["fallback_tiles"] == stats["tiles"] > 0
    assert stats["pairs_bf16"] == 0
    assert stats["pairs_fp32"] + stats["pairs_bf16x3"] == 60 * 2100


# ---- candidate counts, stats and plans -----------------------------------------------------


@pytest.mark.parametrize("f", ["fp32", "bf16x3"])
def test_candidates_near_k_log(f):
    """With the threshold seeded from the GEMM keys and a margin that does not grow with D,
    the canonical step stays near k (1 + ln(N / k)) keys per query, even at D = 8192."""
    m, n, k = 64, 4000, 20
    for d in (256, 8192):
        q, s = float_data(m, n, d, key=("count", d))
        pdepth.knn_stats(reset=True)
        pdepth.knn(q, s, k, filter=f)
        per_query = pdepth.knn_stats()["candidates"] / m
        assert per_query <= 2 * k * (1 + math.log(n / k)), (d, per_query)


def test_stats_count_pairs_by_format():
    q, s = float_data(30, 1500, 300, key=("stats",))
    pdepth.knn_stats(reset=True)
    pdepth.knn(q, s, 5, filter="fp32")
    st = pdepth.knn_stats(reset=True)
    assert st["calls"] == 1 and st["pairs"] == 30 * 1500 == st["pairs_fp32"]
    assert st["candidates"] >= 5 * 30
    pdepth.knn(q, s, 5, filter="bf16x3")
    st = pdepth.knn_stats()
    assert st["pairs"] == st["pairs_bf16x3"] + st["pairs_fp32"] == 30 * 1500


def test_plan_auto_rule():
    from pdepth import _C

    feats = _C._cpu_features()
    fast = feats["avx512_bf16"] or (feats["amx_bf16"] and feats["mkl_bf16"])
    assert pdepth.knn_plan(2048)["filter"] == ("bf16" if fast else "fp32")
    assert pdepth.knn_plan(16)["filter"] == "fp32"
    assert pdepth.knn_plan(2048, dtype=torch.float64)["filter"] == "fp32"
    assert pdepth.knn_plan(2048, device="cuda")["filter"] == "fp32"
    p = pdepth.knn_plan(50176, filter="fp32")
    assert p["filter"] == "fp32" and p["reason"] == "requested"
    # the margin grows with the block, not with D
    assert p["margin"] < 4 * pdepth.knn_plan(2048, filter="fp32")["margin"]
    assert pdepth.knn_plan(2048, filter="bf16x3")["margin"] < pdepth.knn_plan(
        2048, filter="bf16")["margin"] / 25


# ---- bad values ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["BF16", "fp16", "", "int8"])
def test_unknown_filter_lists_the_valid_ones(bad):
    q, s = float_data(4, 20, 3, key=("bad",))
    for call in (
        lambda: pdepth.knn(q, s, 2, filter=bad),
        lambda: pdepth.knn_vote(q, s, torch.zeros(20, dtype=torch.long), 2, filter=bad),
        lambda: torch.ops.pdepth.knn(q, s, 2, None, 0, None, None, 0, bad),
        lambda: reference_path(q, s, bad),
    ):
        with pytest.raises(ValueError, match="filter must be one of 'auto', 'fp32', 'bf16'"):
            call()


def reference_path(q, s, bad):
    from pdepth.ops import check_filter

    check_filter("knn", bad, q.dtype, q.device)


def test_tf32_is_cuda_only():
    q, s = float_data(4, 20, 3, key=("tf32",))
    with pytest.raises(ValueError, match="CUDA tensor-core format"):
        pdepth.knn(q, s, 2, filter="tf32")


def test_low_precision_needs_non_float64():
    q, s = float_data(4, 20, 3, dtype=torch.float64, key=("f64",))
    for f in LOW:
        with pytest.raises(ValueError, match="float64 GEMM"):
            pdepth.knn(q, s, 2, filter=f)
    pdepth.knn(q, s, 2, filter="fp32")
    pdepth.knn(q, s, 2, filter="auto")


def test_fake_kernel_checks_the_filter():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(7, 3)
        s = torch.empty(11, 3)
        d, _ = torch.ops.pdepth.knn(q, s, 4, None, 0, None, None, 0, "bf16")
        assert d.shape == (7, 4)
        with pytest.raises(ValueError, match="filter must be one of"):
            torch.ops.pdepth.knn(q, s, 4, None, 0, None, None, 0, "nope")


# ---- CUDA (runs on a card; compiled in CI) -------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("f", ["tf32", "bf16", "bf16x3", "auto"])
def test_cuda_filters_match_fp32(f):
    """Every CUDA format gives the bits of CUDA fp32, which equal the CPU's (design 9)."""
    q, s = float_data(300, 5000, 515, key=("cuda-filter",))
    q, si = with_self_matches(q, s, key=("cuda-filter",))
    ref = pdepth.knn(q.cuda(), s.cuda(), 25, self_index=si.cuda(), filter="fp32")
    out = pdepth.knn(q.cuda(), s.cuda(), 25, self_index=si.cuda(), filter=f)
    assert_same(out, ref, f)
    g = gen("cuda-off")
    qo = _off_grid((64, 700), g)
    so = torch.cat([qo, _off_grid((2000, 700), g)])
    assert_same(pdepth.knn(qo.cuda(), so.cuda(), 9, filter=f),
                pdepth.knn(qo.cuda(), so.cuda(), 9, filter="fp32"), f)


@needs_cuda
def test_cuda_filter_leaves_cublas_math_mode():
    """The filter's cuBLAS settings do not leak into the user's own matmuls."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(512, 512, device="cuda")
    before = a @ a
    q, s = float_data(50, 3000, 300, key=("mode",))
    for f in ("tf32", "bf16", "fp32"):
        pdepth.knn(q.cuda(), s.cuda(), 5, filter=f)
        assert torch.equal(a @ a, before), f
