"""Pure-torch float64 implementation of the k-NN rules (docs/design.md section 2), from scratch.

It is the test oracle and the fallback used when the compiled extension cannot be loaded.
It implements the rules directly and imports nothing from the code it checks (its argument
checks, and its merge, are its own):

- distance: the squared Euclidean distance sum_d (q_d - s_d)^2, computed directly from the
  two rows in float64, summed over d in order (exact for integer-valued inputs whose squared
  distances stay below 2**53, and within about D * 2**-53 relative otherwise), for query
  chunks so that memory stays bounded, and returned as float64;
- neighbours: a stable sort on (distance, index), empty slots (index -1) last; the first k;
- self match: ``exclude`` skips each query's own support index, ``include`` ignores it,
  ``drop_nearest`` takes k+1 and drops the first (no streaming);
- vote: uniform counts, ties to the lowest class, -1 labels (missing neighbours) not voting;
- ``metric="cosine"``: the rows divided by their L2 norm in float64 first (a zero row stays
  zero), with its own code (:func:`cosine_rows`), then the same rules.

Of the inputs the op rejects, these are rejected here too: k < 1 or above the usable
support, an unknown self-match policy, streaming with ``drop_nearest``, a negative offset,
labels outside ``[0, num_classes)``, non-finite values, squared distances that could
overflow the op's compute dtype, and non-integer ``k``, ``offset`` and ``num_classes``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["cosine_rows", "knn", "knn_vote", "vote", "distance_tolerance"]

# Elements of one chunk's [rows, N] distance block (float64: 128 MiB).
_CHUNK_ELEMENTS = 2**24

_POLICIES = ("exclude", "include", "drop_nearest")


def distance_tolerance(queries: torch.Tensor, support: torch.Tensor, dtype=None) -> torch.Tensor:
    """Documented accuracy of the kernels' squared distances, per query.

    The kernels rank by the canonical key sum_d (q_d - s_d)^2 evaluated in ``dtype``
    (float32 for float16/bfloat16/float32 inputs; a fast GEMM only filters candidates). The
    documented tolerance of that key is ``(D + 4) * eps * (|q|^2 + max_s |s|^2)``; results
    may differ from exact ordering only between points whose exact distances are closer
    than this.

    Returns a float64 tensor [M].
    """
    dtype = dtype or (torch.float64 if queries.dtype == torch.float64 else torch.float32)
    eps = torch.finfo(dtype).eps
    d = queries.shape[1]
    qn = queries.double().pow(2).sum(1)
    smax = support.double().pow(2).sum(1).max() if support.shape[0] else 0.0
    return (d + 4) * eps * (qn + smax)


_INT64 = np.iinfo(np.int64)


def _int_arg(value, name: str, op: str) -> int:
    """``value`` as an int: booleans, floats and non-integral objects raise TypeError (never
    truncated), values outside int64 raise ValueError. Written here, not imported, so that
    the oracle shares no code with the ops it checks."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}(): {name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not _INT64.min <= value <= _INT64.max:
        raise ValueError(f"{op}(): {name}={value} does not fit in int64")
    return value


def _sort_topk(dist: torch.Tensor, index: torch.Tensor, k: int):
    """The first ``k`` columns of each row ordered by (distance, index), empty slots (index
    -1) after every real index. A lexicographic sort in numpy: deliberately not the ops'
    merge (two stable torch sorts), so a bug in either shows as a disagreement."""
    d = dist.detach().cpu().numpy()
    i = index.detach().cpu().numpy()
    key = np.where(i < 0, _INT64.max, i)
    order = np.lexsort((key, d), axis=1)[:, : min(k, d.shape[1])]
    pick = torch.from_numpy(order).to(dist.device)
    return dist.gather(1, pick), index.gather(1, pick)


