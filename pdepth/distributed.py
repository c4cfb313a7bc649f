"""Support-set sharding over ``torch.distributed`` (design.md section 3).

Every rank of a process group holds one contiguous shard of the support set (rows
``shard_offset .. shard_offset + n_r - 1`` of the global support set, see
:func:`shard_range`) and the SAME queries. Each rank computes the local top-k of the queries
with the op (:func:`pdepth.knn` with ``offset=shard_offset``, so indices are global), the
ranks all-gather their ``[M, k]`` lists and every rank merges them with
:func:`pdepth.merge_topk`. The op's distance of a (query, support) pair depends on those two
rows alone, so the merged list is exactly the single-process result: same distances (bit for
bit), same indices, same order, same votes.

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
checksums of the queries' bits and of ``self_index``). A rank that dies or never reaches the
call can only be detected by the process group's timeout: pass
``timeout=datetime.timedelta(...)`` to ``torch.distributed.init_process_group`` (NCCL also
needs ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default in recent torch, for the timeout to
raise instead of hang).

Collectives run on the queries' device with NCCL (set ``torch.cuda.set_device(local_rank)``
first) and on the CPU with gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops import (
    SELF_MATCH_POLICIES,
    Neighbors,
    Vote,
    _as_index,
    empty_topk,
    merge_topk,
    vote,
)
from .ops import knn as _local_knn

__all__ = ["check_all", "check_same", "knn", "knn_vote", "merge_shards", "shard_range"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}
# Handshake fields, one int64 each per rank (q_rows, q_cols, si_sum: checksums).
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


def _group_info(process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "pdepth.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group(backend, timeout=datetime.timedelta(...)) "
            "first (torchrun sets the environment for init_method='env://')"
        )
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the collectives' tensors live: the CPU for gloo, a CUDA device for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_gather(t: torch.Tensor, group, world: int, op: str, what: str) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    try:
        dist.all_gather(out, t.contiguous(), group=group)
    except Exception as exc:
        raise RuntimeError(
            f"{op}: the all-gather of the {what} failed on rank {dist.get_rank(group)}: "
            "another rank died, hung, or did not make the same call (every rank of the "
            "group must call it; the wait is bounded by the timeout= given to "
            f"init_process_group). Cause: {type(exc).__name__}: {exc}"
        ) from exc
    return out


def _fail(op: str, failed: list[int], error: BaseException | None, group, world: int,
          gather: bool = True):
    """Raises the same RuntimeError on every rank, naming the failed ranks (and their errors,
    exchanged with all_gather_object where that works)."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    details: list = [None] * world
    try:
        dist.all_gather_object(details, mine, group=group)
    except Exception:  # pragma: no cover - best effort only
        details = [None] * world
    ranks = ", ".join(str(r) for r in failed)
    lines = [f"{op}: failed on rank(s) {ranks} of {world}"
             + ("; no rank entered the gather" if gather else "")]
    for r in failed:
        lines.append(f"  rank {r}: {details[r] or 'see the error raised on that rank'}")
    message = "\n".join(lines)
    if error is not None:
        raise RuntimeError(message) from error
    raise RuntimeError(message)


def check_same(values: dict, what: str, process_group=None) -> None:
    """Collective: raises the same :class:`ValueError` on every rank, naming the keys whose
    values differ and each rank's value, unless every rank passes equal ``values``
    (JSON-like: compared with ``==`` after an all-gather of the objects)."""
    group, _, world = _group_info(process_group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, values, group=group)
    keys = sorted({k for v in gathered for k in v}, key=str)
    diff = [f"{k}: " + ", ".join(f"rank {r} {v.get(k)!r}" for r, v in enumerate(gathered))
            for k in keys if any(v.get(k) != gathered[0].get(k) for v in gathered)]
    if diff:
        raise ValueError(f"{what}: the ranks' settings differ ({'; '.join(diff)}); start every "
                         "rank with the same arguments")


