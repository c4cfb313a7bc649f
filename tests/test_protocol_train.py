"""pdepth.protocol.train (with its per-epoch probe snapshot, pdepth.protocol.convergence, and
its per-epoch difficulty-score record), the early k check and the training cache's check of
pdepth.protocol.model_run, and the score columns of a real run (pdepth.scores)."""

import json
import math

import numpy as np
import pytest
import torch
from run_helpers import one_error_line, real_run

from pdepth import models, reference, scores
from pdepth.metrics import convergence_epoch
from pdepth.probes import extract, resolve_probes
from pdepth.protocol.config import RunConfig
from pdepth.protocol.convergence import ProbeCurve, probe_curve_sample
from pdepth.protocol.model_run import _saved_training, check_support
from pdepth.protocol.scoring import ModelCache
from pdepth.protocol.train import EPOCH_SCORES, TrainOptions, train_model


def _tiny():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 4, 4)
    y = torch.randint(0, 3, (40,))
    return x, y


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_options_and_keywords_train_the_same():
    x, y = _tiny()
    idx = torch.arange(20)
    a_pred, a_hist = train_model(_model(), x, y, idx, epochs=2, lr=1e-2, batch_size=8, seed=3)
    b_pred, b_hist = train_model(_model(), x, y, idx,
                                 TrainOptions(epochs=2, lr=1e-2, batch_size=8, seed=3))
    assert a_pred.shape == (3, 40)
    assert torch.equal(a_pred, b_pred)
    assert a_hist == b_hist
    with pytest.raises(TypeError):
        train_model(_model(), x, y, idx, TrainOptions(epochs=1), epochs=2)


def test_check_support_asks_the_depth_layer():
    check_support(9, 10)  # 10 training examples, one excluded as the self match: 9 usable
    with pytest.raises(ValueError, match="usable support"):
        check_support(10, 10)


def _cnn_problem():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 1, 28, 28, generator=g)
    y = torch.randint(0, 4, (60,), generator=g)
    return x, y


def _train_cnn(snapshot=None, scores=False):
    x, y = _cnn_problem()
    torch.manual_seed(5)
    model = models.cnn(num_classes=4)
    pred, hist = train_model(model, x, y, torch.arange(40), epochs=2, lr=1e-2, batch_size=16,
                             seed=3, snapshot=snapshot, scores=scores)
    return model, pred, hist, torch.get_rng_state()


def _curve(model):
    x, y = _cnn_problem()
    idx = torch.as_tensor(probe_curve_sample(torch.arange(40).numpy(), seed=0, size=30))
    return ProbeCurve(resolve_probes(model, "cnn"), x[idx], y[idx], k=5, num_classes=4,
                      device=torch.device("cpu"))


def test_probe_snapshot_does_not_change_training():
    torch.manual_seed(5)
    curve = _curve(models.cnn(num_classes=4))
    plain, pred0, hist0, rng0 = _train_cnn()
    snap, pred1, hist1, rng1 = _train_cnn(curve)
    # every weight and buffer (BatchNorm running statistics too) bit for bit, the same
    # predictions and history, and the global generator left where training alone leaves it
    a, b = plain.state_dict(), snap.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert torch.equal(pred0, pred1) and torch.equal(rng0, rng1)
    snapshots = hist1.pop("snapshots")
    assert hist0 == hist1 and "snapshots" not in hist0
    assert len(snapshots) == 3 and all(s.shape == (6,) for s in snapshots)
    assert snap.training  # the snapshot restored the mode it found
    # the last snapshot is the trained model's curve; probe 0 (the input) never changes
    np.testing.assert_array_equal(snapshots[-1], curve(snap))
    assert snapshots[0][0] == snapshots[1][0] == snapshots[2][0]


def test_probe_curve_is_leave_one_out_knn_accuracy():
    torch.manual_seed(5)
    model = models.cnn(num_classes=4).eval()
    curve = _curve(model)
    got = curve(model)
    emb = extract(model, curve.x, curve.spec)
    for layer, z in enumerate(emb.layers.values()):
        _, index = reference.knn(z.double(), z.double(), 5, self_index=torch.arange(30))
        pred = reference.vote(curve.y[index], 4)
        assert got[layer] == pytest.approx(float((pred == curve.y).double().mean()))


