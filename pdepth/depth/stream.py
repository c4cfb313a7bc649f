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
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..ops import empty_topk, knn, knn_sym, metric_rows
from ..probes import ProbeRecorder, iter_batches, resolve_probes
from .args import DepthArgs, _int_vector, check_filter_arg, depth_args
from .placement import resolve_support
from .result import DepthResult, build_result
from .support import LayerVote, LocalSupport, _class_count, stack_votes

__all__ = ["StreamResult", "peak_rss_bytes", "stream_prediction_depth"]


class _DeprecatedDepth(torch.Tensor):
    """The depth tensor that :attr:`StreamResult.depth` returns. Before 0.2 that attribute
    was the :class:`DepthResult`; reading a DepthResult attribute off it (``res.depth.depth``,
    ``res.depth.layer_pred``...) still works, with a DeprecationWarning, and gives the
    DepthResult's. Operations on it return plain tensors (torch functions are not
    overridden), so the subclass goes no further than the attribute."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __getattr__(self, name):  # only for names a tensor does not have
        result = self.__dict__.get("_result")
        if result is None or name.startswith("__") or not hasattr(result, name):
            raise AttributeError(f"'Tensor' object has no attribute {name!r}")
        _warn_old_depth(name)
        return getattr(result, name)

    @property
    def depth(self):  # a tensor's own attribute lookup would not reach __getattr__
        _warn_old_depth("depth")
        return self._result.depth

    def __deepcopy__(self, memo):  # copies and pickles are plain tensors
        return self.as_subclass(torch.Tensor).clone()

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _warn_old_depth(name: str) -> None:
    warnings.warn(f"StreamResult.depth is now the depth tensor; read the DepthResult as "
                  f"StreamResult.result (res.result.{name}, not res.depth.{name})",
                  DeprecationWarning, stacklevel=3)


@dataclass(eq=False)
class StreamResult:
    """Result of :func:`stream_prediction_depth`.

    Attributes:
        result: the :class:`pdepth.DepthResult` (``layer_names`` are the probe names).
        depth: ``[M]`` int64, the depth tensor (``result.depth``), as
            :func:`pdepth.prediction_depth`'s ``.depth``. (It used to be the DepthResult:
            ``res.depth.depth`` and the DepthResult's other attributes read off it still
            work, with a DeprecationWarning.)
        logits: ``[M, C]`` float32 model outputs for the queries (eval mode).
        peak_bytes: the largest number of bytes of embeddings, running top-k and support
            batch embeddings held at once (what ``memory_budget`` bounds).
        peak_rss_bytes: the process's peak resident set size when the call returned.
        cuda_peak_bytes: peak CUDA memory allocated during the call (None on CPU).
        chunk_size: queries per chunk; num_chunks: number of chunks (= support passes).
        seconds: wall time of the call.
    """

    result: DepthResult
    logits: torch.Tensor
    peak_bytes: int
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    chunk_size: int
    num_chunks: int
    seconds: float

    @property
    def depth(self) -> torch.Tensor:
        t = self.result.depth.as_subclass(_DeprecatedDepth)
        t._result = self.result
        return t

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
    token: str | None = None,
    dtype: torch.dtype = torch.float32,
    filter: str = "auto",
    metric: str = "euclidean",
    progress: bool = False,
    shard=None,
    shard_offset: int | None = None,
    process_group=None,
    check_loader_labels: bool = True,
    vote_counts: bool = False,
) -> StreamResult:
    # Long only for its docstring (the public reference of its arguments); the work is in
    # pdepth.depth.args (checks, reference), _Stream (the passes) and build_result.
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
        token: the token rule of transformer block outputs (``"cls"``, ``"mean"``, ``"all"``;
            default: the preset's), :func:`pdepth.probes.resolve_probes`.
        dtype: embedding dtype.
        filter: the GEMM format the k-NN op filters candidates with (:func:`pdepth.knn`):
            ``"auto"`` (default), ``"fp32"``, ``"bf16"``, ``"bf16x3"`` or ``"tf32"`` (CUDA
            only; float64 ``dtype`` takes only ``"auto"`` or ``"fp32"``). Only the speed
            depends on it: the result is the same bits. Checked against ``dtype`` and
            ``device`` before the model runs (``ValueError`` naming the valid values).
        metric: ``"euclidean"`` (default) or ``"cosine"`` (each probe's rows L2-normalised
            in float32 -- float64 for a float64 ``dtype`` -- as they are recorded, then
            ranked by the squared-L2 rule; as :func:`pdepth.prediction_depth`, the same
            result). Checked before the model runs.
        progress: tqdm progress bars.
        shard: where the support set lives: None (here, all of it) or a
            :class:`pdepth.ShardedSupport` (``support`` and ``support_labels``
            are this rank's contiguous shard, starting at global row ``shard.offset``; each
            rank streams its shard and the per-probe top-k lists are merged across ranks
            (:func:`pdepth.distributed.merge_shards`) before the vote). Sharded, the call is
            collective: every rank passes the same ``queries`` (required), ``num_classes``
            (required), ``self_index`` (global indices), ``k``, ``batch_size`` and
            ``memory_budget`` (so the query chunks agree), and gets the whole result.
            ``filter`` may differ between ranks.
        shard_offset, process_group: the older spelling of
            ``shard=ShardedSupport(shard_offset, process_group)`` (deprecated aliases).
        check_loader_labels: where ``support`` (or ``queries``) yields labels along with the
            inputs, they must equal ``support_labels`` (``query_labels``) row by row; a
            mismatch raises ``ValueError`` (the usual cause is a loader in another order than
            the labels). Pass False when the given labels differ on purpose (e.g. ensemble
            consensus labels); the loader's order must still be fixed.
        vote_counts: also return, per probe and query, how many of the k neighbours carry
            each class (``res.result.vote_counts [L, M, C]``, int16; as
            :func:`pdepth.prediction_depth`).

    Returns:
        :class:`StreamResult`.

    Raises:
        ValueError: on bad input, naming the argument (the same checks as
            :func:`pdepth.prediction_depth`: integer labels, references and indices, class ids
            in range, ``self_index`` in ``[-1, N)``, k no larger than the usable support, a
            ``filter`` the op does not take for ``dtype`` on ``device``).
    """
    start = time.perf_counter()
    args = depth_args(support_labels, support=resolve_support(shard, shard_offset, process_group),
                      scoring_support=queries is None, queries_arg="queries",
                      reference=reference, query_labels=query_labels, self_index=self_index,
                      example_index=example_index, k=k, num_classes=num_classes,
                      from_model=True, filter=filter, op="stream_prediction_depth",
                      device=device, metric=metric)
    spec = resolve_probes(model, probes, max_dim=max_dim, token=token)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    check_filter_arg("stream_prediction_depth", filter, dtype=dtype, device=device)
    queries = _check_inputs(args, support, queries)
    stream = _Stream(model, args, support, device=device, dtype=dtype, batch_size=batch_size,
                     progress=progress, check_loader_labels=check_loader_labels,
                     counts=vote_counts)
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with ProbeRecorder(model, spec, dtype=dtype, storage=device) as stream.rec:
            for q_layers, row0 in stream.query_chunks(queries, memory_budget):
                stream.run_chunk(q_layers, row0)
                del q_layers
    finally:
        model.train(was_training)
    result = stream.result(spec.names)
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return StreamResult(
        result=result,
        logits=stream.logits,
        peak_bytes=int(stream.peak),
        peak_rss_bytes=peak_rss_bytes(),
        cuda_peak_bytes=None if cuda_peak is None else int(cuda_peak),
        chunk_size=int(min(stream.chunk_rows, result.num_examples)),
        num_chunks=stream.num_chunks,
        seconds=time.perf_counter() - start,
    )


