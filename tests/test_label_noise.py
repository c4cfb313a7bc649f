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
from pdepth.label_errors import LABEL_ERROR_PAIR_FACTOR, label_error_evidence
from pdepth.metrics import summarize
from pdepth.protocol import RunConfig, flip_labels
from pdepth.protocol.noise import asymmetric_map, load_noise_matrix, off_diagonal

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


def class_conditional_ensemble():
    """4 models (2 seeds x 2 halves) over 60 examples: 20 given 5, 20 given 3, 20 given 7.
    A fifth of class 5 is labelled 3 (examples 20-23) and the networks learned part of that:
    held out, the class-5 examples get p(3) = 0.25 and the flipped ones p(3) = 0.2 (not near
    0). Examples 24-27 are clean 3s that look like 5s (p(3) = 0.4, p(5) = 0.55). The early
    probes vote 5 for both groups. Returns ``(probs [4, 60, 10], in_train [4, 60],
    layer_pred [4, 6, 60], labels [60])``."""
    n = 60
    labels = np.repeat([5, 3, 7], 20)
    rows = {5: {5: 0.7, 3: 0.25}, 3: {3: 0.9, 5: 0.05}, 7: {7: 0.9}}
    p = np.zeros((n, 10))
    for i, y in enumerate(labels):
        for c, v in rows[int(y)].items():
            p[i, c] = v
    p[20:24] = 0
    p[20:24, 5], p[20:24, 3] = 0.75, 0.2  # flipped 5 -> 3
    p[24:28] = 0
    p[24:28, 5], p[24:28, 3] = 0.55, 0.4  # clean, confusable
    p += (1 - p.sum(1, keepdims=True)) / 10
    votes = labels.copy()
    votes[20:28] = 5
    in_train = np.zeros((4, n), bool)
    in_train[0, ::2] = in_train[1, 1::2] = True
    in_train[2, :n // 2] = in_train[3, n // 2:] = True
    layer_pred = np.repeat(votes[None, None, :], 6, 1).repeat(4, 0)
    return np.repeat(p[None], 4, 0), in_train, layer_pred, labels


def test_class_conditional_flips_flagged_where_the_score_threshold_misses_them():
    probs, in_train, layer_pred, labels = class_conditional_ensemble()
    ev = label_error_evidence(probs, in_train, layer_pred, labels, 10)
    assert np.flatnonzero(ev["label_error"]).tolist() == [20, 21, 22, 23]
    np.testing.assert_array_equal(ev["suggested_label"][20:28], 5)
    # the support of 3 on the examples given 5: the mean of their held-out p(3)
    expected = probs[0, labels == 5, 3].mean()
    np.testing.assert_allclose(ev["pair_support"][20:28], expected)
    assert ev["p_held"][20] <= LABEL_ERROR_PAIR_FACTOR * expected < ev["p_held"][24]
    # the score alone (the rule for uniform noise) misses them: p(3) = 0.2 is not near 0
    old = label_error_evidence(probs, in_train, layer_pred, labels, 10, pair_factor=0.0)
    assert not old["label_error"].any() and ev["label_error_score"][20] < 0.9
    np.testing.assert_array_equal(old["label_error_score"], ev["label_error_score"])


def test_clean_confusable_classes_not_flagged():
    # the same classes without flips: the 5s keep p(3) = 0.25, confusable 3s p(3) = 0.4
    probs, in_train, layer_pred, labels = class_conditional_ensemble()
    probs[:, 20:24], layer_pred[:, :, 20:24] = probs[:, 30:34], 3  # typical 3s instead
    ev = label_error_evidence(probs, in_train, layer_pred, labels, 10)
    assert not ev["label_error"].any()
    # flipped examples of the uniform kind (the synthetic ensemble): the pair rule adds none
    _, in_train, probs, layer_pred, _, labels = ensemble(40)
    ev = label_error_evidence(probs, in_train, layer_pred, labels, 10)
    old = label_error_evidence(probs, in_train, layer_pred, labels, 10, pair_factor=0.0)
    np.testing.assert_array_equal(ev["label_error"], old["label_error"])


def test_rule_refuses_mismatched_shapes():
    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble(10)
    with pytest.raises(ValueError, match="label_error_evidence"):
        label_error_evidence(probs[:, :9], in_train, layer_pred, labels, 10)


# --------------------------------------------------------------------------------------------
# --noise-kind asymmetric / confusion (pdepth.protocol.noise)
# --------------------------------------------------------------------------------------------


def _old_key(config: RunConfig) -> str:
    """The protocol key as pdepth computed it before --noise-kind existed."""
    import hashlib

    settings = {k: v for k, v in config.key_settings().items()
                if k not in ("noise_kind", "noise_matrix_sha256")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _matrix_file(tmp_path, matrix, name="m.npy"):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, np.asarray(matrix))
    else:
        np.savetxt(path, np.asarray(matrix), delimiter=",", fmt="%.3f")
    return path


@pytest.mark.parametrize("n, fraction", [(1000, 0.2), (333, 0.45), (10, 0.0), (500, 0.999)])
def test_asymmetric_flips_follow_the_map_exactly(n, fraction):
    target = asymmetric_map("mnist")  # 2->7, 3->8, 5<->6, 7->1; 0, 1, 4, 8, 9 never flip
    assert target.tolist() == [-1, -1, 7, 8, -1, 6, 5, 1, -1, -1]
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(n))
    given, flipped = flip_labels(labels, fraction, 10, 4, "asymmetric", target=target)
    mapped = torch.as_tensor(target)[labels] >= 0
    assert int(flipped.sum()) == round(fraction * int(mapped.sum()))  # Patrini's rate: P of m
    assert not flipped[~mapped].any()  # a class without a target never flips
    np.testing.assert_array_equal(given[flipped].numpy(), target[labels[flipped].numpy()])
    assert torch.equal(given[~flipped], labels[~flipped])
    assert torch.equal(flipped, given != labels)


