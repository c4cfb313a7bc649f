"""The running top-k of the k-NN ops and its merge rule (docs/design.md sections 2 and 8).

:class:`Neighbors` and :class:`Vote` are what the ops return; :func:`empty_topk` starts a
stream; :func:`merge_topk` merges op outputs (e.g. the ranks' shards) by the op's order:
distance, then lower index, empty slots last; :func:`neighbor_labels` gathers the labels of
a top-k, keeping its empty slots; :func:`vote_counts` counts each class among them (what the
vote's winner won by).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._args import as_index, check_num_classes

__all__ = ["Neighbors", "Vote", "empty_topk", "merge_topk", "neighbor_labels", "vote_counts"]


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
    """The k best of several top-k lists, by the op's rule (docs/design.md sections 2 and 8).

    Rows of ``dist[M, c]`` / ``index[M, c]`` are ordered by distance, equal distances by lower
    index, empty slots (index -1, distance inf) last, and the first ``k`` columns are kept:
    two stable sorts, by index (-1 mapped to the int64 maximum) and then by distance.

    The inputs must be op outputs (:func:`pdepth.knn` with global indices, e.g. ``offset=``
    a shard's start), concatenated along dim 1: the op's distance of a (query, support) pair
    is a fixed function of the two rows alone, so merging its per-chunk lists gives exactly
    the list of one call over the union (the same bits and the same order). Used by
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


def neighbor_labels(labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The labels of neighbours ``index[M, k]`` (e.g. a streamed :class:`Neighbors`'s
    ``index``): ``[M, k]`` int64, ``labels[index]`` where ``index >= 0`` and -1 in the empty
    slots (index -1) that a stream with fewer than k usable points leaves. Pass the result to
    :func:`pdepth.vote`, which ignores the -1. (``labels[index]`` would read -1 as the last
    label.)

    Args:
        labels: ``[N]`` integer labels of the support set (global support indices).
        index: ``[M, k]`` integer support indices in ``[-1, N)``, on ``labels``' device.
    """
    labels = as_index(labels, "labels")
    index = as_index(index, "index")
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


def vote_counts(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many of each query's neighbours carry each class: ``[M, C]`` from
    ``neighbor_labels [M, k]`` (int64 in ``[0, num_classes)``, -1 for an empty slot, which
    counts for no class; :func:`neighbor_labels`). int16 while ``k`` fits in it, else int32;
    on the labels' device. :func:`pdepth.vote`'s prediction is the first class of largest count
    (docs/design.md section 2); the counts say by how much it won."""
    num_classes = check_num_classes(num_classes, "vote_counts")
    labels = as_index(neighbor_labels, "neighbor_labels")
    if labels.dim() != 2:
        raise ValueError(f"vote_counts(): neighbor_labels must be 2-D [M, k], got shape "
                         f"{list(labels.shape)}")
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(f"vote_counts(): neighbor_labels must lie in [-1, num_classes="
                         f"{num_classes}), got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    m, k = labels.shape
    dtype = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
    # counted in int32 (CUDA's atomics take it), stored in the smallest type k fits in
    counts = torch.zeros(m, num_classes + 1, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(1, labels + 1, torch.ones_like(labels, dtype=torch.int32))  # col 0: -1
    return counts[:, 1:].to(dtype).contiguous()
