"""The drop-in shims against the behaviour of the code they replace: scikit-learn's
KNeighborsClassifier (run here), the ``difficulty`` package's prediction depth (re-implemented
here the way it does it: scikit-learn per layer), and the AngularGap ``knn_predict`` family
(its intended formula on true neighbours, and its original farthest-point selection)."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

import pdepth
from pdepth.compat import difficulty as pd_difficulty
from pdepth.compat.knndnn import knn_predict
from pdepth.compat.sklearn import KNeighborsClassifier

sk_neighbors = pytest.importorskip("sklearn.neighbors", reason="scikit-learn is a test dependency")
SKLearnKNN = sk_neighbors.KNeighborsClassifier

FMNIST_ROOT = pdepth.data.FASHION_MNIST_ROOT


@pytest.fixture(scope="module")
def fmnist():
    """2,000 support and 500 query Fashion-MNIST images, flattened uint8 pixels."""
    if not os.path.exists(os.path.join(FMNIST_ROOT, "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST not found under {FMNIST_ROOT}: install it with "
                    "`apt-get install dataset-fashion-mnist` (CI does)")
    images, labels = pdepth.load_fashion_mnist(split="test")
    x = images.reshape(len(images), -1).numpy()
    y = labels.numpy()
    return x[:2000], y[:2000], x[2000:2500], y[2000:2500]


def test_load_fashion_mnist(fmnist, tmp_path):
    images, labels = pdepth.load_fashion_mnist(split="test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(10))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        pdepth.load_fashion_mnist(root=str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        pdepth.load_fashion_mnist(split="validation")


# ---------------------------------------------------------------------------------------------
# scikit-learn KNeighborsClassifier
# ---------------------------------------------------------------------------------------------


def assert_same_neighbors(ours, theirs, rtol=1e-7, atol=1e-6):
    """Same distances; indices equal except between points at equal distance, which
    scikit-learn orders arbitrarily (pdepth: lower index first)."""
    (d1, i1), (d2, i2) = ours, theirs
    assert d1.shape == d2.shape and i1.shape == i2.shape
    np.testing.assert_allclose(d1, d2, rtol=rtol, atol=atol)
    diff = i1 != i2
    assert diff.mean() < 0.01, "too many differing neighbours for ties alone"
    for r in np.flatnonzero(diff.any(1)):
        cut = d1[r, -1] * (1 - rtol) - atol  # points strictly inside the k-th distance
        assert set(i1[r][d1[r] < cut]) == set(i2[r][d2[r] < cut])
        tied = diff[r]
        np.testing.assert_allclose(d1[r][tied], d2[r][tied], rtol=rtol, atol=atol)
    # pdepth's order: distance ascending, then index ascending
    for r in range(min(len(d1), 50)):
        key = list(zip(np.round(d1[r], 9), i1[r], strict=True))
        assert key == sorted(key)


@pytest.mark.parametrize("k", [1, 5, 30])
@pytest.mark.parametrize("scale", ["uint8", "float32"])
def test_sklearn_parity_fashion_mnist(fmnist, k, scale):
    x, y, xq, yq = fmnist
    if scale == "float32":
        x, xq = x.astype(np.float32) / 255, xq.astype(np.float32) / 255
    ours = KNeighborsClassifier(n_neighbors=k).fit(x, y)
    theirs = SKLearnKNN(n_neighbors=k).fit(x, y)
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    np.testing.assert_array_equal(ours.predict(xq), theirs.predict(xq))
    # on the fitted data each point is its own neighbour, as in scikit-learn
    np.testing.assert_array_equal(ours.predict(x), theirs.predict(x))
    np.testing.assert_array_equal(ours.predict_proba(xq), theirs.predict_proba(xq))
    assert ours.score(xq, yq) == theirs.score(xq, yq)
    # kneighbors() without X leaves each point out; distances are Euclidean (sqrt)
    assert_same_neighbors(ours.kneighbors(), theirs.kneighbors())
    assert_same_neighbors(ours.kneighbors(xq), theirs.kneighbors(xq))
    idx = ours.kneighbors(xq[:10], return_distance=False)
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64 and idx.shape == (10, k)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sklearn_parity_random(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(dtype)
    xq = rng.normal(size=(150, 12)).astype(dtype)
    y = rng.choice(np.array(["cat", "dog", "emu", "yak"]), size=400)
    for k in (1, 4, 15):
        ours = KNeighborsClassifier(k).fit(x, y)
        theirs = SKLearnKNN(k).fit(x, y)
        assert ours.predict(xq).dtype == theirs.predict(xq).dtype
        np.testing.assert_array_equal(ours.predict(xq), theirs.predict(xq))
        np.testing.assert_array_equal(ours.predict(x), theirs.predict(x))
        np.testing.assert_array_equal(ours.predict_proba(x), theirs.predict_proba(x))
        assert_same_neighbors(ours.kneighbors(), theirs.kneighbors())
        assert_same_neighbors(ours.kneighbors(xq, n_neighbors=k + 2),
                              theirs.kneighbors(xq, n_neighbors=k + 2))
        assert ours.score(xq, y[:150]) == theirs.score(xq, y[:150])


def test_sklearn_vote_ties_and_arbitrary_labels():
    # 4 points, k=2: every query sees one neighbour of each class -> the lowest class wins
    x = np.array([[0.0], [1.0], [3.0], [4.0]])
    y = np.array([100, -3, 7, 100])
    q = np.array([[0.5], [3.5], [2.0]])
    ours = KNeighborsClassifier(2).fit(x, y)
    theirs = SKLearnKNN(2).fit(x, y)
    np.testing.assert_array_equal(ours.classes_, [-3, 7, 100])
    np.testing.assert_array_equal(ours.predict(q), theirs.predict(q))
    np.testing.assert_array_equal(ours.predict_proba(q), theirs.predict_proba(q))


def test_sklearn_torch_in_torch_out():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    y = torch.randint(0, 5, (200,), generator=g) * 10
    xq = torch.randn(40, 8, generator=g)
    ours = KNeighborsClassifier(7).fit(x, y)
    pred = ours.predict(xq)
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.int64
    theirs = SKLearnKNN(7).fit(x.numpy(), y.numpy())
    np.testing.assert_array_equal(pred.numpy(), theirs.predict(xq.numpy()))
    dist, idx = ours.kneighbors()
    assert isinstance(dist, torch.Tensor) and dist.dtype == torch.float64
    assert_same_neighbors((dist.numpy(), idx.numpy()), theirs.kneighbors())
    proba = ours.predict_proba(xq)
    assert isinstance(proba, torch.Tensor) and torch.allclose(proba.sum(1),
                                                              torch.ones(40, dtype=torch.float64))
    assert ours.score(xq, theirs.predict(xq.numpy())) == 1.0
    # predict() without X: the fitted points, each leaving itself out (a pdepth extension;
    # scikit-learn 1.9 requires X): the majority label of scikit-learn's kneighbors()
    loo = ours.predict()
    _, sk_idx = theirs.kneighbors()
    encoded = np.searchsorted(theirs.classes_, y.numpy())[sk_idx]
    majority = np.array([np.bincount(row, minlength=5).argmax() for row in encoded])
    np.testing.assert_array_equal(loo.numpy(), theirs.classes_[majority])


def test_sklearn_float32_dtype_option():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    fast = KNeighborsClassifier(5, dtype=None).fit(x, y)
    exact = KNeighborsClassifier(5).fit(x, y)
    np.testing.assert_array_equal(fast.predict(x), exact.predict(x))


# Unsupported settings (rejected by fit, scikit-learn's convention) and the estimator checks:
# tests/test_sklearn_estimator.py.


def test_sklearn_supported_settings_and_errors():
    x = np.arange(20, dtype=np.float64).reshape(10, 2)
    y = np.arange(10) % 2
    for params in ({"metric": "euclidean"}, {"metric": "l2"}, {"algorithm": "brute"},
                   {"p": 2, "leaf_size": 5, "n_jobs": 4}):
        KNeighborsClassifier(3, **params).fit(x, y).predict(x)
    est = KNeighborsClassifier(3)
    with pytest.raises(RuntimeError, match="not fitted"):
        est.predict(x)
    est.fit(x, y)
    with pytest.raises(ValueError, match="features"):
        est.predict(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="n_neighbors <= n_samples_fit"):
        est.kneighbors(x, n_neighbors=11)
    with pytest.raises(ValueError, match="n_neighbors < n_samples_fit"):
        est.kneighbors(n_neighbors=10)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        KNeighborsClassifier(3).fit(x, y[:5])
    with pytest.raises(ValueError, match="NaN"):
        KNeighborsClassifier(3).fit(np.full((4, 2), np.nan), y[:4])
    with pytest.raises(ValueError, match="2D"):
        KNeighborsClassifier(3).fit(np.zeros(10), y)
    from sklearn.base import clone

    copy = clone(KNeighborsClassifier(4, metric="euclidean"))
    assert copy.get_params()["n_neighbors"] == 4 and copy.metric == "euclidean"
    assert "n_neighbors=4" in repr(copy)


# ---------------------------------------------------------------------------------------------
# difficulty.metrics.prediction_depth
# ---------------------------------------------------------------------------------------------


def sklearn_prediction_depth(train_layers, train_labels, test_layers=None, test_labels=None,
                             k=30):
    """What ``difficulty.metrics.prediction_depth`` does: scikit-learn per layer, predict,
    compare with the labels, first layer after which every layer matches."""
    y = np.asarray(train_labels)
    matches = []
    test_layers = train_layers if test_layers is None else test_layers
    labels = y if test_labels is None else np.asarray(test_labels)
    for tr, te in zip(train_layers, test_layers, strict=True):
        tr = np.asarray(tr).reshape(len(tr), -1)
        te = np.asarray(te).reshape(len(te), -1)
        knn = SKLearnKNN(k).fit(tr, y)
        matches.append(knn.predict(te) == labels)
    matches = np.stack(matches)
    depth = np.zeros(matches.shape[1], dtype=np.int64)
    for j in range(matches.shape[1]):
        depth[j] = matches.shape[0]
        while depth[j] > 0 and matches[depth[j] - 1, j]:
            depth[j] -= 1
    return depth, matches.astype(np.int64)


def _probes(x, dtype, seed=0, widths=(64, 32, 10)):
    """Input probe plus fixed random projections + ReLU, softmax last (an MLP's probes)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.as_tensor(x, dtype=dtype) / 255
    layers = [h]
    for i, w in enumerate(widths):
        proj = torch.randn(h.shape[1], w, generator=g, dtype=dtype) / h.shape[1] ** 0.5
        h = h @ proj
        h = torch.softmax(h * 4, dim=1) if i == len(widths) - 1 else torch.relu(h)
        layers.append(h)
    return layers


def _cpu(**kw):
    return dict(device="cpu", **kw)


def test_difficulty_parity_fashion_mnist_float64(fmnist):
    x, y, xq, yq = fmnist
    train = _probes(x[:1200], torch.float64)
    test = _probes(xq, torch.float64)
    y_t = torch.as_tensor(y[:1200])
    # training points, each included among its own neighbours
    depth, matches = pd_difficulty.prediction_depth(train, y_t, k=30, return_matches=True,
                                                    **_cpu())
    exp_depth, exp_matches = sklearn_prediction_depth(train, y[:1200], k=30)
    np.testing.assert_array_equal(depth.numpy(), exp_depth)
    np.testing.assert_array_equal(matches.numpy(), exp_matches)
    assert depth.dtype == torch.int64 and matches.dtype == y_t.dtype
    assert matches.shape == (4, 1200)
    # held-out points
    depth = pd_difficulty.prediction_depth(train, y_t, test, torch.as_tensor(yq), k=30, **_cpu())
    exp_depth, _ = sklearn_prediction_depth(train, y[:1200], test, yq, k=30)
    np.testing.assert_array_equal(depth.numpy(), exp_depth)
    assert 0 < depth.float().mean() < 4


def test_difficulty_parity_fashion_mnist_float32(fmnist):
    # float32 activations: scikit-learn accumulates in float64, pdepth in float32, so points
    # closer than the documented tolerance may swap; nearly everything must agree
    x, y, xq, yq = fmnist
    train = _probes(x[:1200], torch.float32)
    test = _probes(xq, torch.float32)
    depth, matches = pd_difficulty.prediction_depth(
        train, torch.as_tensor(y[:1200]), test, torch.as_tensor(yq), k=30,
        return_matches=True, **_cpu())
    exp_depth, exp_matches = sklearn_prediction_depth(train, y[:1200], test, yq, k=30)
    assert (matches.numpy() == exp_matches).mean() >= 0.995
    assert (depth.numpy() == exp_depth).mean() >= 0.99


def test_difficulty_parity_random_containers():
    g = torch.Generator().manual_seed(5)
    train = [torch.randn(150, *s, generator=g, dtype=torch.float64) for s in [(2, 3), (7,), (4,)]]
    test = [torch.randn(60, t.shape[1], *t.shape[2:], generator=g, dtype=torch.float64)
            for t in train]
    y = torch.randint(0, 3, (150,), generator=g)
    yq = torch.randint(0, 3, (60,), generator=g)
    exp_depth, exp_matches = sklearn_prediction_depth(train, y, test, yq, k=9)
    named = OrderedDict((f"l{i}.out", t) for i, t in enumerate(train))
    named_test = OrderedDict((f"l{i}.out", t) for i, t in enumerate(test))
    for tr, te in [(train, test), (iter(train), (t for t in test)), (named, named_test)]:
        depth, matches = pd_difficulty.prediction_depth(tr, y, te, yq, k=9,
                                                        return_matches=True, **_cpu())
        np.testing.assert_array_equal(depth.numpy(), exp_depth)
        np.testing.assert_array_equal(matches.numpy(), exp_matches)
    depth = pd_difficulty.prediction_depth(iter(train), y, k=9, verbose=True, use_faiss=True,
                                           **_cpu())
    np.testing.assert_array_equal(depth.numpy(), sklearn_prediction_depth(train, y, k=9)[0])


def test_difficulty_cuda_falls_back_to_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: no fallback to test")
    train = [torch.randn(40, 3), torch.randn(40, 2)]
    y = torch.arange(40) % 2
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        depth = pd_difficulty.prediction_depth(train, y, k=5)  # device="cuda" by default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(pd_difficulty.prediction_depth(train, y, k=5, device="cpu"), depth)


def test_difficulty_bad_arguments():
    train = [torch.randn(20, 3)]
    y = torch.arange(20) % 2
    with pytest.raises(ValueError, match="test_labels"):
        pd_difficulty.prediction_depth(train, y, [torch.randn(5, 3)], **_cpu())
    with pytest.raises(ValueError, match="test_intermediates"):
        pd_difficulty.prediction_depth(train, y, test_labels=y, **_cpu())
    with pytest.raises(ValueError, match="different numbers of layers"):
        pd_difficulty.prediction_depth(train * 2, y, train, y, k=3, **_cpu())
    with pytest.raises(ValueError, match=r"layer 0: .*k=21"):
        pd_difficulty.prediction_depth(train, y, k=21, **_cpu())


def _two_class_probes(n=40, seed=3):
    """n examples, the first half labelled 0 and the rest 1, with three probe layers of
    random activations (distinct points, so that k=1 on the points themselves is exact)."""
    g = torch.Generator().manual_seed(seed)
    layers = OrderedDict((f"block{i}.out", torch.randn(n, *shape, generator=g))
                         for i, shape in enumerate([(2, 3, 3), (8,), (5,)]))
    labels = torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)]).long()
    return layers, labels