def _check(queries, support, k, offset, *, self_match, streaming):
    """The rules on the arguments of :func:`knn` (``streaming``: a running top-k was given);
    returns ``(k, offset)`` as ints."""
    k = _int_arg(k, "k", "knn")
    offset = _int_arg(offset, "offset", "knn")
    if self_match not in _POLICIES:
        raise ValueError(f"self_match must be one of {_POLICIES}, got {self_match!r}")
    if queries.dim() != 2 or support.dim() != 2:
        raise ValueError(
            f"knn(): queries and support must be 2-D, got {tuple(queries.shape)} and "
            f"{tuple(support.shape)}"
        )
    if queries.shape[1] != support.shape[1]:
        raise ValueError(
            f"knn(): queries and support must have the same dimension D, got "
            f"{tuple(queries.shape)} and {tuple(support.shape)}"
        )
    if k < 1:
        raise ValueError(f"knn(): k must be >= 1, got k={k}")
    if offset < 0:
        raise ValueError(f"knn(): offset must be >= 0, got offset={offset}")
    if streaming and self_match == "drop_nearest":
        raise ValueError(
            "knn(): streaming (prev) is not supported with self_match='drop_nearest'; "
            "stream with self_match='include' and k+1, then drop the first column"
        )
    for name, t in (("queries", queries), ("support", support)):
        if t.numel() and not torch.isfinite(t).all():
            raise ValueError(f"knn(): {name} contains NaN or Inf")
    _check_range(queries, support)
    return k, offset


def _check_range(queries, support):
    """The ops' range rule (csrc/knn.h, check_distance_range): ``8 * (max |q|^2 + max |s|^2)``
    must be finite in the dtype the op computes in (float32, or float64 for float64
    inputs), or the op raises rather than rank by an overflowed key. Applied here too, so
    that the reference raises where the op does."""
    if not queries.shape[0] or not support.shape[0]:
        return
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    qmax = float(queries.double().pow(2).sum(1).max())
    smax = float(support.double().pow(2).sum(1).max())
    if not qmax + smax <= torch.finfo(dtype).max / 8:
        name = "Double" if dtype == torch.float64 else "Float"
        raise ValueError(
            f"knn(): {'queries' if qmax >= smax else 'support'} has values too large for "
            f"{name} squared distances: 8 * (max |q|^2 + max |s|^2) must not overflow {name}, "
            f"got max |q|^2 = {qmax:g} (queries) and max |s|^2 = {smax:g} (support); rescale "
            "queries and support by a common factor"
        )


def _check_usable(m, n, kk, k, self_index, offset):
    """Without a running top-k, every query needs k (+1 dropped nearest) usable points."""
    excluded = 0
    if self_index is not None and m:
        excluded = int(((self_index >= offset) & (self_index < offset + n)).any())
    if m and kk > n - excluded:
        raise ValueError(
            f"knn(): k={k} is larger than the usable support: {n} points"
            + (", 1 excluded as the self match" if excluded else "")
        )


