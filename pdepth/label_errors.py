"""Per-example evidence that a given label is wrong, from a run's own outputs.

The rule (docs/design.md section 11). With y the given label, the held-out models (those that
did not train on the example) and the training-split models of a run:

* ``p_held`` -- the held-out models' mean softmax probability of y; ``c`` -- the class other
  than y that their mean softmax ranks first;
* ``early_share`` -- the share of y among the k-NN votes of the first
  ``ceil(early_fraction * L)`` probes of the held-out models;
* ``p_train`` -- the training-split models' mean softmax probability of y (did they fit it?);
* ``late`` -- the training-split models' mean prediction depth with y as the reference (the
  first probe from which every later probe votes y; L when even the last one does not), over
  L: a label reproduced only at the last probes, or never, had to be memorised against what
  the early layers say.

``label_error_score`` is the held-out evidence, the mean of ``1 - 2 p_held`` and
``1 - 2 early_share`` (in ``[-1, 1]``; higher = more likely wrong). An example is flagged
(``label_error``) when the held-out networks and the early probes agree on the other class c
(``prob_gap``, the held-out mean softmax of c minus that of y, and ``vote_gap``, the early
vote share of c minus that of y, are both positive) and either

* the score is at least ``threshold`` (default 0.9: ``p_held`` and ``early_share`` near 0),
  the rule for noise that scatters labels uniformly; or
* ``p_held`` is at most ``pair_factor`` (default 1.125) times ``pair_support``, the mean
  held-out probability of y over the examples *given* label c: the support that the networks
  give y on the examples of class c. This is the class-conditional rule, in the spirit of
  confident learning's per-class thresholds but per (given, suggested) pair, estimated from
  the run's own held-out outputs. Where a fixed share of class c is labelled y (asymmetric
  noise), the held-out networks learn part of that mapping, so a flipped example keeps a
  probability of y near the learned flip rate (not near 0) and the first rule misses it;
  ``pair_support`` measures that rate, since the class-c examples get the same probability
  of y. Without such a mapping ``pair_support`` is small (the networks' own confusion of c
  with y), so the second rule asks for little support, as the first does; a clean example of
  a confusable class keeps more support for y than the class-c examples give it, so it is
  not flagged. The price: under uniform noise it adds some flags of lower precision (on the
  runs behind the default, F1 0.855 -> 0.806 uniform, 0.344 -> 0.699 asymmetric).

``suggested_label`` is c where the held-out networks prefer it to y (``prob_gap > 0``),
else y.

The training split's signals (``p_train``, ``late``) are returned for inspection but left out
of the score: a network that memorises its training split fits a flipped label too
(``p_train`` near 1, hiding the flip), and a clean example of a confusable class is as late
to be reproduced as a flipped one (``late`` near 1 for both in short training). On the
4,000-example run behind the threshold, adding either lowered the F1 of the flags. Nothing is
recomputed: the inputs are the per-model arrays of ``per_model.npz``.
"""

from __future__ import annotations

import numpy as np

from .depth import depth_from_predictions
from .metrics import class_counts, early_probes

__all__ = ["LABEL_ERROR_PAIR_FACTOR", "LABEL_ERROR_THRESHOLD", "label_error_evidence"]

# Default flag threshold on label_error_score. Chosen on a 4,000-example Fashion-MNIST training
# subset (4 CNNs, 4 epochs, 20% label noise), for the score rule alone (before the class-
# conditional test below): 0.8 gave precision 0.73 / recall 0.90 there,
# 0.85 gave 0.81 / 0.89, 0.9 gave 0.90 / 0.86; a larger value trades recall for precision.
LABEL_ERROR_THRESHOLD = 0.9

# Default factor of the class-conditional rule: flag where p_held <= factor * pair_support.
# Fashion-MNIST, 4 CNNs, 3 epochs, 20% noise, uniform / asymmetric (F1 of the flags; cleanlab's
# in brackets). Pair A (3,000 examples, seeds 0-1): 0 (score rule only) 0.855 / 0.344, 0.875
# 0.846 / 0.693, 1.125 0.806 / 0.699 (cleanlab 0.743 / 0.598). 0.875, the best mean F1 on A,
# failed on pair B (2,000 examples, seeds 7-8: 0.805 / 0.371 against cleanlab 0.674 / 0.524),
# where weaker networks give flipped examples more of the given label; 1.125 (tied with 1.25
# for the largest smallest margin over cleanlab on A and B; 0.766 / 0.573 on B, the more
# precise of the two under uniform noise) is the default; confirmed on pair C
# (2,500 examples, seeds 11-12, not used in the choice): 0.807 / 0.613 (cleanlab 0.723 /
# 0.575; score rule alone 0.855 / 0.156). A smaller value
# trades recall under class-conditional noise for precision under uniform noise.
LABEL_ERROR_PAIR_FACTOR = 1.125


