"""pdepth.scores: each difficulty score on a case worked out by hand, and score_columns'
choice of models (the run's columns against the saved arrays: test_protocol_train.py)."""

import math

import numpy as np
import pytest

from pdepth import scores

T, F = True, False


def test_forgetting_events_by_hand():
    # one column per example, rows = epochs 1..4 (right on the given label or not)
    correct = np.array([[T, T, F, F, T, F],
                        [F, T, F, T, F, F],
                        [T, T, F, T, F, T],
                        [F, T, F, F, F, T]])
    # T F T F: forgotten twice; always right: never; never right: the most possible,
    # 4 // 2 = 2; F T T F: once; T F F F: once; learned late and kept: never
    np.testing.assert_array_equal(scores.forgetting_events(correct), [2, 0, 2, 1, 1, 0])
    np.testing.assert_array_equal(scores.first_learned(correct), [1, 1, 5, 2, 1, 3])
    # three epochs: never learned counts 3 // 2 = 1, as many as right, wrong, right
    three = np.array([[F, T], [F, F], [F, T]])
    np.testing.assert_array_equal(scores.forgetting_events(three), [1, 1])
    assert np.isnan(scores.forgetting_events(np.zeros((0, 3), bool))).all()
    assert np.isnan(scores.first_learned(np.zeros((0, 3), bool))).all()


def test_el2n_on_known_probabilities():
    probs = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    got = scores.el2n(probs, np.array([0, 1, 2]))
    np.testing.assert_allclose(got, [math.sqrt(0.3**2 + 0.2**2 + 0.1**2),
                                     math.sqrt(0.7**2 + 0.8**2 + 0.1**2), 0.0])
    # leading axes (models, epochs) broadcast over the labels
    stacked = scores.el2n(np.stack([probs, probs]), np.array([0, 1, 2]))
    np.testing.assert_allclose(stacked, [got, got])


def test_aum_on_known_logits():
    logits = np.array([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]],     # epoch 1
                       [[4.0, -1.0, 1.0], [0.5, 0.0, 0.25]]])  # epoch 2
    margins = scores.logit_margin(logits, np.array([0, 0]))
    np.testing.assert_allclose(margins, [[1.0, -3.0], [3.0, 0.25]])
    np.testing.assert_allclose(scores.aum(margins), [2.0, -1.375])
    assert np.isnan(scores.aum(np.zeros((0, 2)))).all()


def test_data_map_and_loss():
    p = np.array([[0.2, 1.0], [0.4, 1.0], [0.9, 1.0]])
    conf, var = scores.data_map(p)
    np.testing.assert_allclose(conf, [0.5, 1.0])
    np.testing.assert_allclose(var, [math.sqrt(((0.3**2) + 0.1**2 + 0.4**2) / 3), 0.0])
    probs = np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)
    loss = scores.cross_entropy(probs, np.array([1, 1]))
    assert loss[0] == pytest.approx(-math.log(0.75))
    assert math.isfinite(loss[1]) and loss[1] == pytest.approx(-math.log(2.0**-126))


def test_default_el2n_epoch():
    assert [scores.default_el2n_epoch(e) for e in (1, 2, 6, 8, 10, 12, 13, 20, 200)] == \
        [1, 1, 1, 2, 2, 2, 3, 4, 40]
    assert scores.default_el2n_epoch(0) is None


def test_score_columns_use_the_training_models():
    """Two models over three examples: each score averages the models that train on the
    example (the held-out model's values are set far off: they must not count), the held-out
    loss the other one."""
    labels = np.array([0, 1, 0])
    in_train = np.array([[T, F, T], [F, T, T]])
    epoch_pred = np.array([[[1, 1, 1], [0, 1, 0], [1, 1, 0]],
                           [[1, 1, 1], [1, 1, 1], [1, 0, 0]]])  # [R, E+1, n], E = 2
    prob = np.array([[[0.1] * 3, [0.6, 0.9, 0.5], [0.2, 0.9, 0.7]],
                     [[0.1] * 3, [0.9, 0.3, 0.1], [0.9, 0.5, 0.3]]])
    margin = prob * 10 - 5
    el2n = 1 - prob
    probs = np.array([[[0.8, 0.2], [0.6, 0.4], [0.7, 0.3]],
                      [[0.1, 0.9], [0.5, 0.5], [0.4, 0.6]]])
    arrays = {"labels": labels, "in_train": in_train, "depth": np.zeros((2, 3), int),
              "epoch_pred": epoch_pred, "epoch_label_prob": prob, "epoch_margin": margin,
              "epoch_el2n": el2n, "probs": probs}
    cols = scores.score_columns(arrays, el2n_epoch=2)
    assert set(cols) == set(scores.SCORES)
    # example 0: model 0 only; example 1: model 1 only; example 2: both
    np.testing.assert_allclose(cols["el2n"], [0.8, 0.5, (0.3 + 0.7) / 2])
    # correct at epochs 1, 2: ex0 m0 (T, F) -> 1 event; ex1 m1 (T, F) -> 1;
    # ex2 m0 (T, T) -> 0, m1 (F, T) -> 0
    np.testing.assert_allclose(cols["forgetting_events"], [1, 1, 0])
    np.testing.assert_allclose(cols["first_learned"], [1, 1, (1 + 2) / 2])
    np.testing.assert_allclose(cols["data_map_confidence"], [0.4, 0.4, (0.6 + 0.2) / 2])
    np.testing.assert_allclose(cols["data_map_variability"], [0.2, 0.1, (0.1 + 0.1) / 2])
    np.testing.assert_allclose(cols["aum"], np.array(cols["data_map_confidence"]) * 10 - 5)
    np.testing.assert_allclose(cols["train_loss"], -np.log([0.8, 0.5, np.sqrt(0.7 * 0.4)]))
    np.testing.assert_allclose(cols["held_out_loss"], [-np.log(0.1), -np.log(0.4), np.nan])
    # a model that scored nothing (depth -1) counts for nothing; no epoch: el2n is NaN
    arrays["depth"] = np.array([[0, 0, -1], [0, 0, 0]])
    cols = scores.score_columns(arrays, el2n_epoch=None)
    assert np.isnan(cols["el2n"]).all()
    assert cols["first_learned"][2] == 2.0


@pytest.mark.parametrize("name", list(scores.SCORES))
def test_every_score_says_its_orientation_and_models(name):
    text = scores.SCORES[name]
    assert "higher = " in text and "models that" in text
