"""A drop-in for ``knn_predict`` of the AngularGap ``knndnn.py`` family, with TRUE neighbours.

Before (pengbohua/AngularGap ``knndnn.py`` and the scripts derived from it, e.g. the
RPI-DSPlab Prediction-Depth code and MIAE's ``PdHardness``)::

    from knndnn import knn_predict

After::

    from pdepth.compat.knndnn import knn_predict

Same signature and shapes: ``feature [B, F]``, ``feature_bank [F, K]`` (transposed, as the
callers pass ``f_bank.t()``), ``feature_labels [K]``; returns per-class scores
``[B, classes]`` that callers normalise (``F.normalize(scores, p=1, dim=1)``) and reduce with
``argmax``. The neighbours come from the pdepth k-NN op.

Where this deliberately differs from the original:

1. **Nearest, not farthest, neighbours.** The original computed squared L2 distances and
   then called ``topk(k, largest=True)``, which selects the k *farthest* support points (and
   with ``rm_top1`` drops the farthest one). Here the k nearest points are used (squared L2,
   ties to the lower index).
2. **Weights.** The original weighted each selected point by ``exp(sim / knn_t)`` with
   ``sim`` the value it ranked by, i.e. the squared distance, so farther points weighed more
   (and ``exp`` overflowed to ``inf`` for any realistic distance). Here the same formula is
   applied with the similarity the ranking implies, ``sim = -d^2`` (squared L2 distance), so
   ``w = exp(-d^2 / knn_t)``: nearer neighbours weigh more. For ``dist="cosine"`` the
   similarity is the cosine, ``w = exp(cos / knn_t)`` (the InstDisc / MoCo k-NN monitor).
   Each weight stays attached to its own neighbour (a derived version divided by distance
   columns that did not belong to the selected neighbours).
3. **Numerical range.** ``exp(-d^2 / t)`` underflows to 0 for ``d^2 / t`` above ~87 (float32),
   which would make every score 0. With ``stable=True`` (default) the exponent is shifted by
   each row's best similarity, i.e. every score of a row is multiplied by the same positive
   factor ``exp(d_min^2 / t)``: the L1-normalised scores and the argmax, which is how callers
   use them, are unchanged, and the nearest neighbour gets weight 1. ``stable=False`` returns
   the raw ``exp(sim / t)`` sums.
4. **Self match.** ``rm_top1=True`` keeps the legacy behaviour (take k+1 neighbours, drop the
   nearest; ``self_match="drop_nearest"``), which drops the wrong point when duplicates or
   float32 rounding put another point at distance <= the query's own. Pass
   ``self_index=`` (each query's own index in the bank) to exclude exactly that point instead.
5. ``dist="cosine"`` normalises both sides (as the original intended), with pdepth's one
   cosine rule (:func:`pdepth.normalize_rows`), and ranks by L2 distance between the unit
   vectors, which orders like the cosine. Other values raise ``ValueError`` (the original
   raised ``NotImplementedError``).
"""

from __future__ import annotations

import torch

from ..ops import knn, metric_rows

__all__ = ["knn_predict"]


