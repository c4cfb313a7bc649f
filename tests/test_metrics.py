"""Per-example metrics of an ensemble (pdepth.metrics): summarize's columns (confidence,
margin, entropy, per-probe k-NN, per-model depth) and the helpers behind them."""

from __future__ import annotations

import numpy as np
import pytest
from run_helpers import ensemble

from pdepth.metrics import class_counts, iteration_learned, layer_accuracy, summarize


def test_summarize_metrics():
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble()
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
