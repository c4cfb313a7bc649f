"""`pdepth improve RUN_DIR` (pdepth.improve): the training sets of the variants equal the run's
flags, every variant trains the same way, the test split is only evaluated on, improve.json's
fields, precision / recall of the flags, the cleanlab variant (run, disabled, missing) and the
CLI's one-line errors. The label-error columns themselves (their rule) are tested with the
protocol (tests/test_protocol*.py); the CLI's other subcommands in tests/test_cli.py.

The runs here are built by :func:`write_noisy_run` (real Fashion-MNIST training images, known
flips, hand-set flags, synthetic model probabilities; no k-NN): improve() trains for real, on a
few hundred examples with the MLP for one epoch.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import copy_run, needs_fmnist, one_error_line

import pdepth.improve as improve_mod
import pdepth.protocol.train as train_mod
from pdepth.cli import main
from pdepth.data import (
    DATASETS,
    FASHION_MNIST_ROOT,
    dataset_info,
    load_fashion_mnist,
    normalize_images,
)
from pdepth.improve import flag_metrics, heldout_probs, improve, load_run, plan_variants

N = 300


def write_noisy_run(out: Path, n: int = N, *, noise_info: bool = True) -> Path:
    """A finished run directory over ``n`` random Fashion-MNIST training images: every 5th
    label flipped (``(original + 3) % 10``); flags on the first half of the flips and on every
    11th unflipped example; held-out models put 0.6 on the original label, training models 0.9
    on the given one. Arch mlp, 1 epoch, 2 seeds x 2 halves. ``noise_info=False`` leaves out
    ``original_label`` / ``label_flipped`` (a run without label noise information)."""
    from pdepth.protocol import split_halves

    images, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "train")
    index = np.sort(np.random.default_rng(0).choice(labels.shape[0], n, replace=False))
    original = labels.numpy()[index]
    rows = np.arange(n)
    flipped = rows % 5 == 0
    given = np.where(flipped, (original + 3) % 10, original)
    flip_rows = rows[flipped]
    flags = np.zeros(n, bool)
    flags[flip_rows[: len(flip_rows) // 2]] = True
    flags[(rows % 11 == 0) & ~flipped] = True
    suggested = np.where(flags, np.where(flipped, original, (given + 1) % 10), given)
    in_train = np.zeros((4, n), bool)
    for s in (0, 1):
        halves = split_halves(n, s)
        in_train[2 * s, halves[0]] = in_train[2 * s + 1, halves[1]] = True
    probs = np.full((4, n, 10), 0.0)
    for m in range(4):
        tr = in_train[m]
        probs[m, tr, :] = 0.1 / 9
        probs[m, tr, given[tr]] = 0.9
        probs[m, ~tr, :] = 0.4 / 9
        probs[m, ~tr, original[~tr]] = 0.6
    import pandas as pd

    df = pd.DataFrame({"dataset_index": index, "label": given})
    if noise_info:
        df["original_label"] = original
        df["label_flipped"] = flipped
    df["label_error"] = flags
    df["label_error_score"] = flags.astype(float)
    df["suggested_label"] = suggested
    out.mkdir(parents=True)
    df.to_parquet(out / "results.parquet")
    np.savez_compressed(out / "per_model.npz", probs=probs.astype(np.float32),
                        in_train=in_train, labels=given, original_labels=original,
                        dataset_index=index)
    np.savez_compressed(out / "data.npz", images=images.numpy()[index], labels=given,
                        dataset_index=index)
    cfg = {"status": "complete",
           "config": {"dataset": "fashion-mnist", "root": None, "arch": "mlp", "epochs": 1,
                      "seeds": [0, 1], "batch_size": 64, "lr": 2e-3, "weight_decay": 0.0,
                      "eval_batch_size": 1000, "subset": n,
                      "label_noise": 0.2 if noise_info else 0.0},
           "resolved": {"num_classes": 10, "num_examples": n}}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "COMPLETE").write_text("synthetic\n")
    return out


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    return write_noisy_run(tmp_path_factory.mktemp("improve") / "run")


@pytest.fixture
def captured(monkeypatch):
    """Every call of the protocol's train_model during the test: the model's initial weights,
    its inputs, labels and training rows (the real function then runs)."""
    calls = []
    real = train_mod.train_model

    def spy(model, x, y, train_index, *args, **kwargs):
        calls.append({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                      "x": x[torch.as_tensor(train_index)].clone(),
                      "y": torch.as_tensor(y)[torch.as_tensor(train_index)].clone()})
        return real(model, x, y, train_index, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_model", spy)
    return calls


# --- the pieces, without training -----------------------------------------------------------

def test_flag_metrics_hand_built():
    flags = np.array([1, 1, 0, 0, 1, 0], bool)
    flipped = np.array([1, 0, 1, 0, 1, 0], bool)
    m = flag_metrics(flags, flipped)
    assert m == {"flagged": 3, "flipped": 3, "true_flags": 2, "precision": pytest.approx(2 / 3),
                 "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}
    m = flag_metrics(np.array([1, 0, 0, 0], bool), np.array([1, 1, 1, 1], bool))
    assert (m["precision"], m["recall"]) == (1.0, 0.25)
    assert m["f1"] == pytest.approx(2 * 0.25 / 1.25)
    assert flag_metrics(np.zeros(4, bool), np.ones(4, bool))["precision"] is None
    # no label flipped (a run without noise): nothing to find, so no precision either
    assert flag_metrics(np.ones(4, bool), np.zeros(4, bool)) == {
        "flagged": 4, "flipped": 0, "true_flags": 0, "precision": None, "recall": None,
        "f1": None}
    assert flag_metrics(np.array([1, 0], bool), np.array([0, 1], bool))["f1"] == 0.0
    assert flag_metrics(np.ones(3, bool), None) == {"flagged": 3}  # no noise info


def test_heldout_probs_mean_over_models_that_held_it_out():
    probs = np.zeros((3, 2, 2))
    probs[:, 0] = [[1, 0], [0, 1], [0.5, 0.5]]
    probs[:, 1] = [[0.2, 0.8], [0.4, 0.6], [1, 0]]
    in_train = np.array([[0, 1], [1, 0], [0, 0]], bool)
    p = heldout_probs(probs, in_train)
    np.testing.assert_allclose(p, [[0.75, 0.25], [0.7, 0.3]])  # models 0, 2 | 1, 2
    with pytest.raises(ValueError, match="held out by no model"):
        heldout_probs(probs, np.array([[1, 0], [1, 0], [1, 0]], bool))


@needs_fmnist
def test_variants_equal_the_flags(noisy_run):
    run = load_run(noisy_run)
    variants, skipped = plan_variants(run, cleanlab=False)
    y, flags = run.labels, run.label_error
    assert flags.any() and (~flags).any()
    base = variants["baseline"]
    assert np.array_equal(base.index, np.arange(run.n)) and np.array_equal(base.labels, y)
    assert base.flags is None
    rem = variants["pdepth_remove"]  # the rows with label_error removed, nothing else
    assert np.array_equal(rem.index, np.flatnonzero(~flags))
    assert np.array_equal(rem.labels, y[~flags]) and np.array_equal(rem.flags, flags)
    rel = variants["pdepth_relabel"]  # every row; the flagged ones take suggested_label
    assert np.array_equal(rel.index, np.arange(run.n))
    assert np.array_equal(rel.labels[flags], run.suggested_label[flags])
    assert np.array_equal(rel.labels[~flags], y[~flags])
    assert set(skipped) == {"cleanlab_remove"} and "disabled" in skipped["cleanlab_remove"]
    assert "cleanlab_remove" not in variants


@needs_fmnist
def test_cleanlab_variant_is_find_label_issues_on_heldout_probs(noisy_run):
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    run = load_run(noisy_run)
    variants, skipped = plan_variants(run)
    assert not skipped
    expected = cleanlab_filter.find_label_issues(
        labels=run.labels, pred_probs=heldout_probs(run.probs, run.in_train), n_jobs=1)
    v = variants["cleanlab_remove"]
    assert np.array_equal(v.flags, expected)
    assert np.array_equal(v.index, np.flatnonzero(~expected))
    assert np.array_equal(v.labels, run.labels[~expected])


@needs_fmnist
def test_cleanlab_missing_is_skipped_with_reason(noisy_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab -> ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    variants, skipped = plan_variants(load_run(noisy_run))
    assert "cleanlab_remove" not in variants
    assert "not installed" in skipped["cleanlab_remove"]
    assert "pdepth[label-errors]" in skipped["cleanlab_remove"]


# --- improve(): training for real -----------------------------------------------------------

@needs_fmnist
def test_improve_trains_on_the_flags_and_writes_improve_json(noisy_run, tmp_path, captured,
                                                             monkeypatch):
    run_dir = copy_run(noisy_run, tmp_path)
    events = []
    info = dataset_info("fashion-mnist")
    real_load, real_plan = info.load, improve_mod.plan_variants

    def load(root, split):
        events.append(f"load {split}")
        return real_load(root, split)

    def plan(*args, **kwargs):
        events.append("plan")
        return real_plan(*args, **kwargs)

    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(info, load=load))
    monkeypatch.setattr(improve_mod, "plan_variants", plan)
    lines = []
    res = improve(run_dir, progress=False, cleanlab=False, log=lines.append)

    # The test split is read once, after every training set is fixed, and only evaluated on.
    assert events == ["load train", "plan", "load test"]
    run = load_run(run_dir)
    x_all = normalize_images(torch.from_numpy(np.load(run_dir / "data.npz")["images"]))
    flags, y = run.label_error, torch.as_tensor(run.labels)
    expected = {  # name -> (rows of the run's examples, labels)
        "baseline": (np.arange(run.n), y),
        "pdepth_remove": (np.flatnonzero(~flags), y[~flags]),
        "pdepth_relabel": (np.arange(run.n),
                           torch.where(torch.as_tensor(flags),
                                       torch.as_tensor(run.suggested_label), y)),
    }
    assert len(captured) == 3
    for call, (name, (rows, labels)) in zip(captured, expected.items(), strict=True):
        assert torch.equal(call["x"], x_all[rows]), name  # exactly the run's examples
        assert torch.equal(call["y"], labels), name
        assert res[name]["train_examples"] == len(rows)
    for call in captured[1:]:  # one seed: the same initial weights for every variant
        assert all(torch.equal(call["state"][k], v) for k, v in captured[0]["state"].items())

    on_disk = json.loads((run_dir / "improve.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert list(on_disk)[:4] == ["baseline", "pdepth_remove", "pdepth_relabel",
                                 "cleanlab_remove"]
    for name in expected:
        assert 0.0 <= on_disk[name]["test_accuracy"] <= 1.0
    assert on_disk["cleanlab_remove"] == {"skipped": True,
                                          "reason": "disabled (--no-cleanlab / cleanlab=False)"}
    want = flag_metrics(flags, run.label_flipped)
    for name in ("pdepth_remove", "pdepth_relabel"):
        for key in ("flagged", "precision", "recall", "f1"):
            assert on_disk[name][key] == pytest.approx(want[key]), (name, key)
    # the hand-set flags: half of the 60 flips and the 22 unflipped multiples of 11
    assert want["flagged"] == 30 + 22 and want["recall"] == 0.5
    assert want["precision"] == pytest.approx(30 / 52)
    assert on_disk["pdepth_relabel"]["relabelled"] == int(flags.sum())
    assert "flagged" not in on_disk["baseline"]
    s = on_disk["settings"]
    assert (s["epochs"], s["seed"], s["device"], s["arch"]) == (1, 0, "cpu", "mlp")
    assert s["command"].startswith("pdepth improve ")
    assert on_disk["test_split"]["examples"] == 10_000 and on_disk["noise_known"] is True
    assert len(lines) == 3 and not list(run_dir.glob(".*tmp*"))


@needs_fmnist
def test_improve_cli_with_cleanlab(noisy_run, tmp_path, capsys):
    pytest.importorskip("cleanlab")
    run_dir = copy_run(noisy_run, tmp_path)
    assert main(["improve", str(run_dir), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "improve.json")
    res = json.loads((run_dir / "improve.json").read_text())
    cl = res["cleanlab_remove"]
    assert "skipped" not in cl and 0.0 <= cl["test_accuracy"] <= 1.0
    assert cl["train_examples"] == N - cl["flagged"]
    run = load_run(run_dir)
    variants, _ = plan_variants(run)
    assert cl == {**cl, **flag_metrics(variants["cleanlab_remove"].flags, run.label_flipped)}
    assert res["settings"]["command"] == f"pdepth improve {run_dir} --quiet"
    assert res["settings"]["cleanlab"]


@needs_fmnist
def test_improve_without_noise_info_or_cleanlab(tmp_path, monkeypatch, capsys):
    """A run without original_label / label_flipped: counts, no precision / recall; cleanlab
    missing: skipped with the reason, and a message even with --quiet. Two training seeds:
    the accuracy is their mean."""
    run_dir = write_noisy_run(tmp_path / "run", n=120, noise_info=False)
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    assert main(["improve", str(run_dir), "--seeds", "0,3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "cleanlab_remove skipped" in err and "not installed" in err
    res = json.loads((run_dir / "improve.json").read_text())
    assert res["noise_known"] is False
    assert res["cleanlab_remove"]["skipped"] is True
    assert "not installed" in res["cleanlab_remove"]["reason"]
    assert set(res["pdepth_remove"]) >= {"flagged", "test_accuracy", "train_examples"}
    assert "precision" not in res["pdepth_remove"] and "recall" not in res["pdepth_relabel"]
    assert res["settings"]["seeds"] == [0, 3]
    for name in ("baseline", "pdepth_remove", "pdepth_relabel"):
        per_seed = res[name]["test_accuracy_per_seed"]
        assert len(per_seed) == 2
        assert res[name]["test_accuracy"] == pytest.approx(np.mean(per_seed))
        assert res[name]["test_accuracy_std"] == pytest.approx(np.std(per_seed, ddof=1))


# --- bad run directories --------------------------------------------------------------------

def test_cli_improve_missing_dir(tmp_path, capsys):
    assert main(["improve", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in one_error_line(capsys)


@pytest.mark.parametrize("drop", ["results.parquet", "per_model.npz", "config.json",
                                  "COMPLETE"])
def test_cli_improve_incomplete_run(drop, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("results.parquet", "per_model.npz", "config.json", "COMPLETE"):
        if name != drop:
            (run_dir / name).write_text("x")
    assert main(["improve", str(run_dir), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "no finished pdepth run" in err and drop in err
    assert not (run_dir / "improve.json").exists()


@needs_fmnist
def test_cli_improve_run_without_label_error_columns(noisy_run, tmp_path, capsys):
    import pandas as pd

    run_dir = copy_run(noisy_run, tmp_path)
    df = pd.read_parquet(run_dir / "results.parquet")
    df.drop(columns=["label_error", "suggested_label"]).to_parquet(run_dir / "results.parquet")
    assert main(["improve", str(run_dir), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "label_error" in err and "suggested_label" in err
    assert not (run_dir / "improve.json").exists()


@needs_fmnist
def test_improve_refuses_images_not_from_the_training_split(noisy_run, tmp_path):
    run_dir = copy_run(noisy_run, tmp_path)
    with np.load(run_dir / "data.npz") as z:
        arrays = dict(z)
    arrays["images"] = 255 - arrays["images"]
    np.savez_compressed(run_dir / "data.npz", **arrays)
    with pytest.raises(ValueError, match="not the training split's images"):
        improve(run_dir, progress=False, cleanlab=False, log=None)
    assert not (run_dir / "improve.json").exists()


@needs_fmnist
@pytest.mark.parametrize("option", [["--epochs", "0"], ["--device", "bogus"]])
def test_cli_improve_bad_option(option, noisy_run, capsys):
    assert main(["improve", str(noisy_run), *option, "--quiet"]) == 2
    assert option[0] in one_error_line(capsys)
    assert not (noisy_run / "improve.json").exists()  # refused before anything is written


@pytest.mark.slow
def test_improve_on_a_real_run(tiny_run, tmp_path):
    """End to end on a real `pdepth run` (conftest's tiny run): skipped until `pdepth run`
    writes the label-error columns."""
    import pandas as pd

    if not {"label_error", "suggested_label"} <= set(
            pd.read_parquet(tiny_run / "results.parquet").columns):
        pytest.skip("this `pdepth run` writes no label_error / suggested_label columns")
    run_dir = copy_run(tiny_run, tmp_path)
    assert main(["improve", str(run_dir), "--no-cleanlab", "--quiet"]) == 0
    res = json.loads((run_dir / "improve.json").read_text())
    run = load_run(run_dir)
    assert res["baseline"]["train_examples"] == run.n
    assert res["pdepth_remove"]["train_examples"] == run.n - int(run.label_error.sum())
    assert res["pdepth_remove"]["flagged"] == int(run.label_error.sum())
    assert res["cleanlab_remove"]["skipped"] is True
    # the run's report was redrawn with the accuracies
    page = (run_dir / "report.html").read_text()
    assert f"<td>baseline</td><td>{res['baseline']['test_accuracy']:.4f}</td>" in page
    # a run without --label-noise flipped nothing: no precision / recall, "no flips"
    assert res["noise_known"] is True and res["pdepth_remove"]["flipped"] == 0
    assert [res["pdepth_remove"][k] for k in ("precision", "recall", "f1")] == [None] * 3
    assert "<td>no flips</td><td>no flips</td><td>no flips</td>" in page


# --- a run folder is data: no code named in it runs (issue 23, item 12) ---------------------

EVIL = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("imported")


def build(**kwargs):
    pathlib.Path(__file__).with_name("RAN").write_text("called")
"""

USER_NET = """
from torch import nn

CALLS = []


def build(num_classes, in_channels, image_size):
    CALLS.append(num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))
"""


def _set_config(run_dir: Path, **changes) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["config"].update(changes)
    (run_dir / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test on any call of the protocol's train_model: refused before training."""
    def trained(*args, **kwargs):
        raise AssertionError("improve trained a model before refusing its input")

    monkeypatch.setattr(train_mod, "train_model", trained)


# improve()'s arguments but the folder and progress, for its body without the folder check
_DEFAULTS = dict(epochs=None, device="cpu", cleanlab=True, seeds=(0,), log=None, command=None,
                 model=None)


@needs_fmnist
def test_improve_never_imports_a_module_of_the_run_folder(noisy_run, tmp_path, monkeypatch,
                                                          capsys, no_training):
    """`cd RUN && pdepth improve .` with config.json naming a nets.py shipped in the run
    folder (found through sys.path's '' / the current directory): refused without importing
    it, whether --model names it or not."""
    run_dir = copy_run(noisy_run, tmp_path)
    (run_dir / "evilnets.py").write_text(EVIL)
    _set_config(run_dir, arch=None, model="evilnets:build")
    monkeypatch.chdir(run_dir)
    monkeypatch.syspath_prepend("")
    monkeypatch.delitem(sys.modules, "evilnets", raising=False)
    for extra in ([], ["--model", "evilnets:build"]):  # the CLI: a foreign file in the folder
        assert main(["improve", ".", *extra, "--quiet"]) == 2
        assert "evilnets.py" in one_error_line(capsys)
    # improve()'s body itself, the folder check aside: not named, then named but inside the folder
    with pytest.raises(ValueError, match="pass --model evilnets:build"):
        improve_mod._improve(".", progress=False, **_DEFAULTS)
    with pytest.raises(ValueError, match="evilnets.py, inside the run folder"):
        improve_mod._improve(".", progress=False, **{**_DEFAULTS, "model": "evilnets:build"})
    assert not (run_dir / "RAN").exists() and "evilnets" not in sys.modules
    assert not (run_dir / "improve.json").exists()


@needs_fmnist
def test_improve_calls_no_factory_the_config_names(noisy_run, tmp_path, monkeypatch, capsys,
                                                  no_training):
    """config.json's model set to os:abort: refused (never called) without --model, and a
    --model other than the recorded one is refused naming both."""
    calls = []
    monkeypatch.setattr("os.abort", lambda *a: calls.append(a))
    run_dir = copy_run(noisy_run, tmp_path)
    _set_config(run_dir, arch=None, model="os:abort")
    assert main(["improve", str(run_dir), "--quiet"]) == 2
    assert "pass --model os:abort" in one_error_line(capsys)
    assert main(["improve", str(run_dir), "--model", "mynets:build", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "--model mynets:build is not the run's network" in err and "os:abort" in err
    assert not calls and not (run_dir / "improve.json").exists()


@needs_fmnist
@pytest.mark.parametrize("changes, args, message", [
    ({"arch": "os"}, [], "arch 'os' is not one of pdepth's architectures"),
    ({"arch": ["cnn"]}, [], "arch ['cnn'] is not one of"),
    ({}, ["--model", "os:abort"], "was made with --arch mlp, not a --model"),
    ({"dataset": "../../etc"}, [], "dataset '../../etc' is not one of"),
    ({"root": {"path": "/"}}, [], "root {'path': '/'} is not a folder path"),
    ({"batch_size": -1}, [], "batch_size -1 is not an integer >= 1"),
    ({"lr": "nan"}, [], "lr 'nan' is not a finite number > 0"),
    ({"weight_decay": -0.5}, [], "weight_decay -0.5 is not a finite number >= 0"),
    ({"epochs": "6"}, [], "epochs must be >= 1, got '6'"),
    ({"workers": -2}, [], "workers -2 is not an integer >= 0"),
])
def test_improve_checks_what_config_json_selects(changes, args, message, noisy_run, tmp_path,
                                                 capsys, no_training):
    run_dir = copy_run(noisy_run, tmp_path)
    _set_config(run_dir, **changes)
    assert main(["improve", str(run_dir), *args, "--quiet"]) == 2
    err = one_error_line(capsys)
    assert message in err and ("config.json" in err or "--model" in err), err
    assert not (run_dir / "improve.json").exists()


@needs_fmnist
def test_improve_with_the_users_model_named_again(tmp_path, monkeypatch):
    """A run of the user's --model: improve trains that network when --model names it
    again (a module outside the run folder) and records it."""
    (tmp_path / "improve_usernet.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "improve_usernet", raising=False)
    run_dir = write_noisy_run(tmp_path / "run", n=120)
    _set_config(run_dir, arch=None, model="improve_usernet:build")
    res = improve(run_dir, progress=False, cleanlab=False, log=None,
                  model="improve_usernet:build")
    import improve_usernet

    assert improve_usernet.CALLS == [10, 10, 10]  # one network per variant
    assert res["settings"]["model"] == "improve_usernet:build"
    assert res["settings"]["arch"] is None and 0 <= res["baseline"]["test_accuracy"] <= 1
    sys.modules.pop("improve_usernet", None)


# --- edited results.parquet / per_model.npz: refused before any training (item 15) -----------

def _edit_table(run_dir: Path, column: str, edit) -> None:
    import pandas as pd

    df = pd.read_parquet(run_dir / "results.parquet")
    df[column] = edit(df[column])
    df.to_parquet(run_dir / "results.parquet")


@needs_fmnist
@pytest.mark.parametrize("column, edit, message", [
    ("suggested_label", lambda c: c.where(c.index != 0, -1), "must hold values 0..9, got -1"),
    ("suggested_label", lambda c: c.where(c.index != 7, 10), "must hold values 0..9, got 10"),
    ("suggested_label", lambda c: c.astype(float).where(c.index != 3, np.nan),
     "must hold integers, got float64"),
    ("label", lambda c: c + 10, "must hold values 0..9, got 1"),
    ("label_error", lambda c: c.where(c.index > 0, True) | True, "flags every one of the 300"),
    ("label_error", lambda c: c.astype(object).where(c.index != 5, None),
     "must hold booleans, got object"),
    ("label_flipped", lambda c: c.astype(str), "must hold booleans"),
    ("dataset_index", lambda c: c.where(c.index != 1, c[0]), "must hold distinct"),
])
def test_improve_checks_results_parquet_before_training(column, edit, message, noisy_run,
                                                        tmp_path, capsys, no_training):
    run_dir = copy_run(noisy_run, tmp_path)
    _edit_table(run_dir, column, edit)
    assert main(["improve", str(run_dir), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "results.parquet: column " + column in err and message in err, err
    assert not (run_dir / "improve.json").exists()


@needs_fmnist
def test_improve_checks_per_model_npz_before_training(noisy_run, tmp_path, capsys,
                                                      no_training):
    run_dir = copy_run(noisy_run, tmp_path)
    with np.load(run_dir / "per_model.npz") as z:
        arrays = dict(z)
    arrays["probs"][0, 0, 0] = np.nan
    np.savez_compressed(run_dir / "per_model.npz", **arrays)
    assert main(["improve", str(run_dir), "--quiet"]) == 2
    assert "per_model.npz: probs must be finite" in one_error_line(capsys)


@needs_fmnist
def test_cleanlab_flagging_everything_is_skipped(noisy_run, monkeypatch):
    monkeypatch.setattr(improve_mod, "cleanlab_flags", lambda y, p: np.ones(len(y), bool))
    variants, skipped = plan_variants(load_run(noisy_run))
    assert "cleanlab_remove" not in variants
    assert skipped["cleanlab_remove"] == "cleanlab flagged every example"


@needs_fmnist
def test_improve_api_applies_the_run_folder_rules(noisy_run, tmp_path, no_training):
    """improve() called from Python checks the folder as the CLI does (a file pdepth did not
    write, a linked figures/) before any work."""
    from pdepth.protocol import OutputExistsError

    run_dir = copy_run(noisy_run, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        improve(run_dir, progress=False, log=None)
    (run_dir / "notes.txt").unlink()
    target = tmp_path / "elsewhere"
    target.mkdir()
    shutil.rmtree(run_dir / "figures", ignore_errors=True)
    (run_dir / "figures").symlink_to(target)
    with pytest.raises(OutputExistsError, match="figures"):
        improve(run_dir, progress=False, log=None)
    assert not (run_dir / "improve.json").exists()
