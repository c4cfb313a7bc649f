"""Support-set sharding over ``torch.distributed`` (docs/design.md section 8).

Every rank of a process group holds one contiguous shard of the support set (rows
``shard_offset .. shard_offset + n_r - 1`` of the global support set, see
:func:`shard_range`) and the SAME queries. Each rank computes the local top-k of the queries
with the op (:func:`pdepth.knn` with ``offset=shard_offset``, so indices are global), the
ranks all-gather their ``[M, k]`` lists and every rank merges them with
:func:`pdepth.merge_topk`. The op's distance of a (query, support) pair depends on those two
rows alone, so the merged list is exactly the single-process result: same distances (bit for
bit), same indices, same order, same votes.

- :mod:`.collectives`: the group, the all-gather, :func:`check_all`, :func:`check_same`.
- :mod:`.shards`: :func:`knn`, :func:`knn_vote`, :func:`merge_shards` (handshake, gather,
  merge) and :func:`shard_range`.
- :class:`pdepth.ShardedSupport` (:mod:`pdepth.depth.sharded`, built on this package): the
  sharded placement of the support set that
  :func:`pdepth.prediction_depth` and :func:`pdepth.stream_prediction_depth` take as
  ``shard=``.

Communication per call: one small handshake (an all-gather of 14 int64 per rank), then an
all-gather of the ``[M, k]`` distances and of the ``[M, k]`` indices (plus the neighbours'
labels for :func:`knn_vote`): ``world_size * M * k * (4 + 8 + 8)`` bytes gathered per rank
for float32 inputs. Nothing of size N is ever sent.

Failures: a rank whose local step raises (bad input, out of memory, ...) does not leave the
others waiting in the gather. The local step runs inside ``try``; the handshake then tells
every rank which ranks failed, and every rank raises :class:`RuntimeError` naming them (the
failing rank chains its own exception). Inputs that disagree across ranks (different query
counts or values, different ``self_index``, overlapping or missing shards, different
``num_classes``) raise :class:`ValueError` on every rank (the handshake carries exact
checksums of the queries' bits and of ``self_index``). ``filter=`` (the op's filter format)
is not compared: it never changes a rank's local top-k, so the ranks may differ in it. A rank
that dies or never reaches the call can only be detected by the process group's timeout: pass
``timeout=datetime.timedelta(...)`` to ``torch.distributed.init_process_group`` (NCCL also
needs ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default in recent torch, for the timeout to
raise instead of hang).

Collectives run on the queries' device with NCCL (set ``torch.cuda.set_device(local_rank)``
first) and on the CPU with gloo.
"""

from .collectives import check_all, check_same
from .shards import _FIELDS, knn, knn_vote, merge_shards, shard_range

__all__ = ["check_all", "check_same", "knn", "knn_vote", "merge_shards",
           "shard_range"]
_ = _FIELDS  # handshake layout, for benchmarks
