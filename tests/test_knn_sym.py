"""The symmetric path (pdepth::knn_sym, docs/design.md section 13): a support set scored
against itself, each pair's cross term and canonical key computed once, must give the
general op's result bit for bit (distance bits, indices, votes) in every self-match policy,
filter format, tiling, streaming step and block pair. The oracle is the general op
(torch.ops.pdepth.knn, which shares no code with the symmetric scan past the canonical key)
and, on integer data, the float64 reference."""

from __future__ import annotations

import pytest
import torch

import pdepth
from pdepth import ops, reference
from tests.knn_helpers import gen

CPU_FILTERS = ("fp32", "bf16", "bf16x3", "auto")
POLICIES = ("exclude", "include", "drop_nearest")


@pytest.fixture(autouse=True)
def _reset_hooks(monkeypatch):
    monkeypatch.setattr(ops, "SYMMETRIC_MIN_D", 0)  # the symmetric path at every D here
    monkeypatch.setattr(ops, "SYMMETRIC_FILTERS", ops.FILTERS)  # and in every format
    yield
    pdepth._C._knn_test_hooks()


def _general(x, k, policy, *, prev=None, offset=0, filter="fp32"):
    """The general op on (x, x) with the policy's arguments (never the symmetric path)."""
    si = torch.arange(offset, offset + x.shape[0]) if policy == "exclude" else None
    skip = 1 if policy == "drop_nearest" else 0
    pd, pi = (None, None) if prev is None else prev
    return torch.ops.pdepth.knn(x, x, k, si, skip, pd, pi, offset, filter)


def _same(got, want):
    """Bit-identical distances and indices."""
    (gd, gi), (wd, wi) = got, want
    bits = torch.int64 if gd.dtype == torch.float64 else torch.int32
    assert gd.shape == wd.shape and gd.dtype == wd.dtype
    assert torch.equal(gd.contiguous().view(bits), wd.contiguous().view(bits))
    assert torch.equal(gi, wi)


def _relu(n, d, key, dtype=torch.float32):
    g = gen("sym-relu", n, d, *key)
    return torch.relu(torch.randn(n, d, generator=g) + 0.3).to(dtype)


