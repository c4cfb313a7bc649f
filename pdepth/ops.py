"""Python entry points of the k-NN ops: argument handling, backend choice, fake kernels.

The work is done by ``torch.ops.pdepth.*`` (the compiled extension ``pdepth._C``). When the
extension cannot be loaded, or was built without CUDA and gets CUDA tensors, pdepth warns
once and uses :mod:`pdepth.reference` instead; :func:`backend` says which is in use.
"""

from __future__ import annotations

import operator
import warnings
from typing import NamedTuple

import torch

from . import reference

__all__ = [
    "Neighbors",
    "Vote",
    "SELF_MATCH_POLICIES",
    "backend",
    "build_info",
    "check_int",
    "empty_topk",
    "knn",
    "knn_vote",
    "merge_topk",
    "neighbor_labels",
    "vote",
]

SELF_MATCH_POLICIES = ("exclude", "include", "drop_nearest")



def _installed_extension_elsewhere(pkg_dir, search_path=None):
    """The compiled ``pdepth/_C*.so`` of another pdepth on ``search_path`` (default
    ``sys.path``, plus where the installed distribution's files are), or None."""
    import glob
    import os
    import sys

    here = os.path.realpath(pkg_dir)
    found = []
    for entry in sys.path if search_path is None else search_path:
        found += glob.glob(os.path.join(entry or os.getcwd(), "pdepth", "_C*.so"))
    if search_path is None:
        try:
            from importlib.metadata import PackageNotFoundError, distribution

            dist = distribution("pdepth")
            files = dist.files or []
            found += [str(dist.locate_file(f)) for f in files if f.name.startswith("_C")]
        except (PackageNotFoundError, OSError):
            pass
    for so in found:
        if os.path.isfile(so) and os.path.dirname(os.path.realpath(so)) != here:
            return so
    return None


def _load_failure_message(exc, pkg_dir=None, search_path=None):
    """Why ``from . import _C`` failed, and what to do, in words (the bare ImportError of a
    missing submodule talks of 'a circular import')."""
    import glob
    import os

    pkg_dir = pkg_dir or os.path.dirname(os.path.abspath(__file__))
    built = glob.glob(os.path.join(pkg_dir, "_C*.so"))
    if built:
        return (
            f"{built[0]} failed to load ({type(exc).__name__}: {exc}); it was probably built "
            f"against another torch than the running {torch.__version__}: rebuild it with "
            "`pip install --no-build-isolation .` (or `-e .` for a checkout)"
        )
    root = os.path.dirname(pkg_dir)
    source_tree = os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(
        os.path.join(root, "csrc")
    )
    if source_tree:
        installed = _installed_extension_elsewhere(pkg_dir, search_path)
        if installed:
            why = "it is the current directory" if root == os.getcwd() else "see sys.path"
            return (
                f"pdepth was imported from the source tree {pkg_dir}, which has no built "
                f"extension, and it shadows the installed pdepth (with {installed}) because "
                f"the source tree comes first on sys.path ({why}); run from outside the "
                "source tree, or build in place with `pip install --no-build-isolation -e .`"
            )
        return (
            f"no compiled pdepth/_C*.so in the source tree {pkg_dir}: build it with "
            "`pip install --no-build-isolation -e .` (or `make build`)"
        )
    return (
        f"no compiled pdepth/_C*.so in {pkg_dir}: reinstall with "
        "`pip install --no-build-isolation .` (see the README, Install)"
    )


try:
    from . import _C  # noqa: F401  (registers torch.ops.pdepth.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _LOAD_ERROR = ImportError(_load_failure_message(exc))
    _LOAD_ERROR.__cause__ = exc

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class Neighbors(NamedTuple):
    """k nearest neighbours: ``dist[M, k]`` squared L2 distances (ascending; float32, or
    float64 for float64 inputs) and ``index[M, k]`` int64 support indices (-1: empty slot)."""

    dist: torch.Tensor
    index: torch.Tensor


class Vote(NamedTuple):
    """k-NN vote: ``pred[M]`` int64 predicted labels and the neighbours it was voted from."""

    pred: torch.Tensor
    dist: torch.Tensor
    index: torch.Tensor


