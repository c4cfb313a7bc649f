"""A drop-in for ``difficulty.metrics.prediction_depth`` (package ``nn_example_difficulty``).

Before::

    from difficulty.metrics import prediction_depth

After::

    from pdepth.compat.difficulty import prediction_depth

Same signature, same semantics: one k-NN classifier per layer fitted on the training
intermediates and labels (k=30, Euclidean, uniform vote, ties to the lowest class, as
scikit-learn's ``KNeighborsClassifier``); without test intermediates the training points are
scored with themselves included among their neighbours; a layer "matches" when its k-NN
prediction equals the label; the depth is the first layer after which every layer matches
(0..L, L when the last layer is wrong). The k-NN runs in the pdepth op, one layer at a time.

Deliberate differences:

* ``use_faiss`` is accepted and ignored: the pdepth op replaces both scikit-learn and faiss
  (and, unlike faiss' GPU index, selects exactly, with a fixed tie rule).
* ``device="cuda"`` runs the k-NN on the GPU when one is available (the original used the
  device only for faiss); without CUDA it falls back to the CPU with a warning.
* Inputs are not copied to numpy; intermediates stay in their dtype (the original's
  scikit-learn accumulated float32 in float64; pdepth ranks float32 by float32 distances,
  within the tolerance of :func:`pdepth.reference.distance_tolerance`).
* Labels are any values the original accepts (scikit-learn classes: non-contiguous, negative or
  float ids): the shim maps the sorted union of the training and test label values to class
  ids ``0..C-1``, so a test label that no training point has is a class the k-NN simply never
  predicts (as in the original) rather than an error, and ties still go to the lowest label.
* Layer counts that differ between train and test intermediates raise ``ValueError``
  (the original's ``zip`` silently dropped the extra layers), as do ``test_intermediates``
  without ``test_labels`` (an ``assert`` in the original).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch

from ..depth import prediction_depth as _prediction_depth

__all__ = ["prediction_depth"]


def _resolve_device(device) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            "pdepth.compat.difficulty.prediction_depth: device='cuda' was requested but CUDA "
            "is not available; running on the CPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return device


def _layers(intermediates):
    """A stacked tensor / array ``[L, n, ...]`` is iterated over its first dimension, as the
    original does (so ``[L, n]`` is L layers of one feature each); other containers pass."""
    if isinstance(intermediates, (torch.Tensor, np.ndarray)):
        return list(intermediates)
    return intermediates


def _class_ids(train_labels: torch.Tensor, test_labels: torch.Tensor | None):
    """Maps the label values to class ids ``0..C-1`` over the sorted union of the training
    and test labels (scikit-learn compares values; a test-only label is a class too).
    Returns ``(train_ids, test_ids or None, C)``."""
    named = [("train_labels", train_labels), ("test_labels", test_labels)]
    vectors = []
    for name, t in named:
        if t is None:
            continue
        t = t.detach().cpu()
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.is_complex():
            raise ValueError(f"{name} must be real class labels, got dtype {t.dtype}")
        if t.dtype == torch.bool:
            t = t.long()
        if t.is_floating_point() and bool(t.isnan().any()):
            raise ValueError(f"{name} contains NaN")
        vectors.append(t)
    common = vectors[0].dtype
    for t in vectors[1:]:
        common = torch.promote_types(common, t.dtype)
    vectors = [t.to(common) for t in vectors]
    classes = torch.unique(torch.cat(vectors))  # sorted
    ids = [torch.searchsorted(classes, t) for t in vectors]
    return ids[0], (ids[1] if len(ids) > 1 else None), max(int(classes.numel()), 1)


# The positional parameters mirror nn_example_difficulty's signature (a drop-in).
def prediction_depth(
    train_intermediates: Iterable | dict,
    train_labels: torch.Tensor,
    test_intermediates: Iterable | dict | None = None,
    test_labels: torch.Tensor | None = None,
    k: int = 30,
    verbose: bool = False,
    return_matches: bool = False,
    use_faiss: bool = False,
    device: str | torch.device = "cuda",
    *,
    filter: str = "auto",
):
    """Prediction depth per example, as ``difficulty.metrics.prediction_depth``.

    Args:
        train_intermediates: list, ordered dict or generator of L activations ``(M, ...)``
            of the examples the k-NN classifiers are fitted on, input to output, or one
            stacked tensor ``[L, M, ...]`` (iterated over its first dimension, as the
            original does: ``[L, M]`` is L layers of one feature).
        train_labels: ``[M]`` labels for the k-NN (e.g. consensus labels): any values a
            scikit-learn classifier takes as classes (integers, not necessarily contiguous,
            or floats).
        test_intermediates: activations ``(N, ...)`` of the examples to score at the same L
            layers; None scores the training examples (each counted among its own
            neighbours, as scikit-learn's ``predict`` on fitted data does).
        test_labels: ``[N]`` labels to compare with; required with ``test_intermediates``,
            else ``train_labels``. They may hold labels that no training example has (a
            class absent from the training split): the k-NN never predicts those, so such an
            example's depth is L.
        k: neighbours per k-NN classifier.
        verbose: show a progress bar over layers.
        return_matches: also return the ``[L, N]`` matches.
        use_faiss: accepted and ignored (see the module docstring).
        device: where to run the k-NN; ``"cuda"`` falls back to the CPU with a warning when
            CUDA is unavailable.
        filter: the k-NN op's filter format (keyword only; :func:`pdepth.prediction_depth`):
            ``"auto"``, ``"fp32"``, ``"bf16"``, ``"bf16x3"`` or ``"tf32"``; speed only, the
            depths are the same. ``"tf32"`` needs the k-NN on CUDA (after the fallback).

    Returns:
        ``depth`` ``[N]`` int64 in ``0..L`` on ``train_labels``' device, or
        ``(depth, matches)`` with ``matches`` ``[L, N]`` of ``train_labels``' dtype (1 where
        the layer's k-NN prediction equals the label).
    """
    del use_faiss  # accepted for compatibility; the pdepth op replaces faiss
    if not isinstance(train_labels, torch.Tensor):
        train_labels = torch.as_tensor(train_labels)
    if test_intermediates is None:
        if test_labels is not None:
            raise ValueError(
                "test_labels was given without test_intermediates; pass both, or neither to "
                "score the training examples"
            )
        labels = train_labels
    else:
        if test_labels is None:
            raise ValueError("test_intermediates needs test_labels (the labels to compare with)")
        labels = test_labels if isinstance(test_labels, torch.Tensor) else torch.as_tensor(
            test_labels)
    train_ids, test_ids, num_classes = _class_ids(
        train_labels, None if test_intermediates is None else labels)
    result = _prediction_depth(
        _layers(train_intermediates),
        train_ids,
        None if test_intermediates is None else _layers(test_intermediates),
        reference="labels",
        query_labels=train_ids if test_ids is None else test_ids,
        num_classes=num_classes,
        k=k,
        self_match="include",
        device=_resolve_device(device),
        filter=filter,
        progress=verbose,
    )
    out_device = train_labels.device
    depth = result.depth.to(out_device)
    if not return_matches:
        return depth
    matches = (result.layer_pred == result.reference).to(dtype=train_labels.dtype,
                                                         device=out_device)
    return depth, matches
