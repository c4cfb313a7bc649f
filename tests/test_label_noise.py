"""Label noise (`pdepth run --label-noise P`, pdepth.protocol.flip_labels) and the label-error
evidence (pdepth.label_errors): the flips are seeded, exact and recorded; the results carry the
given and the original label; the rule flags a mislabelled example and not a clean one. The
summary of the claims: tests/test_summary.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from run_helpers import ensemble, needs_fmnist, one_error_line, tiny_noisy_run

from pdepth.cli import main
from pdepth.label_errors import label_error_evidence
from pdepth.metrics import summarize
from pdepth.protocol import RunConfig, flip_labels

# --------------------------------------------------------------------------------------------
# the flips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction", [(200, 0.2), (1001, 0.1), (7, 0.5), (50, 0.0),
                                         (333, 0.999)])
def test_flip_labels_exact_and_seeded(n, fraction):
    labels = torch.arange(n) % 10
    given, flipped = flip_labels(labels, fraction, 10, seed=3)
    again, flipped_again = flip_labels(labels, fraction, 10, seed=3)
    assert torch.equal(given, again) and torch.equal(flipped, flipped_again)
    assert int(flipped.sum()) == round(fraction * n)
    assert torch.equal(flipped, given != labels)  # a flipped label never equals its original
    assert given.min() >= 0 and given.max() < 10 and given.dtype == torch.int64


def test_flip_labels_uniform_nested_and_seed_dependent():
    labels = torch.zeros(20000, dtype=torch.long)
    given, flipped = flip_labels(labels, 0.5, 10, seed=0)
    counts = torch.bincount(given[flipped], minlength=10)
    assert counts[0] == 0 and (counts[1:] - 10000 / 9).abs().max() < 250  # uniform on the others
    small, small_flipped = flip_labels(labels, 0.2, 10, seed=0)
    assert (small_flipped <= flipped).all()  # a smaller fraction flips a subset ...
    assert torch.equal(small[small_flipped], given[small_flipped])  # ... to the same classes
    _, other = flip_labels(labels, 0.5, 10, seed=1)
    assert not torch.equal(other, flipped)


def test_label_noise_setting_and_protocol_key():
    clean = RunConfig(subset=200)
    assert clean.label_noise == 0.0 and clean.label_noise_seed == clean.subset_seed
    keys = {RunConfig(subset=200, label_noise=p).protocol_key() for p in (0.0, 0.1, 0.2)}
    assert len(keys) == 3
    assert RunConfig(subset=200, label_noise=0.1, label_noise_seed=5).protocol_key() != \
        RunConfig(subset=200, label_noise=0.1).protocol_key()
    # without noise the key is the one of earlier versions (no label-noise settings in it)
    assert RunConfig(subset=200, label_noise_seed=7).protocol_key() == clean.protocol_key()
    for bad in (-0.1, 1.0, 1.5, math.nan, "x"):
        with pytest.raises(ValueError, match=r"label_noise \(--label-noise\)"):
            RunConfig(label_noise=bad)


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5", "nan"])
def test_cli_bad_label_noise(value, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--label-noise", value, "--out", str(out), "--quiet"]) == 2
    assert "--label-noise" in one_error_line(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# a real run with label noise
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    return tiny_noisy_run(tmp_path_factory, "noisy", 0.2)


@needs_fmnist
def test_run_records_the_flips(noisy_run):
    import pandas as pd

    from pdepth.data import load_subset

    cfg = json.loads((noisy_run / "config.json").read_text())
    assert cfg["config"]["label_noise"] == 0.2 and cfg["config"]["label_noise_seed"] == 0
    assert cfg["resolved"]["label_noise"]["flipped"] == 40
    _, original, index = load_subset("fashion-mnist", None, 200, 0)
    given, flipped = flip_labels(original, 0.2, 10, cfg["config"]["label_noise_seed"])
    assert int(flipped.sum()) == round(0.2 * 200)

    df = pd.read_parquet(noisy_run / "results.parquet")
    np.testing.assert_array_equal(df["dataset_index"], index.numpy())
    np.testing.assert_array_equal(df["label"], given.numpy())
    np.testing.assert_array_equal(df["original_label"], original.numpy())
    np.testing.assert_array_equal(df["label_flipped"], flipped.numpy())
    assert (df.loc[~df["label_flipped"], "label"] == df.loc[~df["label_flipped"],
                                                          "original_label"]).all()
    assert df["label_error"].dtype == bool and df["label_error_score"].between(-1, 1).all()
    flagged = df[df["label_error"]]
    assert (flagged["suggested_label"] != flagged["label"]).all()  # a flag names another class
    with np.load(noisy_run / "per_model.npz") as z:
        np.testing.assert_array_equal(z["labels"], given.numpy())
        np.testing.assert_array_equal(z["original_labels"], original.numpy())
        assert z["probs"].dtype == np.float32 and z["in_train"].dtype == bool
    with np.load(noisy_run / "data.npz") as z:
        np.testing.assert_array_equal(z["labels"], given.numpy())
        np.testing.assert_array_equal(z["original_labels"], original.numpy())


@needs_fmnist
def test_same_settings_same_flips(tmp_path):
    from pdepth.protocol.runner import load_run_data

    cfg = RunConfig(subset=300, label_noise=0.3, k=3)
    a, b = load_run_data(cfg, False), load_run_data(RunConfig(**cfg.to_dict()), False)
    assert torch.equal(a.labels, b.labels) and int(a.label_flipped.sum()) == 90
    assert torch.equal(load_run_data(RunConfig(subset=300, k=3), False).labels,
                       a.original_labels)


# --------------------------------------------------------------------------------------------
# the columns and the label-error rule on a synthetic ensemble
# --------------------------------------------------------------------------------------------


def test_summarize_label_columns():
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble(12)
    original = labels.copy()
    original[0] = 5  # example 0's given label 3 is a flip of its class 5
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels,
                   original_labels=original)
    assert df["label_flipped"].tolist() == [True] + [False] * 11
    assert df.loc[0, "held_out_accuracy"] == 0  # the given label: never predicted held out
    assert df.loc[0, "held_out_accuracy_original"] == 1  # the network is right
    clean = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels)
    assert not clean["label_flipped"].any()
    np.testing.assert_array_equal(clean["held_out_accuracy"], clean["held_out_accuracy_original"])


def test_rule_flags_the_mislabelled_example_only():
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble(40)
    ev = label_error_evidence(probs, in_train, layer_pred, labels, 10)
    assert ev["label_error"].tolist() == [True] + [False] * 39
    assert ev["suggested_label"][0] == 5  # the class the evidence points to
    np.testing.assert_array_equal(ev["suggested_label"][1:], labels[1:])
    assert ev["label_error_score"][0] > 0.5 > ev["label_error_score"][1:].max()
    # a clean example the held-out networks get wrong without early-probe support: no flag
    probs2 = probs.copy()
    probs2[:, 7] = 0.01
    probs2[:, 7, 2] = 0.91  # held out (and trained) networks say class 2, the probes say 7
    ev2 = label_error_evidence(probs2, in_train, layer_pred, labels, 10)
    assert not ev2["label_error"][7] and ev2["suggested_label"][7] == 2


def test_rule_refuses_mismatched_shapes():
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble(10)
    with pytest.raises(ValueError, match="label_error_evidence"):
        label_error_evidence(probs[:, :9], in_train, layer_pred, labels, 10)
