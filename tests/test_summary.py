"""summary.json (pdepth.summary): every entry of a real run equals a direct computation from
its results.parquet and per_model.npz; the flipped-label and label-error entries on a
synthetic ensemble with one known flip. Label noise itself: tests/test_label_noise.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from run_helpers import ensemble, needs_fmnist, tiny_noisy_run
from scipy.stats import spearmanr

import pdepth
from pdepth.label_errors import label_error_evidence
from pdepth.metrics import summarize
from pdepth.summary import (
    SCORE_COLUMNS,
    claims_summary,
    score_correlations,
    score_reliability,
    spearman,
)

CORRELATIONS = {  # entry -> (x column, y column, paper direction)
    "depth_vs_accuracy": ("held_out_depth", "held_out_accuracy_original", "negative"),
    "depth_vs_confidence": ("held_out_depth", "confidence", "negative"),
    "depth_vs_margin": ("held_out_depth", "margin", "negative"),
    "depth_vs_uncertainty": ("held_out_depth", "ensemble_entropy", "positive"),
    "depth_vs_agreement": ("held_out_depth", "held_out_agreement", "negative"),
    "depth_vs_speed_of_learning": ("train_depth", "iteration_learned", "positive"),
    "learns_easy_data_first": ("held_out_depth", "iteration_learned", "positive"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_noisy_run(tmp_path_factory, "summary", 0.25)


def _load(out):
    import pandas as pd

    with np.load(out / "per_model.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return (pd.read_parquet(out / "results.parquet"), arrays,
            json.loads((out / "summary.json").read_text()))


@needs_fmnist
def test_summary_matches_direct_computation(run):
    df, z, summary = _load(run)
    assert summary == json.loads(json.dumps(claims_summary(df, z)))  # reproducible from files
    claims = summary["claims"]
    r_models, num_layers, n = z["layer_pred"].shape
    assert summary["n_examples"] == n == 200 and summary["n_models"] == r_models == 4
    for name, (x, y, direction) in CORRELATIONS.items():
        entry = claims[name]
        ok = df[x].notna() & df[y].notna()
        expected = spearmanr(df.loc[ok, x], df.loc[ok, y]).statistic
        assert entry["value"] == pytest.approx(expected, abs=1e-9), name
        assert entry["n_examples"] == ok.sum() and entry["n_models"] == r_models
        assert entry["paper_direction"] == direction
        sign = 1 if direction == "positive" else -1
        assert entry["holds"] == bool(sign * expected > 0), name

    # per-probe k-NN accuracy (given labels), train vs held out, over (model, example) pairs
    lp, it, y, orig = z["layer_pred"], z["in_train"], z["labels"], z["original_labels"]
    gap = claims["early_layers_generalise"]
    for split, mask in (("train", it), ("held_out", ~it)):
        direct = [(lp[:, layer][mask] == np.broadcast_to(y, it.shape)[mask]).mean()
                  for layer in range(num_layers)]
        np.testing.assert_allclose(gap[f"knn_accuracy_{split}"], direct)
    g = np.array(gap["knn_accuracy_train"]) - np.array(gap["knn_accuracy_held_out"])
    assert gap["value"] == pytest.approx(g[-1] - g[0]) and gap["holds"] == (g[-1] > g[0])

    flip = claims["flipped_labels_memorised_late"]
    flipped = y != orig
    assert flip["n_examples"] == flipped.sum() == 50
    mask = it & flipped[None]
    train_given = [(lp[:, layer][mask] == np.broadcast_to(y, it.shape)[mask]).mean()
                   for layer in range(num_layers)]
    np.testing.assert_allclose(flip["knn_accuracy_flipped"]["train_given"], train_given)
    early = flip["early_probes"]
    assert flip["value"] == pytest.approx(train_given[-1] - np.mean(train_given[:early]))

    _check_groups(df, z, claims["groups_processed_differently"])
    _check_convergence(z, claims["early_layers_converge_faster"])

    errors = summary["label_errors"]
    tp = int((df["label_error"] & df["label_flipped"]).sum())
    assert errors["flipped"] == 50 and errors["flagged"] == df["label_error"].sum()
    assert errors["true_positives"] == tp and errors["recall"] == pytest.approx(tp / 50)
    if errors["flagged"]:
        assert errors["precision"] == pytest.approx(tp / errors["flagged"])


def _check_groups(df, z, entry):
    """Per category, split and probe: the mean vote shares over (model, example) pairs."""
    share, it, scored = z["knn_vote_share"], z["in_train"], z["depth"] >= 0
    r_models, num_layers, n, _ = share.shape
    assert entry["vote_share_order"] == ["label", "prediction", "other"]
    for cat in pdepth.CATEGORIES:
        in_cat = (df["category"] == cat).to_numpy()
        for split, mask in (("train", it & scored), ("held_out", ~it & scored)):
            pairs = [(r, i) for r in range(r_models) for i in range(n) if mask[r, i] and in_cat[i]]
            got = np.array(entry["vote_share"][cat][split], dtype=float)
            if not pairs:
                assert np.isnan(got).all()
                continue
            direct = np.mean([share[r, :, i] for r, i in pairs], axis=0)
            np.testing.assert_allclose(got, direct, rtol=1e-6)
    label_share = lambda cat: np.mean(  # noqa: E731  (null in JSON: no pair, NaN)
        np.array(entry["vote_share"][cat]["train"], dtype=float)[:entry["early_probes"], 0])
    expected = label_share("easy") - label_share("looks_like_other_class")
    if np.isnan(expected):  # a category without a training-split pair in this tiny run
        assert entry["value"] is None and entry["holds"] is None
    else:
        assert entry["value"] == pytest.approx(expected) and entry["holds"] == (expected > 0)
    # the probe's vote is the class of largest share: where it is the label, the label's share
    # is at least the other classes'; where the network is right, label == prediction share
    lp, y, pred = z["layer_pred"], z["labels"], z["probs"].argmax(2)
    voted_label = lp == y[None, None]
    assert (share[..., 0] >= share[..., 2])[voted_label].all()
    right = np.broadcast_to((pred == y[None])[:, None], lp.shape)
    np.testing.assert_array_equal(share[..., 0][right], share[..., 1][right])
    assert np.allclose(share.sum(-1)[~right], np.minimum(1, share.sum(-1)[~right]))


def _check_convergence(z, entry):
    """The epoch each probe's mean curve makes 95% of its gain, and its Spearman with the
    probe index."""
    mean = z["probe_accuracy_epochs"].mean(0)  # [E+1, L]
    assert mean.shape == (2, z["layer_pred"].shape[1])  # initialisation + 1 epoch
    gain = mean - mean[0]
    epochs = [next(e for e in range(mean.shape[0]) if gain[e, p] >= 0.95 * gain[-1, p] - 1e-12)
              for p in range(mean.shape[1])]
    assert entry["convergence_epoch"] == epochs
    np.testing.assert_allclose(entry["probe_accuracy_epochs"], mean)
    if len(set(epochs)) > 1:
        assert entry["value"] == pytest.approx(spearmanr(range(len(epochs)), epochs).statistic)
    else:
        assert entry["value"] is None and entry["holds"] is None


def _synthetic(original_class=5, flip=True):
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble(40)
    original = labels.copy()
    if flip:
        original[0] = original_class
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels,
                   original_labels=original)
    for name, value in label_error_evidence(probs, in_train, layer_pred, labels, 10).items():
        df[name] = value
    arrays = {"in_train": in_train, "layer_pred": layer_pred, "labels": labels,
              "original_labels": original}
    return df, arrays


def test_flipped_label_entry_and_label_errors_on_a_known_flip():
    df, arrays = _synthetic()
    summary = claims_summary(df, arrays)
    flip = summary["claims"]["flipped_labels_memorised_late"]
    # trained on: probes 0-3 vote the original class 5, probes 4-5 the given label 3
    assert flip["knn_accuracy_flipped"]["train_given"] == [0, 0, 0, 0, 1, 1]
    assert flip["knn_accuracy_flipped"]["train_original"] == [1, 1, 1, 1, 0, 0]
    assert flip["knn_accuracy_flipped"]["held_out_original"] == [1] * 6
    assert flip["value"] == 1.0 and flip["holds"] is True and flip["n_examples"] == 1
    assert summary["label_errors"] == {"flagged": 1, "flipped": 1, "true_positives": 1,
                                       "relabel_correct": 1, "precision": 1.0, "recall": 1.0,
                                       "f1": 1.0}
    json.dumps(summary)  # plain JSON types only


def test_without_flips_the_noise_entries_are_empty():
    df, arrays = _synthetic(flip=False)
    summary = claims_summary(df, arrays)
    flip = summary["claims"]["flipped_labels_memorised_late"]
    assert flip["value"] is None and flip["holds"] is None and flip["n_examples"] == 0
    errors = summary["label_errors"]
    assert errors["flipped"] == 0 and errors["flagged"] == 1
    assert errors["precision"] is None and errors["recall"] is None
    # early layers generalise: every probe is right on both splits here, so the gap is 0
    gap = summary["claims"]["early_layers_generalise"]
    assert gap["value"] == pytest.approx(0.0, abs=0.1)


def test_spearman_helper():
    x = np.array([1.0, 2, 3, 4, np.nan, 6])
    y = np.array([2.0, 2, 5, 9, 1, np.inf])
    rho, n = spearman(x, y)
    assert n == 4 and rho == pytest.approx(spearmanr(x[:4], y[:4]).statistic)
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5])[0])
    assert np.isnan(spearman([1, 2], [3, 4])[0])


@needs_fmnist
def test_score_correlations_match_scipy(run):
    df, _, summary = _load(run)
    corr = summary["score_correlations"]
    assert corr["scores"] == list(SCORE_COLUMNS)  # a run has every score column
    assert corr["higher_is_harder"] == [SCORE_COLUMNS[c] for c in corr["scores"]]
    for i, a in enumerate(corr["scores"]):
        for j, b in enumerate(corr["scores"]):
            ok = np.isfinite(df[a].to_numpy(float)) & np.isfinite(df[b].to_numpy(float))
            x, y = df.loc[ok, a], df.loc[ok, b]
            value = corr["matrix"][i][j]
            if x.nunique() < 2 or y.nunique() < 2:  # constant (e.g. 1 epoch: no forgetting)
                assert value is None, (a, b)
            else:
                assert value == pytest.approx(spearmanr(x, y).statistic, abs=1e-9), (a, b)
                assert corr["n_examples"][i][j] == ok.sum()
    rel = summary["score_reliability"]
    assert rel["seeds_a"] == [0] and rel["seeds_b"] == [1] and rel["reason"] is None
    assert set(rel["scores"]) == set(SCORE_COLUMNS)


def _with_epoch_scores(n=40):
    """The synthetic ensemble (4 models: seeds 0, 0, 1, 1) with per-epoch scores where each
    seed's value is known for every example: el2n ranks the examples 0..n-1 under seed 0 and
    with neighbours swapped under seed 1; the margin reverses them; p(y) is a monotone map
    of the same order; it never varies across epochs."""
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble(n)
    a = np.arange(n, dtype=np.float64)
    b = a.reshape(-1, 2)[:, ::-1].reshape(-1)  # 1, 0, 3, 2, ...
    per_seed = lambda v0, v1: np.stack([v0, v0, v1, v1])[:, None, :].repeat(  # noqa: E731
        epoch_pred.shape[1], 1)
    p = 0.05 + 0.9 * a / n
    arrays = {"depth": depth, "in_train": in_train, "probs": probs, "layer_pred": layer_pred,
              "epoch_pred": epoch_pred, "labels": labels, "seeds": np.array([0, 0, 1, 1]),
              "epoch_el2n": per_seed(a, b), "epoch_margin": per_seed(a, -a),
              "epoch_label_prob": per_seed(p, p**2), "el2n_epoch": np.array(2)}
    return arrays, a, b


def test_score_reliability_on_a_constructed_case():
    arrays, a, b = _with_epoch_scores()
    rel = score_reliability(arrays)
    assert rel["seeds_a"] == [0] and rel["seeds_b"] == [1] and rel["reason"] is None
    got = rel["scores"]
    r = spearmanr(a, b).statistic  # 1 - 6 * 40 / (40 * 1599): every neighbour swapped
    assert r == pytest.approx(1 - 6 / 1599)
    assert got["el2n"]["split_half"] == pytest.approx(r)
    assert got["el2n"]["spearman_brown"] == pytest.approx(2 * r / (1 + r))
    assert got["el2n"]["n_examples"] == 40
    # reversed under the other seeds: r = -1, whose Spearman-Brown estimate is undefined
    assert got["aum"]["split_half"] == pytest.approx(-1.0)
    assert got["aum"]["spearman_brown"] is None
    # a monotone map of the same order: perfectly stable
    assert got["data_map_confidence"]["split_half"] == pytest.approx(1.0)
    assert got["data_map_confidence"]["spearman_brown"] == pytest.approx(1.0)
    # no variation over the epochs: a constant score has no rank correlation
    assert got["data_map_variability"] == {"split_half": None, "spearman_brown": None,
                                           "n_examples": 40}
    json.dumps(rel)


def test_score_reliability_halves_and_one_seed():
    arrays, _, _ = _with_epoch_scores()
    arrays["seeds"] = np.array([3, 3, 1, 1])  # sorted: seeds 1 then 3
    assert (score_reliability(arrays)["seeds_a"], score_reliability(arrays)["seeds_b"]) == \
        ([1], [3])
    one = {k: (v[:2] if k not in ("labels", "el2n_epoch") else v) for k, v in arrays.items()}
    rel = score_reliability(one)
    assert rel["scores"] is None and rel["seeds_b"] == []
    assert "1 seed" in rel["reason"] and "at least 2" in rel["reason"]


def test_score_correlations_of_a_table_without_the_scores():
    """A table of an older run: only the columns it has, each with itself 1."""
    import pandas as pd

    table = pd.DataFrame({"held_out_depth": [0.0, 1, 2, 3], "margin": [0.9, 0.5, 0.7, 0.1]})
    corr = score_correlations(table)
    assert corr["scores"] == ["held_out_depth", "margin"]
    assert corr["matrix"] == [[1.0, pytest.approx(-0.8)], [pytest.approx(-0.8), 1.0]]