def _check_inputs(args: DepthArgs, support, queries):
    """Checks the loaders (row counts, fixed order) and the query-side lengths where the
    number of queries is known before reading them; returns the queries (the support set
    itself when None)."""
    n = args.labels.shape[0]
    n_support = _num_rows(support)
    if n_support is not None and n_support != n:
        raise ValueError(f"support has {n_support} rows but support_labels has {n}")
    _check_order(support, "support", "it is read once per query chunk and its rows are "
                 "paired with support_labels by position")
    if queries is None:
        queries = support
    else:
        _check_order(queries, "queries", "the result's rows follow the order the queries are "
                     "read in, paired with query_labels, self_index and example_index")
    m = _num_rows(queries)
    if m is not None:  # else checked once the queries are read
        args.check_lengths(m)
    args.support.check_k(args.k, n, args.self_index)
    return queries


class _Stream:
    """One :func:`stream_prediction_depth` call: the query chunks, the passes over the
    support set and what they accumulate (predictions, logits, peak bytes)."""

    def __init__(self, model, args: DepthArgs, support, *, device, dtype, batch_size,
                 progress, check_loader_labels, counts=False):
        self.args, self.support, self.device, self.dtype = args, args.support, device, dtype
        self.support_data = support
        self.batch_size, self.progress = batch_size, progress
        self.check_loader_labels = check_loader_labels
        self.counts = counts
        self.labels = args.labels.cpu()
        self.lab_dev = self.labels.to(device)
        self.query_labels = None if args.query_labels is None else args.query_labels.cpu()
        self.self_index = None if args.self_index is None else args.self_index.cpu()
        self.n_support = _num_rows(support)
        self.rec = None  # the ProbeRecorder, while the model runs
        self.peak = 0
        self.num_chunks = 0
        self.chunk_rows = None
        self.votes: list[list[LayerVote]] = []  # [query chunk][probe]
        self.logits_seen: list[torch.Tensor] = []
        self.labels_seen: list[torch.Tensor] = []

    def query_chunks(self, queries, memory_budget):
        """Yields ``(q_layers, row0)``: the queries' embeddings per probe, in chunks of
        rows that fit ``memory_budget``."""
        m = _num_rows(queries)
        batches = iter_batches(queries, self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, leave=False, unit="batch", desc="query embeddings",
                           total=None if m is None else math.ceil(m / self.batch_size))
        pending: list[list[torch.Tensor]] = []
        pending_rows = row0 = q_row = 0
        for xq, yq in batches:
            self._query_labels(yq, q_row, xq.shape[0])
            q_row += xq.shape[0]
            q_layers, q_logits = self.rec.run(xq.to(self.device, non_blocking=True))
            q_layers = self._rows(q_layers)
            self.logits_seen.append(q_logits.cpu())
            if self.chunk_rows is None:
                self.chunk_rows = self._chunk_rows(q_layers, xq.shape[0], m, memory_budget)
            pending.append(q_layers)
            pending_rows += xq.shape[0]
            if pending_rows >= self.chunk_rows:
                yield _concat(pending), row0
                row0 += pending_rows
                pending_rows = 0
        if pending:
            yield _concat(pending), row0

    def _rows(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        """A batch's probe embeddings as the op ranks them (normalised for ``"cosine"``:
        row by row, so batches and chunks never change a row)."""
        return [metric_rows(self.args.metric, t, op="stream_prediction_depth")[0]
                for t in layers]

    def _query_labels(self, yq, row0: int, rows: int) -> None:
        if yq is None:
            return
        if self.query_labels is None:
            self.labels_seen.append(_int_vector(yq, "the labels the query loader yields").cpu())
        elif self.check_loader_labels:
            _check_loader_labels(yq, self.query_labels[row0:row0 + rows], row0,
                                 "support" if self.args.scoring_support else "queries",
                                 self.args.query_labels_arg)

    def _chunk_rows(self, q_layers, first_rows: int, m, memory_budget) -> int:
        dims = [t.shape[1] for t in q_layers]
        itemsize = q_layers[0].element_size()
        per_query = sum(dims) * itemsize + len(dims) * self.args.k * 16
        batch_bytes = self.batch_size * sum(dims) * itemsize
        if memory_budget is None:
            return m if m is not None else 2**62
        fit = max(0, int(memory_budget) - batch_bytes) // per_query
        return max(first_rows, fit)

    def run_chunk(self, q_layers, row0: int) -> None:
        """One pass over the support set for the queries ``q_layers``: the running top-k of
        every probe, then the vote (merged across ranks when sharded)."""
        args, mc = self.args, q_layers[0].shape[0]
        sidx = None if self.self_index is None else self.self_index[row0:row0 + mc].to(
            self.device)
        compute = torch.float64 if self.dtype == torch.float64 else torch.float32
        tops = [empty_topk(mc, args.k, compute, self.device) for _ in q_layers]
        resident = _nbytes(q_layers) + _nbytes(t for top in tops for t in top)
        try:
            self.support.check_labels()
            if self._is_whole_support(mc, row0, sidx):
                self._score_self(q_layers, tops, resident)
            else:
                self._stream_support(q_layers, tops, sidx, resident, row0)
        except Exception as exc:
            self.support.fail(exc, n=self.labels.shape[0], num_classes=args.num_classes_given)
        self.votes.append(self.support.finish(
            tops, self.lab_dev, k=args.k, num_classes=args.num_classes, self_index=sidx,
            row0=row0, dims=[q.shape[1] for q in q_layers], counts=self.counts))
        self.num_chunks += 1

    def _is_whole_support(self, mc: int, row0: int, sidx) -> bool:
        """Whether this chunk is the whole (local, CPU) support set scored against itself
        with its own rows excluded: then its rows are the support rows (the same batches
        through the same model) and the symmetric op ranks them without a second pass."""
        n = self.labels.shape[0]
        return (ops.SYMMETRIC and self.args.scoring_support and row0 == 0 and mc == n
                and type(self.support) is LocalSupport and self.device.type == "cpu"
                and sidx is not None and torch.equal(sidx.cpu(), torch.arange(n)))

    def _score_self(self, q_layers, tops, resident: int) -> None:
        """Every probe's top-k of the support set against itself (docs/design.md section
        13: each pair's cross term and key once), into ``tops`` (in place)."""
        self.peak = max(self.peak, resident)
        for layer, q in enumerate(q_layers):
            tops[layer] = knn_sym(q, self.args.k, self_match="exclude", filter=self.args.filter)

    def _stream_support(self, q_layers, tops, sidx, resident: int, row0: int) -> None:
        """Merges every support batch into ``tops`` (in place)."""
        n, start_row = self.labels.shape[0], int(self.support.offset)
        offset = start_row
        batches = iter_batches(self.support_data, self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            total = None if self.n_support is None else math.ceil(n / self.batch_size)
            batches = tqdm(batches, total=total, leave=False, unit="batch",
                           desc=f"k-NN chunk {self.num_chunks + 1} (queries {row0}-"
                                f"{row0 + q_layers[0].shape[0]})")
        for xs, ys in batches:
            if ys is not None and self.check_loader_labels:
                row = offset - start_row
                _check_loader_labels(ys, self.labels[row:row + xs.shape[0]], row, "support",
                                     "support_labels")
            s_layers, _ = self.rec.run(xs.to(self.device, non_blocking=True))
            s_layers = self._rows(s_layers)
            self.peak = max(self.peak, resident + _nbytes(s_layers))
            for layer, (q, s) in enumerate(zip(q_layers, s_layers, strict=True)):
                tops[layer] = knn(q, s, self.args.k, self_index=sidx, self_match="exclude",
                                  prev=tops[layer], offset=offset, filter=self.args.filter)
            offset += xs.shape[0]
            del s_layers
        if offset - start_row != n:
            raise ValueError(f"the support set yielded {offset - start_row} rows but "
                             f"support_labels has {n}")

    def result(self, names) -> DepthResult:
        """The :class:`DepthResult` once every chunk ran."""
        if not self.votes:
            raise ValueError("the queries yielded no batches")
        args = self.args
        layer_pred, counts = stack_votes(self.votes)
        self.logits = torch.cat(self.logits_seen)
        m = self.logits.shape[0]
        q_labels = self.query_labels
        if q_labels is None and self.labels_seen:
            q_labels = torch.cat(self.labels_seen)
        ref, ref_name = args.resolve_reference(layer_pred, network=self.logits.argmax(1),
                                               query_labels=q_labels)
        args.check_lengths(m, reference=ref, reference_name=ref_name, query_labels=q_labels)
        # every label the call saw counts (the model may predict a class no label has)
        num_classes = max(args.num_classes, _class_count(
            args.num_classes_given, [(args.query_labels_arg, q_labels), (ref_name, ref)]))
        return build_result(layer_pred, ref, vote_counts=counts, query_labels=q_labels,
                            example_index=args.example_index, k=args.k, self_match="exclude",
                            reference_mode=args.mode, num_classes=num_classes,
                            layer_names=names, metric=args.metric)


def _concat(pending: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The pending query batches' embeddings, one tensor per probe (``pending`` emptied)."""
    cat = [torch.cat([p[layer] for p in pending]) for layer in range(len(pending[0]))]
    pending.clear()
    return cat
