"""Per-example metrics over an ensemble of models trained on random halves of a dataset.

Inputs are per-model arrays over the n examples of the dataset (R models, L probes, C
classes, E epochs):

* ``depth [R, n]`` -- prediction depth of example i under model r (-1: not scored),
* ``in_train [R, n]`` -- example i was in model r's training split (else held out),
* ``probs [R, n, C]`` -- model r's softmax output for example i (final model, eval mode),
* ``layer_pred [R, L, n]`` -- the k-NN prediction of each probe,
* ``epoch_pred [R, E+1, n]`` -- the network's prediction after each epoch (row 0: at
  initialisation),
* ``labels [n]`` -- the given labels.

:func:`summarize` turns them into one row per example (see its docstring for the columns);
:func:`vote_shares` splits one model's per-probe k-NN vote counts three ways (label, network's
prediction, other class) and :func:`convergence_epoch` reads the per-epoch probe accuracy
curves (docs/design.md section 11).
Ensemble aggregation (counting predictions, means, entropies) is plain numpy; the k-NN itself
is never recomputed here.
"""

from __future__ import annotations

import math

import numpy as np

from .depth import aggregate, depth_from_predictions

__all__ = [
    "CONVERGED",
    "VOTE_SHARES",
    "class_counts",
    "convergence_epoch",
    "early_probes",
    "iteration_learned",
    "json_floats",
    "layer_accuracy",
    "mean_or_none",
    "summarize",
    "vote_shares",
]

VOTE_SHARES = ("label", "prediction", "other")  # the last axis of vote_shares()
CONVERGED = 0.95  # a probe has converged once it has made this share of its accuracy gain


def iteration_learned(epoch_pred: np.ndarray) -> np.ndarray:
    """``[E+1, n] -> [n]``: the first epoch e (0 = initialisation) after which the prediction
    equals the final prediction at every later epoch -- the depth rule applied along
    training time with the final prediction as reference. A model without a training
    history (``[0, n]``: a checkpoint, never trained here) gives NaN: it has no such epoch."""
    epoch_pred = np.asarray(epoch_pred)
    if epoch_pred.shape[0] == 0:
        return np.full(epoch_pred.shape[1], np.nan)
    return depth_from_predictions(epoch_pred, epoch_pred[-1])


def mean_or_none(values) -> float | None:
    """The mean of the values that are not NaN; None when there are none (e.g. the held-out
    columns of a ``--checkpoint`` run, which holds nothing out)."""
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if (~np.isnan(values)).any() else None


def json_floats(values) -> list[float | None]:
    """A float array as a JSON-ready list, NaN (nothing to average, e.g. no held-out example)
    as None (null)."""
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, np.float64)]


def convergence_epoch(curves: np.ndarray, share: float = CONVERGED) -> np.ndarray:
    """``curves [E+1, L]`` (row 0: initialisation) -> ``[L]`` float64: the first epoch at
    which each probe's accuracy has made ``share`` of its gain from initialisation to the
    end, ``acc[e] - acc[0] >= share (acc[E] - acc[0])``. A probe that gains nothing (the
    input probe, which training cannot change) has converged at epoch 0."""
    curves = np.asarray(curves, np.float64)
    gain = curves - curves[:1]
    reached = gain >= share * gain[-1:] - 1e-12
    return reached.argmax(0).astype(np.float64)


