"""The field's standard per-example difficulty scores, next to prediction depth
(docs/scores.md): EL2N (Paul et al. 2021), forgetting events (Toneva et al. 2019), the area
under the margin (Pleiss et al. 2020) and the data map's confidence and variability
(Swayamdipta et al. 2020), and the final loss.

They are read from what training records per epoch for every example of both halves
(:func:`pdepth.protocol.train.train_model` with ``scores=True``; the arrays
``epoch_label_prob``, ``epoch_margin``, ``epoch_el2n`` of ``per_model.npz``). Each score is a
small pure function of one model's arrays; :func:`score_columns` averages them over the
models that train on the example (the training split), as the papers score the examples a
network trains on. Shapes: R models, E epochs (E + 1 recorded rows, row 0 at
initialisation), n examples, C classes.

The epoch-wise scores (forgetting events, first learned, AUM, data map) read the epochs
``1..E`` -- after each training epoch -- and not row 0: the untrained network's right guess is
no learning event.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SCORES", "aum", "cross_entropy", "data_map", "default_el2n_epoch", "el2n",
           "first_learned", "forgetting_events", "logit_margin", "score_columns"]

# Every score column of results.parquet that this module adds: its meaning, the models it
# uses and its orientation (the reports and docs/scores.md say the same).
SCORES = {
    "el2n": "L2 norm of softmax - onehot(given label) at epoch --el2n-epoch, mean over the "
            "models that train on the example (Paul et al. 2021); higher = harder",
    "forgetting_events": "learned -> forgotten transitions (right, then wrong on the given "
                         "label) over epochs 1..E, mean over the models that train on the "
                         "example; never learned counts as the most possible, E // 2 "
                         "(Toneva et al. 2019); higher = harder",
    "first_learned": "first epoch (1..E) at which the prediction is the given label, E + 1 "
                     "if never; mean over the models that train on the example; higher = "
                     "harder (unlike iteration_learned it asks for the label, and the "
                     "prediction may change later)",
    "aum": "area under the margin: mean over epochs 1..E of the given label's logit minus "
           "the largest other logit, mean over the models that train on the example "
           "(Pleiss et al. 2020); higher = easier",
    "data_map_confidence": "mean over epochs 1..E of the softmax probability of the given "
                           "label, mean over the models that train on the example "
                           "(Swayamdipta et al. 2020); higher = easier",
    "data_map_variability": "standard deviation (ddof 0) over epochs 1..E of the softmax "
                            "probability of the given label, mean over the models that train "
                            "on the example (Swayamdipta et al. 2020); higher = more "
                            "ambiguous (harder)",
    "train_loss": "final cross-entropy on the given label, mean over the models that train "
                  "on the example; higher = harder",
    "held_out_loss": "final cross-entropy on the given label, mean over the models that "
                     "hold the example out; higher = harder",
}
# the smallest probability a loss reads: a float32 softmax may round p(y) to 0
_TINY = float(np.finfo(np.float32).tiny)


def default_el2n_epoch(epochs: int) -> int | None:
    """The default ``--el2n-epoch``: a fifth of training, rounded half up, at least 1
    (``max(1, floor(epochs / 5 + 0.5))``: 6 epochs -> 1, 8 -> 2, 20 -> 4); None without
    training epochs (a checkpoint)."""
    return None if epochs < 1 else max(1, math.floor(epochs / 5 + 0.5))


def el2n(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``probs [..., n, C]``, ``labels [n]`` -> ``[..., n]`` float64: ``|p - onehot(y)|_2``."""
    p = np.asarray(probs, np.float64)
    onehot = np.eye(p.shape[-1])[np.asarray(labels, np.int64)]
    return np.sqrt(((p - onehot) ** 2).sum(-1))