def build_info() -> dict:
    """What the extension was built with: torch and CUDA versions, CUDA archs, OpenMP.

    Returns ``{"backend": "reference", "error": ...}`` when the extension is not loaded."""
    if _C is None:
        return {"backend": "reference", "error": str(_LOAD_ERROR)}
    return {"backend": "extension", **_C.build_info()}


def backend(device: torch.device | str | None = None) -> str:
    """``"extension"`` when the compiled ops serve ``device`` (default CPU), else
    ``"reference"`` (the pure-torch fallback)."""
    device = torch.device(device or "cpu")
    if _C is None:
        return "reference"
    if device.type == "cuda" and not _C.build_info()["with_cuda"]:
        return "reference"
    return "extension"


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


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_int(value, name: str, *, op: str | None = None, min_value: int | None = None) -> int:
    """``value`` as a Python int, for integer arguments such as ``k``, ``offset`` and
    ``num_classes``.

    Accepts Python ints, numpy integers and 0-d integer tensors (and SymInts, unchanged).
    Raises ``TypeError`` for anything else, booleans included (``k=2.7`` or ``k=True`` is a
    bug, never truncated), and ``ValueError`` when the value does not fit in int64 (the ops'
    integer type) or is below ``min_value``. ``op`` prefixes messages with ``op():``.
    """
    prefix = f"{op}(): " if op else ""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        )
        what = f"a tensor of dtype {value.dtype} and shape {list(value.shape)}"
    else:
        # bool is an int subclass and numpy's bool_ has a dtype: both are rejected.
        ok = not isinstance(value, bool) and getattr(value, "dtype", None) != "bool"
        what = f"{value!r} ({type(value).__name__})"
    if ok:
        try:
            value = operator.index(value)
        except TypeError:
            ok = False
    if not ok:
        raise TypeError(f"{prefix}{name} must be an integer, got {what}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{prefix}{name}={value} does not fit in int64")
    if min_value is not None and value < min_value:
        raise ValueError(f"{prefix}{name} must be >= {min_value}, got {name}={value}")
    return value