def class_counts(values: np.ndarray, mask: np.ndarray | None, num_classes: int) -> np.ndarray:
    """``values [R, n]`` integer classes, ``mask [R, n]`` which entries count -> ``[n, C]``
    counts."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[None]
    mask = np.ones(values.shape, bool) if mask is None else np.asarray(mask, bool)
    n = values.shape[1]
    counts = np.zeros((n, num_classes), np.int64)
    rows = np.broadcast_to(np.arange(n), values.shape)
    np.add.at(counts, (rows[mask], values[mask]), 1)
    return counts


def _mode(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most frequent class (ties: lowest id) and its share; share NaN where nothing counted."""
    total = counts.sum(1)
    mode = counts.argmax(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, counts.max(1) / np.maximum(total, 1), np.nan)
    return mode, share


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of ``values [R, n]`` where ``mask``; NaN where no entry counts."""
    mask = np.asarray(mask, bool)
    count = mask.sum(0)
    total = np.where(mask, values, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def early_probes(num_layers: int, early_fraction: float) -> int:
    """Number of early probes: ``ceil(early_fraction * L)``, at least 1."""
    return max(1, min(num_layers, math.ceil(early_fraction * num_layers)))


def layer_accuracy(layer_pred: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[L]`` k-NN accuracy of each probe over the (model, example) pairs in ``mask [R, n]``
    (``layer_pred [R, L, n]``)."""
    correct = np.asarray(layer_pred) == np.asarray(labels)[None, None, :]
    mask = np.asarray(mask, bool)[:, None, :]
    count = mask.sum((0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (correct & mask).sum((0, 2)) / np.maximum(count, 1), np.nan)


def vote_shares(counts: np.ndarray, labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """One model's k-NN votes at every probe, split three ways: ``[L, n, 3]`` float32, the
    share of the k neighbours voting (0) the given label ``labels [n]``, (1) the network's
    final prediction ``pred [n]`` (equal to (0) where the network is right) and (2) the most
    frequent other class (neither of the two; ties: lowest id; 0 where none is left).

    ``counts [L, n, C]``: the per-probe vote counts of the model
    (:attr:`pdepth.DepthResult.vote_counts`). "How the groups are processed differently"
    (docs/design.md section 11) compares these shares between the difficulty categories."""
    counts = np.asarray(counts, np.float32)
    labels, pred = np.asarray(labels, np.int64), np.asarray(pred, np.int64)
    rows = np.arange(labels.shape[0])
    total = np.maximum(counts.sum(-1), 1)
    other = counts.copy()
    other[:, rows, labels] = -1
    other[:, rows, pred] = -1
    shares = np.stack([counts[:, rows, labels], counts[:, rows, pred],
                       np.maximum(other.max(-1), 0)], -1)
    return shares / total[..., None]


def summarize(
    depth: np.ndarray,
    in_train: np.ndarray,
    probs: np.ndarray,
    layer_pred: np.ndarray,
    epoch_pred: np.ndarray,
    labels: np.ndarray,
    *,
    early_fraction: float = 0.5,
    original_labels: np.ndarray | None = None,
):
    """One row per example (a pandas DataFrame, index = position in the dataset subset).

    ``labels [n]`` are the *given* labels: those the models trained on and the k-NN support
    sets carry. ``original_labels [n]`` (default: ``labels``) are the dataset's labels where
    the given ones carry label noise (``pdepth run --label-noise``). Each column says which it
    uses: the given label where the question is "does the network / the probe reproduce the
    training label", the original label where it is "is the network right".

    Columns (``held-out`` means over the models that did not train on the example; ``train``
    over those that did):

    * ``label`` (given), ``original_label``, ``label_flipped`` (they differ);
    * ``train_depth`` / ``held_out_depth`` -- mean prediction depth per split, with
      ``*_depth_std`` and ``train_count`` / ``held_out_count`` (number of models), and the
      per-model depths ``depth_m<r>`` with ``in_train_m<r>``; depth needs no label (its
      reference is the network's own prediction);
    * ``held_out_accuracy`` -- fraction of held-out models predicting the *given* label (the
      C-score estimate, Jiang et al.'s consistency score); ``train_accuracy`` likewise over
      the training-split models (how well they fit the label they trained on);
    * ``held_out_accuracy_original`` -- fraction of held-out models predicting the *original*
      label ("is the network right"; equals ``held_out_accuracy`` without label noise);
    * ``held_out_mode`` -- the held-out models' most frequent prediction (ties: lowest class)
      and ``held_out_agreement`` -- the fraction of held-out models predicting it (label-free;
      not Jiang et al.'s consistency score, the C-score, which is ``held_out_accuracy``);
    * ``confidence`` -- mean held-out softmax probability of the predicted class (label-free);
      ``margin`` -- mean held-out probability of the *given* label minus the largest other;
      ``train_confidence`` / ``train_margin`` likewise for the training split;
    * ``ensemble_pred`` / ``ensemble_entropy`` -- argmax and entropy (nats) of the mean
      held-out softmax (ensemble uncertainty; label-free);
    * ``iteration_learned`` -- mean over the training-split models of the first epoch after
      which the prediction equals the final one at every later epoch (0 = initialisation;
      label-free); ``held_out_iteration_learned`` likewise over the held-out models;
    * ``early_mode`` / ``early_mode_share`` / ``early_label_share`` -- over the first
      ``ceil(early_fraction * L)`` probes of every model: the most frequent k-NN vote, its
      share, and the share of votes for the *given* label;
    * ``knn_train_<l>`` / ``knn_held_out_<l>`` -- fraction of models whose probe l k-NN
      prediction equals the *given* label, per split ("does the probe reproduce the training
      label").
    """
    import pandas as pd

    depth = np.asarray(depth)
    in_train = np.asarray(in_train, bool)
    probs = np.asarray(probs, np.float64)
    layer_pred = np.asarray(layer_pred)
    labels = np.asarray(labels).astype(np.int64)
    original = labels if original_labels is None else np.asarray(original_labels, np.int64)
    if original.shape != labels.shape:
        raise ValueError(f"summarize(): original_labels has shape {original.shape}, labels "
                         f"{labels.shape}")
    scored = depth >= 0
    held_out, train = ~in_train & scored, in_train & scored
    cols: dict[str, np.ndarray] = {"label": labels, "original_label": original,
                                   "label_flipped": labels != original}
    cols.update(_depth_columns(depth, in_train, held_out))
    cols.update(_prediction_columns(probs, labels, train, held_out))
    right = (probs.argmax(2) == original[None]).astype(np.float64)
    cols["held_out_accuracy_original"] = _masked_mean(right, held_out)
    learned = np.stack([iteration_learned(e) for e in np.asarray(epoch_pred)]).astype(np.float64)
    cols["iteration_learned"] = _masked_mean(learned, train)
    cols["held_out_iteration_learned"] = _masked_mean(learned, held_out)
    cols.update(_early_columns(layer_pred, labels, scored, probs.shape[2], early_fraction))
    for r in range(depth.shape[0]):
        cols[f"depth_m{r}"] = np.where(scored[r], depth[r], -1).astype(np.int64)
        cols[f"in_train_m{r}"] = in_train[r]
    knn_correct = (layer_pred == labels[None, None, :]).astype(np.float64)  # [R, L, n]
    for name, mask in (("train", train), ("held_out", held_out)):
        for layer in range(layer_pred.shape[1]):
            cols[f"knn_{name}_{layer}"] = _masked_mean(knn_correct[:, layer], mask)
    df = pd.DataFrame(cols)
    df.index.name = "example"
    return df


def _depth_columns(depth, in_train, held_out) -> dict:
    """Mean, std and count of the depth per split (:func:`pdepth.aggregate`)."""
    scored = depth >= 0
    ens = aggregate([d.astype(np.float64) for d in np.where(scored, depth, -1)],
                    [{"train": t, "held_out": h} for t, h in zip(in_train, held_out, strict=True)],
                    num_examples=depth.shape[1])
    return {"train_depth": ens.train_mean.numpy(), "held_out_depth": ens.held_out_mean.numpy(),
            "train_depth_std": ens.train_std.numpy(),
            "held_out_depth_std": ens.held_out_std.numpy(),
            "train_count": ens.train_count.numpy(), "held_out_count": ens.held_out_count.numpy()}


def _prediction_columns(probs, labels, train, held_out) -> dict:
    """Accuracy, mode and agreement, confidence and margin, and the held-out ensemble's
    prediction and entropy, from the models' softmax outputs ``probs [R, n, C]``."""
    r_models, _, num_classes = probs.shape
    cols = {}
    pred = probs.argmax(2)  # [R, n]
    correct = (pred == labels[None]).astype(np.float64)
    cols["held_out_accuracy"] = _masked_mean(correct, held_out)
    cols["train_accuracy"] = _masked_mean(correct, train)
    cols["held_out_mode"], cols["held_out_agreement"] = _mode(
        class_counts(pred, held_out, num_classes))

    conf = probs.max(2)
    true_p = np.take_along_axis(probs, labels[None, :, None].repeat(r_models, 0), 2)[..., 0]
    other = probs.copy()
    np.put_along_axis(other, labels[None, :, None].repeat(r_models, 0), -np.inf, 2)
    margin = true_p - other.max(2)
    cols["confidence"] = _masked_mean(conf, held_out)
    cols["margin"] = _masked_mean(margin, held_out)
    cols["train_confidence"] = _masked_mean(conf, train)
    cols["train_margin"] = _masked_mean(margin, train)

    cnt = held_out.sum(0)
    mean_p = np.where(held_out[..., None], probs, 0.0).sum(0) / np.maximum(cnt, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(mean_p > 0, mean_p * np.log(mean_p), 0.0)).sum(1)
    cols["ensemble_pred"] = mean_p.argmax(1)
    cols["ensemble_entropy"] = np.where(cnt > 0, ent, np.nan)
    return cols


def _early_columns(layer_pred, labels, scored, num_classes, early_fraction) -> dict:
    """The k-NN votes of the first ``ceil(early_fraction * L)`` probes of every model."""
    n = labels.shape[0]
    n_early = early_probes(layer_pred.shape[1], early_fraction)
    early = layer_pred[:, :n_early, :].reshape(-1, n)  # [R * n_early, n]
    early_mask = np.repeat(scored, n_early, axis=0)
    counts = class_counts(early, early_mask, num_classes)
    cols = {}
    cols["early_mode"], cols["early_mode_share"] = _mode(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["early_label_share"] = counts[np.arange(n), labels] / np.maximum(counts.sum(1), 1)
    return cols
