"""Prediction depth on embeddings: :func:`prediction_depth` runs one k-NN classifier per
probe, streaming the probes one layer at a time (only one layer's embeddings need to be
resident), and reduces the per-probe predictions to a depth with
:func:`pdepth.depth_from_predictions`.

The k-NN work is always done by the op (:func:`pdepth.knn_vote`, through the support set's
:class:`~pdepth.depth.support.Support`); nothing here computes distances or votes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..ops import metric_rows
from .args import DepthArgs, depth_args
from .placement import resolve_support
from .result import DepthResult, build_result
from .support import LayerVote, stack_votes

__all__ = ["prediction_depth"]


def prediction_depth(
    support_layers,
    support_labels,
    query_layers=None,
    *,
    reference: str | torch.Tensor | np.ndarray = "network",
    network_pred=None,
    query_labels=None,
    k: int = 30,
    self_match: str = "exclude",
    self_index=None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    filter: str = "auto",
    metric: str = "euclidean",
    example_index=None,
    progress: bool = False,
    shard=None,
    shard_offset: int | None = None,
    process_group=None,
    vote_counts: bool = False,
) -> DepthResult:
    # Long only for its docstring (the public reference of its arguments); the work is in
    # pdepth.depth.args (checks, reference), _layer_votes (the probes) and build_result.
    """Prediction depth (Baldock et al. 2021) of queries against a labelled support set.

    At each of L probes a k-NN classifier (k nearest support points by squared L2 distance,
    uniform vote, ties to the lower index / lowest class, docs/design.md section 2) is built on the
    support embeddings; the depth of a query is the first probe from which every later probe's
    k-NN prediction equals the reference (:func:`depth_from_predictions`).

    Args:
        support_layers: the support set's embeddings at L probes, input to output: a list, an
            ordered dict (its keys become ``layer_names``) or a generator of L tensors or
            arrays shaped ``(N, ...)`` (flattened to ``(N, D_l)``). Consumed one layer at a
            time, so a generator only needs one layer resident. Integer embeddings are
            converted to float32.
        support_labels: ``[N]`` integer labels of the support set (the model's training split
            labels, or e.g. ensemble consensus labels).
        query_layers: the queries' embeddings at the same L probes (same container kinds),
            ``(M, ...)`` per layer, zipped with ``support_layers`` layer by layer. None scores
            the support points themselves (M = N).
        reference: ``"network"`` (default; needs ``network_pred``), ``"labels"`` (needs
            ``query_labels``, or uses ``support_labels`` when scoring the support itself),
            ``"last_probe"`` (the last probe's k-NN prediction), or an ``[M]`` integer tensor
            used as is.
        network_pred: ``[M]`` the network's argmax prediction per query (``[M, C]`` logits or
            probabilities are reduced with argmax).
        query_labels: ``[M]`` labels of the queries, used for ``reference="labels"`` and for
            ``layer_accuracy``. Defaults to ``support_labels`` when ``query_layers`` is None.
        k: neighbours per query.
        self_match: ``"exclude"`` (default; skip each query's own support point given by
            ``self_index``), ``"include"`` (count it, as sklearn's ``predict`` on the fitted
            data does) or ``"drop_nearest"`` (legacy: take k+1 and drop the nearest).
        self_index: ``[M]`` support index of each query, -1 for none. Defaults to
            ``arange(N)`` when ``query_layers`` is None, else no self matches.
        num_classes: number of classes. Default: one more than the largest class id among
            ``support_labels``, ``query_labels`` and the reference (a class that only the
            queries have is never predicted, but it is not an error). Given, every one
            of them must lie in ``[0, num_classes)``. At most ``pdepth.ops.MAX_CLASSES``
            (2**24): larger class ids must be mapped to ``0..C-1`` first.
        device: where to run the k-NN (default: where each support layer lives).
        filter: the GEMM format the k-NN op filters candidates with (:func:`pdepth.knn`):
            ``"auto"`` (default: the fastest exact one, :func:`pdepth.knn_plan`), ``"fp32"``,
            ``"bf16"``, ``"bf16x3"`` or ``"tf32"`` (CUDA only); float64 embeddings take only
            ``"auto"`` or ``"fp32"``. Only the speed depends on it: the result is the same
            bits. An unknown value raises ``ValueError`` before any layer is read.
        metric: ``"euclidean"`` (default) or ``"cosine"``: each layer's rows are
            L2-normalised (:func:`pdepth.normalize_rows`: float32, float64 for float64
            embeddings; a zero row stays zero) and ranked by the same squared-L2 rule, which
            orders them as cosine distance does (docs/design.md section 2, "The cosine
            metric"). An unknown value raises ``ValueError`` before any layer is read.
        example_index: ``[M]`` dataset indices of the queries, stored in the result for
            :func:`aggregate`. Defaults to ``arange(N)`` when ``query_layers`` is None.
        progress: show a tqdm progress bar over layers.
        shard: where the support set lives: None (here, all of it) or a
            :class:`pdepth.ShardedSupport` (``support_layers`` and
            ``support_labels`` are this rank's contiguous shard of the support set, starting
            at global row ``shard.offset``; each layer's vote is
            :func:`pdepth.distributed.knn_vote` over all ranks). Sharded, the call is
            collective: every rank calls with the same ``query_layers`` (required),
            ``self_index`` (global indices), ``num_classes`` (required), ``k`` and reference.
            Every rank gets the whole result, equal to the single-process one. ``filter`` may
            differ between ranks.
        shard_offset, process_group: the older spelling of
            ``shard=ShardedSupport(shard_offset, process_group)`` (deprecated aliases).
        vote_counts: also return, per probe and query, how many of the k neighbours carry
            each class (``DepthResult.vote_counts [L, M, C]``, int16): what each vote won by.

    Returns:
        :class:`DepthResult` (tensors on the CPU).

    Raises:
        ValueError: on bad input, naming the layer index where the problem is in a layer
            (rows that differ from the labels or from layer 0, NaN/Inf embeddings, k larger
            than the support, mismatched layer counts), and naming the argument otherwise
            (a missing ``network_pred``, a reference of the wrong length, class ids that are
            negative or not below an explicit ``num_classes``, ``self_index`` outside
            ``[-1, N)``, a ``filter`` the op does not take).
    """

    support = resolve_support(shard, shard_offset, process_group)
    args = depth_args(support_labels, support=support, scoring_support=query_layers is None,
                      queries_arg="query_layers", reference=reference,
                      query_labels=query_labels, self_index=self_index,
                      example_index=example_index, k=k, num_classes=num_classes,
                      network_pred=network_pred, filter=filter, op="prediction_depth",
                      device=device, metric=metric)
    names, layers = _layer_pairs(support_layers, query_layers)
    bar = _progress_bar(progress, support_layers, query_layers)
    try:
        votes = _layer_votes(args, layers, names, device=device, self_match=self_match,
                             bar=bar, counts=vote_counts)
    finally:
        if bar is not None:
            bar.close()
    layer_pred, counts = stack_votes([votes])
    ref, _ = args.resolve_reference(layer_pred)
    return build_result(layer_pred, ref, vote_counts=counts,
                        query_labels=args.query_labels,
                        example_index=args.example_index, k=args.k, self_match=self_match,
                        reference_mode=args.mode, num_classes=args.num_classes,
                        layer_names=names, metric=args.metric)


_MISSING = object()


def _layer_pairs(support_layers, query_layers):
    """``(names or None, (support iterator, query iterator or None))``."""
    names, support_iter = _layer_iter(support_layers, "support_layers")
    if query_layers is None:
        return names, (support_iter, None)
    q_names, query_iter = _layer_iter(query_layers, "query_layers")
    if names is not None and q_names is not None and names != q_names:
        raise ValueError(
            f"support_layers and query_layers name different layers: {names} vs {q_names}"
        )
    return (names if names is not None else q_names), (support_iter, query_iter)


def _progress_bar(progress: bool, *containers):
    if not progress:
        return None
    from tqdm.auto import tqdm

    total = None
    for obj in containers:
        if isinstance(obj, Sequence | Mapping):
            total = len(obj)
    return tqdm(total=total, desc="prediction depth", unit="layer")


def _layer_votes(args: DepthArgs, layers, names, *, device, self_match: str, bar,
                 counts: bool) -> list[LayerVote]:
    """The k-NN vote of each probe (with its counts if ``counts``), one layer at a time."""
    votes: list[LayerVote] = []
    m = None
    on_device: dict[torch.device, tuple] = {}
    layer = 0
    while (pair := _next_layer(layers, layer, names, args.labels.shape[0], device)) is not None:
        s, q = pair
        del pair
        where = _layer_label(layer, names)
        if m is None:
            m = q.shape[0]
            source = "network_pred" if args.mode == "network" else "reference"
            args.check_lengths(m, " (rows of layer 0)",
                               reference_name=f"reference ({args.mode}): {source}")
        elif q.shape[0] != m:
            raise ValueError(f"{where}: query_layers has {q.shape[0]} rows but layer 0 had {m}")
        if s.device not in on_device:
            on_device[s.device] = (
                args.labels.to(s.device),
                None if args.self_index is None else args.self_index.to(s.device),
            )
        lab, sidx = on_device[s.device]
        q, s = metric_rows(args.metric, q, s, op="prediction_depth")  # q is s: normalised once
        try:
            votes.append(args.support.knn_vote(q, s, lab, args.k, args.num_classes,
                                               self_index=sidx, self_match=self_match,
                                               filter=args.filter, counts=counts))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        del s, q
        layer += 1
        if bar is not None:
            bar.update(1)
    if m is None:
        raise ValueError("support_layers holds no layers; prediction depth needs L >= 1 probes")
    return votes


def _next_layer(layers, layer: int, names, n: int, device):
    """``(support [N, D], queries [M, D])`` of the next layer, or None after the last.
    Fetched by hand (not zip) so that no reference to the previous layer survives while the
    next one is produced: a generator needs one layer resident at a time."""
    support_iter, query_iter = layers
    s_raw = next(support_iter, _MISSING)
    q_raw = None if query_iter is None else next(query_iter, _MISSING)
    if s_raw is _MISSING and (q_raw is None or q_raw is _MISSING):
        return None
    where = _layer_label(layer, names)
    if s_raw is _MISSING or q_raw is _MISSING:
        longer, shorter = ("query_layers", "support_layers") if s_raw is _MISSING \
            else ("support_layers", "query_layers")
        raise ValueError(
            f"{where}: support_layers and query_layers have different numbers of "
            f"layers: {longer} has at least {layer + 1}, {shorter} has {layer}"
        )
    s = _embedding(s_raw, where, "support_layers", device)
    del s_raw
    if s.shape[0] != n:
        raise ValueError(f"{where}: support_layers has {s.shape[0]} rows but support_labels "
                         f"has {n}")
    if q_raw is None:  # scoring the support set itself
        return s, s
    q = _embedding(q_raw, where, "query_layers", s.device)
    if q.dtype != s.dtype:
        common = torch.promote_types(q.dtype, s.dtype)
        q, s = q.to(common), s.to(common)
    return s, q


def _layer_iter(layers, name: str):
    """(names or None, iterator over layers) for a list, ordered dict, generator or a stacked
    tensor / array [L, n, ...]."""
    if isinstance(layers, Mapping):
        return [str(key) for key in layers.keys()], iter(layers.values())
    if isinstance(layers, (torch.Tensor, np.ndarray)) and layers.ndim < 3:
        raise ValueError(
            f"{name} must be a list, ordered dict or generator of L tensors shaped (n, ...), "
            f"got a single array of shape {tuple(layers.shape)}; wrap one layer in a list"
        )
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(
            f"{name} must be a list, ordered dict or generator of L tensors shaped (n, ...), "
            f"got {type(layers).__name__}"
        )
    return None, iter(layers)


def _embedding(x, layer: str, what: str, device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if device is not None:
        t = t.to(device)
    if t.dim() == 0:
        raise ValueError(f"{layer}: {what} is a scalar; each layer must be shaped (n, ...)")
    t = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if t.is_complex():
        raise ValueError(f"{layer}: {what} is complex ({t.dtype}); embeddings must be real")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _layer_label(layer: int, names: list[str] | None) -> str:
    if names is not None and layer < len(names):
        return f"layer {layer} ({names[layer]!r})"
    return f"layer {layer}"
