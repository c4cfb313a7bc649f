"""pdepth.protocol.train (with its per-epoch probe snapshot, pdepth.protocol.convergence) and
the early k check of pdepth.protocol.model_run."""

import numpy as np
import pytest
import torch

from pdepth import models, reference
from pdepth.metrics import convergence_epoch
from pdepth.probes import extract, resolve_probes
from pdepth.protocol.convergence import ProbeCurve, probe_curve_sample
from pdepth.protocol.model_run import check_support
from pdepth.protocol.train import TrainOptions, train_model


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


def _train_cnn(snapshot=None):
    x, y = _cnn_problem()
    torch.manual_seed(5)
    model = models.cnn(num_classes=4)
    pred, hist = train_model(model, x, y, torch.arange(40), epochs=2, lr=1e-2, batch_size=16,
                             seed=3, snapshot=snapshot)
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