def test_asymmetric_flips_are_seeded_and_nested():
    labels = torch.arange(2000) % 10
    target = asymmetric_map("cifar10")
    assert {c: t for c, t in enumerate(target) if t >= 0} == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    a, fa = flip_labels(labels, 0.4, 10, 7, "asymmetric", target=target)
    b, fb = flip_labels(labels, 0.4, 10, 7, "asymmetric", target=target)
    c, fc = flip_labels(labels, 0.4, 10, 8, "asymmetric", target=target)
    assert torch.equal(a, b) and torch.equal(fa, fb)  # same seed, same flips
    assert not torch.equal(fa, fc) and int(fc.sum()) == int(fa.sum()) == 400  # 0.4 * 1000
    _, small = flip_labels(labels, 0.1, 10, 7, "asymmetric", target=target)
    assert (small <= fa).all() and int(small.sum()) == 100


def test_asymmetric_fashion_maps_every_class_and_flips_what_uniform_flips():
    target = asymmetric_map("fashion-mnist", 10)
    assert (target >= 0).all() and (target != np.arange(10)).all()
    labels = torch.arange(1000) % 10
    given, flipped = flip_labels(labels, 0.2, 10, 0, "asymmetric", target=target)
    _, uniform = flip_labels(labels, 0.2, 10, 0)
    assert int(flipped.sum()) == round(0.2 * 1000)  # every class mapped: m = n
    assert torch.equal(flipped, uniform)  # one permutation: the same examples, other labels
    np.testing.assert_array_equal(given[flipped].numpy(), target[labels[flipped].numpy()])