# The positional parameters mirror the AngularGap-family knn_predict (a drop-in).
def knn_predict(
    feature: torch.Tensor,
    feature_bank: torch.Tensor,
    feature_labels: torch.Tensor,
    classes: int,
    knn_k: int,
    knn_t: float,
    rm_top1: bool = True,
    dist: str = "l2",
    *,
    self_index: torch.Tensor | None = None,
    stable: bool = True,
    filter: str = "auto",
) -> torch.Tensor:
    """Weighted k-NN class scores over the true nearest neighbours.

    Args:
        feature: ``[B, F]`` query features.
        feature_bank: ``[F, K]`` support features, transposed (the original's convention).
        feature_labels: ``[K]`` integer labels in ``[0, classes)``.
        classes: number of classes C.
        knn_k: neighbours per query.
        knn_t: temperature of the weights ``exp(sim / knn_t)``.
        rm_top1: drop each query's nearest neighbour (legacy ``drop_nearest``), for queries
            that are themselves in the bank. Ignored when ``self_index`` is given.
        dist: ``"l2"`` (``sim = -squared L2 distance``) or ``"cosine"`` (``sim = cosine``).
        self_index: ``[B]`` each query's own column in the bank (-1: none); excludes exactly
            that point (``self_match="exclude"``).
        stable: shift each row's exponents by its best similarity (see the module docstring);
            scales every score of a row by one positive factor.
        filter: the k-NN op's filter format (:func:`pdepth.knn`: ``"auto"``, ``"fp32"``,
            ``"bf16"``, ``"bf16x3"``, ``"tf32"``); speed only, the neighbours are the same.

    Returns:
        ``[B, classes]`` scores (float32; float64 for float64 inputs) on ``feature``'s device:
        per class, the sum of the weights of the neighbours with that label.
    """
    _check_args(feature, feature_bank, dist, knn_t)
    queries, support = _queries_support(feature, feature_bank, dist)
    labels = _labels(feature_labels, support, classes)
    sq_dist, index = _neighbours(queries, support, knn_k, rm_top1, self_index, filter)
    # Similarity of each selected neighbour, in the ranking's own terms.
    sim = (1.0 - 0.5 * sq_dist) if dist == "cosine" else -sq_dist
    if stable and sim.numel():
        sim = sim - sim[:, :1]  # the nearest neighbour has the largest similarity
    weight = (sim / knn_t).exp()
    scores = torch.zeros(queries.shape[0], classes, dtype=weight.dtype, device=queries.device)
    scores.scatter_add_(1, labels[index], weight)
    return scores


def _check_args(feature, feature_bank, dist, knn_t) -> None:
    if dist not in ("l2", "cosine"):
        raise ValueError(f"dist must be 'l2' or 'cosine', got {dist!r}")
    if feature.dim() != 2 or feature_bank.dim() != 2:
        raise ValueError(
            f"feature must be [B, F] and feature_bank [F, K], got shapes "
            f"{tuple(feature.shape)} and {tuple(feature_bank.shape)}"
        )
    if feature_bank.shape[0] != feature.shape[1]:
        raise ValueError(
            f"feature_bank must be [F, K] (transposed, as the original's callers pass "
            f"f_bank.t()) with F={feature.shape[1]} rows, got shape {tuple(feature_bank.shape)}"
        )
    if not knn_t or knn_t <= 0:
        raise ValueError(f"knn_t must be > 0, got {knn_t!r}")


def _queries_support(feature, feature_bank, dist):
    """Queries ``[B, F]`` and support ``[K, F]`` in one floating dtype on ``feature``'s
    device, unit length for ``dist="cosine"``."""
    queries = feature.detach()
    support = feature_bank.detach().t()
    if not queries.is_floating_point():
        queries = queries.float()
    dtype = torch.promote_types(queries.dtype, support.dtype) if support.is_floating_point() \
        else queries.dtype
    queries = queries.to(dtype)
    support = support.to(device=queries.device, dtype=dtype)
    if dist == "cosine":  # pdepth's one normalisation (pdepth.normalize_rows)
        queries, support = metric_rows("cosine", queries, support, op="knn_predict")
    return queries, support


def _labels(feature_labels, support, classes) -> torch.Tensor:
    """``[K]`` int64 labels in ``[0, classes)``, one per support point: the scores are
    indexed by them (the k-NN op never sees these labels)."""
    labels = torch.as_tensor(feature_labels, device=support.device).long().reshape(-1)
    if labels.shape[0] != support.shape[0]:
        raise ValueError(
            f"feature_labels has {labels.shape[0]} entries but feature_bank has "
            f"K={support.shape[0]} columns"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(
            f"feature_labels must lie in [0, classes={classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def _neighbours(queries, support, knn_k, rm_top1, self_index, filter="auto"):
    """The op's neighbours under the self-match policy the arguments select."""
    if self_index is not None:
        return knn(queries, support, knn_k,
                   self_index=torch.as_tensor(self_index, device=queries.device),
                   self_match="exclude", filter=filter)
    return knn(queries, support, knn_k, self_match="drop_nearest" if rm_top1 else "include",
               filter=filter)
