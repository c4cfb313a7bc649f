"""Python entry points of the k-NN ops: argument conversion, backend choice, fake kernels.

The work is done by ``torch.ops.pdepth.*`` (the compiled extension ``pdepth._C``, loaded by
:mod:`pdepth._extension`). The wrappers here convert arguments to the op schemas (integers,
index tensors, the self-match policy) and leave every other rule to the op. When the
extension cannot be loaded, or was built without CUDA and gets CUDA tensors, pdepth warns
once and uses :mod:`pdepth.reference` instead; :func:`backend` says which is in use.

The running top-k (:class:`Neighbors`, :func:`empty_topk`, :func:`merge_topk`,
:func:`neighbor_labels`) lives in :mod:`pdepth.topk`; it is re-exported here, as are the
loader's :func:`build_info` and :func:`backend` and :func:`check_int`.
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from ._args import INT64_MAX as _INT64_MAX
from ._args import (  # noqa: F401  (re-exported: the class limit is part of the ops' API)
    MAX_CLASSES,
    check_class_ids,
    check_int,
    check_num_classes,
)
from ._args import as_index as _as_index
from ._extension import (  # noqa: F401  (re-exported: pdepth.ops / pdepth.knn names)
    _C,
    _LOAD_ERROR,
    _load_failure_message,
    backend,
    build_info,
)
from .topk import (  # noqa: F401  (re-exported)
    Neighbors,
    Vote,
    empty_topk,
    merge_topk,
    neighbor_labels,
)

__all__ = [
    "Neighbors",
    "Vote",
    "SELF_MATCH_POLICIES",
    "backend",
    "build_info",
    "check_int",
    "check_metric",
    "FILTERS",
    "MAX_CLASSES",
    "METRICS",
    "check_class_ids",
    "check_num_classes",
    "empty_topk",
    "knn",
    "knn_plan",
    "knn_stats",
    "knn_sym",
    "knn_vote",
    "merge_topk",
    "neighbor_labels",
    "normalize_rows",
    "vote",
]

#: The values of ``self_match=`` (docs/design.md section 2): what a query's own support row does.
SELF_MATCH_POLICIES = ("exclude", "include", "drop_nearest")
#: The filter GEMM's formats (docs/design.md section 6); none changes the output.
FILTERS = ("auto", "fp32", "bf16", "bf16x3", "tf32")
#: The k-NN metrics (docs/design.md section 2, "The cosine metric"): "cosine" ranks the
#: L2-normalised rows (normalize_rows) by the op's squared-L2 rule. One spelling each, so a
#: recorded metric (results, protocol keys) has one value.
METRICS = ("euclidean", "cosine")

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _use_extension(device: torch.device) -> bool:
    if backend(device) == "extension":
        return True
    if _C is None:
        _warn_once(
            "load",
            f"pdepth: the compiled extension pdepth._C could not be loaded: {_LOAD_ERROR}. "
            "Using the pure-torch reference implementation (slow) meanwhile.",
        )
    else:
        _warn_once(
            "cuda",
            "pdepth: the extension was built without CUDA kernels; using the pure-torch "
            "reference implementation for CUDA tensors. Rebuild with FORCE_CUDA=1.",
        )
    return False


def _policy(self_match: str, self_index: torch.Tensor | None):
    """Maps a self-match policy to the op's (self_index, skip) arguments."""
    if self_match not in SELF_MATCH_POLICIES:
        raise ValueError(
            f"self_match must be one of {SELF_MATCH_POLICIES}, got {self_match!r}"
        )
    if self_match == "exclude":
        return _as_index(self_index, "self_index"), 0
    return None, (1 if self_match == "drop_nearest" else 0)