def test_confusion_draws_follow_the_matrix():
    matrix = np.array([[0.5, 0.3, 0.2, 0.0],   # off the diagonal: 0.6 / 0.4 / 0
                       [0.1, 0.0, 0.0, 0.9],   # no diagonal: 0.1 / 0.9 as given
                       [0.25, 0.25, 0.25, 0.25],  # 1/3 to each other class
                       [0.0, 0.0, 0.8, 0.2]])  # all mass to class 2
    n = 80000
    labels = torch.arange(n) % 4
    given, flipped = flip_labels(labels, 0.5, 4, 11, "confusion", matrix=matrix)
    assert int(flipped.sum()) == n // 2 and torch.equal(flipped, given != labels)  # never same
    expected = np.array([[0, 0.6, 0.4, 0], [0.1, 0, 0, 0.9], [1 / 3, 1 / 3, 0, 1 / 3],
                         [0, 0, 1, 0]])  # by hand: the rows without their diagonal, renormalised
    np.testing.assert_allclose(off_diagonal(matrix), expected)
    for c in range(4):
        drawn = given[flipped & (labels == c)]
        counts = torch.bincount(drawn, minlength=4).numpy()
        m = counts.sum()
        assert m > 9000 and counts[c] == 0
        sigma = np.sqrt(m * expected[c] * (1 - expected[c])) + 1e-9
        assert (np.abs(counts - m * expected[c]) <= 5 * sigma).all(), (c, counts / m)
    again, _ = flip_labels(labels, 0.5, 4, 11, "confusion", matrix=matrix)
    other, _ = flip_labels(labels, 0.5, 4, 12, "confusion", matrix=matrix)
    assert torch.equal(again, given) and not torch.equal(other, given)
    small, small_flipped = flip_labels(labels, 0.2, 4, 11, "confusion", matrix=matrix)
    assert (small_flipped <= flipped).all() and torch.equal(small[small_flipped],
                                                            given[small_flipped])


def test_load_noise_matrix_accepts_npy_and_csv(tmp_path):
    m = np.full((3, 3), 1 / 3)
    np.testing.assert_allclose(load_noise_matrix(_matrix_file(tmp_path, m), 3), m)
    np.testing.assert_allclose(load_noise_matrix(_matrix_file(tmp_path, m, "m.csv")), m,
                               atol=1e-3)  # 0.333 x 3: within the tolerance


@pytest.mark.parametrize("matrix, message", [
    (np.full((3, 4), 0.25), "C x C"),
    (np.array([[0.5, np.nan], [0.5, 0.5]]), "non-finite"),
    (np.array([[1.5, -0.5], [0.5, 0.5]]), "negative"),
    (np.array([[0.2, 0.2], [0.5, 0.5]]), "row 0 sums to 0.4"),
    (np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]), "row 1 has no mass off"),
    (np.array([[3, 1], [1, 3]]), "rows must sum to 1"),  # counts, not probabilities
])
def test_load_noise_matrix_refuses(matrix, message, tmp_path):
    with pytest.raises(ValueError, match=r"--noise-matrix") as exc:
        load_noise_matrix(_matrix_file(tmp_path, matrix))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_load_noise_matrix_refuses_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--noise-matrix"):
        load_noise_matrix(tmp_path / "missing.npy")
    (tmp_path / "m.txt").write_text("0.5,0.5\n0.5,0.5\n")
    with pytest.raises(ValueError, match=r"\.npy or \.csv"):
        load_noise_matrix(tmp_path / "m.txt")
    (tmp_path / "bad.csv").write_text("a,b\n0.5,0.5\n")
    with pytest.raises(ValueError, match="cannot be read"):
        load_noise_matrix(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="is 2 x 2, the data has 10 classes"):
        load_noise_matrix(_matrix_file(tmp_path, np.full((2, 2), 0.5)), 10)


