"""Data generators and checks shared by the k-NN tests (imported by the test modules).

The oracle is :mod:`pdepth.reference` (float64, run on CPU). Two kinds of comparison:

- exact (:func:`assert_same_topk`, :func:`check_exact_reference`): for integer-valued
  inputs, whose squared distances are exactly representable in float32, and for
  op-vs-op comparisons that docs/design.md (section 9) promises to be bit-identical
  (streaming, threads, CPU vs CUDA, float16 vs float32 on the same values);
- within the documented tolerance (:func:`check_close_to_reference`): for random float data,
  where the kernels' distances may reorder points whose exact distances are
  closer than ``reference.distance_tolerance``.
"""

from __future__ import annotations

import zlib

import torch

from pdepth import reference


def gen(*key) -> torch.Generator:
    """A CPU generator seeded from ``key`` (stable across runs, different per case)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def int_data(m, n, d, *, lo=-2, hi=2, dtype=torch.float32, key=()):
    """Integer-valued queries [m, d] and support [n, d] in [lo, hi]: every squared distance
    is a small integer (exact in float32), and small ranges give many exact ties."""
    g = gen("int", m, n, d, lo, hi, *key)
    q = torch.randint(lo, hi + 1, (m, d), generator=g).to(dtype)
    s = torch.randint(lo, hi + 1, (n, d), generator=g).to(dtype)
    return q, s


def float_data(m, n, d, *, dtype=torch.float32, key=()):
    """Standard normal queries [m, d] and support [n, d]."""
    g = gen("float", m, n, d, *key)
    q = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    s = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    return q, s


def with_self_matches(q, s, *, frac=0.6, key=()):
    """Makes about ``frac`` of the queries copies of a support row and returns
    ``(queries, self_index)`` with that row's index (-1 for the other queries)."""
    m, n = q.shape[0], s.shape[0]
    g = gen("self", m, n, frac, *key)
    if m <= n:
        si = torch.randperm(n, generator=g)[:m]
    else:
        si = torch.randint(0, n, (m,), generator=g)
    keep = torch.rand(m, generator=g) < frac
    si = torch.where(keep, si, torch.full_like(si, -1))
    q = q.clone()
    q[keep] = s[si[keep]]
    return q, si


def usable_k(k, n, policy, self_index):
    """The largest valid k <= ``k`` for a policy (one support point is lost to an excluded
    self match or to the dropped nearest)."""
    lost = policy == "drop_nearest" or (
        policy == "exclude" and self_index is not None and bool((self_index >= 0).any())
    )
    return min(k, n - 1) if lost else min(k, n)


def cpu(x):
    """Moves a tensor, a tuple of tensors or None to the CPU."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(cpu(t) for t in x)
    return x.cpu()


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a != b).nonzero()
    if diff.numel() == 0:
        return "no difference"
    r, c = (int(x) for x in diff[0])
    return (
        f"{diff.shape[0]} of {a.numel()} entries differ; first at [{r}, {c}]: "
        f"{a[r, c].item()!r} vs {b[r, c].item()!r}"
    )


def assert_same_topk(got, expected, *, what="", compare_dtype=True):
    """Bit-identical (dist, index). ``expected`` may be float64 (the oracle): distances are
    then compared after widening ``got`` to float64."""
    gd, gi = cpu(got[0]), cpu(got[1])
    ed, ei = cpu(expected[0]), cpu(expected[1])
    assert gi.dtype == torch.int64
    assert gi.shape == ei.shape, f"{what}: shape {tuple(gi.shape)} vs {tuple(ei.shape)}"
    if compare_dtype:
        assert gd.dtype == ed.dtype, f"{what}: dist dtype {gd.dtype} vs {ed.dtype}"
    same_index = torch.equal(gi, ei)
    assert same_index, f"{what}: index {first_difference(gi, ei)}"
    gd64, ed64 = gd.double(), ed.double()
    same_dist = bool(((gd64 == ed64) | (torch.isinf(gd64) & torch.isinf(ed64))).all())
    assert same_dist, f"{what}: dist {first_difference(gd64, ed64)}"


def check_structure(out, m, n, k, *, dist_dtype, device, self_index=None, offset=0,
                    allow_empty=False):
    """Shape / dtype / device, ascending distances with ties to the lower index, unique
    in-range indices, excluded self matches absent."""
    d, i = out
    assert tuple(d.shape) == (m, k) and tuple(i.shape) == (m, k), (d.shape, i.shape)
    assert d.dtype == dist_dtype, d.dtype
    assert i.dtype == torch.int64, i.dtype
    assert d.device.type == torch.device(device).type and i.device.type == d.device.type
    d, i = d.cpu(), i.cpu()
    valid = i >= 0
    if not allow_empty:
        assert bool(valid.all()), f"empty slots: {first_difference(i, i.clamp_min(0))}"
    assert bool(((i[valid] >= offset) & (i[valid] < offset + n)).all()), "index out of range"
    assert bool(torch.isfinite(d[valid]).all()) and bool((d[valid] >= 0).all())
    assert bool(torch.isinf(d[~valid]).all()), "empty slots must have distance inf"
    if k > 1:
        d0, d1, i0, i1 = d[:, :-1], d[:, 1:], i[:, :-1], i[:, 1:]
        assert bool((d1 >= d0).all()), "distances not ascending"
        tie = (d1 == d0) & (i0 >= 0) & (i1 >= 0)
        assert bool((i1[tie] > i0[tie]).all()), "equal distances not ordered by lower index"
        assert not bool(((i0 < 0) & (i1 >= 0)).any()), "empty slot before a real neighbour"
        srt = i.sort(1).values
        assert not bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()), "duplicates"
    if self_index is not None:
        si = self_index.cpu()[:, None]
        assert not bool(((i == si) & (si >= 0)).any()), "an excluded self match was returned"


def exact_sqdist(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[M, N] squared distances in float64 (relative error ~1e-16 for these sizes)."""
    q, s = q.cpu().double(), s.cpu().double()
    d = q.pow(2).sum(1)[:, None] + s.pow(2).sum(1)[None, :] - 2.0 * (q @ s.T)
    return d.clamp_min(0.0)