def _ties(n, d, key):
    """Integer rows in [-1, 1] with a third of them duplicates of others: exact ties."""
    g = gen("sym-ties", n, d, *key)
    x = torch.randint(-1, 2, (n, d), generator=g).float()
    dup = torch.randperm(n, generator=g)[: n // 3]
    x[dup] = x[torch.randint(0, n, (dup.numel(),), generator=g)]
    return x


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("filter", CPU_FILTERS)
@pytest.mark.parametrize("n,d,k", [(300, 64, 7), (1100, 33, 5), (97, 300, 10)])
def test_matches_general_path(policy, filter, n, d, k):
    x = _relu(n, d, (policy, filter))
    got = pdepth.knn(x, x, k, self_index=torch.arange(n), self_match=policy, filter=filter)
    _same(got, _general(x, k, policy, filter=filter))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("filter", ("fp32", "bf16"))
def test_ties_and_duplicates(policy, filter):
    x = _ties(530, 6, (policy, filter))
    got = pdepth.knn(x, x, 9, self_index=torch.arange(530), self_match=policy, filter=filter)
    _same(got, _general(x, 9, policy, filter=filter))
    # Integer data: exact distances, so the float64 reference agrees too.
    si = torch.arange(530) if policy == "exclude" else None
    want = reference.knn(x, x, 9, self_index=si, self_match=policy)
    assert torch.equal(got.index, want[1])


@pytest.mark.parametrize("policy", POLICIES)
def test_k_near_n(policy):
    n = 70
    x = _relu(n, 20, (policy,))
    k = {"exclude": n - 1, "include": n, "drop_nearest": n - 1}[policy]
    got = pdepth.knn(x, x, k, self_index=torch.arange(n), self_match=policy)
    _same(got, _general(x, k, policy, filter="auto"))


@pytest.mark.parametrize("d", [2100, 8200])
def test_wide_rows(d):
    """Past the general path's batched keys (2048) and two passes (8192)."""
    x = _relu(45, d, ("wide",))
    for filter in ("fp32", "bf16"):
        got = pdepth.knn(x, x, 6, self_index=torch.arange(45), filter=filter)
        _same(got, _general(x, 6, "exclude", filter=filter))


def test_float64_and_float16():
    x = _relu(200, 40, ("f64",), torch.float64)
    _same(pdepth.knn(x, x, 5, self_index=torch.arange(200)), _general(x, 5, "exclude"))
    h = _relu(200, 40, ("f16",), torch.float16)
    _same(pdepth.knn(h, h, 5, self_index=torch.arange(200), filter="bf16"),
          _general(h, 5, "exclude", filter="bf16"))


def test_tiny_sets():
    for n, k in [(1, 1), (2, 1), (3, 2)]:
        x = _relu(n, 4, ("tiny", n))
        _same(pdepth.knn(x, x, k, self_match="include"), _general(x, k, "include"))
        if k < n:
            _same(pdepth.knn(x, x, k, self_index=torch.arange(n)), _general(x, k, "exclude"))


def test_streaming_with_prev_and_offset():
    """A chunk of a stream scored against itself (global indices from `offset`) merges into
    the running top-k exactly as the general op's streaming mode does."""
    x = _relu(600, 50, ("prev",))
    other = _relu(250, 50, ("prev-other",))
    prev = torch.ops.pdepth.knn(x, other, 8, None, 0, None, None, 0, "fp32")
    for filter in ("fp32", "bf16"):
        got = pdepth.knn(x, x, 8, self_index=torch.arange(250, 850), prev=prev, offset=250,
                         filter=filter)
        _same(got, _general(x, 8, "exclude", prev=prev, offset=250))


def test_block_pairs_give_the_whole_set():
    """The embedding store's way: blocks of the support set, each block against itself and
    each pair of blocks once (knn_sym with other=), merged by prev=, equal one call."""
    n, k = 700, 6
    x = _ties(n, 8, ("blocks",)) + _relu(n, 8, ("blocks",))
    want = _general(x, k, "exclude")
    bounds = [0, 130, 400, 700]
    blocks = list(zip(bounds[:-1], bounds[1:], strict=True))
    tops = [pdepth.empty_topk(b1 - b0, k, torch.float32, x.device) for b0, b1 in blocks]
    for a, (a0, a1) in enumerate(blocks):
        tops[a] = ops.knn_sym(x[a0:a1], k, prev=tops[a], offset=a0, filter="bf16")
        for b in range(a + 1, len(blocks)):
            b0, b1 = blocks[b]
            prev = (torch.cat([tops[a].dist, tops[b].dist]),
                    torch.cat([tops[a].index, tops[b].index]))
            both = ops.knn_sym(x[a0:a1], k, other=x[b0:b1], prev=prev, offset=a0,
                               other_offset=b0)
            tops[a] = pdepth.Neighbors(both.dist[: a1 - a0], both.index[: a1 - a0])
            tops[b] = pdepth.Neighbors(both.dist[a1 - a0:], both.index[a1 - a0:])
    _same((torch.cat([t.dist for t in tops]), torch.cat([t.index for t in tops])), want)


def test_cross_pair_matches_two_general_calls():
    a, b = _relu(150, 30, ("a",)), _relu(90, 30, ("b",))
    got = ops.knn_sym(a, 4, other=b, offset=500, other_offset=20)
    ga = torch.ops.pdepth.knn(a, b, 4, None, 0, None, None, 20, "fp32")
    gb = torch.ops.pdepth.knn(b, a, 4, None, 0, None, None, 500, "fp32")
    _same(got, (torch.cat([ga[0], gb[0]]), torch.cat([ga[1], gb[1]])))


def test_every_pair_a_candidate_and_forced_fallback():
    """The exhaustive hook (every pair's canonical key: no filter at all) and a zero fallback
    budget (every strip recomputed in the next format) leave the bits unchanged."""
    x = _relu(400, 100, ("hooks",))
    want = _general(x, 5, "exclude")
    for hooks in ({"exhaustive": True}, {"fallback_budget": 0.0},
                  {"bf16_gemm": "sgemm"}):
        pdepth._C._knn_test_hooks(**hooks)
        _same(pdepth.knn(x, x, 5, self_index=torch.arange(400), filter="bf16"), want)
        pdepth._C._knn_test_hooks()


def test_votes_match_the_fused_op():
    x = _ties(400, 5, ("vote",))
    labels = torch.arange(400) % 7
    got = pdepth.knn_vote(x, x, labels, 9, self_index=torch.arange(400))
    want = torch.ops.pdepth.knn_vote(x, x, labels, 9, 7, torch.arange(400), 0, "fp32")
    assert torch.equal(got.pred, want[0])
    _same((got.dist, got.index), want[1:])


def test_dispatch_and_its_limits():
    """queries is support with its own indices (or no self match) takes the symmetric op
    (half the pairs' keys: counted once per direction, N (N - 1)); other self indices, a
    copy of the support and SYMMETRIC=False take the general op (N^2 pairs)."""
    n = 120
    x = _relu(n, 16, ("dispatch",))

    def pairs(fn):
        pdepth.knn_stats(reset=True)
        fn()
        return pdepth.knn_stats()["pairs"]

    assert pairs(lambda: pdepth.knn(x, x, 3, self_index=torch.arange(n))) == n * (n - 1)
    assert pairs(lambda: pdepth.knn(x, x, 3, self_match="include")) == n * (n - 1)
    shifted = torch.arange(n).roll(1)
    assert pairs(lambda: pdepth.knn(x, x, 3, self_index=shifted)) == n * n
    assert pairs(lambda: pdepth.knn(x, x.clone(), 3, self_index=torch.arange(n))) == n * n
    ops.SYMMETRIC = False
    try:
        assert pairs(lambda: pdepth.knn(x, x, 3, self_index=torch.arange(n))) == n * n
    finally:
        ops.SYMMETRIC = True
    ops.SYMMETRIC_FILTERS = ("fp32",)  # a format the rule leaves out: the general op
    assert pairs(lambda: pdepth.knn(x, x, 3, self_index=torch.arange(n),
                                    filter="bf16")) == n * n
    assert pairs(lambda: pdepth.knn(x, x, 3, self_index=torch.arange(n),
                                    filter="fp32")) == n * (n - 1)
    ops.SYMMETRIC_MIN_D = 17  # narrower rows: the general op (knn_sym too)
    assert pairs(lambda: pdepth.knn(x, x, 3, self_index=torch.arange(n))) == n * n
    assert pairs(lambda: ops.knn_sym(x, 3)) == n * n


def test_bad_arguments():
    x = _relu(10, 4, ("bad",))
    with pytest.raises(ValueError, match="k=10"):
        pdepth.knn(x, x, 10, self_index=torch.arange(10))
    with pytest.raises(ValueError, match="must not overlap"):
        ops.knn_sym(x, 2, other=x[:5], offset=0, other_offset=5)
    with pytest.raises(ValueError, match="skip"):
        torch.ops.pdepth.knn_sym(x, x[:5], 2, 1, False, None, None, 0, 20)
    with pytest.raises(ValueError, match="drop_nearest"):
        ops.knn_sym(x, 2, other=x[:5], self_match="drop_nearest", other_offset=20)
    with pytest.raises(ValueError, match="filter"):
        pdepth.knn(x, x, 2, self_index=torch.arange(10), filter="nope")
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pdepth.knn(bad, bad, 2, self_index=torch.arange(10))


def test_opcheck():
    x = _relu(60, 9, ("opcheck",))
    prev = torch.ops.pdepth.knn(x, x[:20], 4, None, 0, None, None, 0, "fp32")
    cases = [
        (x, None, 4, 0, True, None, None, 0, 0, "fp32"),
        (x, None, 4, 1, False, None, None, 0, 0, "bf16"),
        (x, None, 4, 0, True, prev[0], prev[1], 20, 0, "auto"),
        (x[:20], x[20:], 4, 0, True, None, None, 0, 20, "fp32"),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.pdepth.knn_sym.default, args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_static"))