def test_noise_kind_in_the_key_only_with_noise(tmp_path):
    base = dict(subset=200, k=3)
    clean = RunConfig(**base)
    # no noise: the kind changes nothing (runs without noise keep their key)
    assert RunConfig(**base, noise_kind="asymmetric").protocol_key() == clean.protocol_key()
    noisy = {kind: RunConfig(**base, label_noise=0.2, noise_kind=kind)
             for kind in ("uniform", "asymmetric")}
    assert noisy["uniform"].protocol_key() != noisy["asymmetric"].protocol_key()
    # the uniform kind is what every earlier noisy run had: their key is unchanged
    assert noisy["uniform"].protocol_key() == _old_key(noisy["uniform"])
    assert "noise_kind" not in noisy["uniform"].key_settings()
    assert noisy["asymmetric"].key_settings()["noise_kind"] == "asymmetric"
    # confusion: the matrix enters by its content, not its path
    m = np.full((10, 10), 1 / 10)
    a, b = _matrix_file(tmp_path, m, "a.npy"), _matrix_file(tmp_path, m, "b.npy")
    m2 = m.copy()
    m2[0] = [0.0] + [1 / 9] * 9
    c = _matrix_file(tmp_path, m2, "c.npy")
    keys = [RunConfig(**base, label_noise=0.2, noise_kind="confusion", noise_matrix=p)
            .protocol_key() for p in (a, b, c)]
    assert keys[0] == keys[1] != keys[2] and keys[0] not in {cfg.protocol_key() for cfg in
                                                              noisy.values()}
    assert RunConfig(**base, noise_kind="confusion", noise_matrix=a).protocol_key() == \
        clean.protocol_key()


