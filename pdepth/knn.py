"""Python entry points of the k-NN ops: argument handling, backend choice, fake kernels.

The work is done by ``torch.ops.pdepth.*`` (the compiled extension ``pdepth._C``). When the
extension cannot be loaded, or was built without CUDA and gets CUDA tensors, pdepth warns
once and uses :mod:`pdepth.reference` instead; :func:`backend` says which is in use.
"""

from __future__ import annotations

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
    "empty_topk",
    "knn",
    "knn_vote",
    "merge_topk",
    "vote",
]

SELF_MATCH_POLICIES = ("exclude", "include", "drop_nearest")

try:
    from . import _C  # noqa: F401  (registers torch.ops.pdepth.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _LOAD_ERROR = exc

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
            f"pdepth: the compiled extension pdepth._C could not be loaded ({_LOAD_ERROR}); "
            "using the pure-torch reference implementation (slow).",
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
        Streaming a support set chunk by chunk gives exactly the result of one call.
    """
    self_index, skip = _policy(self_match, self_index)
    prev_dist, prev_index = (None, None) if prev is None else prev
    if _use_extension(queries.device):
        return Neighbors(
            *torch.ops.pdepth.knn(
                queries, support, int(k), self_index, skip, prev_dist, prev_index, int(offset)
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
        return int(num_classes)
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
        a tie goes to the lowest class id (scikit-learn's rule).
    """
    labels = _as_index(support_labels, "support_labels")
    num_classes = _num_classes(labels, num_classes)
    self_index, skip = _policy(self_match, self_index)
    if _use_extension(queries.device):
        return Vote(
            *torch.ops.pdepth.knn_vote(
                queries, support, labels, int(k), num_classes, self_index, skip
            )
        )
    return Vote(
        *reference.knn_vote(
            queries, support, labels, k, num_classes, self_index=self_index,
            self_match=self_match,
        )
    )


def vote(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform vote over ``neighbor_labels[M, k]`` (int64 in ``[0, num_classes)``): the most
    frequent label per row, ties to the lowest class. Returns ``[M]`` int64."""
    labels = _as_index(neighbor_labels, "neighbor_labels")
    if _use_extension(labels.device):
        return torch.ops.pdepth.vote(labels, int(num_classes))
    return reference.vote(labels, int(num_classes))


if _C is not None:

    def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("pdepth::knn")
    def _knn_fake(queries, support, k, self_index, skip, prev_dist, prev_index, offset):
        m = queries.shape[0]
        return (
            queries.new_empty((m, k), dtype=_compute_dtype(queries.dtype)),
            queries.new_empty((m, k), dtype=torch.int64),
        )

    @torch.library.register_fake("pdepth::knn_vote")
    def _knn_vote_fake(queries, support, support_labels, k, num_classes, self_index, skip):
        m = queries.shape[0]
        return (
            queries.new_empty((m,), dtype=torch.int64),
            queries.new_empty((m, k), dtype=_compute_dtype(queries.dtype)),
            queries.new_empty((m, k), dtype=torch.int64),
        )

    @torch.library.register_fake("pdepth::vote")
    def _vote_fake(neighbor_labels, num_classes):
        return neighbor_labels.new_empty((neighbor_labels.shape[0],), dtype=torch.int64)
