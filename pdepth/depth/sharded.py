""":class:`ShardedSupport`: the support set is sharded across a process group. It implements
the same small interface as :class:`pdepth.depth.support.LocalSupport` (and lives beside it, above
:mod:`pdepth.distributed`, whose collectives it uses), so both
prediction-depth drivers run unchanged on a shard; every call that talks to the other ranks
is a collective (every rank makes it, in the same order)."""

from __future__ import annotations

import torch

from ..distributed.shards import knn_vote, merge_shards, shard_neighbor_labels
from ..topk import vote_counts
from .support import LayerVote, Support, _class_count, check_full, layer_vote

__all__ = ["ShardedSupport"]


class ShardedSupport(Support):
    """This rank holds the contiguous rows ``offset ..`` of the support set; the other ranks
    of ``process_group`` (default: the world) hold the rest (see
    :func:`pdepth.distributed.shard_range`).

    Pass it as ``shard=`` to :func:`pdepth.prediction_depth` or
    :func:`pdepth.stream_prediction_depth`. Every rank then calls with the same queries,
    ``num_classes`` (required), ``self_index`` (global indices) and ``k``, and gets the whole
    result, equal to the single-process one. ``filter=`` may differ between ranks (it never
    changes a result).
    """

    def __init__(self, offset: int, process_group=None):
        self.offset = offset
        self.process_group = process_group
        self._label_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"ShardedSupport(offset={self.offset!r}, process_group={self.process_group!r})"

    def check_call(self, *, scoring_support: bool, num_classes, queries_arg: str) -> None:
        if scoring_support or num_classes is None:
            raise ValueError(f"a sharded support set (shard= or shard_offset=) needs "
                             f"{queries_arg}= and num_classes=, the same on every rank")

    def size(self, n: int) -> None:
        return None  # the ranks agree on the global size in the collective

    def count_classes(self, num_classes: int | None, labels: torch.Tensor, named) -> int:
        # This shard's labels differ per rank: checked inside the collective (check_labels,
        # or the op's own check in knn_vote), so that every rank raises alike. The error
        # belongs to this call: a reused ShardedSupport starts clean.
        self._label_error = None
        try:
            _class_count(num_classes, [("support_labels", labels)])
        except ValueError as exc:
            self._label_error = exc
        return _class_count(num_classes, named)

    def check_labels(self) -> None:
        if self._label_error is not None:
            raise self._label_error

    def check_k(self, k: int, n: int, self_index) -> None:
        pass  # the global size is known on the merge, which checks k

    def knn_vote(self, queries, support, labels, k: int, num_classes: int, *,
                 self_index=None, self_match: str = "exclude", filter: str = "auto",
                 counts: bool = False) -> LayerVote:
        # Each rank filters its own shard with its own filter= (the handshake does not
        # compare it: the merged result is the same bits whatever each rank used).
        v, lab_k = knn_vote(queries, support, labels, k, num_classes, shard_offset=self.offset,
                            self_index=self_index, self_match=self_match,
                            process_group=self.process_group, filter=filter,
                            return_labels=True)
        return LayerVote(v.pred.cpu(), vote_counts(lab_k, num_classes).cpu() if counts else None)

    def finish(self, tops, labels: torch.Tensor, *, k: int, num_classes: int,
               self_index=None, row0: int = 0, dims=(), counts: bool = False
               ) -> list[LayerVote]:
        n, offset = labels.shape[0], int(self.offset)
        votes = []
        for top, dim in zip(tops, dims, strict=True):
            merged, lab_k = merge_shards(
                top, shard_neighbor_labels(labels, top.index, offset), num_classes,
                shard_offset=offset, shard_size=n, dim=dim, self_index=self_index,
                process_group=self.process_group)
            check_full(merged.index, k, n, row0)  # identical on every rank
            votes.append(layer_vote(lab_k, num_classes, counts))
        return votes

    def fail(self, error: BaseException, *, n: int, num_classes) -> None:
        """Tells the other ranks (in place of :meth:`finish`'s merges) that this rank's
        step failed; raises the same RuntimeError on every rank."""
        merge_shards(None, None, num_classes, shard_offset=self.offset, shard_size=n, dim=0,
                     process_group=self.process_group, error=error)