@pytest.mark.parametrize("args, flag", [
    (["--noise-kind", "gaussian"], "--noise-kind"),
    (["--noise-kind", "asymmetric", "--dataset", "svhn"], "--noise-kind"),
    (["--noise-kind", "asymmetric", "--dataset", "imagefolder", "--root", "x"], "--noise-kind"),
    (["--noise-kind", "confusion"], "--noise-matrix"),
    (["--noise-matrix", "m.npy"], "--noise-matrix"),
    (["--noise-kind", "confusion", "--noise-matrix", "nowhere.npy"], "--noise-matrix"),
    (["--noise-kind", "confusion", "--noise-matrix", "bad.npy"], "--noise-matrix"),
    (["--noise-kind", "confusion", "--noise-matrix", "small.npy"], "--noise-matrix"),
])
def test_cli_bad_noise_kind_or_matrix(args, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "m.npy", np.full((10, 10), 0.1))
    np.save(tmp_path / "bad.npy", np.eye(10))  # every row all diagonal
    np.save(tmp_path / "small.npy", np.full((3, 3), 1 / 3))  # fashion-mnist has 10 classes
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    assert main(["run", "--label-noise", "0.2", *args, "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert flag in line
    if "svhn" in args:
        assert "cifar10, fashion-mnist, mnist" in line and "uniform" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@needs_fmnist
def test_run_data_and_record_of_each_kind(tmp_path):
    from pdepth.data import load_subset
    from pdepth.protocol.runner import _config_record, load_run_data

    _, original, _ = load_subset("fashion-mnist", None, 300, 0)
    np.save(tmp_path / "m.npy", np.full((10, 10), 0.1))
    settings = {"uniform": {}, "asymmetric": {},
                "confusion": {"noise_matrix": str(tmp_path / "m.npy")}}
    for kind, extra in settings.items():
        cfg = RunConfig(subset=300, label_noise=0.3, k=3, noise_kind=kind, **extra)
        data = load_run_data(cfg, False)
        assert torch.equal(data.original_labels, original)
        assert int(data.label_flipped.sum()) == 90
        record = _config_record(cfg, data)["resolved"]["label_noise"]
        assert record["kind"] == kind and record["flipped"] == 90
        if kind == "asymmetric":
            target = asymmetric_map("fashion-mnist")
            np.testing.assert_array_equal(data.labels[data.label_flipped].numpy(),
                                          target[original[data.label_flipped].numpy()])
            assert record["map"] == {str(c): int(t) for c, t in enumerate(target)}
        if kind == "confusion":
            assert record["matrix_sha256"] == cfg.noise_matrix_sha256
        assert cfg.to_dict()["noise_kind"] == kind


def test_noisy_run_folder_of_earlier_versions_resumes(tmp_path):
    from pdepth.protocol.errors import OutputExistsError
    from pdepth.protocol.outdir import MARKER, prepare_output

    uniform = RunConfig(subset=200, k=3, label_noise=0.2)
    out = tmp_path / "run"
    prepare_output(out, uniform, False, data_sha256="a" * 64)
    (out / "models" / "seed0-half0.npz").write_text("a model")
    marker = json.loads((out / MARKER).read_text())
    marker["protocol_key"] = _old_key(uniform)  # as pdepth wrote it before --noise-kind
    marker["settings"] = {k: v for k, v in marker["settings"].items() if k != "noise_kind"}
    (out / MARKER).write_text(json.dumps(marker))
    assert prepare_output(out, uniform, False, data_sha256="a" * 64) == 1  # resumed
    other = RunConfig(subset=200, k=3, label_noise=0.2, noise_kind="asymmetric")
    with pytest.raises(OutputExistsError, match=r'--noise-kind: "asymmetric" here, unset in'):
        prepare_output(out, other, False, data_sha256="a" * 64)


def _synthetic_run(folder):
    """A per_model.npz of 2 models over 40 examples of 10 classes whose held-out predictions
    are known: examples 0-9 predicted as class y+1, 10-19 as y+2, 20-39 right; the training
    models predict the label (they must not count)."""
    folder.mkdir()
    labels = np.arange(40) % 10
    held_pred = labels.copy()
    held_pred[:10], held_pred[10:20] = (labels[:10] + 1) % 10, (labels[10:20] + 2) % 10
    in_train = np.stack([np.arange(40) % 2 == 0, np.arange(40) % 2 == 1])
    probs = np.full((2, 40, 10), 0.01, np.float32)
    for r in range(2):
        pred = np.where(in_train[r], labels, held_pred)
        probs[r, np.arange(40), pred] = 0.91
    np.savez(folder / "per_model.npz", probs=probs, in_train=in_train, labels=labels,
             original_labels=labels)
    return folder


def test_heldout_matrix_is_the_held_out_confusion(tmp_path):
    from pdepth.protocol.noise import heldout_matrix

    run = _synthetic_run(tmp_path / "run")
    expected = np.zeros((10, 10))
    for y in range(10):  # by hand: 4 examples per class, one to y+1, one to y+2, two right
        expected[y, y], expected[y, (y + 1) % 10], expected[y, (y + 2) % 10] = 0.5, 0.25, 0.25
    np.testing.assert_allclose(heldout_matrix(run), expected)
    cfg = RunConfig(subset=200, label_noise=0.2, noise_kind="confusion",
                    noise_matrix=f"heldout:{run}")
    np.save(tmp_path / "m.npy", expected)
    as_file = RunConfig(subset=200, label_noise=0.2, noise_kind="confusion",
                        noise_matrix=tmp_path / "m.npy")
    assert cfg.noise_matrix_sha256 and cfg.protocol_key() != RunConfig(
        subset=200, label_noise=0.2).protocol_key()
    assert as_file.noise_matrix_sha256 != cfg.noise_matrix_sha256  # file bytes vs matrix bytes
    with pytest.raises(FileNotFoundError, match=r"\(--noise-matrix\) heldout:"):
        heldout_matrix(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="the run has 10 classes, the data has 3"):
        heldout_matrix(run, 3)
    right = _synthetic_run(tmp_path / "right")
    with np.load(right / "per_model.npz") as z:
        arrays = dict(z)
    arrays["probs"][:, :, :] = 0.01
    arrays["probs"][:, np.arange(40), arrays["labels"]] = 0.91  # never wrong
    np.savez(right / "per_model.npz", **arrays)
    with pytest.raises(ValueError, match="row 0 has no mass off the diagonal"):
        heldout_matrix(right)