def _checksum(t: torch.Tensor, chunk: int = 2**22) -> tuple[int, int]:
    """Exact, order-independent checksums of the bits of a float tensor ``[M, D]``: its row
    sums weighted by row number and its column sums weighted by column number (int64 sums
    wrap modulo 2**64, so neither rounding nor thread count can change them). Rows go in
    blocks of about ``chunk`` elements, so the int64 copy stays small."""
    bits = t.detach().view(_BITS[t.dtype])
    step = max(1, chunk // max(1, t.shape[1]))
    rows = torch.zeros(t.shape[0], dtype=torch.int64, device=t.device)
    cols = torch.zeros(t.shape[1], dtype=torch.int64, device=t.device)
    for i in range(0, t.shape[0], step):
        block = bits[i:i + step].to(torch.int64)
        rows[i:i + step] = block.sum(1)
        cols += block.sum(0)
    return _weighted(rows), _weighted(cols)


def _weighted(v: torch.Tensor) -> int:
    """``sum_i (i + 1) * v[i]`` in int64 (wrapping)."""
    return int((v.to(torch.int64) * torch.arange(1, v.numel() + 1, device=v.device)).sum())


def check_all(error: BaseException | None, what: str, process_group=None) -> None:
    """Collective: raises the same :class:`RuntimeError`, naming the failed ranks, on every
    rank when ``error`` is not None on any rank; returns on every rank otherwise.

    Wrap a rank-local step in ``try`` / ``except Exception as exc: error = exc`` and call this
    after it, so that one rank's failure does not leave the others waiting in the next
    collective until the process group's timeout."""
    group, _, world = _group_info(process_group)
    flag = torch.tensor([int(error is not None)], dtype=torch.int64,
                        device=_comm_device(group, torch.device("cpu")))
    flags = _all_gather(flag, group, world, what, "error flags")
    failed = [r for r in range(world) if int(flags[r][0])]
    if failed:
        _fail(what, failed, error, group, world, gather=False)


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


def _sharded(op, queries, support_shard, labels_shard, k, num_classes, shard_offset,
             self_index, self_match, process_group):
    """The local step, the handshake, the gather and the merge. Returns ``(Neighbors,
    labels[M, k] or None, num_classes)``."""
    group, rank, world = _group_info(process_group)
    fields = dict.fromkeys(_FIELDS, -1)
    fields["failed"] = 0
    skip = 1 if self_match == "drop_nearest" else 0
    local = lab_k = None
    error: BaseException | None = None
    try:
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
                           prev=empty_topk(m, kk, compute, device), offset=shard_offset)
        if lab is not None:
            hit = local.index >= 0
            rows = torch.where(hit, local.index - shard_offset, 0)
            lab_k = lab[rows] if n else torch.zeros_like(local.index)
            lab_k = torch.where(hit, lab_k, -1)
    except Exception as exc:  # reported to every rank by the handshake below
        error = exc
        fields["failed"] = 1
    device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    return _exchange(op, fields, error, local, lab_k, k, skip, self_match, group, world,
                     device)


def _exchange(op, fields, error, local, lab_k, k, skip, self_match, group, world, device):
    """Handshake (failures, consistency), all-gather of the local lists, merge."""
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
    group, _, world = _group_info(process_group)
    fields = dict.fromkeys(_FIELDS, -1)
    fields.update(failed=int(error is not None), n=int(shard_size), offset=int(shard_offset),
                  num_classes=int(num_classes), d=int(dim))
    device = torch.device("cpu")
    k = 0
    if local is not None:
        dist_, index = local
        device = index.device
        k = index.shape[1]
        fields.update(m=index.shape[0], kk=k, dtype=_DTYPES.index(dist_.dtype))
        if self_index is not None and index.shape[0]:
            fields.update(si_lo=int(self_index.min()), si_hi=int(self_index.max()),
                          si_sum=_weighted(self_index))
        local = Neighbors(dist_, index)
    nbrs, labels, _ = _exchange("pdepth.distributed.merge_shards()", fields, error, local,
                                local_labels, k, 0, "exclude", group, world, device)
    return nbrs, labels


def knn(
    queries: torch.Tensor,
    support_shard: torch.Tensor,
    k: int,
    *,
    shard_offset: int,
    self_index: torch.Tensor | None = None,
    self_match: str = "exclude",
    process_group=None,
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

    Returns:
        :class:`pdepth.Neighbors` ``(dist[M, k], index[M, k])`` with global indices, on every
        rank, equal to ``pdepth.knn`` on the concatenated support set.

    Raises:
        RuntimeError: on every rank, when the local step failed on some rank (named).
        ValueError: on every rank, when the ranks' arguments disagree or k is too large.
    """
    return _sharded("pdepth.distributed.knn()", queries, support_shard, None, k, None,
                    shard_offset, self_index, self_match, process_group)[0]


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
) -> Vote:
    """:func:`pdepth.knn_vote` over a sharded support set (see :func:`knn`).

    ``labels_shard[n_r]`` are the labels of this rank's rows. Each rank gathers its
    neighbours' labels along with their distances and indices, so no rank needs the other
    shards' labels. ``num_classes`` defaults to the global ``max(label) + 1``.

    Returns:
        :class:`pdepth.Vote` ``(pred[M], dist[M, k], index[M, k])`` on every rank, equal to
        ``pdepth.knn_vote`` on the concatenated support set.
    """
    nbrs, labels, num_classes = _sharded(
        "pdepth.distributed.knn_vote()", queries, support_shard, labels_shard, k, num_classes,
        shard_offset, self_index, self_match, process_group)
    return Vote(vote(labels, max(num_classes, 1)), nbrs.dist, nbrs.index)
