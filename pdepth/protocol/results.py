"""Aggregating the per-model results of a run into ``results.parquet`` (one row per example,
with the label-error evidence of :mod:`pdepth.label_errors`), ``per_model.npz`` (every model's
arrays, stacked), ``summary.json`` (the paper's claims, :mod:`pdepth.summary`) and the summary
in ``config.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import _atomic
from ..categories import CATEGORIES, categorize
from ..label_errors import label_error_evidence
from ..metrics import json_floats, layer_accuracy, mean_or_none, summarize
from ..scores import SCORES, default_el2n_epoch, score_columns
from ..summary import claims_summary
from .model_run import RunData

__all__ = ["write_results"]

# per model, [E+1, n] float16: p(given label), logit margin and EL2N after each epoch
_EPOCH_ARRAYS = ("epoch_label_prob", "epoch_margin", "epoch_el2n")


def write_results(out: Path, per_model: list[dict], data: RunData) -> dict:
    """Writes ``results.parquet``, ``per_model.npz`` and ``summary.json`` from the models'
    arrays (in seed, half order) and returns the run's summary for ``config.json``."""
    stacked = {name: np.stack([m[name] for m in per_model])
               for name in ("depth", "in_train", "probs", "layer_pred", "epoch_pred", "loss",
                            "train_accuracy", "held_out_accuracy", "knn_vote_share",
                            "probe_accuracy_epochs")}
    for name in ("depth", "layer_pred", "epoch_pred"):
        stacked[name] = stacked[name].astype(np.int64)
    stacked.update(_epoch_scores(per_model, stacked["epoch_pred"].shape))
    y = data.labels.numpy()
    el2n_epoch = _el2n_epoch(data, stacked["epoch_pred"].shape[1] - 1)
    df = _results_table(stacked, data, el2n_epoch)
    arrays = dict(
        depth=stacked["depth"], in_train=stacked["in_train"],
        probs=stacked["probs"].astype(np.float32),
        layer_pred=stacked["layer_pred"].astype(np.int16),
        epoch_pred=stacked["epoch_pred"].astype(np.int16),
        seeds=np.array([m["seed"] for m in per_model]),
        halves=np.array([m["half"] for m in per_model]),
        labels=y, original_labels=data.original_labels.numpy(),
        dataset_index=data.dataset_index.numpy(),
        layer_names=np.array(data.spec.names),
        loss=stacked["loss"], train_accuracy=stacked["train_accuracy"],
        held_out_accuracy=stacked["held_out_accuracy"],
        knn_vote_share=stacked["knn_vote_share"],
        probe_accuracy_epochs=stacked["probe_accuracy_epochs"],
        **{name: stacked[name] for name in _EPOCH_ARRAYS},
        el2n_epoch=np.array(-1 if el2n_epoch is None else el2n_epoch),
    )
    _atomic.write_parquet(out / "results.parquet", df)
    _atomic.savez(out / "per_model.npz", **arrays)
    _atomic.write_json(out / "summary.json", claims_summary(
        df, arrays, early_fraction=data.thresholds.early_fraction))
    layer_pred, in_train = stacked["layer_pred"], stacked["in_train"]
    return {
        "layer_knn_accuracy_train": json_floats(layer_accuracy(layer_pred, y, in_train)),
        "layer_knn_accuracy_held_out": json_floats(layer_accuracy(layer_pred, y, ~in_train)),
        "mean_train_depth": mean_or_none(df["train_depth"]),
        "mean_held_out_depth": mean_or_none(df["held_out_depth"]),
        "held_out_accuracy": mean_or_none(df["held_out_accuracy"]),
        "train_accuracy": mean_or_none(df["train_accuracy"]),
        "categories": {c: int((df["category"] == c).sum()) for c in CATEGORIES},
        "label_flipped": int(df["label_flipped"].sum()),
        "label_error": int(df["label_error"].sum()),
    }


def _epoch_scores(per_model: list[dict], shape) -> dict:
    """The per-epoch score arrays (:data:`_EPOCH_ARRAYS`), stacked ``[R, E+1, n]`` float16; a
    model file of an older version, which lacks them, gives NaN rows (its score columns are
    NaN, nothing is guessed)."""
    nan = np.full(shape[1:], np.nan, np.float16)
    return {name: np.stack([np.asarray(m.get(name, nan), np.float16) for m in per_model])
            for name in _EPOCH_ARRAYS}


def _el2n_epoch(data: RunData, epochs: int) -> int | None:
    """The epoch the ``el2n`` column reads: the run's ``el2n_epoch`` (``--el2n-epoch``),
    else its default for ``epochs`` (:func:`pdepth.scores.default_el2n_epoch`)."""
    chosen = getattr(data.config, "el2n_epoch", None)
    return default_el2n_epoch(epochs) if chosen is None else int(chosen)


def _results_table(stacked: dict, data: RunData, el2n_epoch: int | None):
    """The per-example table: :func:`pdepth.metrics.summarize` with the category, the
    dataset index and the label's name in front, the label-error evidence
    (:func:`pdepth.label_errors.label_error_evidence`) after the label columns and the
    difficulty scores (:func:`pdepth.scores.score_columns`) after ``iteration_learned``."""
    y = data.labels.numpy()
    df = summarize(stacked["depth"], stacked["in_train"], stacked["probs"],
                   stacked["layer_pred"], stacked["epoch_pred"], y,
                   early_fraction=data.thresholds.early_fraction,
                   original_labels=data.original_labels.numpy())
    df["category"] = categorize(df, data.spec.num_probes, data.thresholds,
                                num_classes=data.num_classes)
    evidence = label_error_evidence(stacked["probs"], stacked["in_train"],
                                    stacked["layer_pred"], y, stacked["probs"].shape[2],
                                    early_fraction=data.thresholds.early_fraction)
    at = df.columns.get_loc("label_flipped") + 1
    for i, name in enumerate(("label_error", "label_error_score", "suggested_label")):
        df.insert(at + i, name, evidence[name])
    scores = score_columns({**stacked, "labels": y}, el2n_epoch)
    at = df.columns.get_loc("held_out_iteration_learned") + 1
    for i, name in enumerate(SCORES):
        df.insert(at + i, name, scores[name])
    df.insert(0, "dataset_index", data.dataset_index.numpy())
    df.insert(2, "label_name", [data.dataset.classes[i] for i in y])
    cat = df.pop("category")
    df.insert(3, "category", cat)
    return df
