"""Difficulty categories and the per-example metrics they are computed from."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import pdepth
from pdepth.categories import CATEGORIES, CategoryThresholds, categorize
from pdepth.metrics import class_counts, iteration_learned, layer_accuracy, summarize

L = 6  # probes


def _row(**kw):
    base = dict(label=3, train_depth=0.0, held_out_depth=0.0, held_out_accuracy=1.0,
                consistency=1.0, held_out_mode=3, early_mode=3, early_mode_share=1.0,
                ensemble_entropy=0.05)
    base.update(kw)
    return base


CASES = {
    "easy": _row(),
    # a flipped label: held-out networks agree on the true class 5 early (low held-out depth),
    # the early probes vote 5, a network that trains on it must override them (deep)
    "looks_like_other_class": _row(train_depth=5.0, held_out_depth=0.5, held_out_accuracy=0.0,
                                   held_out_mode=5, early_mode=5, early_mode_share=0.9),
    # held-out networks split between classes, deep in both splits
    "ambiguous": _row(train_depth=4.0, held_out_depth=5.0, held_out_accuracy=0.5,
                      consistency=0.5, ensemble_entropy=0.9),
    # correct when trained on, deep and still right-ish when held out, no other class early
    "atypical": _row(train_depth=2.5, held_out_depth=5.5, held_out_accuracy=1.0,
                     early_mode=3, early_mode_share=0.4),
    # consistently wrong held out, but the early probes do not back the wrong class
    "atypical_wrong": _row(train_depth=3.0, held_out_depth=4.0, held_out_accuracy=0.0,
                           held_out_mode=7, early_mode=3, early_mode_share=0.6),
}


def test_constructed_cases():
    df = pd.DataFrame(list(CASES.values()))
    got = list(categorize(df, L).astype(str))
    want = [name.replace("_wrong", "") for name in CASES]
    assert got == want


def test_categories_are_a_categorical_over_all_names():
    cats = categorize(pd.DataFrame([CASES["easy"]]), L)
    assert list(cats.categories) == list(CATEGORIES)
    assert pdepth.categorize is categorize


def test_thresholds_are_parameters():
    df = pd.DataFrame([_row(train_depth=2.5, held_out_depth=2.5)])
    assert categorize(df, L)[0] == "atypical"  # 2.5 > 6 / 3
    assert categorize(df, L, easy_depth=0.5)[0] == "easy"
    assert categorize(df, L, CategoryThresholds(easy_depth=0.5))[0] == "easy"
    flipped = pd.DataFrame([CASES["looks_like_other_class"]])
    assert categorize(flipped, L, early_vote=0.95)[0] == "atypical"
    with pytest.raises(ValueError, match="unknown category thresholds"):
        CategoryThresholds.from_dict({"easy_dpeth": 0.1})
    with pytest.raises(ValueError, match="lacks columns"):
        categorize(pd.DataFrame({"label": [1]}), L)


def test_high_entropy_makes_ambiguous():
    df = pd.DataFrame([_row(train_depth=3, held_out_depth=3, ensemble_entropy=0.6 * math.log(10),
                            held_out_accuracy=0.0, held_out_mode=4, early_mode=2)])
    assert categorize(df, L, num_classes=10)[0] == "ambiguous"


def _ensemble(n=6, flipped=0, true_class=5, given=3):
    """Per-model arrays for R=4 models (2 seeds x 2 halves) over n examples, where example
    ``flipped`` has the given label 3 but looks like class 5 (its true class)."""
    r_models, num_classes, epochs = 4, 10, 4
    labels = np.arange(n) % num_classes
    labels[flipped] = given
    in_train = np.zeros((r_models, n), bool)
    in_train[0, ::2] = in_train[1, 1::2] = True
    in_train[2, :n // 2] = in_train[3, n // 2:] = True
    probs = np.full((r_models, n, num_classes), 0.01)
    layer_pred = np.repeat(labels[None, None, :], L, 1).repeat(r_models, 0)
    epoch_pred = np.repeat(labels[None, None, :], epochs + 1, 1).repeat(r_models, 0).copy()
    epoch_pred[:, 0] = 0  # untrained: predicts class 0
    for r in range(r_models):
        for i in range(n):
            if i == flipped:
                if in_train[r, i]:  # memorised: late probes follow the given label
                    probs[r, i, given] = 0.91
                    layer_pred[r, :4, i] = true_class
                    layer_pred[r, 4:, i] = given
                    epoch_pred[r, :3, i] = true_class
                    epoch_pred[r, 3:, i] = given
                else:  # held out: every probe and the network say 5
                    probs[r, i, true_class] = 0.91
                    layer_pred[r, :, i] = true_class
                    epoch_pred[r, 1:, i] = true_class
            else:
                probs[r, i, labels[i]] = 0.91
    pred = probs.argmax(2)
    depth = np.stack([pdepth.depth_from_predictions(layer_pred[r], pred[r])
                      for r in range(r_models)])
    return depth, in_train, probs, layer_pred, epoch_pred, labels


def test_flipped_label_through_summarize_lands_in_looks_like_other_class():
    depth, in_train, probs, layer_pred, epoch_pred, labels = _ensemble()
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels)
    row = df.iloc[0]
    assert row["train_depth"] == 4 and row["held_out_depth"] == 0
    assert row["held_out_accuracy"] == 0 and row["consistency"] == 1
    assert row["held_out_mode"] == 5 and row["early_mode"] == 5
    assert row["iteration_learned"] == 3
    assert (df["held_out_accuracy"].iloc[1:] == 1).all()
    cats = categorize(df, L)
    assert cats[0] == "looks_like_other_class"
    assert (cats[1:] == "easy").all()


def test_summarize_metrics():
    depth, in_train, probs, layer_pred, epoch_pred, labels = _ensemble()
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels)
    assert np.allclose(df["confidence"], 0.91)
    np.testing.assert_allclose(df["margin"].iloc[1:], 0.90)
    assert df["margin"].iloc[0] == pytest.approx(0.01 - 0.91)
    p = np.full(10, 0.01)
    p[labels[1]] = 0.91
    assert df["ensemble_entropy"].iloc[1] == pytest.approx(-(p * np.log(p)).sum())
    assert df["knn_held_out_0"].iloc[0] == 0 and df["knn_train_5"].iloc[0] == 1
    assert list(df.filter(like="depth_m").columns) == [f"depth_m{r}" for r in range(4)]


def test_metric_helpers():
    ep = np.array([[0, 1, 2, 2], [1, 1, 1, 1], [2, 2, 1, 2]]).T  # [E+1=4, n=3]
    np.testing.assert_array_equal(iteration_learned(ep), [2, 0, 3])
    counts = class_counts(np.array([[1, 2], [1, 0]]), np.array([[True, True], [True, False]]), 3)
    np.testing.assert_array_equal(counts, [[0, 2, 0], [0, 0, 1]])
    lp = np.array([[[0, 1], [1, 1]]])  # [R=1, L=2, n=2]
    np.testing.assert_allclose(layer_accuracy(lp, np.array([0, 1]), np.ones((1, 2), bool)),
                               [1.0, 0.5])