def check_close_to_reference(out, q, s, k, *, self_index=None, self_match="exclude"):
    """The documented accuracy contract for random float data (policies include/exclude).

    - every returned distance is within tolerance of the exact distance of that index;
    - every returned neighbour is at most ``tol`` beyond the oracle's k-th distance;
    - every oracle neighbour more than ``tol`` inside the oracle's k-th distance is returned.

    ``tol`` is ``distance_tolerance`` for the input dtype plus the float64 tolerance of the
    oracle itself.
    """
    assert self_match in ("include", "exclude")
    qc, sc = q.cpu(), s.cpu()
    rd, ri = reference.knn(qc, sc, k, self_index=cpu(self_index), self_match=self_match)
    tol = (
        reference.distance_tolerance(qc, sc)
        + reference.distance_tolerance(qc, sc, dtype=torch.float64)
    )[:, None]
    d, i = out[0].cpu().double(), out[1].cpu()
    exact = exact_sqdist(qc, sc).gather(1, i)
    err = (d - exact).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{int(bad.sum())} distances off by more than the tolerance; worst "
        f"{float((err - tol).max()):.3g} beyond it"
    )
    kth = rd[:, -1:]
    outside = exact > kth + tol
    assert not bool(outside.any()), (
        f"returned neighbours beyond the oracle's k-th distance + tol: rows "
        f"{outside.any(1).nonzero().flatten()[:10].tolist()}"
    )
    clear = rd < kth - tol
    returned = (ri[:, :, None] == i[:, None, :]).any(-1)
    missing = clear & ~returned
    assert not bool(missing.any()), (
        f"oracle neighbours clearly inside the top-k were not returned: rows "
        f"{missing.any(1).nonzero().flatten()[:10].tolist()}"
    )
    # Rows with the oracle's neighbour set and no near ties: the order is the oracle's too.
    rows = returned.all(1) & separated_rows(rd, tol)
    same_order = torch.equal(i[rows], ri[rows])
    assert same_order, f"neighbour order differs from the oracle: {first_difference(i, ri)}"
    return rd, ri, tol


def separated_rows(rd: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """[M] bool: rows whose consecutive oracle distances all differ by more than 2 * tol."""
    if rd.shape[1] < 2:
        return torch.ones(rd.shape[0], dtype=torch.bool)
    return ((rd[:, 1:] - rd[:, :-1]) > 2 * tol).all(1)


def check_exact_reference(out, q, s, k, *, what="", **kw):
    """Identical indices and distances to the float64 oracle (integer-valued inputs)."""
    kw = {key: (cpu(v) if key in ("self_index", "prev") else v) for key, v in kw.items()}
    rd, ri = reference.knn(q.cpu(), s.cpu(), k, **kw)
    assert_same_topk(out, (rd, ri), what=what or "op vs reference", compare_dtype=False)
    return rd, ri