def test_convergence_epoch():
    curves = np.array([[0.5, 0.1, 0.2, 0.9],
                       [0.5, 0.9, 0.3, 0.8],
                       [0.5, 0.96, 0.9, 0.7],
                       [0.5, 1.0, 1.0, 0.6]])
    # probe 0 gains nothing (epoch 0); probe 1 makes 95% of its gain at epoch 2, probe 2 only
    # at the end; probe 3 loses accuracy (nothing to converge to: epoch 0)
    np.testing.assert_array_equal(convergence_epoch(curves), [0, 2, 3, 0])


def test_epoch_scores_do_not_change_training():
    """Recording p(y), the margin and EL2N reads the logits of the pass that gives
    epoch_pred: the weights (BatchNorm statistics too), predictions, history and global
    generator are bit for bit those of training without it."""
    plain, pred0, hist0, rng0 = _train_cnn()
    rec, pred1, hist1, rng1 = _train_cnn(scores=True)
    a, b = plain.state_dict(), rec.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert torch.equal(pred0, pred1) and torch.equal(rng0, rng1)
    recorded = hist1.pop("epoch_scores")
    assert hist0 == hist1 and "epoch_scores" not in hist0
    assert set(recorded) == set(EPOCH_SCORES)
    assert all(v.shape == (3, 60) and v.dtype == torch.float32 for v in recorded.values())
    # the last row is the trained model's: recomputed here from its logits (float64 numpy)
    x, y = _cnn_problem()
    rec.eval()
    with torch.no_grad():
        logits = rec(x).double().numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    yn = y.numpy()
    np.testing.assert_allclose(recorded["label_prob"][-1], probs[np.arange(60), yn],
                               atol=1e-5)
    np.testing.assert_allclose(recorded["margin"][-1], scores.logit_margin(logits, yn),
                               atol=1e-4)
    np.testing.assert_allclose(recorded["el2n"][-1], scores.el2n(probs, yn), atol=1e-5)
    # and the prediction is the label exactly where the margin is positive
    right = (pred1 == y).numpy()
    np.testing.assert_array_equal(right, recorded["margin"].numpy() > 0)


