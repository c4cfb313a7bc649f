"""One validation path for both prediction-depth drivers (:func:`pdepth.prediction_depth`
on embeddings, :func:`pdepth.stream_prediction_depth` on a model): the depth arguments are
checked, the query-side defaults filled in and the reference resolved here, once.

The k-NN op's own rules (k against the usable support, the self-match policies, the support
labels' range inside the op) are checked by the op and, for a sharded support set, by
:mod:`pdepth.distributed`; nothing here repeats them. The ``filter=`` name is checked here,
before any layer is read or any model runs, with the op's own rule
(:func:`pdepth.ops.check_filter`); what depends on the embeddings' dtype and device is left to
the op (or checked by the driver once it knows them). ``metric=`` is checked here too
(:func:`pdepth.ops.check_metric`); the drivers normalise the rows with the op's own
:func:`pdepth.ops.metric_rows`, the one normalisation path of every entry point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ops import MAX_CLASSES, check_filter, check_metric
from .rule import REFERENCE_MODES
from .support import Support

__all__ = ["DepthArgs", "check_filter_arg", "depth_args"]


@dataclass(eq=False)
class DepthArgs:
    """The checked arguments of one prediction-depth call.

    ``reference`` is the given ``[M]`` reference (mode ``"tensor"``), the network's
    prediction (mode ``"network"``, when the caller gave it) or the query labels (mode
    ``"labels"``, when known); None where the driver produces it (``"last_probe"``, or a
    model's prediction / a loader's labels). ``num_classes`` counts every class id seen so
    far (the given value when there is one). ``filter`` is the k-NN op's filter format
    (:data:`pdepth.FILTERS`), passed to every k-NN call of the driver; it never changes
    a result. ``metric`` is ``"euclidean"`` or ``"cosine"`` (:data:`pdepth.METRICS`): the
    rows the driver hands to the op are normalised for ``"cosine"``."""

    k: int
    labels: torch.Tensor
    support: Support
    mode: str
    reference: torch.Tensor | None
    reference_name: str
    query_labels: torch.Tensor | None
    query_labels_arg: str
    self_index: torch.Tensor | None
    example_index: torch.Tensor | None
    num_classes_given: int | None
    num_classes: int
    scoring_support: bool
    filter: str = "auto"
    metric: str = "euclidean"

    def check_lengths(self, m: int, where: str = "", *, reference=None, reference_name=None,
                      query_labels=None) -> None:
        """Every query-side vector has ``m`` entries (``where`` says where m comes from)."""
        ref = self.reference if reference is None else reference
        q = self.query_labels if query_labels is None else query_labels
        for name, t in ((self.query_labels_arg, q), ("self_index", self.self_index),
                        ("example_index", self.example_index),
                        (reference_name or self.reference_name, ref)):
            if t is not None and t.shape[0] != m:
                raise ValueError(f"{name} has {t.shape[0]} entries but there are {m} "
                                 f"queries{where}")

    def resolve_reference(self, layer_pred: torch.Tensor, *, network=None,
                          query_labels=None) -> tuple[torch.Tensor, str]:
        """``(reference [M], its name in messages)`` once the probes' predictions
        ``layer_pred`` (and, for a model, its prediction ``network`` and the labels its
        query loader yielded) are known."""
        if self.mode == "last_probe":
            return layer_pred[-1].clone(), "reference"
        if self.reference is not None:
            return self.reference, self.reference_name
        if self.mode == "network":
            return network, "the model's prediction (reference='network')"
        if query_labels is None:  # mode "labels"
            raise ValueError('reference="labels" needs query_labels= (or a query loader that '
                             "yields labels)")
        return query_labels, self.query_labels_arg


def depth_args(support_labels, *, support: Support, scoring_support: bool, queries_arg: str,
               reference, query_labels, self_index, example_index, k, num_classes,
               network_pred=None, from_model: bool = False, filter: str = "auto",
               op: str = "prediction_depth", device=None,
               metric: str = "euclidean") -> DepthArgs:
    """Checks the arguments both drivers share and fills in the defaults of scoring the
    support set itself (``self_index``, ``example_index`` ``arange(N)``, the query labels the
    support labels).

    ``from_model``: the driver runs the model (:func:`pdepth.stream_prediction_depth`), so
    the network's prediction and possibly the query labels come later; otherwise
    ``reference="network"`` needs ``network_pred`` and ``reference="labels"`` query labels
    now. Class ids are counted over every vector known here; a sharded support set's labels
    are left to the collective (:meth:`Support.count_classes`), so that every rank raises
    alike.

    ``filter`` is checked first (:func:`check_filter_arg`, ``op`` names the driver in the
    message; ``device``, when the caller already knows it, also rules out ``"tf32"`` off
    CUDA), then ``metric``.
    """
    filter = check_filter_arg(op, filter, device=device)
    metric = check_metric(metric, op)
    k = _check_k(k)
    support.check_call(scoring_support=scoring_support, num_classes=num_classes,
                       queries_arg=queries_arg)
    labels = _int_vector(support_labels, "support_labels")
    n = labels.shape[0]
    num_classes = _check_num_classes(num_classes)
    mode, ref = _reference_mode(reference)
    ref_name = "reference"
    q_arg = "query_labels"
    if query_labels is not None:
        q_labels = _int_vector(query_labels, "query_labels")
    elif scoring_support:
        q_labels, q_arg = labels, "support_labels"
    else:
        q_labels = None
    if mode == "network" and not from_model:
        ref, ref_name = _network_pred(network_pred), "network_pred"
    elif mode == "labels" and q_labels is None and not from_model:
        raise ValueError('reference="labels" needs query_labels= when query_layers is given')
    elif mode == "labels":
        ref, ref_name = q_labels, q_arg
    named = []
    if q_labels is not labels:
        named.append((q_arg, q_labels))
    if ref is not labels and ref is not q_labels:
        named.append(("network_pred (reference='network')" if mode == "network"
                      else "reference", ref))
    classes = support.count_classes(num_classes, labels, named)
    if self_index is None and scoring_support:
        self_index = torch.arange(n)
    elif self_index is not None:
        self_index = _int_vector(self_index, "self_index")
        _check_self_index(self_index, support.size(n))
    if example_index is None and scoring_support:
        example_index = torch.arange(n)
    elif example_index is not None:
        example_index = _int_vector(example_index, "example_index")
    return DepthArgs(k=k, labels=labels, support=support, mode=mode, reference=ref,
                     reference_name=ref_name, query_labels=q_labels, query_labels_arg=q_arg,
                     self_index=self_index, example_index=example_index,
                     num_classes_given=num_classes, num_classes=classes,
                     scoring_support=scoring_support, filter=filter, metric=metric)


def check_filter_arg(op: str, filter, *, dtype: torch.dtype | None = None,
                     device=None) -> str:
    """``filter`` when the k-NN op would accept it, else the op's ``ValueError`` naming the
    valid values (:func:`pdepth.ops.check_filter`). What is not known yet is not held against
    it: ``dtype`` None stands for float32 inputs (every format is valid), ``device`` None for
    a CUDA device (``"tf32"`` is valid); the op checks those itself when it runs."""
    check_filter(op, filter, torch.float32 if dtype is None else dtype, torch.device("cuda"))
    if device is not None and filter == "tf32":  # the one device-dependent rule
        check_filter(op, filter, torch.float32, torch.device(device))
    return filter


def _reference_mode(reference) -> tuple[str, torch.Tensor | None]:
    if isinstance(reference, str):
        if reference not in REFERENCE_MODES:
            raise ValueError(
                f"reference must be one of {REFERENCE_MODES} or an [M] integer tensor, got "
                f"{reference!r}"
            )
        return reference, None
    return "tensor", _int_vector(reference, "reference")


def _network_pred(network_pred) -> torch.Tensor:
    if network_pred is None:
        raise ValueError(
            'reference="network" needs network_pred=, the network\'s argmax prediction '
            "per query ([M] integers, or [M, C] logits). Pass reference=\"labels\" to "
            'measure depth against the labels, or reference="last_probe".'
        )
    net = torch.as_tensor(network_pred)
    if net.dim() == 2 and (net.is_floating_point() or net.shape[1] > 1):
        net = net.argmax(1)
    return _int_vector(net, "network_pred")


def _int_vector(x, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_num_classes(num_classes) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if num_classes > MAX_CLASSES:
        raise ValueError(f"num_classes={num_classes} exceeds the limit of MAX_CLASSES="
                         f"{MAX_CLASSES} classes (a vote keeps one count per class)")
    return int(num_classes)


def _check_self_index(self_index: torch.Tensor | None, n: int | None) -> None:
    """``self_index`` holds -1 or a support index in ``[0, n)`` (``n`` None: unknown here,
    e.g. a sharded support set whose global size the ranks agree on later)."""
    if self_index is None or not self_index.numel():
        return
    lo, hi = int(self_index.min()), int(self_index.max())
    if lo < -1 or (n is not None and hi >= n):
        valid = "-1 (no self match) or a support index" + ("" if n is None else f" in [0, N={n})")
        raise ValueError(f"self_index must hold {valid}, got values in [{lo}, {hi}]")