def _as_index(t, name: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.long()


def empty_topk(
    num_queries: int, k: int, dtype=torch.float32, device=None
) -> Neighbors:
    """The start of a stream: a running top-k with every slot empty (distance inf, index -1).

    Pass it as ``prev`` with the first chunk when chunks may hold fewer than k points."""
    return Neighbors(
        torch.full((num_queries, k), float("inf"), dtype=dtype, device=device),
        torch.full((num_queries, k), -1, dtype=torch.int64, device=device),
    )


# Sort key of an empty slot (index -1): after every real support index.
_EMPTY_SORT_KEY = torch.iinfo(torch.int64).max


def merge_topk(
    dist: torch.Tensor, index: torch.Tensor, k: int, *, return_order: bool = False
):
    """The k best of several top-k lists, by the op's rule (design.md section 2).

    Rows of ``dist[M, c]`` / ``index[M, c]`` are ordered by distance, equal distances by lower
    index, empty slots (index -1, distance inf) last, and the first ``k`` columns are kept:
    two stable sorts, by index (-1 mapped to the int64 maximum) and then by distance.

    The inputs must be op outputs (:func:`knn` with global indices, e.g. ``offset=`` a
    shard's start), concatenated along dim 1: the op's distance of a (query, support) pair is
    a fixed function of the two rows alone, so merging its per-chunk lists gives exactly the
    list of one call over the union (the same bits and the same order). Used by
    :mod:`pdepth.distributed` to merge the ranks' shards.

    Args:
        dist: ``[M, c]`` float distances.
        index: ``[M, c]`` int64 global support indices, -1 for an empty slot.
        k: columns to keep (``k <= c``).
        return_order: also return ``order[M, k]`` int64, the source column of each kept
            entry, so that other per-entry columns (e.g. labels) follow the same permutation
            with ``extra.gather(1, order)``.

    Returns:
        :class:`Neighbors` ``(dist[M, k], index[M, k])``, or ``(Neighbors, order)`` with
        ``return_order=True``.
    """
    if dist.shape != index.shape or dist.dim() != 2:
        raise ValueError(
            f"merge_topk(): dist and index must be 2-D with the same shape, got "
            f"{tuple(dist.shape)} and {tuple(index.shape)}"
        )
    if not 0 <= k <= dist.shape[1]:
        raise ValueError(f"merge_topk(): k={k} must lie in [0, {dist.shape[1]}] (columns)")
    key = torch.where(index < 0, torch.full_like(index, _EMPTY_SORT_KEY), index)
    order = torch.argsort(key, dim=1, stable=True)
    order = order.gather(1, torch.argsort(dist.gather(1, order), dim=1, stable=True))[:, :k]
    merged = Neighbors(dist.gather(1, order), index.gather(1, order))
    return (merged, order) if return_order else merged


def knn(
    queries: torch.Tensor,
    support: torch.Tensor,
    k: int,
    *,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
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

    Returns:
        :class:`Neighbors` ``(dist[M, k], index[M, k])``: distances ascending, equal
        distances ordered by lower index; float32 distances (float64 for float64 inputs).
        Streaming a support set chunk by chunk gives exactly the result of one call. A
        stream with fewer than k usable points leaves empty slots (distance inf, index -1):
        gather their labels with :func:`neighbor_labels`, which keeps the -1.

    Raises ``ValueError`` when the squared distances could overflow the compute dtype
    (``8 * (max |q|^2 + max |s|^2)`` must be finite; rescale the inputs), and ``TypeError``
    for a non-integer ``k`` or ``offset``. Not differentiable: the outputs never require grad.
    """
    k = check_int(k, "k", op="knn")
    offset = check_int(offset, "offset", op="knn")
    self_index, skip = _policy(self_match, self_index)
    prev_dist, prev_index = (None, None) if prev is None else prev
    if _use_extension(queries.device):
        return Neighbors(
            *torch.ops.pdepth.knn(
                queries, support, k, self_index, skip, prev_dist, prev_index, offset
            )
        )
    return Neighbors(
        *reference.knn(
            queries, support, k, self_index=self_index, self_match=self_match, prev=prev,
            offset=offset,
        )
    )


def _num_classes(labels: torch.Tensor, num_classes: int | None) -> int:
    if num_classes is not None:
        return check_int(num_classes, "num_classes", op="knn_vote")
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
) -> Vote:
    """k-NN classification: the uniform vote of each query's k nearest support labels.

    Args:
        queries, support, k, self_index, self_match: as in :func:`knn`.
        support_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes; default ``support_labels.max() + 1``.

    Returns:
        :class:`Vote` ``(pred[M] int64, dist[M, k], index[M, k])``. The largest count wins;
        a tie goes to the lowest class id (scikit-learn's rule). Not differentiable: the
        outputs never require grad.
    """
    k = check_int(k, "k", op="knn_vote")
    labels = _as_index(support_labels, "support_labels")
    num_classes = _num_classes(labels, num_classes)
    self_index, skip = _policy(self_match, self_index)
    if _use_extension(queries.device):
        return Vote(
            *torch.ops.pdepth.knn_vote(
                queries, support, labels, k, num_classes, self_index, skip
            )
        )
    return Vote(
        *reference.knn_vote(
            queries, support, labels, k, num_classes, self_index=self_index,
            self_match=self_match,
        )
    )


def neighbor_labels(labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The labels of neighbours ``index[M, k]`` (e.g. a streamed :class:`Neighbors`'s
    ``index``): ``[M, k]`` int64, ``labels[index]`` where ``index >= 0`` and -1 in the empty
    slots (index -1) that a stream with fewer than k usable points leaves. Pass the result to
    :func:`vote`, which ignores the -1. (``labels[index]`` would read -1 as the last label.)

    Args:
        labels: ``[N]`` integer labels of the support set (global support indices).
        index: ``[M, k]`` integer support indices in ``[-1, N)``, on ``labels``' device.
    """
    labels = _as_index(labels, "labels")
    index = _as_index(index, "index")
    if labels.dim() != 1:
        raise ValueError(
            f"neighbor_labels(): labels must be 1-D [N], got shape {list(labels.shape)}"
        )
    if index.dim() != 2:
        raise ValueError(
            f"neighbor_labels(): index must be 2-D [M, k], got shape {list(index.shape)}"
        )
    if index.device != labels.device:
        raise RuntimeError(
            f"neighbor_labels(): index must be on labels' device {labels.device}, got "
            f"{index.device}"
        )
    n = labels.shape[0]
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= n:
            raise ValueError(
                f"neighbor_labels(): index must lie in [-1, {n}) (-1: an empty slot), got "
                f"values in [{lo}, {hi}]"
            )
    if n == 0:  # only empty slots
        return torch.full_like(index, -1)
    return torch.where(index >= 0, labels[index.clamp_min(0)], -1)


def vote(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform vote over ``neighbor_labels[M, k]`` (int64 in ``[0, num_classes)``, or -1): the
    most frequent label per row, ties to the lowest class. A -1 (a missing neighbour, see
    :func:`neighbor_labels`) does not vote; a row with no label votes -1. Returns ``[M]``
    int64. Not differentiable."""
    num_classes = check_int(num_classes, "num_classes", op="vote")
    labels = _as_index(neighbor_labels, "neighbor_labels")
    if _use_extension(labels.device):
        return torch.ops.pdepth.vote(labels, num_classes)
    return reference.vote(labels, num_classes)


if _C is not None:

    def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    # The fake (meta) kernels run where the real ones would: on meta tensors, under
    # FakeTensorMode, and whenever one argument is on the meta device (Meta outranks CPU in
    # dispatch). They check what the real op checks without reading values (devices,
    # shapes, dtypes; same messages as csrc/knn.cpp), so a mix of meta and real tensors
    # raises like any device mismatch instead of returning uninitialised memory.
    _C10_NAMES = {
        torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
        torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
        torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    }
    _FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def _dt(t) -> str:
        return _C10_NAMES.get(t.dtype, str(t.dtype))

    def _sh(t) -> str:
        return "[" + ", ".join(str(x) for x in t.shape) + "]"

    def _value_check(ok, message: str) -> None:
        if not ok:
            raise ValueError(message)

    def _fake_check_knn(op, queries, support, k, self_index, skip, prev_dist, prev_index,
                        offset):
        q, s = queries, support
        _value_check(q.dim() == 2, f"{op}(): queries must be 2-D [M, D], got shape {_sh(q)}")
        _value_check(s.dim() == 2, f"{op}(): support must be 2-D [N, D], got shape {_sh(s)}")
        _value_check(q.dtype in _FLOATS, f"{op}(): queries must be float16, bfloat16, "
                     f"float32 or float64, got {_dt(q)}")
        _value_check(q.dtype == s.dtype, f"{op}(): queries and support must have the same "
                     f"dtype, got queries {_dt(q)} and support {_dt(s)}")
        if q.device != s.device:
            raise RuntimeError(f"{op}(): queries and support must be on the same device, got "
                               f"queries on {q.device} and support on {s.device}")
        _value_check(q.shape[1] == s.shape[1], f"{op}(): queries and support must have the "
                     f"same dimension D, got queries {_sh(q)} and support {_sh(s)}")
        _value_check(k >= 1, f"{op}(): k must be >= 1, got k={k}")
        _value_check(skip in (0, 1), f"{op}(): skip must be 0 or 1, got {skip}")
        _value_check(offset >= 0, f"{op}(): offset must be >= 0, got offset={offset}")
        m, n, kk = q.shape[0], s.shape[0], k + skip
        _value_check(k <= _INT64_MAX - skip, f"{op}(): k={k} is too large (k + {skip} "
                     "dropped nearest must fit in int64)")
        _value_check(offset <= _INT64_MAX - n, f"{op}(): offset + N must fit in int64, got "
                     f"offset={offset} and N={n}")
        if self_index is not None:
            si = self_index
            _value_check(si.dim() == 1 and si.shape[0] == m, f"{op}(): self_index must be 1-D "
                         f"with one entry per query ({m}), got shape {_sh(si)}")
            _value_check(si.dtype == torch.int64,
                         f"{op}(): self_index must be int64, got {_dt(si)}")
            if si.device != q.device:
                raise RuntimeError(f"{op}(): self_index must be on the queries' device "
                                   f"{q.device}, got {si.device}")
        if prev_dist is not None or prev_index is not None:
            _value_check(prev_dist is not None and prev_index is not None, f"{op}(): prev "
                         "needs both the distances and the indices of the running top-k")
            _value_check(skip == 0, f"{op}(): streaming (prev) is not supported with "
                         "self_match='drop_nearest'; stream with self_match='include' and "
                         "k+1, then drop the first column")
            for what, t, dtype in (("distances", prev_dist, _compute_dtype(q.dtype)),
                                   ("indices", prev_index, torch.int64)):
                _value_check(t.dim() == 2 and t.shape[0] == m and t.shape[1] == kk,
                             f"{op}(): prev {what} must have shape [{m}, {kk}], got {_sh(t)}")
                _value_check(t.dtype == dtype, f"{op}(): prev {what} must be "
                             f"{_C10_NAMES[dtype]}" + (f" for {_dt(q)} inputs" if
                                                      what == "distances" else "") +
                             f", got {_dt(t)}")
            if prev_dist.device != q.device or prev_index.device != q.device:
                raise RuntimeError(f"{op}(): prev must be on the queries' device {q.device}")
        elif m > 0:
            # A self match can only lower the usable support: kk <= N is necessary.
            _value_check(kk <= n, f"{op}(): k={k}" + (" (+1 dropped nearest)" if skip else "")
                         + f" is larger than the usable support: {n} points")
        return m, k

    def _fake_check_labels(op, name, labels, n, num_classes, device):
        _value_check(num_classes >= 1, f"{op}(): num_classes must be >= 1, got {num_classes}")
        _value_check(labels.dim() == 1 and labels.shape[0] == n,
                     f"{op}(): {name} must be 1-D with {n} entries, got shape {_sh(labels)}")
        _value_check(labels.dtype == torch.int64,
                     f"{op}(): {name} must be int64, got {_dt(labels)}")
        if labels.device != device:
            raise RuntimeError(f"{op}(): {name} must be on {device}, got {labels.device}")

    @torch.library.register_fake("pdepth::knn")
    def _knn_fake(queries, support, k, self_index, skip, prev_dist, prev_index, offset):
        m, k = _fake_check_knn("knn", queries, support, k, self_index, skip, prev_dist,
                               prev_index, offset)
        return (
            queries.new_empty((m, k), dtype=_compute_dtype(queries.dtype)),
            queries.new_empty((m, k), dtype=torch.int64),
        )

    @torch.library.register_fake("pdepth::knn_vote")
    def _knn_vote_fake(queries, support, support_labels, k, num_classes, self_index, skip):
        m, k = _fake_check_knn("knn_vote", queries, support, k, self_index, skip, None, None,
                               0)
        _fake_check_labels("knn_vote", "support_labels", support_labels, support.shape[0],
                           num_classes, support.device)
        return (
            queries.new_empty((m,), dtype=torch.int64),
            queries.new_empty((m, k), dtype=_compute_dtype(queries.dtype)),
            queries.new_empty((m, k), dtype=torch.int64),
        )

    @torch.library.register_fake("pdepth::vote")
    def _vote_fake(neighbor_labels, num_classes):
        nl = neighbor_labels
        _value_check(num_classes >= 1, f"vote(): num_classes must be >= 1, got {num_classes}")
        _value_check(nl.dim() == 2 and nl.shape[1] >= 1, "vote(): neighbor_labels must be "
                     f"2-D [M, k] with k >= 1, got shape {_sh(nl)}")
        _value_check(nl.dtype == torch.int64,
                     f"vote(): neighbor_labels must be int64, got {_dt(nl)}")
        return nl.new_empty((nl.shape[0],), dtype=torch.int64)
