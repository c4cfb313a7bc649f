""":func:`knn`, :func:`knn_vote` and :func:`merge_shards` over a support set sharded across a
process group: the local step, the handshake (failures, consistency), the all-gather of the
local top-k lists and their merge. See :mod:`pdepth.distributed`."""

from __future__ import annotations

import torch

from ..ops import (
    SELF_MATCH_POLICIES,
    Neighbors,
    Vote,
    _as_index,
    empty_topk,
    merge_topk,
    metric_rows,
    neighbor_labels,
    vote,
)
from ..ops import knn as _local_knn
from .collectives import _BITS, _all_gather, _checksum, _comm_device, _fail, _group_info, _weighted

__all__ = ["knn", "knn_vote", "merge_shards", "shard_range"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Handshake fields, one int64 each per rank (q_rows, q_cols, si_sum: checksums). The k-NN
# filter format (filter=) is deliberately not among them: it only decides which pairs get
# their canonical key computed, never a distance, an index or their order, so each rank's
# local top-k (and the merged list) is the same bits whatever filter each rank used. Ranks
# may therefore differ in it (e.g. "tf32" on a CUDA rank, "bf16" on a CPU one); an invalid
# value fails that rank's local step, which the handshake reports to every rank.
_FIELDS = ("failed", "m", "kk", "d", "n", "offset", "dtype", "si_lo", "si_hi", "label_max",
           "num_classes", "q_rows", "q_cols", "si_sum")


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous shard ``[start, stop)`` of ``n`` rows that ``rank`` of ``world_size``
    holds: shards differ in size by at most one row (the first ``n % world_size`` ranks get
    one more). Pass ``start`` as ``shard_offset``."""
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(
            f"shard_range(): need n >= 0, world_size >= 1 and 0 <= rank < world_size, got "
            f"n={n}, rank={rank}, world_size={world_size}"
        )
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _check_table(op: str, table: torch.Tensor, world: int, k: int, skip: int,
                 self_match: str) -> tuple[int, int]:
    """Cross-rank consistency checks on the handshake table ``[world, len(_FIELDS)]``.
    Every rank sees the same table, so every rank raises the same ValueError. Returns the
    global support size and the number of classes (-1 when there are no labels)."""
    col = {name: [int(v) for v in table[:, i].tolist()] for i, name in enumerate(_FIELDS)}
    for name, what in (("m", "number of queries"), ("kk", "k"), ("d", "dimension D"),
                       ("dtype", "dtype"), ("si_lo", "self_index"), ("si_hi", "self_index"),
                       ("si_sum", "self_index (checksum)"), ("num_classes", "num_classes"),
                       ("q_rows", "queries (checksum of their values)"),
                       ("q_cols", "queries (checksum of their values)")):
        if len(set(col[name])) > 1:
            raise ValueError(
                f"{op}: the {what} differs across ranks ({name} per rank: {col[name]}); every "
                "rank must pass the same queries, k, self_index and num_classes"
            )
    shards = sorted((o, n, r) for r, (o, n) in enumerate(zip(col["offset"], col["n"],
                                                             strict=True)) if n > 0)
    expect = 0
    for o, n, r in shards:
        if o != expect:
            raise ValueError(
                f"{op}: the shards do not tile the support set: rank {r} starts at "
                f"shard_offset={o}, expected {expect} (shards as (offset, size) per rank: "
                f"{list(zip(col['offset'], col['n'], strict=True))}); see shard_range()"
            )
        expect = o + n
    total = expect
    m, kk, si_lo, si_hi = col["m"][0], col["kk"][0], col["si_lo"][0], col["si_hi"][0]
    if m > 0 and self_match == "exclude" and si_hi >= total:
        raise ValueError(
            f"{op}: self_index value {si_hi} is out of range for a support set of {total} "
            f"points (valid: -1 or 0..{total - 1})"
        )
    if m > 0 and si_lo < -1:
        raise ValueError(f"{op}: self_index values must be >= -1, got {si_lo}")
    excluded = m > 0 and self_match == "exclude" and si_hi >= 0
    if m > 0 and kk > total - (1 if excluded else 0):
        raise ValueError(
            f"{op}: k={k}{' (+1 dropped nearest)' if skip else ''} is larger than the usable "
            f"support: {total} points{', 1 excluded as the self match' if excluded else ''} "
            f"over {world} shards"
        )
    num_classes = col["num_classes"][0]
    if num_classes < 0 and max(col["label_max"]) >= 0:
        num_classes = max(col["label_max"]) + 1
    return total, num_classes


def _sharded(op, queries, support_shard, labels_shard, k, *, num_classes, shard_offset,
             self_index, self_match, process_group, filter="auto", metric="euclidean"):
    """The local step, the handshake, the gather and the merge. Returns ``(Neighbors,
    labels[M, k] or None, num_classes)``. ``metric="cosine"`` normalises the rows first,
    inside the local step (a bad value fails every rank alike), so the handshake compares
    the normalised queries: ranks that disagree on the metric differ in their queries."""
    _group_info(process_group)  # before any work: needs an initialised process group
    fields = dict.fromkeys(_FIELDS, -1)
    fields["failed"] = 0
    skip = 1 if self_match == "drop_nearest" else 0
    local = lab_k = None
    error: BaseException | None = None
    try:
        queries, support_shard = metric_rows(metric, queries, support_shard,
                                             op=op.removesuffix("()"))
        if self_match not in SELF_MATCH_POLICIES:
            raise ValueError(
                f"self_match must be one of {SELF_MATCH_POLICIES}, got {self_match!r}")
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if isinstance(shard_offset, bool) or int(shard_offset) != shard_offset \
                or shard_offset < 0:
            raise ValueError(f"shard_offset must be an integer >= 0, got {shard_offset!r}")
        if queries.dim() != 2 or support_shard.dim() != 2:
            raise ValueError(
                f"queries and support_shard must be 2-D, got {tuple(queries.shape)} and "
                f"{tuple(support_shard.shape)}")
        k, shard_offset = int(k), int(shard_offset)
        kk = k + skip
        m, n = queries.shape[0], support_shard.shape[0]
        device = queries.device
        fields.update(m=m, kk=kk, d=queries.shape[1], n=n, offset=shard_offset,
                      dtype=_DTYPES.index(queries.dtype) if queries.dtype in _DTYPES else 99)
        if queries.dtype in _BITS:
            fields["q_rows"], fields["q_cols"] = _checksum(queries)
        sidx = None
        if self_match == "exclude" and self_index is not None:
            sidx = _as_index(self_index, "self_index").to(device)
            if sidx.shape != (m,):
                raise ValueError(f"self_index must have shape ({m},), got {tuple(sidx.shape)}")
            if m:
                fields.update(si_lo=int(sidx.min()), si_hi=int(sidx.max()),
                              si_sum=_weighted(sidx))
        if num_classes is not None:
            fields["num_classes"] = int(num_classes)
        lab = None
        if labels_shard is not None:
            lab = _as_index(labels_shard, "labels_shard").to(device)
            if lab.shape != (n,):
                raise ValueError(f"labels_shard must have shape ({n},) (one label per row of "
                                 f"support_shard), got {tuple(lab.shape)}")
            if n:
                lo, hi = int(lab.min()), int(lab.max())
                if lo < 0 or (num_classes is not None and hi >= num_classes):
                    raise ValueError(f"labels_shard must lie in [0, num_classes={num_classes})"
                                     f", got values in [{lo}, {hi}]")
                fields["label_max"] = hi
        compute = torch.float64 if queries.dtype == torch.float64 else torch.float32
        # prev= makes the op stream: a shard may hold fewer than kk usable points (empty
        # slots pad the list) and self indices may lie on other ranks' shards.
        local = _local_knn(queries, support_shard, kk, self_index=sidx,
                           self_match="exclude" if self_match == "exclude" else "include",
                           prev=empty_topk(m, kk, compute, device), offset=shard_offset,
                           filter=filter)
        if lab is not None:
            lab_k = shard_neighbor_labels(lab, local.index, shard_offset)
    except Exception as exc:  # reported to every rank by the handshake below
        error = exc
        fields["failed"] = 1
    device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    return _exchange(op, fields, local, lab_k, error=error, k=k, skip=skip,
                     self_match=self_match, process_group=process_group, device=device)


def shard_neighbor_labels(labels_shard: torch.Tensor, index: torch.Tensor,
                          shard_offset: int) -> torch.Tensor:
    """``[M, k]`` labels of the neighbours ``index`` (global indices into this rank's shard,
    -1 for empty slots) from the shard's labels; -1 in the empty slots."""
    return neighbor_labels(labels_shard, torch.where(index >= 0, index - shard_offset, -1))


def _exchange(op, fields, local, lab_k, *, error, k, skip, self_match, process_group,
              device):
    """Handshake (failures, consistency), all-gather of the local lists, merge. Every rank
    calls it, the failed ones too (``error``, ``local`` None): the handshake tells every rank
    who failed."""
    group, _, world = _group_info(process_group)
    comm = _comm_device(group, device)
    header = torch.tensor([fields[f] for f in _FIELDS], dtype=torch.int64, device=comm)
    table = torch.stack(_all_gather(header, group, world, op, "handshake")).cpu()
    failed = [r for r in range(world) if int(table[r, 0])]
    if failed:
        _fail(op, failed, error, group, world)
    _, num_classes = _check_table(op, table, world, k, skip, self_match)

    dists = _all_gather(local.dist.to(comm), group, world, op, "distances")
    ints = local.index if lab_k is None else torch.cat([local.index, lab_k], 1)
    ints = _all_gather(ints.to(comm), group, world, op, "indices and labels")
    kk = local.index.shape[1]
    d_all = torch.cat(dists, 1).to(device)
    i_all = torch.cat([t[:, :kk] for t in ints], 1).to(device)
    merged, order = merge_topk(d_all, i_all, kk, return_order=True)
    labels = None
    if lab_k is not None:
        labels = torch.cat([t[:, kk:] for t in ints], 1).to(device).gather(1, order)
    if skip:
        merged = Neighbors(merged.dist[:, 1:], merged.index[:, 1:])
        labels = None if labels is None else labels[:, 1:]
    return Neighbors(merged.dist.contiguous(), merged.index.contiguous()), \
        (None if labels is None else labels.contiguous()), num_classes


def merge_shards(
    local: tuple[torch.Tensor, torch.Tensor],
    local_labels: torch.Tensor,
    num_classes: int,
    *,
    shard_offset: int,
    shard_size: int,
    dim: int,
    self_index: torch.Tensor | None = None,
    process_group=None,
    error: BaseException | None = None,
) -> tuple[Neighbors, torch.Tensor]:
    """Merges running top-k lists that each rank streamed over its own shard (collective).

    For callers that build the local top-k themselves, chunk by chunk (e.g.
    :func:`pdepth.stream_prediction_depth`): ``local = (dist[M, k], index[M, k])`` from
    :func:`pdepth.knn` with ``prev=`` / ``offset=`` (global indices, ``self_match="exclude"``)
    over this rank's ``shard_size`` rows starting at ``shard_offset``, and ``local_labels
    [M, k]`` the labels of those neighbours (-1 for empty slots). ``dim`` is the embedding
    dimension (checked across ranks). A rank whose local work failed passes ``error=`` (and
    ``local=None``): every rank then raises the same RuntimeError naming it.

    Returns ``(Neighbors, labels[M, k])``, identical on every rank.
    """
    fields, device = _merge_fields(local, shard_offset=shard_offset, shard_size=shard_size,
                                   num_classes=num_classes, dim=dim, self_index=self_index,
                                   error=error)
    local = None if local is None else Neighbors(*local)
    nbrs, labels, _ = _exchange(
        "pdepth.distributed.merge_shards()", fields, local, local_labels, error=error,
        k=0 if local is None else local.index.shape[1], skip=0, self_match="exclude",
        process_group=process_group, device=device)
    return nbrs, labels


def _merge_fields(local, *, shard_offset, shard_size, num_classes, dim, self_index,
                  error) -> tuple[dict, torch.device]:
    """The handshake fields of :func:`merge_shards` (``local`` None: this rank failed)."""
    fields = dict.fromkeys(_FIELDS, -1)
    fields.update(failed=int(error is not None), n=int(shard_size), offset=int(shard_offset),
                  num_classes=int(num_classes), d=int(dim))
    if local is None:
        return fields, torch.device("cpu")
    dist_, index = local
    fields.update(m=index.shape[0], kk=index.shape[1], dtype=_DTYPES.index(dist_.dtype))
    if self_index is not None and index.shape[0]:
        fields.update(si_lo=int(self_index.min()), si_hi=int(self_index.max()),
                      si_sum=_weighted(self_index))
    return fields, index.device


def knn(
    queries: torch.Tensor,
    support_shard: torch.Tensor,
    k: int,
    *,
    shard_offset: int,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    process_group=None,
    filter: str = "auto",
    metric: str = "euclidean",
) -> Neighbors:
    """:func:`pdepth.knn` over a support set sharded across the ranks of a process group.

    Collective: every rank of ``process_group`` (default: the world) must call it with the
    same ``queries``, ``k``, ``self_index`` and ``self_match``, and its own shard.

    Args:
        queries: ``[M, D]``, identical on every rank.
        support_shard: ``[n_r, D]``, this rank's rows of the global support set (may be empty
            or hold fewer than k points).
        k: neighbours per query (checked against the global support size).
        shard_offset: global index of ``support_shard[0]``; the shards of all ranks must tile
            ``0..N-1`` without gaps or overlaps (:func:`shard_range` gives such shards).
        self_index: ``[M]`` global support index of each query, or -1 (``"exclude"``); it may
            lie on any rank's shard.
        self_match: ``"exclude"``, ``"include"`` or ``"drop_nearest"`` (k+1 neighbours over
            the whole support set, the nearest dropped: the single-process definition).
        process_group: a ``torch.distributed`` process group; None for the default group.
        filter: the filter format of this rank's local search (:func:`pdepth.knn`); it never
            changes the result, so it is not compared across ranks. An invalid value fails
            this rank's local step (every rank then raises, as for any local failure).
        metric: ``"euclidean"`` or ``"cosine"`` (:func:`pdepth.knn`), the same on every rank
            (a rank that differs sees other queries, and every rank raises).

    Returns:
        :class:`pdepth.Neighbors` ``(dist[M, k], index[M, k])`` with global indices, on every
        rank, equal to ``pdepth.knn`` on the concatenated support set.

    Raises:
        RuntimeError: on every rank, when the local step failed on some rank (named).
        ValueError: on every rank, when the ranks' arguments disagree or k is too large.
    """
    return _sharded("pdepth.distributed.knn()", queries, support_shard, None, k,
                    num_classes=None, shard_offset=shard_offset, self_index=self_index,
                    self_match=self_match, process_group=process_group, filter=filter,
                    metric=metric)[0]


def knn_vote(
    queries: torch.Tensor,
    support_shard: torch.Tensor,
    labels_shard: torch.Tensor,
    k: int = 30,
    num_classes: int | None = None,
    *,
    shard_offset: int,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    process_group=None,
    filter: str = "auto",
    metric: str = "euclidean",
    return_labels: bool = False,
):
    """:func:`pdepth.knn_vote` over a sharded support set (see :func:`knn`).

    ``labels_shard[n_r]`` are the labels of this rank's rows. Each rank gathers its
    neighbours' labels along with their distances and indices, so no rank needs the other
    shards' labels. ``num_classes`` defaults to the global ``max(label) + 1``. ``filter``,
    ``metric``: as in :func:`knn`.

    Returns:
        :class:`pdepth.Vote` ``(pred[M], dist[M, k], index[M, k])`` on every rank, equal to
        ``pdepth.knn_vote`` on the concatenated support set; with ``return_labels``,
        ``(Vote, labels[M, k])``, the neighbours' labels it was voted from.
    """
    nbrs, labels, num_classes = _sharded(
        "pdepth.distributed.knn_vote()", queries, support_shard, labels_shard, k,
        num_classes=num_classes, shard_offset=shard_offset, self_index=self_index,
        self_match=self_match, process_group=process_group, filter=filter, metric=metric)
    result = Vote(vote(labels, max(num_classes, 1)), nbrs.dist, nbrs.index)
    return (result, labels) if return_labels else result