def logit_margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logits [..., n, C]``, ``labels [n]`` -> ``[..., n]`` float64: the given label's logit
    minus the largest other logit (negative where another class wins)."""
    z = np.asarray(logits, np.float64)
    y = np.broadcast_to(np.asarray(labels, np.int64)[..., None], z.shape[:-1] + (1,))
    given = np.take_along_axis(z, y, -1)[..., 0]
    other = z.copy()
    np.put_along_axis(other, y, -np.inf, -1)
    return given - other.max(-1)


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``probs [..., n, C]``, ``labels [n]`` -> ``[..., n]`` float64: ``-log p(y)``, ``p(y)``
    clipped below at the smallest normal float32 (a loss of at most 87.3)."""
    p = np.asarray(probs, np.float64)
    y = np.broadcast_to(np.asarray(labels, np.int64)[..., None], p.shape[:-1] + (1,))
    return -np.log(np.maximum(np.take_along_axis(p, y, -1)[..., 0], _TINY))


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """``correct [E, n]`` bool (the prediction is the given label after epoch 1..E) -> ``[n]``
    float64: the number of epochs e with ``correct[e - 1] and not correct[e]``. An example
    never right counts ``E // 2``, the most any example can have (right, wrong, right, ...),
    as Toneva et al. rank never-learned examples as the most forgotten. NaN where ``E == 0``."""
    correct = np.asarray(correct, bool)
    if correct.shape[0] == 0:
        return np.full(correct.shape[1], np.nan)
    events = (correct[:-1] & ~correct[1:]).sum(0)
    return np.where(correct.any(0), events, correct.shape[0] // 2).astype(np.float64)


def first_learned(correct: np.ndarray) -> np.ndarray:
    """``correct [E, n]`` bool (after epoch 1..E) -> ``[n]`` float64: the first epoch (1-based)
    at which the prediction is the given label; ``E + 1`` where never. NaN where ``E == 0``."""
    correct = np.asarray(correct, bool)
    if correct.shape[0] == 0:
        return np.full(correct.shape[1], np.nan)
    return np.where(correct.any(0), correct.argmax(0) + 1,
                    correct.shape[0] + 1).astype(np.float64)


def aum(margins: np.ndarray) -> np.ndarray:
    """``margins [E, n]`` (logit margins after epoch 1..E) -> ``[n]`` float64: their mean
    (NaN where ``E == 0``)."""
    m = np.asarray(margins, np.float64)
    return m.mean(0) if m.shape[0] else np.full(m.shape[1], np.nan)


def data_map(label_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``label_prob [E, n]`` (p(given label) after epoch 1..E) -> ``(confidence [n],
    variability [n])`` float64: the mean and the standard deviation (ddof 0, as Swayamdipta
    et al.) over the epochs; NaN where ``E == 0``."""
    p = np.asarray(label_prob, np.float64)
    if p.shape[0] == 0:
        nan = np.full(p.shape[1], np.nan)
        return nan, nan.copy()
    return p.mean(0), p.std(0)


def _mean_over(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values [R, n]`` averaged over the models where ``mask [R, n]``; NaN where none (or
    where a counted model's value is NaN: a model file of an older version)."""
    mask = np.asarray(mask, bool)
    count = mask.sum(0)
    total = np.where(mask, values, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def score_columns(arrays: dict, el2n_epoch: int | None) -> dict[str, np.ndarray]:
    """The columns of :data:`SCORES`, ``[n]`` float64 each, from the stacked per-model arrays
    (those of ``per_model.npz``): ``epoch_pred``, ``epoch_label_prob``, ``epoch_margin``,
    ``epoch_el2n`` ``[R, E+1, n]``, ``probs [R, n, C]``, ``in_train`` and ``depth [R, n]``
    (a model counts for an example where ``depth >= 0``, as in :func:`pdepth.metrics.summarize`)
    and ``labels [n]`` (given). ``el2n_epoch``: the row of ``epoch_el2n`` read (None: no
    training epoch, the column is NaN)."""
    labels = np.asarray(arrays["labels"], np.int64)
    scored = np.asarray(arrays["depth"]) >= 0
    train = np.asarray(arrays["in_train"], bool) & scored
    held = ~np.asarray(arrays["in_train"], bool) & scored
    epoch_pred = np.asarray(arrays["epoch_pred"])[:, 1:]  # epochs 1..E
    prob = np.asarray(arrays["epoch_label_prob"], np.float64)[:, 1:]
    margin = np.asarray(arrays["epoch_margin"], np.float64)[:, 1:]
    per_model = {"forgetting_events": [], "first_learned": [], "aum": [],
                 "data_map_confidence": [], "data_map_variability": []}
    for r in range(train.shape[0]):
        correct = epoch_pred[r] == labels[None]
        per_model["forgetting_events"].append(forgetting_events(correct))
        per_model["first_learned"].append(first_learned(correct))
        per_model["aum"].append(aum(margin[r]))
        conf, var = data_map(prob[r])
        per_model["data_map_confidence"].append(conf)
        per_model["data_map_variability"].append(var)
    cols = {}
    if el2n_epoch is None or np.asarray(arrays["epoch_el2n"]).shape[1] <= el2n_epoch:
        cols["el2n"] = np.full(labels.shape[0], np.nan)
    else:
        cols["el2n"] = _mean_over(np.asarray(arrays["epoch_el2n"], np.float64)[:, el2n_epoch],
                                  train)
    cols.update({name: _mean_over(np.stack(v), train) for name, v in per_model.items()})
    loss = cross_entropy(arrays["probs"], labels)
    cols["train_loss"], cols["held_out_loss"] = _mean_over(loss, train), _mean_over(loss, held)
    return cols