def _sq_dist(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``[m, n]`` float64 squared distances sum_d (q_d - s_d)^2 of float64 rows, summed over
    d = 0..D-1 in order (the definition itself: no expanded form, no cancellation)."""
    acc = q.new_zeros(q.shape[0], s.shape[0])
    for j in range(q.shape[1]):
        diff = q[:, j, None] - s[None, :, j]
        acc.addcmul_(diff, diff)
    return acc


def _chunk_topk(d, idx, kk, prev_rows, self_rows):
    """The (distance, index)-sorted first ``kk`` of one chunk of query rows: the chunk's
    distances ``d`` / indices ``idx`` ``[rows, N]``, self matches removed, merged with the
    running top-k rows ``prev_rows`` or padded with empty slots up to ``kk``."""
    if self_rows is not None:
        hit = idx == self_rows[:, None]
        d = d.masked_fill(hit, math.inf)
        idx = idx.masked_fill(hit, -1)
    if prev_rows is not None:
        d = torch.cat([prev_rows[0].to(torch.float64), d], 1)
        idx = torch.cat([prev_rows[1], idx], 1)
    elif d.shape[1] < kk:
        pad = kk - d.shape[1]
        d = torch.cat([d, d.new_full((d.shape[0], pad), math.inf)], 1)
        idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
    return _sort_topk(d, idx, kk)


@torch.no_grad()
def knn(
    queries: torch.Tensor,
    support: torch.Tensor,
    k: int,
    *,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
    metric: str = "euclidean",
):
    """Reference k nearest neighbours; same signature and rules as :func:`pdepth.knn`.

    Returns ``(dist[M, k] float64, index[M, k] int64)``. Not differentiable (computed under
    ``torch.no_grad``, as the op's outputs never require grad).
    """
    queries, support = _rows(metric, queries, support)
    k, offset = _check(queries, support, k, offset, self_match=self_match,
                       streaming=prev is not None)
    skip = 1 if self_match == "drop_nearest" else 0
    if self_match != "exclude":
        self_index = None
    kk = k + skip
    m, n = queries.shape[0], support.shape[0]
    device = queries.device
    q = queries.to(torch.float64)
    s = support.to(torch.float64)
    if prev is None:
        _check_usable(m, n, kk, k, self_index, offset)
    out_d = torch.empty(m, k, dtype=torch.float64, device=device)
    out_i = torch.empty(m, k, dtype=torch.int64, device=device)
    cols = torch.arange(offset, offset + n, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for r0 in range(0, m, step):
        rows = slice(r0, min(m, r0 + step))
        d, idx = _chunk_topk(
            _sq_dist(q[rows], s),
            cols.expand(rows.stop - r0, n).clone(),
            kk,
            None if prev is None else (prev[0][rows], prev[1][rows]),
            None if self_index is None else self_index[rows],
        )
        out_d[rows], out_i[rows] = d[:, skip:], idx[:, skip:]
    return out_d, out_i


def cosine_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [M, D]`` in float64 with each row divided by its L2 norm; a zero row stays zero."""
    x = x.to(torch.float64)
    norm = torch.sqrt((x * x).sum(dim=1, keepdim=True))
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(torch.float64).tiny), x)


def _rows(metric: str, queries, support):
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if metric == "euclidean":
        return queries, support
    return cosine_rows(queries), cosine_rows(support)


@torch.no_grad()
def vote(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform vote: the most frequent label per row, ties to the lowest class. [M] int64.

    A label -1 (a missing neighbour, see :func:`pdepth.neighbor_labels`) does not vote; a row
    without any label votes -1."""
    num_classes = _int_arg(num_classes, "num_classes", "vote")
    if neighbor_labels.numel() and (
        neighbor_labels.min() < -1 or neighbor_labels.max() >= num_classes
    ):
        raise ValueError(
            f"vote(): neighbor_labels must lie in [0, num_classes={num_classes}) or be -1 (a "
            f"missing neighbour, which does not vote), got values in "
            f"[{int(neighbor_labels.min())}, {int(neighbor_labels.max())}]"
        )
    m = neighbor_labels.shape[0]
    counts = torch.zeros(m, num_classes, dtype=torch.int64, device=neighbor_labels.device)
    present = neighbor_labels >= 0
    counts.scatter_add_(1, neighbor_labels.clamp_min(0), present.long())
    pred = counts.argmax(1)  # argmax returns the first (lowest) maximal class
    return torch.where(counts.amax(1) > 0, pred, -1)


@torch.no_grad()
def knn_vote(
    queries: torch.Tensor,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    k: int = 30,
    num_classes: int | None = None,
    *,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    metric: str = "euclidean",
):
    """Reference k-NN vote; returns ``(pred[M], dist[M, k], index[M, k])``."""
    labels = support_labels.long()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    num_classes = _int_arg(num_classes, "num_classes", "knn_vote")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"knn_vote(): support_labels must lie in [0, num_classes={num_classes})")
    dist, index = knn(queries, support, k, self_index=self_index, self_match=self_match,
                      metric=metric)
    return vote(labels[index], num_classes), dist, index
