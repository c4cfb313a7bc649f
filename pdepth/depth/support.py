"""Where the support set lives: :class:`LocalSupport` (all of it in this process) or
:class:`pdepth.depth.sharded.ShardedSupport` (this rank's shard of a process group). Both
prediction-depth drivers talk to the support set through this small interface only, so
sharding is one implementation of it rather than a branch in every function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import check_class_ids, knn_vote, neighbor_labels, vote
from ..topk import vote_counts

__all__ = ["LayerVote", "LocalSupport", "Support", "check_full", "layer_vote", "stack_votes"]


class Support:
    """The interface (and the local behaviour, which :class:`LocalSupport` keeps).

    ``offset`` is the global index of this process's first support row.
    """

    offset = 0

    def check_call(self, *, scoring_support: bool, num_classes, queries_arg: str) -> None:
        """Argument rules of the placement itself, checked before any work."""

    def size(self, n: int) -> int | None:
        """The global support size, where this process knows it (``n``: its rows)."""
        return n

    def count_classes(self, num_classes: int | None, labels: torch.Tensor, named) -> int:
        """The number of classes over the support labels and the ``(name, tensor)`` pairs
        ``named`` (see :func:`_class_count`)."""
        return _class_count(num_classes, [("support_labels", labels), *named])

    def check_labels(self) -> None:
        """Raises what :meth:`count_classes` left to the collective (nothing, locally)."""

    def check_k(self, k: int, n: int, self_index: torch.Tensor | None) -> None:
        """Before streaming: k against the usable support (the op cannot, a batch at a
        time). A sharded support set's global size is known only when the ranks merge."""
        excludes = self_index is not None and bool((self_index >= 0).any())
        if k > n - (1 if excludes else 0):
            raise ValueError(
                f"k={k} is larger than the support set allows (N={n}"
                f"{', one point excluded as self match' if excludes else ''})"
            )

    def knn_vote(self, queries, support, labels, k: int, num_classes: int, *,
                 self_index=None, self_match: str = "exclude", filter: str = "auto",
                 counts: bool = False) -> LayerVote:
        """The k-NN vote of ``queries`` (:func:`pdepth.knn_vote`; ``filter``: the op's filter
        format, which never changes the predictions), with the vote counts if ``counts``."""
        v = knn_vote(queries, support, labels, k, num_classes, self_index=self_index,
                     self_match=self_match, filter=filter)
        return LayerVote(v.pred.cpu(), vote_counts(neighbor_labels(labels, v.index),
                                                   num_classes).cpu() if counts else None)

    def finish(self, tops, labels: torch.Tensor, *, k: int, num_classes: int,
               self_index=None, row0: int = 0, dims=(), counts: bool = False
               ) -> list[LayerVote]:
        """The votes (CPU; with the counts if ``counts``) of the running top-k lists ``tops``
        (one per probe) that streaming this process's support rows (labels ``labels``) left;
        ``dims`` are the probes' embedding dimensions (compared across ranks when sharded)."""
        votes = []
        for top in tops:
            check_full(top.index, k, labels.shape[0], row0)  # no -1 slot reaches the vote
            votes.append(layer_vote(neighbor_labels(labels, top.index), num_classes, counts))
        return votes

    def fail(self, error: BaseException, *, n: int, num_classes) -> None:
        """Reports a failure of this process's streaming step (raises)."""
        raise error


class LayerVote(NamedTuple):
    """One probe's k-NN vote: ``pred [M]`` int64 and, where asked for, ``counts [M, C]``
    (:func:`pdepth.topk.vote_counts`: int16, or int32 for k >= 2^15); on the CPU."""

    pred: torch.Tensor
    counts: torch.Tensor | None = None


def layer_vote(labels_k: torch.Tensor, num_classes: int, counts: bool) -> LayerVote:
    """The :class:`LayerVote` of the neighbour labels ``labels_k [M, k]``."""
    return LayerVote(vote(labels_k, num_classes).cpu(),
                     vote_counts(labels_k, num_classes).cpu() if counts else None)


def stack_votes(chunks: list[list[LayerVote]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(layer_pred [L, M], counts [L, M, C] or None)`` of the per-probe votes of query chunks
    (``chunks[c][l]``: chunk c, probe l), the chunks' rows in order."""
    layers = range(len(chunks[0]))
    pred = torch.stack([torch.cat([c[layer].pred for c in chunks]) for layer in layers])
    if chunks[0][0].counts is None:
        return pred, None
    return pred, torch.stack([torch.cat([c[layer].counts for c in chunks]) for layer in layers])


class LocalSupport(Support):
    """The whole support set lives in this process (the default)."""

    def __repr__(self) -> str:
        return "LocalSupport()"


def check_full(index: torch.Tensor, k: int, n: int, row0: int) -> None:
    """Every query must have k real neighbours (no empty slot, index -1) before the vote:
    the one check a streaming driver needs after the op (which sees a batch at a time)."""
    if not index.numel():
        return
    filled = (index >= 0).sum(1)
    least = int(filled.min())
    if least < k:
        j = int(filled.argmin())
        raise ValueError(
            f"k={k} is larger than the usable support: query {row0 + j} has only {least} "
            f"support points to vote from (support_labels has N={n}, minus its self match). "
            "Lower k or give a larger support set."
        )


def _class_count(num_classes: int | None, named) -> int:
    """Checks the class-id vectors ``named`` (``(name, tensor or None)`` pairs) and returns
    the number of classes.

    Every vector must hold ids ``>= 0``, and ``< num_classes`` when ``num_classes`` is given.
    Without it the count is one more than the largest id in *any* of the vectors, so a class
    that occurs only among the query labels or the reference (absent from the support set,
    as real splits produce) counts too: the probes simply never predict it.
    """
    top = -1
    for name, t in named:
        if t is None or not t.numel():
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            raise ValueError(
                f"{name} must hold class ids >= 0, got values in [{lo}, {hi}]; map the labels "
                "to 0..C-1 first"
            )
        if num_classes is not None and hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, num_classes={num_classes}), got values in "
                f"[{lo}, {hi}]; raise num_classes or leave it out to infer it from the labels"
            )
        check_class_ids(t, name)  # before anything is sized by the largest id
        top = max(top, hi)
    return num_classes if num_classes is not None else max(top + 1, 1)