def test_a_cached_training_without_epoch_scores_is_trained_again(tmp_path):
    """A train.pt of an older version (no per-epoch scores) does not fit: deleted, logged,
    retrained -- never a KeyError."""
    model = _model()
    heard = []
    cache = ModelCache(tmp_path, "seed0-half0", {"protocol_key": "k"}, heard.append)
    history = {"loss": [1.0], "train_accuracy": [0.5], "held_out_accuracy": [0.5],
               "snapshots": [[0.1], [0.2]]}
    cache.save_train({"protocol_key": "k", "state": model.state_dict(),
                      "epoch_pred": torch.zeros(2, 40, dtype=torch.int64), "history": history,
                      "stage": {}})
    assert _saved_training(cache, "k", _model(), (2, 40)) is None
    assert not cache.path("train.pt").exists() and len(heard) == 1
    history["epoch_scores"] = {name: torch.zeros(2, 40) for name in EPOCH_SCORES}
    cache.save_train({"protocol_key": "k", "state": model.state_dict(),
                      "epoch_pred": torch.zeros(2, 40, dtype=torch.int64), "history": history,
                      "stage": {}})
    assert _saved_training(cache, "k", _model(), (2, 40)) is not None


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A small real run with 3 epochs (so that examples can be forgotten) and one seed."""
    return real_run(tmp_path_factory, "scores", ["--subset", "200", "--epochs", "3", "--k",
                                                 "3", "--seeds", "1", "--el2n-epoch", "2",
                                                 "--quiet"])


def test_score_columns_equal_a_recomputation_from_the_saved_arrays(scored_run):
    """Every score column of results.parquet, recomputed here example by example from the
    per-epoch arrays of per_model.npz with plain loops (no code of pdepth.scores)."""
    import pandas as pd

    df = pd.read_parquet(scored_run / "results.parquet")
    z = dict(np.load(scored_run / "per_model.npz"))
    cfg = json.loads((scored_run / "config.json").read_text())
    assert cfg["config"]["el2n_epoch"] == 2 and int(z["el2n_epoch"]) == 2
    y, in_train = z["labels"], z["in_train"].astype(bool)
    R, E1, n = z["epoch_pred"].shape
    assert (R, E1, n) == (2, 4, 200)
    for name in ("epoch_label_prob", "epoch_margin", "epoch_el2n"):
        assert z[name].shape == (R, E1, n) and z[name].dtype == np.float16
    want = {c: np.zeros(n) for c in ("el2n", "forgetting_events", "first_learned", "aum",
                                      "data_map_confidence", "data_map_variability",
                                      "train_loss", "held_out_loss")}
    for i in range(n):
        (r,), (h,) = np.flatnonzero(in_train[:, i]), np.flatnonzero(~in_train[:, i])
        right = [bool(z["epoch_pred"][r, e, i] == y[i]) for e in range(1, E1)]
        events = sum(1 for a, b in zip(right[:-1], right[1:], strict=True) if a and not b)
        want["forgetting_events"][i] = events if any(right) else (E1 - 1) // 2
        want["first_learned"][i] = right.index(True) + 1 if any(right) else E1
        want["el2n"][i] = float(z["epoch_el2n"][r, 2, i])
        p = [float(z["epoch_label_prob"][r, e, i]) for e in range(1, E1)]
        want["data_map_confidence"][i] = sum(p) / len(p)
        want["data_map_variability"][i] = math.sqrt(
            sum((v - sum(p) / len(p)) ** 2 for v in p) / len(p))
        want["aum"][i] = sum(float(z["epoch_margin"][r, e, i]) for e in range(1, E1)) / (E1 - 1)
        want["train_loss"][i] = -math.log(float(z["probs"][r, i, y[i]]))
        want["held_out_loss"][i] = -math.log(float(z["probs"][h, i, y[i]]))
    for name, values in want.items():
        np.testing.assert_allclose(df[name], values, rtol=1e-6, atol=1e-9, err_msg=name)
    assert df["forgetting_events"].max() <= 1 and df["first_learned"].max() <= 4
    # the last epoch's record is the final model, whose softmax the scoring pass saved
    # (float16 storage: about 3 significant digits)
    rows = np.arange(n)
    for r in range(R):
        np.testing.assert_allclose(z["epoch_label_prob"][r, -1], z["probs"][r, rows, y],
                                   atol=2e-3)
        np.testing.assert_allclose(z["epoch_el2n"][r, -1], scores.el2n(z["probs"][r], y),
                                   atol=2e-3)
    # the summary's matrix holds every score; one seed: no reliability, and it says why
    summary = json.loads((scored_run / "summary.json").read_text())
    assert set(want) <= set(summary["score_correlations"]["scores"])
    rel = summary["score_reliability"]
    assert rel["scores"] is None and "1 seed" in rel["reason"]


def test_el2n_epoch_is_checked_and_not_in_the_key():
    base = RunConfig(subset=200, epochs=6, k=3)
    assert base.el2n_epoch == 1  # a fifth of 6, rounded
    assert RunConfig(subset=200, epochs=20, k=3).el2n_epoch == 4
    assert RunConfig(subset=200, epochs=6, k=3, el2n_epoch=5).protocol_key() == \
        base.protocol_key()
    for bad in (0, 7, 2.5, "x"):
        with pytest.raises(ValueError, match=r"el2n_epoch \(--el2n-epoch\) must be an "
                                             r"integer in 1\.\.6"):
            RunConfig(subset=200, epochs=6, k=3, el2n_epoch=bad)


def test_cli_bad_el2n_epoch_is_one_line(tmp_path, capsys):
    from pdepth.cli import main

    out = tmp_path / "out"
    assert main(["run", "--subset", "200", "--epochs", "2", "--el2n-epoch", "3",
                 "--out", str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "--el2n-epoch" in err and "3" in err
    assert not out.exists()
