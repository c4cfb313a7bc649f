"""Difficulty categories (pdepth.categories): constructed cases, thresholds, and a flipped
label through summarize. The metrics themselves: tests/test_metrics.py."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from run_helpers import NUM_PROBES, ensemble

import pdepth
from pdepth.categories import CATEGORIES, CategoryThresholds, categorize
from pdepth.metrics import summarize

L = NUM_PROBES  # probes


def _row(**kw):
    base = dict(label=3, train_depth=0.0, held_out_depth=0.0, held_out_accuracy=1.0,
                held_out_agreement=1.0, held_out_mode=3, early_mode=3, early_mode_share=1.0,
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
                      held_out_agreement=0.5, ensemble_entropy=0.9),
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


def test_held_out_agreement_is_the_column_and_threshold_consistency_is_gone():
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble()
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels)
    assert "held_out_agreement" in df.columns and "consistency" not in df.columns
    assert "consistency" not in CategoryThresholds().to_dict()
    split = pd.DataFrame([{**CASES["ambiguous"], "ensemble_entropy": 0.1}])  # agreement 0.5
    assert categorize(split, L)[0] == "ambiguous"
    assert categorize(split, L, held_out_agreement=0.4)[0] != "ambiguous"
    # the old threshold name still works, with a DeprecationWarning
    with pytest.warns(DeprecationWarning, match="held_out_agreement"):
        assert categorize(split, L, consistency=0.4)[0] != "ambiguous"
    with pytest.warns(DeprecationWarning):
        assert CategoryThresholds.from_dict({"consistency": 0.6}).held_out_agreement == 0.6
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        CategoryThresholds.from_dict({"consistency": 0.6, "held_out_agreement": 0.7})


def test_high_entropy_makes_ambiguous():
    df = pd.DataFrame([_row(train_depth=3, held_out_depth=3, ensemble_entropy=0.6 * math.log(10),
                            held_out_accuracy=0.0, held_out_mode=4, early_mode=2)])
    assert categorize(df, L, num_classes=10)[0] == "ambiguous"


def test_flipped_label_through_summarize_lands_in_looks_like_other_class():
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble()
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels)
    row = df.iloc[0]
    assert row["train_depth"] == 4 and row["held_out_depth"] == 0
    assert row["held_out_accuracy"] == 0 and row["held_out_agreement"] == 1
    assert row["held_out_mode"] == 5 and row["early_mode"] == 5
    assert row["iteration_learned"] == 3
    assert (df["held_out_accuracy"].iloc[1:] == 1).all()
    cats = categorize(df, L)
    assert cats[0] == "looks_like_other_class"
    assert (cats[1:] == "easy").all()
