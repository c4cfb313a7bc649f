"""Helpers shared by the tests of the protocol, its metrics, the CLI and the report
(imported by the test modules; the fixture ``tiny_run`` is in conftest.py).

- Fashion-MNIST: :data:`HAVE_FMNIST`, :data:`needs_fmnist` (real runs need the Debian
  package; tests never download it) and :data:`TINY`, the settings of the smallest real run.
- Synthetic runs: :func:`ensemble` builds per-model arrays with a known outcome (one
  flipped label among easy examples); :func:`write_synthetic_run` writes a finished run
  directory from them without training anything, in the layout of docs/protocol.md.
- Checks: :func:`one_error_line` (the CLI's error contract), :func:`tree` (every file and
  its modification time), :func:`copy_run`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import pdepth
from pdepth.data import FASHION_MNIST_ROOT

HAVE_FMNIST = os.path.exists(os.path.join(FASHION_MNIST_ROOT, "train-labels-idx1-ubyte.gz"))
FMNIST_MISSING = (f"Fashion-MNIST not installed at {FASHION_MNIST_ROOT} "
                  "(apt-get install dataset-fashion-mnist; CI installs it)")
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason=FMNIST_MISSING)

# The smallest real run: 200 images, 1 epoch, 2 seeds x 2 halves.
TINY = ["--subset", "200", "--epochs", "1", "--k", "3", "--seeds", "2", "--quiet"]

NUM_PROBES = 6  # probes of the synthetic ensemble


def real_run(tmp_path_factory, name: str, args) -> Path:
    """A real run (``pdepth run *args``) in a fresh temporary directory; skips the test
    where Fashion-MNIST is not installed."""
    from pdepth.cli import main

    if not HAVE_FMNIST:
        pytest.skip(FMNIST_MISSING)
    out = tmp_path_factory.mktemp(name) / "run"
    assert main(["run", *args, "--out", str(out)]) == 0
    return out


def tiny_noisy_run(tmp_path_factory, name: str, noise: float) -> Path:
    """A tiny real run (:data:`TINY`) with ``--label-noise noise`` (:func:`real_run`)."""
    return real_run(tmp_path_factory, name, [*TINY, "--label-noise", str(noise)])


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of the run directory ``run`` (tests change copies, never a shared run)."""
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def one_error_line(capsys) -> str:
    """stderr, checked to be the CLI's one line ``pdepth: error: ...``."""
    err = capsys.readouterr().err
    assert err.startswith("pdepth: error: ") and err.count("\n") == 1, err
    return err


def tree(path) -> dict:
    """Every file under ``path``: its content and modification time."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def ensemble(n=6, flipped=0, true_class=5, given=3):
    """Per-model arrays for R=4 models (2 seeds x 2 halves) over n examples, where example
    ``flipped`` has the given label 3 but looks like class 5 (its true class).

    Returns ``(depth [R, n], in_train [R, n], probs [R, n, 10], layer_pred [R, L, n],
    epoch_pred [R, E+1, n], labels [n])`` with L = :data:`NUM_PROBES` and E = 4."""
    r_models, num_classes, epochs = 4, 10, 4
    labels = np.arange(n) % num_classes
    labels[flipped] = given
    in_train = np.zeros((r_models, n), bool)
    in_train[0, ::2] = in_train[1, 1::2] = True
    in_train[2, :n // 2] = in_train[3, n // 2:] = True
    probs = np.full((r_models, n, num_classes), 0.01)
    layer_pred = np.repeat(labels[None, None, :], NUM_PROBES, 1).repeat(r_models, 0)
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


def write_synthetic_run(out: Path, n: int = 40) -> Path:
    """A finished run directory built from :func:`ensemble` (no training; example 0's label
    flipped from 5 to 3): the files ``pdepth report`` reads (results.parquet, per_model.npz,
    data.npz, config.json, summary.json) and COMPLETE, with the per-example table, the
    label-error evidence and the summary from the protocol's own functions; the probes' votes
    (``knn_vote_share``) follow ``layer_pred`` and the per-epoch probe accuracy rises later
    for later probes."""
    from pdepth.label_errors import label_error_evidence
    from pdepth.metrics import summarize
    from pdepth.summary import claims_summary

    depth, in_train, probs, layer_pred, epoch_pred, labels = ensemble(n)
    original = labels.copy()
    original[0] = 5
    r_models, epochs = depth.shape[0], epoch_pred.shape[1] - 1
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, labels,
                   original_labels=original)
    df["category"] = pdepth.categorize(df, NUM_PROBES)
    for name, value in label_error_evidence(probs, in_train, layer_pred, labels, 10).items():
        df[name] = value
    df.insert(0, "dataset_index", np.arange(n))
    out.mkdir(parents=True)
    df.to_parquet(out / "results.parquet")
    curve = np.linspace(1.0, 0.2, epochs)[None].repeat(r_models, 0)
    pred = probs.argmax(2)[:, None, :]
    votes = np.stack([layer_pred == labels, layer_pred == pred,
                      (layer_pred != labels) & (layer_pred != pred)], -1).astype(np.float32)
    rise = np.clip(np.arange(epochs + 1)[:, None] / (1 + np.arange(NUM_PROBES)), 0, 1)
    arrays = dict(
        depth=depth, in_train=in_train, probs=probs.astype(np.float32),
        layer_pred=layer_pred.astype(np.int16), epoch_pred=epoch_pred.astype(np.int16),
        seeds=np.array([0, 0, 1, 1]), halves=np.array([0, 1, 0, 1]), labels=labels,
        original_labels=original, dataset_index=np.arange(n),
        layer_names=np.array(["input", "block1", "block2", "block3", "fc", "softmax"]),
        loss=curve, train_accuracy=1 - curve / 2, held_out_accuracy=1 - curve,
        knn_vote_share=votes, probe_accuracy_epochs=np.repeat(0.5 + rise[None] / 2, 4, 0))
    np.savez_compressed(out / "per_model.npz", **arrays)
    (out / "summary.json").write_text(json.dumps(claims_summary(df, arrays)))
    rng = np.random.default_rng(0)
    np.savez_compressed(out / "data.npz", images=rng.integers(0, 256, (n, 28, 28), np.uint8),
                        labels=labels, dataset_index=np.arange(n))
    cfg = {"status": "complete",
           "config": {"arch": "cnn", "dataset": "fashion-mnist", "k": 3, "seeds": [0, 1]},
           "resolved": {"num_classes": 10, "num_layers": NUM_PROBES, "num_models": r_models,
                        "probe_dims": [784, 64, 64, 64, 32, 10]},
           "versions": {"pdepth": pdepth.__version__}}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "COMPLETE").write_text("synthetic\n")
    return out