def label_error_evidence(probs: np.ndarray, in_train: np.ndarray, layer_pred: np.ndarray,
                         labels: np.ndarray, num_classes: int, *, early_fraction: float = 0.5,
                         threshold: float = LABEL_ERROR_THRESHOLD,
                         pair_factor: float = LABEL_ERROR_PAIR_FACTOR) -> dict[str, np.ndarray]:
    """Label-error score, flag and suggested label of every example (rule: module docstring).

    Args:
        probs: ``[R, n, C]`` float, each model's softmax output.
        in_train: ``[R, n]`` bool, example i was in model r's training split.
        layer_pred: ``[R, L, n]`` int, each probe's k-NN prediction (support: the model's
            training split with the given labels).
        labels: ``[n]`` int, the given labels.
        num_classes: C.
        early_fraction: the early probes are the first ``ceil(early_fraction * L)``.
        threshold: flag threshold on the score, in ``[-1, 1]``.
        pair_factor: the class-conditional rule flags where ``p_held <= pair_factor *
            pair_support`` (0 turns it off).

    Returns:
        ``label_error_score [n]`` float64 (NaN without a held-out model),
        ``label_error [n]`` bool, ``suggested_label [n]`` int64, and the signals behind them
        (``[n]`` float64): ``p_held``, ``early_share``, ``p_train``, ``late`` (in ``[0, 1]``;
        0.5, no evidence either way, without a training-split model) and ``prob_gap``,
        ``vote_gap`` (in ``[-1, 1]``), ``pair_support`` (in ``[0, 1]``; 0 where no example
        with a held-out model is given label c).
    """
    probs = np.asarray(probs, np.float64)
    in_train = np.asarray(in_train, bool)
    layer_pred = np.asarray(layer_pred)
    y = np.asarray(labels, np.int64)
    r_models, n = in_train.shape
    if probs.shape != (r_models, n, num_classes) or layer_pred.shape[::2] != (r_models, n):
        raise ValueError(f"label_error_evidence(): probs {probs.shape}, in_train "
                         f"{in_train.shape} and layer_pred {layer_pred.shape} do not describe "
                         f"the same {r_models} models, {n} examples and {num_classes} classes")
    rows = np.arange(n)
    held = ~in_train
    n_held = held.sum(0)
    p = np.where(held[..., None], probs, 0.0).sum(0) / np.maximum(n_held, 1)[:, None]
    masked = p.copy()
    masked[rows, y] = -np.inf
    other = masked.argmax(1)
    prob_gap = p[rows, other] - p[rows, y]

    n_early = early_probes(layer_pred.shape[1], early_fraction)
    early = layer_pred[:, :n_early, :].reshape(-1, n)  # [R * n_early, n]
    counts = class_counts(early, np.repeat(held, n_early, axis=0), num_classes)
    total = np.maximum(counts.sum(1), 1)
    vote_gap = (counts[rows, other] - counts[rows, y]) / total

    early_share = counts[rows, y] / total
    n_train = in_train.sum(0)
    p_train = np.where(n_train > 0, np.where(in_train[..., None], probs, 0.0).sum(0)[rows, y]
                       / np.maximum(n_train, 1), 0.5)
    late = _late_memorisation(layer_pred, in_train, y)
    p_held = p[rows, y]
    score = ((1 - 2 * p_held) + (1 - 2 * early_share)) / 2.0
    score = np.where(n_held > 0, score, np.nan)
    support = _pair_support(p, y, n_held > 0, num_classes)[other, y]
    conditional = p_held <= pair_factor * support
    flag = (n_held > 0) & (prob_gap > 0) & (vote_gap > 0) & ((score >= threshold) | conditional)
    suggested = np.where((n_held > 0) & (prob_gap > 0), other, y)
    return {"label_error_score": score, "label_error": flag, "suggested_label": suggested,
            "p_held": p_held, "early_share": early_share, "p_train": p_train, "late": late,
            "prob_gap": prob_gap, "vote_gap": vote_gap, "pair_support": support}


def _pair_support(p: np.ndarray, y: np.ndarray, has_held: np.ndarray,
                  num_classes: int) -> np.ndarray:
    """``[C, C]`` float64: row c is the mean of the held-out mean softmax ``p [n, C]`` over the
    examples given label c that have a held-out model (zeros where there is none)."""
    keep = has_held
    sums = np.zeros((num_classes, num_classes))
    np.add.at(sums, y[keep], p[keep])
    count = np.bincount(y[keep], minlength=num_classes)
    return sums / np.maximum(count, 1)[:, None]


def _late_memorisation(layer_pred: np.ndarray, in_train: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[n]`` in ``[0, 1]``: mean over the training-split models of the depth with the given
    label as reference, over L (0.5, no evidence either way, without such a model)."""
    num_layers = layer_pred.shape[1]
    depth = np.stack([depth_from_predictions(lp, y) for lp in layer_pred]).astype(np.float64)
    count = in_train.sum(0)
    total = np.where(in_train, depth, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1) / num_layers, 0.5)
