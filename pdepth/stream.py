"""Model-level prediction depth that streams the support set through the network.

:func:`stream_prediction_depth` never holds the support set's embeddings for all probes at
once. It keeps the *query* embeddings of every probe resident -- in chunks of queries when
they would exceed ``memory_budget`` -- and, for each query chunk, runs the support set
through the model batch by batch (one forward pass per batch records every probe, see
:mod:`pdepth.extract`) and merges each batch into a running top-k per probe with the op's
streaming mode (:func:`pdepth.knn` with ``prev=`` and ``offset=``). After the last support
batch the k neighbours' labels are voted with :func:`pdepth.vote` and the per-probe
predictions are reduced to a depth with :func:`pdepth.depth_from_predictions`.

Because the op's streaming merge is exact, the result equals
:func:`pdepth.prediction_depth` on the same embeddings (tested), at
``O(M_chunk * sum(D_l) + B * sum(D_l) + L * M_chunk * k)`` memory instead of
``O(N * sum(D_l))``. The support set is read ``ceil(M / M_chunk)`` times.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .depth import (
    REFERENCE_MODES,
    DepthResult,
    _check_k,
    _check_num_classes,
    _check_self_index,
    _class_count,
    _int_vector,
    depth_from_predictions,
)
from .distributed import merge_shards
from .ops import empty_topk, knn, vote
from .probes import ProbeRecorder, iter_batches, resolve_probes

__all__ = ["StreamResult", "peak_rss_bytes", "stream_prediction_depth"]


@dataclass(eq=False)
class StreamResult:
    """Result of :func:`stream_prediction_depth`.

    Attributes:
        depth: the :class:`pdepth.DepthResult` (``layer_names`` are the probe names).
        logits: ``[M, C]`` float32 model outputs for the queries (eval mode).
        peak_bytes: the largest number of bytes of embeddings, running top-k and support
            batch embeddings held at once (what ``memory_budget`` bounds).
        peak_rss_bytes: the process's peak resident set size when the call returned.
        cuda_peak_bytes: peak CUDA memory allocated during the call (None on CPU).
        chunk_size: queries per chunk; num_chunks: number of chunks (= support passes).
        seconds: wall time of the call.
    """

    depth: DepthResult
    logits: torch.Tensor
    peak_bytes: int
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    chunk_size: int
    num_chunks: int
    seconds: float

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    def stats(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "cuda_peak_bytes": self.cuda_peak_bytes, "chunk_size": self.chunk_size,
                "num_chunks": self.num_chunks, "seconds": self.seconds}


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_SHUFFLING_SAMPLERS = (
    torch.utils.data.RandomSampler,
    torch.utils.data.SubsetRandomSampler,
    torch.utils.data.WeightedRandomSampler,
)


def _check_order(data, name: str, why: str) -> None:
    """Refuses a DataLoader whose sampler draws a new order on every pass (``shuffle=True``,
    a random / weighted sampler, a shuffling DistributedSampler)."""
    if not isinstance(data, torch.utils.data.DataLoader):
        return
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        shuffles = isinstance(sampler, _SHUFFLING_SAMPLERS) or (
            isinstance(sampler, torch.utils.data.distributed.DistributedSampler)
            and sampler.shuffle)
        if shuffles:
            raise ValueError(
                f"{name} is a DataLoader with a shuffling sampler ({type(sampler).__name__}): "
                f"{why}, so its order must be fixed. Build the DataLoader with shuffle=False "
                "(or a sequential sampler)."
            )


def _check_loader_labels(y, expected: torch.Tensor, row0: int, name: str, arg: str) -> None:
    """The labels a loader yields for rows ``row0..`` must equal ``expected`` (the slice of
    ``arg`` for those rows). Labels that are not one class id per row are not compared."""
    try:
        yt = torch.as_tensor(y).cpu()
    except (TypeError, ValueError, RuntimeError):
        return
    if yt.dim() != 1 or yt.shape[0] != expected.shape[0] or yt.dtype == torch.bool:
        return
    bad = yt != expected
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} yields labels that differ from {arg} in {int(bad.sum())} of the "
            f"{expected.shape[0]} rows {row0}..{row0 + expected.shape[0] - 1} (row {row0 + j}: "
            f"the loader says {yt[j].item()}, {arg} says {int(expected[j])}). The rows would be "
            f"paired with other rows' labels: keep {name} in the order of {arg} (no "
            "shuffling). If the labels differ on purpose (e.g. ensemble consensus labels), "
            "pass check_loader_labels=False."
        )


def _check_full(index: torch.Tensor, k: int, n: int, row0: int) -> None:
    """Every query must have k real neighbours (no empty slot, index -1) before the vote."""
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


def _num_rows(data) -> int | None:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    try:
        return len(data.dataset) if hasattr(data, "dataset") else len(data)
    except TypeError:
        return None


@torch.no_grad()
def stream_prediction_depth(
    model: nn.Module,
    support,
    support_labels,
    queries=None,
    *,
    probes=None,
    k: int = 30,
    self_index=None,
    reference="network",
    query_labels=None,
    num_classes: int | None = None,
    example_index=None,
    batch_size: int = 256,
    memory_budget: int | None = 2**30,
    device: torch.device | str | None = None,
    max_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    shard_offset: int | None = None,
    process_group=None,
    check_loader_labels: bool = True,
) -> StreamResult:
    """Prediction depth of ``queries`` against ``support`` computed from a model, streaming.

    Args:
        model: the network (run in eval mode; its mode is restored).
        support: the support set's inputs: a tensor ``[N, ...]``, a Dataset, or a re-iterable
            DataLoader (read once per query chunk, in the same order each time). Row i is
            paired with ``support_labels[i]``, so a DataLoader with a shuffling sampler
            (``shuffle=True``) is refused, and labels the loader yields must equal
            ``support_labels`` (see ``check_loader_labels``).
        support_labels: ``[N]`` integer labels of the support set (the given labels).
        queries: the queries' inputs (same kinds; a shuffling DataLoader is refused too: the
            result's rows follow the order the queries are read in and are paired with
            ``query_labels``, ``self_index`` and ``example_index`` by position), or None to
            score the support set itself
            (then ``self_index`` defaults to ``arange(N)``, ``query_labels`` to
            ``support_labels`` and ``example_index`` to ``arange(N)``).
        probes: a :class:`pdepth.ProbeSpec`, preset name or module names (None: ``"auto"``).
        k: neighbours per query.
        self_index: ``[M]`` each query's own support index (in ``[0, N)``) or -1; those
            support points are excluded from the query's neighbours (``self_match="exclude"``).
        reference: ``"network"`` (the model's argmax prediction, computed here),
            ``"labels"`` (needs ``query_labels``), ``"last_probe"``, or an ``[M]`` tensor.
        query_labels: ``[M]`` labels of the queries (for ``layer_accuracy``). Default: the
            labels the query loader yields, if any.
        num_classes: default: one more than the largest class id among the support labels,
            the query labels and the reference (as :func:`pdepth.prediction_depth`).
        example_index: ``[M]`` dataset indices of the queries, stored in the result.
        batch_size: forward-pass batch size (support and queries).
        memory_budget: bytes allowed for resident query embeddings + running top-k + one
            support batch's embeddings; the queries are cut into chunks to fit (at least one
            batch per chunk). None: one chunk.
        device: where the model and the k-NN run (default: the model's device).
        max_dim: pool conv maps to at most this many features.
        dtype: embedding dtype.
        progress: tqdm progress bars.
        shard_offset: sharded support set (:mod:`pdepth.distributed`): ``support`` and
            ``support_labels`` are this rank's contiguous shard, starting at global row
            ``shard_offset``; each rank streams its shard and the per-probe top-k lists are
            merged across ranks (:func:`pdepth.distributed.merge_shards`) before the vote.
            Collective: every rank passes the same ``queries`` (required), ``num_classes``
            (required), ``self_index`` (global indices), ``k``, ``batch_size`` and
            ``memory_budget`` (so the query chunks agree), and gets the whole result.
        process_group: the ``torch.distributed`` group of the shards (default: the world);
            only with ``shard_offset``.
        check_loader_labels: where ``support`` (or ``queries``) yields labels along with the
            inputs, they must equal ``support_labels`` (``query_labels``) row by row; a
            mismatch raises ``ValueError`` (the usual cause is a loader in another order than
            the labels). Pass False when the given labels differ on purpose (e.g. ensemble
            consensus labels); the loader's order must still be fixed.

    Returns:
        :class:`StreamResult`.

    Raises:
        ValueError: on bad input, naming the argument (the same checks as
            :func:`pdepth.prediction_depth`: integer labels, references and indices, class ids
            in range, ``self_index`` in ``[-1, N)``, k no larger than the usable support).
    """
    start = time.perf_counter()
    k = _check_k(k)
    sharded = shard_offset is not None or process_group is not None
    if sharded and (shard_offset is None or queries is None or num_classes is None):
        raise ValueError("a sharded support set needs shard_offset=, queries= and "
                         "num_classes=, the same on every rank")
    start_row = int(shard_offset or 0)
    num_classes = _check_num_classes(num_classes)
    spec = resolve_probes(model, probes, max_dim=max_dim)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(reference, str):
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES} or an [M] integer "
                             f"tensor, got {reference!r}")
        mode, ref_given = reference, None
    else:
        mode, ref_given = "tensor", _int_vector(reference, "reference").cpu()
    labels = _int_vector(support_labels, "support_labels").cpu()
    n = labels.shape[0]
    n_support = _num_rows(support)
    if n_support is not None and n_support != n:
        raise ValueError(f"support has {n_support} rows but support_labels has {n}")
    _check_order(support, "support", "it is read once per query chunk and its rows are "
                 "paired with support_labels by position")
    scoring_support = queries is None
    query_labels_arg = "query_labels"
    if scoring_support:
        queries = support
        if self_index is None:
            self_index = torch.arange(n)
        if query_labels is None:
            query_labels = labels
            query_labels_arg = "support_labels"
        if example_index is None:
            example_index = torch.arange(n)
    else:
        _check_order(queries, "queries", "the result's rows follow the order the queries are "
                     "read in, paired with query_labels, self_index and example_index")
    q_given = None if query_labels is None else _int_vector(query_labels, "query_labels").cpu()
    if example_index is not None:
        example_index = _int_vector(example_index, "example_index").cpu()
    m = _num_rows(queries)
    if self_index is not None:
        self_index = _int_vector(self_index, "self_index").cpu()
        if m is not None and self_index.shape[0] != m:
            raise ValueError(f"self_index has {self_index.shape[0]} entries but there are {m} "
                             "queries")
        # sharded: global indices, checked against the global size when the shards merge
        _check_self_index(self_index, None if sharded else n)
    if m is not None:  # else checked once the queries are read
        for name, t in ((query_labels_arg, q_given), ("example_index", example_index),
                        ("reference", ref_given)):
            if t is not None and t.shape[0] != m:
                raise ValueError(f"{name} has {t.shape[0]} entries but there are {m} queries")
    # Class ids: the support labels are this rank's shard when sharded, checked inside the
    # collective so that every rank raises alike.
    support_label_error = None
    try:
        vote_classes = _class_count(num_classes, [("support_labels", labels),
                                                  (query_labels_arg, q_given),
                                                  ("reference", ref_given)])
    except ValueError as exc:
        if not sharded:
            raise
        support_label_error, vote_classes = exc, num_classes
    excludes = self_index is not None and bool((self_index >= 0).any())
    if not sharded and k > n - (1 if excludes else 0):  # sharded: checked on the merge
        raise ValueError(
            f"k={k} is larger than the support set allows (N={n}"
            f"{', one point excluded as self match' if excludes else ''})"
        )
    lab_dev = labels.to(device)

    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak = 0
    preds: list[list[torch.Tensor]] = []
    logits_all: list[torch.Tensor] = []
    q_labels_seen: list[torch.Tensor] = []
    chunk_rows = None
    num_chunks = 0
    try:
        with ProbeRecorder(model, spec, dtype=dtype, storage=device) as rec:

            def run_chunk(q_layers, sidx, row0):
                nonlocal peak, num_chunks
                mc = q_layers[0].shape[0]
                tops = [empty_topk(mc, k, torch.float64 if dtype == torch.float64 else
                                   torch.float32, device) for _ in q_layers]
                resident = _nbytes(q_layers) + _nbytes(t for top in tops for t in top)
                offset = start_row
                batches = iter_batches(support, batch_size)
                if progress:
                    from tqdm.auto import tqdm

                    total = None if n_support is None else math.ceil(n / batch_size)
                    batches = tqdm(batches, total=total, leave=False, unit="batch",
                                   desc=f"k-NN chunk {num_chunks + 1} (queries {row0}-"
                                        f"{row0 + mc})")
                try:
                    if support_label_error is not None:
                        raise support_label_error
                    for xs, ys in batches:
                        if ys is not None and check_loader_labels:
                            row = offset - start_row
                            _check_loader_labels(ys, labels[row:row + xs.shape[0]], row,
                                                 "support", "support_labels")
                        s_layers, _ = rec.run(xs.to(device))
                        peak = max(peak, resident + _nbytes(s_layers))
                        for layer, (q, s) in enumerate(zip(q_layers, s_layers, strict=True)):
                            tops[layer] = knn(q, s, k, self_index=sidx, self_match="exclude",
                                              prev=tops[layer], offset=offset)
                        offset += xs.shape[0]
                        del s_layers
                    if offset - start_row != n:
                        raise ValueError(f"the support set yielded {offset - start_row} rows but "
                                         f"support_labels has {n}")
                except Exception as exc:
                    if not sharded:
                        raise
                    merge_shards(None, None, num_classes, shard_offset=start_row,
                                 shard_size=n, dim=0, process_group=process_group,
                                 error=exc)  # raises on every rank
                if not sharded:
                    chunk_preds = []
                    for top in tops:
                        _check_full(top.index, k, n, row0)  # no -1 slot reaches the labels
                        chunk_preds.append(vote(lab_dev[top.index], vote_classes).cpu())
                    preds.append(chunk_preds)
                else:
                    chunk_preds = []
                    for q, top in zip(q_layers, tops, strict=True):
                        hit = top.index >= 0
                        lab_k = lab_dev[torch.where(hit, top.index - start_row, 0)] if n \
                            else torch.zeros_like(top.index)
                        merged, lab_k = merge_shards(
                            top, torch.where(hit, lab_k, -1), num_classes,
                            shard_offset=start_row, shard_size=n, dim=q.shape[1],
                            self_index=sidx, process_group=process_group)
                        _check_full(merged.index, k, n, row0)  # identical on every rank
                        chunk_preds.append(vote(lab_k, num_classes).cpu())
                    preds.append(chunk_preds)
                num_chunks += 1

            pending: list[list[torch.Tensor]] = []
            pending_rows = 0
            row0 = 0
            q_batches = iter_batches(queries, batch_size)
            if progress:
                from tqdm.auto import tqdm

                q_batches = tqdm(q_batches, leave=False, unit="batch", desc="query embeddings",
                                 total=None if m is None else math.ceil(m / batch_size))
            q_row = 0
            for xq, yq in q_batches:
                if yq is not None and q_given is None:
                    q_labels_seen.append(_int_vector(yq, "the labels the query loader "
                                                     "yields").cpu())
                elif yq is not None and check_loader_labels:
                    _check_loader_labels(yq, q_given[q_row:q_row + xq.shape[0]], q_row,
                                         "support" if scoring_support else "queries",
                                         query_labels_arg)
                q_row += xq.shape[0]
                q_layers, q_logits = rec.run(xq.to(device))
                logits_all.append(q_logits.cpu())
                if chunk_rows is None:
                    dims = [t.shape[1] for t in q_layers]
                    itemsize = q_layers[0].element_size()
                    per_query = sum(dims) * itemsize + len(dims) * k * 16
                    batch_bytes = batch_size * sum(dims) * itemsize
                    if memory_budget is None:
                        chunk_rows = m if m is not None else 2**62
                    else:
                        fit = max(0, int(memory_budget) - batch_bytes) // per_query
                        chunk_rows = max(xq.shape[0], fit)
                pending.append(q_layers)
                pending_rows += xq.shape[0]
                if pending_rows >= chunk_rows:
                    cat = [torch.cat([p[layer] for p in pending]) for layer in range(len(dims))]
                    pending.clear()
                    sidx = None if self_index is None else \
                        self_index[row0:row0 + pending_rows].to(device)
                    run_chunk(cat, sidx, row0)
                    del cat
                    row0 += pending_rows
                    pending_rows = 0
            if pending:
                cat = [torch.cat([p[layer] for p in pending]) for layer in range(len(dims))]
                pending.clear()
                sidx = None if self_index is None else \
                    self_index[row0:row0 + pending_rows].to(device)
                run_chunk(cat, sidx, row0)
                row0 += pending_rows
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError("the queries yielded no batches")

    layer_pred = torch.stack([torch.cat([p[layer] for p in preds]) for layer in
                              range(len(preds[0]))])
    logits = torch.cat(logits_all)
    m = logits.shape[0]
    q_labels = q_given
    if q_labels is None and q_labels_seen:
        q_labels = torch.cat(q_labels_seen)
    if mode == "network":
        ref, ref_name = logits.argmax(1), "the model's prediction (reference='network')"
    elif mode == "labels":
        if q_labels is None:
            raise ValueError('reference="labels" needs query_labels= (or a query loader that '
                             "yields labels)")
        ref, ref_name = q_labels, query_labels_arg
    elif mode == "last_probe":
        ref, ref_name = layer_pred[-1].clone(), "reference"
    else:
        ref, ref_name = ref_given, "reference"
    for name, t in ((query_labels_arg, q_labels), ("self_index", self_index),
                    ("example_index", example_index), (ref_name, ref)):
        if t is not None and t.shape[0] != m:
            raise ValueError(f"{name} has {t.shape[0]} entries but there are {m} queries")
    # every label the call saw counts (the model may predict a class no label has)
    num_classes = _class_count(num_classes, [(query_labels_arg, q_labels), (ref_name, ref)])
    num_classes = max(num_classes, vote_classes)
    depth = depth_from_predictions(layer_pred, ref)
    from ._version import __version__

    result = DepthResult(
        depth=depth,
        layer_pred=layer_pred,
        reference=ref,
        layer_agreement=(layer_pred == ref).to(torch.float64).mean(1),
        layer_accuracy=None if q_labels is None else
        (layer_pred == q_labels).to(torch.float64).mean(1),
        labels=q_labels,
        example_index=example_index,
        k=k,
        self_match="exclude",
        reference_mode=mode,
        num_layers=int(layer_pred.shape[0]),
        num_classes=int(num_classes),
        layer_names=spec.names,
        version=__version__,
    )
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return StreamResult(
        depth=result,
        logits=logits,
        peak_bytes=int(peak),
        peak_rss_bytes=peak_rss_bytes(),
        cuda_peak_bytes=None if cuda_peak is None else int(cuda_peak),
        chunk_size=int(min(chunk_rows, m)),
        num_chunks=num_chunks,
        seconds=time.perf_counter() - start,
    )