def check_metric(metric, op: str) -> str:
    """``metric`` when it is one of :data:`METRICS`, else a one-line ``ValueError`` naming
    ``metric`` and the value."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"{op}(): metric must be 'euclidean' or 'cosine', got {metric!r}")
    return metric


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x [M, D]`` scaled to unit L2 norm: the input of the cosine k-NN.

    The rule (docs/design.md section 2, "The cosine metric"): a row is divided by its
    largest ``|x_d|``, then by the L2 norm of the result (squares summed in index order), in
    float64, and rounded once to the op's compute dtype (float32 for float16, bfloat16 and
    float32 rows; float64 stays float64). The float64 steps cannot overflow or underflow a
    float32 row and leave the result the float32 rounding of ``x / |x|`` (up to a tie at a
    rounding boundary); the first scaling keeps float64 rows in range too. A zero row stays
    zero. Each row is normalised alone, in a fixed order, so chunks, blocks and streams give
    the same bits as one call. Anything but a 2-D floating tensor is returned as it is, for
    the op to refuse. Not differentiable (the k-NN is not).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        return x
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x64 = x.detach().to(torch.float64)  # the k-NN is not differentiable
    if x.shape[1] == 0:
        return x64.to(compute)
    top = x64.abs().amax(dim=1, keepdim=True)  # a maximum is exact in any order
    y = x64 / torch.where(top > 0, top, 1.0)  # zero rows: divided by 1
    # The sum of squares in index order (cumsum: one sequential pass per row), so that a
    # row's norm never depends on its batch or the threads (torch's sum may split one long
    # row across threads, and reduces a batch otherwise).
    norm = torch.cumsum(y.square(), dim=1)[:, -1:].sqrt()
    return torch.where(norm > 0, y / torch.where(norm > 0, norm, 1.0), y).to(compute)


def metric_rows(metric: str, queries, support=None, *, op: str = "knn"):
    """``(queries, support)`` as the k-NN op ranks them under ``metric`` (checked): as given
    for ``"euclidean"``, :func:`normalize_rows` for ``"cosine"`` (once when both are the
    same tensor). The one path every entry point takes."""
    if check_metric(metric, op) == "euclidean":
        return queries, support
    q = normalize_rows(queries)
    if support is None:
        return q, None
    return q, (q if support is queries else normalize_rows(support))


def knn(
    queries: torch.Tensor,
    support: torch.Tensor,
    k: int,
    *,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
    filter: str = "auto",
    metric: str = "euclidean",
) -> Neighbors:
    """The k nearest support points of every query, by squared L2 distance.

    Args:
        queries: ``[M, D]`` float16, bfloat16, float32 or float64.
        support: ``[N, D]``, same dtype and device as ``queries``.
        k: neighbours per query, ``1 <= k <= N`` (``N - 1`` when a self match is excluded).
        self_index: ``[M]`` integer, each query's own support index (global, i.e. including
            ``offset``), or -1 for none. Used by ``self_match="exclude"``.
        self_match: ``"exclude"`` skips each query's self index; ``"include"`` ignores it
            (sklearn's ``predict`` on the fitted data); ``"drop_nearest"`` takes k+1
            neighbours and drops the nearest (legacy code; no streaming).
        prev: a running top-k ``(dist[M, k], index[M, k])`` from an earlier call (or
            :func:`empty_topk`) to merge this support chunk into.
        offset: global index of ``support[0]`` (streaming).
        filter: the GEMM format that *filters* candidates before they are ranked by their
            canonical key: ``"fp32"`` (float32 GEMM; float64 for float64 inputs),
            ``"bf16"`` (bfloat16 inputs, float32 accumulation), ``"bf16x3"`` (bfloat16
            high and residual parts, three products), ``"tf32"`` (CUDA tensor cores) or
            ``"auto"`` (the fastest exact one here: :func:`knn_plan`). The result is the
            same bits in every mode; only the speed differs.
        metric: ``"euclidean"`` (default) or ``"cosine"``: the rows are L2-normalised first
            (:func:`normalize_rows`) and ranked by the same squared-L2 rule; the distances
            returned are then the squared L2 distances of the normalised rows, ``2 - 2 cos``
            between nonzero rows (the cosine distance is half of it). docs/design.md
            section 2.

    Returns:
        :class:`Neighbors` ``(dist[M, k], index[M, k])``: distances ascending, equal
        distances ordered by lower index; float32 distances (float64 for float64 inputs).
        Streaming a support set chunk by chunk gives exactly the result of one call. A
        stream with fewer than k usable points leaves empty slots (distance inf, index -1):
        gather their labels with :func:`neighbor_labels`, which keeps the -1.

    Raises ``ValueError`` when the squared distances could overflow the compute dtype
    (``8 * (max |q|^2 + max |s|^2)`` must be finite; rescale the inputs) or for an unknown
    ``filter``, and ``TypeError`` for a non-integer ``k`` or ``offset``. Not differentiable:
    the outputs never require grad.
    """
    k = check_int(k, "k", op="knn")
    offset = check_int(offset, "offset", op="knn")
    self_index, skip = _policy(self_match, self_index)
    queries, support = metric_rows(metric, queries, support, op="knn")
    prev_dist, prev_index = (None, None) if prev is None else prev
    if _use_extension(queries.device):
        exclude = _symmetric(queries, support, self_match, self_index, offset, filter)
        if exclude is not None:  # the support set against itself: each pair once
            _fake_check_knn("knn", queries, support, k, self_index, skip, prev_dist,
                            prev_index, offset, filter)
            return Neighbors(*torch.ops.pdepth.knn_sym(
                queries, None, k, skip, exclude, prev_dist, prev_index, offset, 0, filter))
        return Neighbors(
            *torch.ops.pdepth.knn(
                queries, support, k, self_index, skip, prev_dist, prev_index, offset,
                filter,
            )
        )
    check_filter("knn", filter, queries.dtype, queries.device)
    return Neighbors(
        *reference.knn(
            queries, support, k, self_index=self_index, self_match=self_match, prev=prev,
            offset=offset,
        )
    )


def _num_classes(labels: torch.Tensor, num_classes: int | None) -> int:
    if num_classes is not None:
        return check_num_classes(num_classes, "knn_vote")
    check_class_ids(labels, "support_labels", "knn_vote")
    return int(labels.max()) + 1 if labels.numel() else 1


def knn_vote(
    queries: torch.Tensor,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    k: int = 30,
    num_classes: int | None = None,
    *,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    filter: str = "auto",
    metric: str = "euclidean",
) -> Vote:
    """k-NN classification: the uniform vote of each query's k nearest support labels.

    Args:
        queries, support, k, self_index, self_match, filter, metric: as in :func:`knn`.
        support_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes; default ``support_labels.max() + 1``. At most
            :data:`MAX_CLASSES` (2**24): larger class ids must be mapped to ``0..C-1``.

    Returns:
        :class:`Vote` ``(pred[M] int64, dist[M, k], index[M, k])``. The largest count wins;
        a tie goes to the lowest class id (scikit-learn's rule). Not differentiable: the
        outputs never require grad.

    Raises:
        ValueError: mismatched shapes or dtypes, k out of range, labels outside
            ``[0, num_classes)``, a bad ``self_index``, NaN / Inf or values too large for
            the compute dtype, an unknown ``filter`` or ``metric`` (naming the argument).
        TypeError: a non-integer ``k`` or ``num_classes``.
        RuntimeError: queries, support and labels on different devices.
    """
    k = check_int(k, "k", op="knn_vote")
    labels = _as_index(support_labels, "support_labels")
    num_classes = _num_classes(labels, num_classes)
    self_index, skip = _policy(self_match, self_index)
    queries, support = metric_rows(metric, queries, support, op="knn_vote")
    if _use_extension(queries.device):
        exclude = _symmetric(queries, support, self_match, self_index, 0, filter)
        if exclude is not None:  # the support set against itself: each pair once
            return _knn_vote_sym(queries, labels, k, num_classes, self_index, skip, exclude,
                                 filter)
        return Vote(
            *torch.ops.pdepth.knn_vote(
                queries, support, labels, k, num_classes, self_index, skip, filter
            )
        )
    check_filter("knn_vote", filter, queries.dtype, queries.device)
    return Vote(
        *reference.knn_vote(
            queries, support, labels, k, num_classes, self_index=self_index,
            self_match=self_match,
        )
    )


# The symmetric path (docs/design.md section 13) is taken where it applies; False makes
# every call take the general op (benchmarks and tests compare the two).
SYMMETRIC = True
# ... from this D on: below it the scan of each pair from both rows costs more than the
# cross terms it saves (measured on the 2-core EPYC, N = 3,000 ReLU rows, one thread:
# symmetric / general time 0.53-0.55 (fp32) and 0.76 (bf16) at D = 4096 and 12,544, but
# 0.70 / 1.06 at 2048 and 0.92 / 1.18 at 1024).
SYMMETRIC_MIN_D = 4096
# ... where the filter resolves to one of these formats. The symmetric path's bf16 cross terms
# convert each strip's rows per piece; on the 2-core EPYC (two threads, a loaded machine) it
# took 1.03-1.09x the general bf16 path's time at D = 4096 and 12,544, its fp32 0.66-0.79x
# the general fp32's (benchmarks/bench_knn.py --suites sym; one thread: bf16 0.76x). Both
# were measured before the strip's GEMM pieces were balanced over the threads (RESULTS.md,
# issue 26: fp32 0.85-0.93 -> 0.60-0.62); through the float32 sgemm on an AVX2 CPU the bf16
# symmetric path now takes 0.59-0.67x the general bf16 path's time on trained ResNet-18
# probes, which says nothing of an AVX512-BF16 CPU's conversions: bf16 joins this list when
# the sym suite, run there, says so.
SYMMETRIC_FILTERS = ("fp32",)


def _symmetric_pays(x, filter) -> bool:
    """Whether the symmetric op is taken for rows ``x`` (CPU) and ``filter``: from
    :data:`SYMMETRIC_MIN_D` on, where ``filter`` resolves to one of
    :data:`SYMMETRIC_FILTERS`. A filter the op refuses returns False (the general op then
    raises its own error)."""
    if not SYMMETRIC or x.dim() != 2 or x.shape[1] < SYMMETRIC_MIN_D:
        return False
    if not isinstance(filter, str) or filter not in FILTERS:
        return False
    try:
        plan = knn_plan(x.shape[1], dtype=x.dtype, device="cpu", filter=filter)
    except ValueError:
        return False
    return plan["filter"] in SYMMETRIC_FILTERS


def _symmetric(queries, support, self_match: str, self_index, offset: int, filter="auto"):
    """Whether a knn / knn_vote call scores a support set against itself on the CPU
    extension, so that the symmetric op gives its result: ``exclude_self`` for the op
    (``self_index`` is each row's own global index ``offset + r``, or no self match is
    asked), or None for the general op (other self indices, CUDA, other tensors)."""
    if queries is not support or not isinstance(queries, torch.Tensor):
        return None
    if queries.device.type != "cpu" or not _symmetric_pays(queries, filter):
        return None
    if self_match != "exclude" or self_index is None:
        return False
    m = queries.shape[0]
    own = torch.arange(offset, offset + m, dtype=torch.int64)
    if (self_index.dim() == 1 and self_index.dtype == torch.int64
            and self_index.device.type == "cpu" and torch.equal(self_index, own)):
        return True
    return None


def _knn_vote_sym(x, labels, k, num_classes, self_index, skip, exclude, filter) -> Vote:
    """knn_vote(x, x, ...) through the symmetric op: the same checks, then the op's vote of
    the neighbours' labels (the fused op's own last step)."""
    _fake_check_knn("knn_vote", x, x, k, self_index, skip, None, None, 0, filter)
    _fake_check_labels("knn_vote", "support_labels", labels, x.shape[0], num_classes,
                       x.device)
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        _value_check(lo >= 0 and hi < num_classes,
                     f"knn_vote(): support_labels must lie in [0, num_classes={num_classes})"
                     f", got values in [{lo}, {hi}]")
    dist, index = torch.ops.pdepth.knn_sym(x, None, k, skip, exclude, None, None, 0, 0, filter)
    return Vote(torch.ops.pdepth.vote(neighbor_labels(labels, index), num_classes), dist,
                index)


def knn_sym(
    x: torch.Tensor,
    k: int,
    *,
    other: torch.Tensor | None = None,
    self_match: str = "exclude",
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
    other_offset: int = 0,
    filter: str = "auto",
) -> Neighbors:
    """Rows scored against each other with each pair's cross term and canonical key computed
    once (the symmetric path, docs/design.md section 13); the general path's bits.

    Args:
        x: ``[N, D]`` rows with global indices ``offset..offset+N-1``.
        k: neighbours per row.
        other: None, or ``[N2, D]`` rows (same dtype and device) with global indices
            ``other_offset..``, disjoint from x's: then x's rows are ranked against
            ``other`` and ``other``'s rows against x (a block pair of a support set).
        self_match: without ``other``: ``"exclude"`` (each row's own index skipped),
            ``"include"`` or ``"drop_nearest"`` (no ``prev``), as in :func:`knn`.
        prev: the running top-k ``(dist, index)`` of the rows (``[N, k]``, or
            ``[N + N2, k]`` with x's rows first) to merge into (:func:`empty_topk`).
        offset, other_offset: the global indices of ``x[0]`` and ``other[0]``.
        filter: as in :func:`knn` (never changes the result).

    Returns:
        :class:`Neighbors` ``(dist, index)``, ``[N, k]`` or ``[N + N2, k]``: without
        ``other`` ``knn(x, x, k, self_index=offset + arange(N), self_match=self_match,
        prev=prev, offset=offset)``; with it ``knn(x, other, prev=prev[:N],
        offset=other_offset)`` over ``knn(other, x, prev=prev[N:], offset=offset)``,
        bit for bit. The CPU extension runs the symmetric op where it pays
        (:data:`SYMMETRIC_MIN_D`, :data:`SYMMETRIC_FILTERS`); elsewhere (narrower rows,
        other formats, CUDA, the reference backend) those general calls are made.
    """
    k = check_int(k, "k", op="knn_sym")
    offset = check_int(offset, "offset", op="knn_sym")
    other_offset = check_int(other_offset, "other_offset", op="knn_sym")
    _, skip = _policy(self_match, None)
    if other is not None and skip:
        raise ValueError("knn_sym(): self_match='drop_nearest' needs the whole set in one call "
                         "(no other)")
    prev_dist, prev_index = (None, None) if prev is None else prev
    if _use_extension(x.device) and x.device.type == "cpu" and _symmetric_pays(x, filter):
        return Neighbors(*torch.ops.pdepth.knn_sym(
            x, other, k, skip, self_match == "exclude", prev_dist, prev_index, offset,
            other_offset, filter))
    if other is None:
        own = torch.arange(offset, offset + x.shape[0], device=x.device)
        return knn(x, x, k,
                   self_index=own if self_match == "exclude" else None,
                   self_match=self_match, prev=prev, offset=offset, filter=filter)
    n = x.shape[0]
    split = (None, None) if prev is None else (
        (prev_dist[:n], prev_index[:n]), (prev_dist[n:], prev_index[n:]))
    top_x = knn(x, other, k, prev=split[0], offset=other_offset, filter=filter)
    top_o = knn(other, x, k, prev=split[1], offset=offset, filter=filter)
    return Neighbors(torch.cat([top_x.dist, top_o.dist]), torch.cat([top_x.index, top_o.index]))


def vote(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform vote over ``neighbor_labels[M, k]`` (int64 in ``[0, num_classes)``, or -1): the
    most frequent label per row, ties to the lowest class. A -1 (a missing neighbour, see
    :func:`neighbor_labels`) does not vote; a row with no label votes -1. Returns ``[M]``
    int64. ``num_classes`` is at most :data:`MAX_CLASSES`. Not differentiable."""
    num_classes = check_num_classes(num_classes, "vote")
    labels = _as_index(neighbor_labels, "neighbor_labels")
    if _use_extension(labels.device):
        return torch.ops.pdepth.vote(labels, num_classes)
    return reference.vote(labels, num_classes)


def check_filter(op: str, filter, dtype: torch.dtype, device: torch.device) -> None:
    """The op's rule for ``filter=`` (csrc/knn.cpp, resolve_filter), for the paths that do not
    reach the op (the reference, the fake kernels)."""
    if not isinstance(filter, str) or filter not in FILTERS:
        valid = ", ".join(repr(f) for f in FILTERS)
        raise ValueError(f"{op}(): filter must be one of {valid}, got {filter!r}")
    if filter not in ("auto", "fp32") and dtype == torch.float64:
        raise ValueError(
            f"{op}(): filter='{filter}' needs float32, float16 or bfloat16 inputs; float64 "
            "inputs are filtered by a float64 GEMM (filter='fp32' or 'auto')"
        )
    if filter == "tf32" and device.type != "cuda":
        raise ValueError(
            f"{op}(): filter='tf32' is a CUDA tensor-core format; on the CPU use 'auto', "
            "'fp32', 'bf16' or 'bf16x3'"
        )


def knn_plan(
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    filter: str = "auto",
) -> dict:
    """What :func:`knn` will do for rows of ``dim`` features: the filter ``"auto"`` resolves
    to and why, its margin (relative to ``|a|^2 + |b|^2``), the threshold growth (relative to
    the k-th distance), the reduction block, the bfloat16 GEMM backend and the fallback rule.
    See docs/design.md section 6."""
    dim = check_int(dim, "dim", op="knn_plan")
    device = torch.device(device)
    check_filter("knn_plan", filter, dtype, device)
    if _C is None:
        return {"filter": "fp32", "reason": "no compiled extension: the float64 reference"}
    return dict(_C.knn_plan(dim, "float64" if dtype == torch.float64 else "float32",
                            device.type, filter))


def knn_stats(reset: bool = False) -> dict:
    """Counters of the compiled kernels since the last reset (process-wide): calls, pairs
    scanned, ``candidates`` (canonical keys computed; about ``k (1 + ln(N / k))`` per query
    when the filter is tight), rows whose threshold was seeded from the GEMM keys, tiles,
    ``fallback_tiles`` (low-precision tiles recomputed in fp32 because too many pairs
    passed) and the pairs filtered in each format; ``ns_gemm``, ``ns_norms``, ``ns_seeds``,
    ``ns_keys`` and ``ns_select``, the CPU kernel's wall time in nanoseconds per phase (filter
    GEMM; norms and centring shifts; threshold seeds; canonical keys; k-selection), timed
    around each phase's parallel section (wall time, not CPU time). On the symmetric path
    (:func:`knn_sym`) ``pairs`` counts each pair once per direction and ``candidates`` each
    key once; its ``ns_seeds`` is the upper bounds offered to both rows of each pair, its
    ``ns_select`` the candidate lists and the heap offers. ``reset=True`` returns and zeroes them. On
    CUDA, candidates and seeded rows are not counted."""
    if _C is None:
        return {}
    return dict(_C.knn_stats(reset))


# ---- fake (meta) kernels -------------------------------------------------------------------
# They run where the real ones would: on meta tensors, under FakeTensorMode, and whenever one
# argument is on the meta device (Meta outranks CPU in dispatch). They check what the real op
# checks without reading values (devices, shapes, dtypes; same messages and order as
# csrc/knn.cpp), so a mix of meta and real tensors raises like any device mismatch instead of
# returning uninitialised memory.

_C10_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
    torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dt(t) -> str:
    return _C10_NAMES.get(t.dtype, str(t.dtype))


def _sh(t) -> str:
    return "[" + ", ".join(str(x) for x in t.shape) + "]"


def _value_check(ok, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _same_device(t, device, message: str) -> None:
    if t.device != device:
        raise RuntimeError(message)


def _fake_check_inputs(op, q, s):
    """queries and support: dims, dtypes, devices, dimension D."""
    _value_check(q.dim() == 2, f"{op}(): queries must be 2-D [M, D], got shape {_sh(q)}")
    _value_check(s.dim() == 2, f"{op}(): support must be 2-D [N, D], got shape {_sh(s)}")
    _value_check(q.dtype in _FLOATS, f"{op}(): queries must be float16, bfloat16, "
                 f"float32 or float64, got {_dt(q)}")
    _value_check(q.dtype == s.dtype, f"{op}(): queries and support must have the same "
                 f"dtype, got queries {_dt(q)} and support {_dt(s)}")
    _same_device(s, q.device, f"{op}(): queries and support must be on the same device, got "
                 f"queries on {q.device} and support on {s.device}")
    _value_check(q.shape[1] == s.shape[1], f"{op}(): queries and support must have the "
                 f"same dimension D, got queries {_sh(q)} and support {_sh(s)}")


def _fake_check_ints(op, k, skip, offset, n):
    """k, skip and offset, and what they add up to, against int64."""
    _value_check(k >= 1, f"{op}(): k must be >= 1, got k={k}")
    _value_check(skip in (0, 1), f"{op}(): skip must be 0 or 1, got {skip}")
    _value_check(offset >= 0, f"{op}(): offset must be >= 0, got offset={offset}")
    _value_check(k <= _INT64_MAX - skip, f"{op}(): k={k} is too large (k + {skip} "
                 "dropped nearest must fit in int64)")
    _value_check(offset <= _INT64_MAX - n, f"{op}(): offset + N must fit in int64, got "
                 f"offset={offset} and N={n}")


def _fake_check_self_index(op, si, q):
    m = q.shape[0]
    _value_check(si.dim() == 1 and si.shape[0] == m, f"{op}(): self_index must be 1-D "
                 f"with one entry per query ({m}), got shape {_sh(si)}")
    _value_check(si.dtype == torch.int64, f"{op}(): self_index must be int64, got {_dt(si)}")
    _same_device(si, q.device, f"{op}(): self_index must be on the queries' device "
                 f"{q.device}, got {si.device}")


def _fake_check_prev(op, q, prev_dist, prev_index, kk, skip):
    """The running top-k: both parts, no drop_nearest, shape [M, k + skip], dtypes, device."""
    m = q.shape[0]
    _value_check(prev_dist is not None and prev_index is not None, f"{op}(): prev "
                 "needs both the distances and the indices of the running top-k")
    _value_check(skip == 0, f"{op}(): streaming (prev) is not supported with "
                 "self_match='drop_nearest'; stream with self_match='include' and "
                 "k+1, then drop the first column")
    for what, t, dtype in (("distances", prev_dist, _compute_dtype(q.dtype)),
                           ("indices", prev_index, torch.int64)):
        _value_check(t.dim() == 2 and t.shape[0] == m and t.shape[1] == kk,
                     f"{op}(): prev {what} must have shape [{m}, {kk}], got {_sh(t)}")
        for_inputs = f" for {_dt(q)} inputs" if what == "distances" else ""
        _value_check(t.dtype == dtype, f"{op}(): prev {what} must be "
                     f"{_C10_NAMES[dtype]}{for_inputs}, got {_dt(t)}")
    if prev_dist.device != q.device or prev_index.device != q.device:
        raise RuntimeError(f"{op}(): prev must be on the queries' device {q.device}")


# Mirrors the op schema's argument list (csrc/knn.cpp), as the fake kernels must.
def _fake_check_knn(op, queries, support, k, self_index, skip, prev_dist, prev_index,
                    offset, filter="auto"):
    """The op's checks in csrc/knn.cpp's order (arguments as in its schema); ``(M, k)``."""
    _fake_check_inputs(op, queries, support)
    check_filter(op, filter, queries.dtype, queries.device)
    m, n, kk = queries.shape[0], support.shape[0], k + skip
    _fake_check_ints(op, k, skip, offset, n)
    if self_index is not None:
        _fake_check_self_index(op, self_index, queries)
    if prev_dist is not None or prev_index is not None:
        _fake_check_prev(op, queries, prev_dist, prev_index, kk, skip)
    elif m > 0:
        # A self match can only lower the usable support: kk <= N is necessary.
        _value_check(kk <= n, f"{op}(): k={k}" + (" (+1 dropped nearest)" if skip else "")
                     + f" is larger than the usable support: {n} points")
    return m, k


def _check_num_classes(op, num_classes):
    """The C++ ops' rule on num_classes (csrc/knn.cpp, kMaxClasses = MAX_CLASSES)."""
    _value_check(num_classes >= 1, f"{op}(): num_classes must be >= 1, got {num_classes}")
    _value_check(num_classes <= MAX_CLASSES, f"{op}(): num_classes={num_classes} exceeds the "
                 f"limit of MAX_CLASSES={MAX_CLASSES} (a vote keeps one count per class)")


def _fake_check_labels(op, name, labels, n, num_classes, device):
    _check_num_classes(op, num_classes)
    _value_check(labels.dim() == 1 and labels.shape[0] == n,
                 f"{op}(): {name} must be 1-D with {n} entries, got shape {_sh(labels)}")
    _value_check(labels.dtype == torch.int64,
                 f"{op}(): {name} must be int64, got {_dt(labels)}")
    _same_device(labels, device, f"{op}(): {name} must be on {device}, got {labels.device}")


if _C is not None:

    @torch.library.register_fake("pdepth::knn")
    def _knn_fake(queries, support, k, self_index, skip, prev_dist, prev_index, offset,
                  filter="auto"):
        m, k = _fake_check_knn("knn", queries, support, k, self_index, skip, prev_dist,
                               prev_index, offset, filter)
        return (
            queries.new_empty((m, k), dtype=_compute_dtype(queries.dtype)),
            queries.new_empty((m, k), dtype=torch.int64),
        )

    @torch.library.register_fake("pdepth::knn_vote")
    def _knn_vote_fake(queries, support, support_labels, k, num_classes, self_index, skip,
                       filter="auto"):
        m, k = _fake_check_knn("knn_vote", queries, support, k, self_index, skip, None, None,
                               0, filter)
        _fake_check_labels("knn_vote", "support_labels", support_labels, support.shape[0],
                           num_classes, support.device)
        return (
            queries.new_empty((m,), dtype=torch.int64),
            queries.new_empty((m, k), dtype=_compute_dtype(queries.dtype)),
            queries.new_empty((m, k), dtype=torch.int64),
        )

    @torch.library.register_fake("pdepth::knn_sym")
    def _knn_sym_fake(a, b, k, skip, exclude_self, prev_dist, prev_index, offset_a, offset_b,
                      filter="auto"):
        if b is None:
            m, k = _fake_check_knn("knn_sym", a, a, k, None, skip, prev_dist, prev_index,
                                   offset_a, filter)
        else:
            _fake_check_inputs("knn_sym", a, b)
            check_filter("knn_sym", filter, a.dtype, a.device)
            _value_check(skip == 0, "knn_sym(): skip (drop_nearest) needs the whole set in "
                         f"one call (no b), got skip={skip}")
            m = a.shape[0] + b.shape[0]
        return (
            a.new_empty((m, k), dtype=_compute_dtype(a.dtype)),
            a.new_empty((m, k), dtype=torch.int64),
        )

    @torch.library.register_fake("pdepth::vote")
    def _vote_fake(neighbor_labels, num_classes):
        nl = neighbor_labels
        _check_num_classes("vote", num_classes)
        _value_check(nl.dim() == 2 and nl.shape[1] >= 1, "vote(): neighbor_labels must be "
                     f"2-D [M, k] with k >= 1, got shape {_sh(nl)}")
        _value_check(nl.dtype == torch.int64,
                     f"vote(): neighbor_labels must be int64, got {_dt(nl)}")
        return nl.new_empty((nl.shape[0],), dtype=torch.int64)