def test_difficulty_training_split_without_a_class():
    # Regression: a training split holding class 0 only, scored against test labels in
    # {0, 1} (a class absent from the split), raised "reference (labels) must lie in
    # [0, num_classes=1)"; the original returns a depth for every example: the k-NN never
    # predicts the missing class.
    layers, labels = _two_class_probes()
    n, num_layers = labels.shape[0], len(layers)
    train = [t[: n // 2] for t in layers.values()]
    depth, matches = pd_difficulty.prediction_depth(train, labels[: n // 2], layers, labels,
                                                    k=2, return_matches=True, **_cpu())
    assert depth.shape == (n,) and depth.dtype == torch.int64
    assert ((0 <= depth) & (depth <= num_layers)).all()
    assert torch.equal(depth, torch.where(labels == 0, 0, num_layers))
    assert torch.equal(matches, (labels == 0).long().expand(num_layers, n))
    exp_depth, exp_matches = sklearn_prediction_depth(train, labels[: n // 2],
                                                      list(layers.values()), labels, k=2)
    np.testing.assert_array_equal(depth.numpy(), exp_depth)
    np.testing.assert_array_equal(matches.numpy(), exp_matches)


def test_difficulty_exact_cases_with_k1():
    layers, labels = _two_class_probes()
    num_layers = len(layers)
    # the examples scored against themselves with k=1: every layer is right
    depth = pd_difficulty.prediction_depth(layers, labels, layers, labels, k=1, **_cpu())
    assert torch.equal(depth, torch.zeros_like(depth))
    # the same without test intermediates (each point its own neighbour), an ordered dict
    depth = pd_difficulty.prediction_depth(layers, labels, k=1, **_cpu())
    assert torch.equal(depth, torch.zeros_like(depth))
    # the k-NN fitted on swapped labels is wrong everywhere: depth L
    depth = pd_difficulty.prediction_depth(layers, 1 - labels, layers, labels, k=1, **_cpu())
    assert torch.equal(depth, torch.full_like(depth, num_layers))


def test_difficulty_stacked_tensor_and_float_labels():
    # Two fixed training points per layer (a stacked [L, 2] tensor: L layers of one feature,
    # iterated as the original does), test points drifting towards the second one by 0.25 a
    # layer, float test labels compared by value. Depth = first layer from which each point
    # stays past the midpoint 0.5.
    train = torch.tensor([[0.0, 1.0]] * 4)
    start = torch.tensor([[-0.3], [0.05], [0.3], [0.55], [0.8]])
    test = [start + 0.25 * i for i in range(4)]
    depth, matches = pd_difficulty.prediction_depth(train, torch.tensor([2, 6]), test,
                                                    torch.full((5,), 6.0), k=1,
                                                    return_matches=True, **_cpu())
    assert depth.tolist() == [4, 2, 1, 0, 0]
    assert matches.shape == (4, 5) and matches.dtype == torch.int64
    assert matches[:, 0].tolist() == [0, 0, 0, 0] and matches[:, 3].tolist() == [1, 1, 1, 1]


def test_difficulty_arbitrary_label_values():
    # non-contiguous, negative and test-only labels: scikit-learn's semantics (labels are
    # values; ties go to the lowest label)
    g = torch.Generator().manual_seed(8)
    train = [torch.randn(90, w, generator=g, dtype=torch.float64) for w in (3, 6, 2)]
    test = [torch.randn(30, t.shape[1], generator=g, dtype=torch.float64) for t in train]
    values = torch.tensor([-4, 3, 17])
    y = values[torch.randint(0, 3, (90,), generator=g)]
    yq = torch.cat([values, torch.tensor([99])])[torch.randint(0, 4, (30,), generator=g)]
    assert (yq == 99).any()
    for k in (1, 4, 7):  # k=4: ties between two labels occur
        depth, matches = pd_difficulty.prediction_depth(train, y, test, yq, k=k,
                                                        return_matches=True, **_cpu())
        exp_depth, exp_matches = sklearn_prediction_depth(train, y, test, yq, k=k)
        np.testing.assert_array_equal(depth.numpy(), exp_depth)
        np.testing.assert_array_equal(matches.numpy(), exp_matches)
        assert (depth[yq == 99] == 3).all()
        depth = pd_difficulty.prediction_depth(train, y, k=k, **_cpu())
        np.testing.assert_array_equal(depth.numpy(), sklearn_prediction_depth(train, y, k=k)[0])


# ---------------------------------------------------------------------------------------------
# AngularGap-family knn_predict
# ---------------------------------------------------------------------------------------------


def intended_knn_predict(feature, feature_bank, labels, classes, knn_k, knn_t, rm_top1, dist):
    """The formula the original meant, on exact float64 distances: the knn_k most similar
    bank points (k+1 and drop the first with rm_top1), weights exp(sim / t)."""
    q = feature.double()
    s = feature_bank.double().t()
    if dist == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        s = torch.nn.functional.normalize(s, dim=1)
        sim = q @ s.t()
    else:
        sim = -(q[:, None, :] - s[None, :, :]).pow(2).sum(-1)
    order = torch.argsort(-sim, dim=1, stable=True)  # most similar first, ties to lower index
    take = order[:, 1:knn_k + 1] if rm_top1 else order[:, :knn_k]
    weight = (sim.gather(1, take) / knn_t).exp()
    scores = torch.zeros(q.shape[0], classes, dtype=torch.float64)
    return scores.scatter_add_(1, labels[take], weight)


def original_knn_predict(feature, feature_bank, labels, classes, knn_k, knn_t, rm_top1=True):
    """The AngularGap original's selection (L2 branch): topk(largest=True) on squared
    distances -- the farthest points -- weighted by exp(d^2 / t)."""
    d2 = (feature[:, None, :] - feature_bank.t()[None, :, :]).pow(2).sum(-1)
    w, idx = d2.topk(knn_k + 1 if rm_top1 else knn_k, dim=-1)
    if rm_top1:
        w, idx = w[:, 1:], idx[:, 1:]
    scores = torch.zeros(feature.shape[0], classes, dtype=d2.dtype)
    return scores.scatter_add_(1, labels[idx], (w / knn_t).exp()), idx


@pytest.mark.parametrize("dist", ["l2", "cosine"])
@pytest.mark.parametrize("rm_top1", [True, False])
def test_knndnn_true_neighbours_and_weights(dist, rm_top1):
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(200, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (200,), generator=g)
    feature = torch.cat([bank[:20], torch.randn(10, 6, generator=g, dtype=torch.float64)])
    t = 0.5
    expected = intended_knn_predict(feature, bank.t(), labels, 4, 12, t, rm_top1, dist)
    raw = knn_predict(feature, bank.t(), labels, 4, 12, t, rm_top1=rm_top1, dist=dist,
                      stable=False)
    torch.testing.assert_close(raw, expected, rtol=1e-9, atol=1e-12)
    stable = knn_predict(feature, bank.t(), labels, 4, 12, t, rm_top1=rm_top1, dist=dist)
    # stable scores: the same up to one positive factor per row
    norm = torch.nn.functional.normalize
    torch.testing.assert_close(norm(stable, p=1, dim=1), norm(expected, p=1, dim=1))
    assert torch.equal(stable.argmax(1), expected.argmax(1))


def test_knndnn_differs_from_original_farthest_selection():
    # two tight, far-apart clusters: the nearest neighbours are in the query's own cluster,
    # the farthest in the other one
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=g) * 0.1
    b = torch.randn(50, 4, generator=g) * 0.1 + 3.0
    bank = torch.cat([a, b])
    labels = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    feature = bank[::10]
    ours = knn_predict(feature, bank.t(), labels, 2, 10, 1.0, rm_top1=True)
    assert torch.equal(ours.argmax(1), labels[::10])
    orig, idx = original_knn_predict(feature, bank.t(), labels, 2, 10, 1.0, rm_top1=True)
    # the original picked points of the other cluster only, and weighted them by exp(+d^2)
    assert torch.equal(labels[idx], 1 - labels[::10, None].expand_as(idx))
    assert torch.equal(orig.argmax(1), 1 - labels[::10])


def test_knndnn_in_its_calling_pattern(fmnist):
    # get_knn_prds_k_layer: knn_predict(inp, f_bank.t(), labels, classes, knn_k, knn_t=1,
    # rm_top1=train_split), then F.normalize(p=1) and argmax. Pixel distances are huge, so
    # the raw exp(-d^2) underflows; the default stable weights keep the scores usable.
    x, y, xq, yq = fmnist
    bank = torch.as_tensor(x[:1000], dtype=torch.float32)
    labels = torch.as_tensor(y[:1000])
    scores = knn_predict(bank[:200], bank.t().contiguous(), labels, classes=10, knn_k=30,
                         knn_t=1, rm_top1=True)
    probs = torch.nn.functional.normalize(scores, p=1, dim=1)
    assert scores.shape == (200, 10) and torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(1), torch.ones(200))
    assert (probs.argmax(1) == labels[:200]).float().mean() > 0.6
    raw = knn_predict(bank[:200], bank.t(), labels, 10, 30, 1, rm_top1=True, stable=False)
    assert (raw == 0).all()  # why stable=True is the default
    # the same neighbour set as a uniform k-NN when the temperature is huge
    flat = knn_predict(bank[:200], bank.t(), labels, 10, 30, 1e30, rm_top1=False)
    clf = KNeighborsClassifier(30).fit(x[:1000], y[:1000])
    np.testing.assert_allclose(flat.numpy() / 30, clf.predict_proba(x[:200]), atol=1e-6)


def test_knndnn_self_index_and_duplicates():
    # point 1 duplicates point 0: rm_top1 drops point 0 for query 1 and keeps query 1 itself
    bank = torch.tensor([[0.0], [0.0], [5.0], [6.0]])
    labels = torch.tensor([0, 1, 1, 1])
    q = bank[:2]
    legacy = knn_predict(q, bank.t(), labels, 2, 1, 1.0, rm_top1=True)
    exact = knn_predict(q, bank.t(), labels, 2, 1, 1.0, self_index=torch.tensor([0, 1]))
    assert legacy.argmax(1).tolist() == [1, 1]  # query 1 votes with its own label
    assert exact.argmax(1).tolist() == [1, 0]  # each query sees its duplicate


def test_knndnn_bad_input():
    bank = torch.randn(10, 3)
    labels = torch.arange(10) % 2
    with pytest.raises(ValueError, match=r"\[F, K\]"):
        knn_predict(torch.randn(2, 3), bank, labels, 2, 3, 1.0)  # not transposed
    with pytest.raises(ValueError, match="dist"):
        knn_predict(torch.randn(2, 3), bank.t(), labels, 2, 3, 1.0, dist="manhattan")
    with pytest.raises(ValueError, match="classes=2"):
        knn_predict(torch.randn(2, 3), bank.t(), labels + 1, 2, 3, 1.0)
    with pytest.raises(ValueError, match="knn_t"):
        knn_predict(torch.randn(2, 3), bank.t(), labels, 2, 3, 0.0)
    with pytest.raises(ValueError, match="k=10"):
        knn_predict(torch.randn(2, 3), bank.t(), labels, 2, 10, 1.0, rm_top1=True)


# ---------------------------------------------------------------------------------------------
# Devices (the CUDA case is reported as skipped without a GPU)
# ---------------------------------------------------------------------------------------------


def test_compat_on_device(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (250, 6), generator=g).float()
    y = torch.randint(0, 4, (250,), generator=g)
    xq = torch.randint(-3, 4, (60, 6), generator=g).float()
    # scikit-learn shim: torch in on the device, torch out on the device, same answers
    ref = KNeighborsClassifier(9).fit(x.numpy(), y.numpy())
    for dtype in ("float64", "float32"):
        est = KNeighborsClassifier(9, dtype=dtype).fit(x.to(device), y.to(device))
        pred = est.predict(xq.to(device))
        assert pred.device.type == device.type
        np.testing.assert_array_equal(pred.cpu().numpy(), ref.predict(xq.numpy()))
        dist, idx = est.kneighbors()
        ref_dist, ref_idx = ref.kneighbors()
        np.testing.assert_array_equal(idx.cpu().numpy(), ref_idx)
        np.testing.assert_allclose(dist.cpu().numpy(), ref_dist, rtol=1e-6)
        np.testing.assert_array_equal(est.predict_proba(xq.to(device)).cpu().numpy(),
                                      ref.predict_proba(xq.numpy()))
    # difficulty shim on the device
    layers = [x, x[:, :3], x.abs()]
    cpu = pd_difficulty.prediction_depth(layers, y, k=7, return_matches=True, device="cpu")
    dev = pd_difficulty.prediction_depth([t.to(device) for t in layers], y.to(device), k=7,
                                         return_matches=True, device=str(device))
    assert dev[0].device.type == device.type
    assert torch.equal(dev[0].cpu(), cpu[0]) and torch.equal(dev[1].cpu(), cpu[1])
    # knndnn shim on the device
    s_cpu = knn_predict(xq, x.t(), y, 4, 9, 2.0, rm_top1=False)
    s_dev = knn_predict(xq.to(device), x.t().to(device), y.to(device), 4, 9, 2.0,
                        rm_top1=False)
    assert s_dev.device.type == device.type
    torch.testing.assert_close(s_dev.cpu(), s_cpu)
