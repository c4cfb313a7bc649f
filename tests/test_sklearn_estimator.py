"""pdepth.compat.sklearn.KNeighborsClassifier is a real scikit-learn estimator.

scikit-learn's own estimator checks run on it (``parametrize_with_checks``), together with the
tooling users put a classifier into (``clone``, ``is_classifier``, pipelines, ``GridSearchCV``,
``cross_val_score``) and the regressions of the issue that made it one. Parity of the
predictions with scikit-learn's ``KNeighborsClassifier`` is tested in ``test_compat.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is a test dependency")

from sklearn.base import clone, is_classifier  # noqa: E402
from sklearn.exceptions import NotFittedError as SKNotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier as SKLearnKNN  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from pdepth.compat.sklearn import KNeighborsClassifier, NotFittedError  # noqa: E402

_SK_VERSION = tuple(int(v) for v in sklearn.__version__.split(".")[:2] if v.isdigit())

# ---------------------------------------------------------------------------------------------
# scikit-learn's estimator checks
# ---------------------------------------------------------------------------------------------

# The estimator checks that do not apply to this estimator, each with the reason; they are
# marked xfail (strictly where scikit-learn supports it, so an entry whose check passes is
# reported). With scikit-learn 1.9 every check applies and passes, so the list is empty:
# - check_array_api_input is skipped by scikit-learn itself unless SCIPY_ARRAY_API=1 is set
#   before scipy is imported; test_array_api_check_passes below runs it with that setting.
# Keep the scikit-learn section of docs/migration.md in step with this list.
NOT_APPLICABLE_CHECKS: dict[str, str] = {}


def _expected_failed_checks(estimator) -> dict[str, str]:
    return dict(NOT_APPLICABLE_CHECKS)


_CHECK_OPTIONS: dict = {}
if _SK_VERSION >= (1, 6):
    _CHECK_OPTIONS["expected_failed_checks"] = _expected_failed_checks
if _SK_VERSION >= (1, 8):
    _CHECK_OPTIONS["xfail_strict"] = True


@parametrize_with_checks(
    [KNeighborsClassifier(), KNeighborsClassifier(3, dtype=None, metric="euclidean"),
     KNeighborsClassifier(metric="cosine")],
    **_CHECK_OPTIONS,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.slow
def test_array_api_check_passes():
    """check_array_api_input (dispatch enabled, numpy inputs) needs SCIPY_ARRAY_API=1 before
    scipy is imported, so it runs in a fresh interpreter."""
    code = (
        "from sklearn.utils.estimator_checks import check_estimator\n"
        "from pdepth.compat.sklearn import KNeighborsClassifier\n"
        "res = check_estimator(KNeighborsClassifier(), on_fail=None)\n"
        "res = [r for r in res if r['check_name'] == 'check_array_api_input']\n"
        "assert res, 'check_array_api_input was not run'\n"
        "assert all(r['status'] == 'passed' for r in res), res\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SCIPY_ARRAY_API="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Where users put a classifier
# ---------------------------------------------------------------------------------------------


def _blobs(n=240, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, d)) + 1.5 * y[:, None]
    return x, y


def test_is_classifier_and_clone():
    est = KNeighborsClassifier(4, metric="euclidean", dtype=None)
    assert is_classifier(est)
    assert est.__sklearn_tags__().estimator_type == "classifier"
    copy = clone(est)
    assert copy is not est and copy.get_params() == est.get_params()
    assert "n_neighbors=4" in repr(copy) and "metric='euclidean'" in repr(copy)
    x, y = _blobs()
    fitted = KNeighborsClassifier(4).fit(x, y)
    assert not hasattr(clone(fitted), "classes_")


def test_pipeline_and_cross_val_score_match_sklearn():
    x, y = _blobs()
    ours = cross_val_score(make_pipeline(StandardScaler(), KNeighborsClassifier(7)), x, y,
                           cv=4)
    theirs = cross_val_score(make_pipeline(StandardScaler(),
                                           SKLearnKNN(7, algorithm="brute")), x, y, cv=4)
    np.testing.assert_array_equal(ours, theirs)
    pipe = make_pipeline(StandardScaler(), KNeighborsClassifier(7)).fit(x, y)
    assert pipe.score(x, y) == make_pipeline(
        StandardScaler(), SKLearnKNN(7, algorithm="brute")).fit(x, y).score(x, y)


def test_grid_search_matches_sklearn():
    x, y = _blobs(seed=1)
    grid = {"n_neighbors": [1, 3, 5, 9]}
    ours = GridSearchCV(KNeighborsClassifier(), grid, cv=3).fit(x, y)
    theirs = GridSearchCV(SKLearnKNN(algorithm="brute"), grid, cv=3).fit(x, y)
    assert ours.best_params_ == theirs.best_params_
    np.testing.assert_array_equal(ours.cv_results_["mean_test_score"],
                                  theirs.cv_results_["mean_test_score"])
    np.testing.assert_array_equal(ours.predict(x), theirs.predict(x))
    # a grid over an unsupported setting fails in fit, naming it
    with pytest.raises(ValueError, match="weights='distance'"):
        GridSearchCV(KNeighborsClassifier(), {"weights": ["distance"]}, cv=3,
                     error_score="raise").fit(x, y)


def test_pipeline_nested_params():
    x, y = _blobs(seed=2)
    pipe = make_pipeline(StandardScaler(), KNeighborsClassifier())
    pipe.set_params(kneighborsclassifier__n_neighbors=11)
    assert pipe.get_params()["kneighborsclassifier__n_neighbors"] == 11
    pipe.fit(x, y)
    assert pipe[-1].n_neighbors == 11 and pipe[-1].n_features_in_ == 5


# ---------------------------------------------------------------------------------------------
# The regressions of the issue
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["predict", "predict_proba", "kneighbors", "score"])
def test_not_fitted_error(method):
    est = KNeighborsClassifier()
    x = np.zeros((3, 2))
    args = (x, np.zeros(3)) if method == "score" else (x,)
    with pytest.raises(SKNotFittedError, match="not fitted"):
        getattr(est, method)(*args)
    # also a RuntimeError, which earlier versions of the shim raised
    with pytest.raises(RuntimeError):
        getattr(est, method)(*args)
    assert all(issubclass(NotFittedError, base)
               for base in (SKNotFittedError, RuntimeError, ValueError, AttributeError))


def test_object_dtype_input():
    x, y = _blobs(n=60)
    xq = x[:10] + 0.1
    ref = KNeighborsClassifier(5).fit(x, y)
    est = KNeighborsClassifier(5).fit(x.astype(object), y)
    np.testing.assert_array_equal(est.predict(xq.astype(object)), ref.predict(xq))
    np.testing.assert_array_equal(est.predict_proba(xq.tolist()), ref.predict_proba(xq))
    bad = x.astype(object)
    bad[0, 0] = {"not": "a number"}
    with pytest.raises(TypeError):
        KNeighborsClassifier(5).fit(bad, y)


def test_zero_features_and_samples_rejected():
    y = np.array([0, 1, 0])
    for x in (np.zeros((3, 0)), torch.zeros(3, 0)):
        with pytest.raises(ValueError, match="0 feature"):
            KNeighborsClassifier(1).fit(x, y)
    for x in (np.zeros((0, 2)), torch.zeros(0, 2)):
        with pytest.raises(ValueError, match="0 sample"):
            KNeighborsClassifier(1).fit(x, y[:0])
    est = KNeighborsClassifier(1).fit(np.eye(3), y)
    with pytest.raises(ValueError, match="0 feature|features"):
        est.predict(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="0 sample"):
        est.predict(np.zeros((0, 3)))


def test_bad_params_are_stored_and_rejected_by_fit():
    x, y = _blobs(n=30)
    est = KNeighborsClassifier()
    assert est.set_params(n_neighbors=-1) is est  # stores, as scikit-learn does
    assert est.get_params()["n_neighbors"] == -1
    with pytest.raises(ValueError, match="n_neighbors"):
        est.fit(x, y)
    assert not hasattr(est, "classes_")
    est.set_params(n_neighbors=3)
    assert est.fit(x, y).n_neighbors == 3
    # the constructor stores as well
    assert KNeighborsClassifier(n_neighbors=0).n_neighbors == 0
    with pytest.raises(ValueError, match="n_neighbors"):
        KNeighborsClassifier(n_neighbors=0).fit(x, y)
    with pytest.raises(ValueError, match="Invalid parameter"):
        est.set_params(no_such_param=1)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"weights": "distance"}, "weights='distance'"),
        ({"weights": lambda d: d}, "weights="),
        ({"metric": "manhattan"}, "metric='manhattan'"),
        ({"metric": "chebyshev"}, "metric='chebyshev'"),
        ({"p": 1}, "p=1"),
        ({"algorithm": "kd_tree"}, "algorithm='kd_tree'"),
        ({"algorithm": "ball_tree"}, "algorithm='ball_tree'"),
        ({"metric_params": {"w": 1}}, "metric_params"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"n_neighbors": 2.5}, "n_neighbors"),
        ({"dtype": "float16"}, "dtype"),
        ({"leaf_size": 0}, "leaf_size"),
    ],
)
def test_sklearn_unsupported_settings(params, match):
    """Unsupported (or invalid) settings are stored by the constructor and ``set_params`` and
    rejected by ``fit`` with a ValueError naming the setting (scikit-learn's convention)."""
    x, y = _blobs(n=20)
    est = KNeighborsClassifier(**params)
    with pytest.raises(ValueError, match=match):
        est.fit(x, y)
    est = KNeighborsClassifier().set_params(**params)
    with pytest.raises(ValueError, match=match):
        est.fit(x, y)


def test_supported_setting_spellings():
    x, y = _blobs(n=40)
    ref = KNeighborsClassifier(3).fit(x, y).predict(x)
    for params in ({"metric": "euclidean"}, {"metric": "l2"}, {"algorithm": "brute"},
                   {"weights": None}, {"p": None}, {"metric_params": {}},
                   {"dtype": np.float64}, {"dtype": torch.float64},
                   {"p": 2.0, "leaf_size": 5, "n_jobs": 4}):
        np.testing.assert_array_equal(KNeighborsClassifier(3, **params).fit(x, y).predict(x),
                                      ref, err_msg=str(params))


def test_score_with_labels_never_seen_in_fit():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    y = np.array(["a", "a", "b", "b"])
    q = np.array([[0.5], [10.5], [0.2], [10.2]])
    yq = np.array(["a", "b", "c", "zz"])  # "c", "zz" never occur in y: simply wrong
    ours = KNeighborsClassifier(1).fit(x, y)
    theirs = SKLearnKNN(1).fit(x, y)
    assert ours.score(q, yq) == theirs.score(q, yq) == 0.5
    w = np.array([1.0, 1.0, 2.0, 0.0])
    assert ours.score(q, yq, sample_weight=w) == theirs.score(q, yq, sample_weight=w) == 0.5
    # integer labels, torch in
    yi = np.array([3, 3, 7, 7])
    ours = KNeighborsClassifier(1).fit(torch.from_numpy(x), torch.from_numpy(yi))
    assert ours.score(torch.from_numpy(q), torch.tensor([3, 7, 99, -1])) == 0.5


def test_arbitrary_labels_and_attributes():
    x, y = _blobs(n=90)
    labels = np.array([-7, 0, 12])[y]
    est = KNeighborsClassifier(5).fit(x, labels)
    np.testing.assert_array_equal(est.classes_, [-7, 0, 12])
    assert est.n_features_in_ == 5 and est.n_samples_fit_ == 90
    assert not hasattr(est, "feature_names_in_")
    assert set(est.predict(x)) <= {-7, 0, 12}
    strings = np.array(["zebra", "ant", "moth"])[y]
    est = KNeighborsClassifier(5).fit(x, strings)
    np.testing.assert_array_equal(est.classes_, ["ant", "moth", "zebra"])
    np.testing.assert_array_equal(est.predict(x), SKLearnKNN(5).fit(x, strings).predict(x))
    # a column vector y is accepted with scikit-learn's DataConversionWarning
    with pytest.warns(sklearn.exceptions.DataConversionWarning):
        KNeighborsClassifier(5).fit(x, labels[:, None])
    with pytest.raises(ValueError, match="Unknown label type"):
        KNeighborsClassifier(5).fit(x, np.linspace(0, 1, 90))


def test_feature_names_in():
    pd = pytest.importorskip("pandas")
    x, y = _blobs(n=50, d=3)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    est = KNeighborsClassifier(3).fit(frame, y)
    np.testing.assert_array_equal(est.feature_names_in_, ["a", "b", "c"])
    np.testing.assert_array_equal(est.predict(frame), KNeighborsClassifier(3).fit(x, y)
                                  .predict(x))
    with pytest.raises(ValueError, match="feature names"):
        est.predict(frame[["c", "b", "a"]])
    est.fit(torch.from_numpy(x), torch.from_numpy(y))  # a refit without names drops them
    assert not hasattr(est, "feature_names_in_")


def test_kneighbors_signature():
    x, y = _blobs(n=50)
    ours = KNeighborsClassifier(4).fit(x, y)
    theirs = SKLearnKNN(4, algorithm="brute").fit(x, y)
    for kwargs in ({}, {"n_neighbors": 2}, {"X": x[:7], "n_neighbors": 6}):
        d1, i1 = ours.kneighbors(**kwargs)
        d2, i2 = theirs.kneighbors(**kwargs)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(d1, d2, rtol=1e-7, atol=1e-7)
        np.testing.assert_array_equal(ours.kneighbors(**kwargs, return_distance=False), i2)
    dist, idx = ours.kneighbors()
    assert dist.dtype == np.float64 and idx.dtype == np.int64 and idx.shape == (50, 4)
    with pytest.raises(ValueError, match="n_neighbors"):
        ours.kneighbors(x, n_neighbors=0)


def test_torch_input_validation():
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.arange(20) % 2
    with pytest.raises(ValueError, match="2D"):
        KNeighborsClassifier(3).fit(x[:, 0], y)
    with pytest.raises(ValueError, match="NaN"):
        KNeighborsClassifier(3).fit(torch.full((4, 2), float("nan")), y[:4])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        KNeighborsClassifier(3).fit(x, y[:5])
    with pytest.raises(ValueError, match="requires y"):
        KNeighborsClassifier(3).fit(x, None)
    est = KNeighborsClassifier(3).fit(x, y)
    with pytest.raises(ValueError, match="X has 4 features, but KNeighborsClassifier is "
                                         "expecting 3 features"):
        est.predict(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        est.predict(torch.full((2, 3), float("inf")))


def test_float32_fit_with_float64_queries():
    """dtype=None keeps the fitted float32; queries are brought to the fitted dtype."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    y = rng.integers(0, 3, 80)
    est = KNeighborsClassifier(5, dtype=None).fit(x, y)
    assert est._fit_X.dtype == torch.float32
    np.testing.assert_array_equal(est.predict(x.astype(np.float64)), est.predict(x))
    np.testing.assert_array_equal(est.predict(torch.from_numpy(x).double()).numpy(),
                                  est.predict(x))


def test_import_pdepth_without_sklearn():
    """scikit-learn stays optional for pdepth; the shim then says what it needs."""
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None\n"
        "import pdepth\n"
        "try:\n"
        "    from pdepth.compat.sklearn import KNeighborsClassifier\n"
        "except ImportError as e:\n"
        "    assert 'pip install scikit-learn' in str(e), e\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cosine_matches_sklearn(dtype):
    """metric="cosine": scikit-learn's neighbours, cosine distances (1 - cos), predictions
    and probabilities, with and without X (the fitted points leave themselves out)."""
    x, y = _blobs(n=200, d=6)
    x = x - x.mean(0)  # directions differ (blobs far from the origin are all alike)
    xq = x[:50] * 3 + 0.01
    ours = KNeighborsClassifier(5, metric="cosine", dtype=dtype).fit(x, y)
    theirs = SKLearnKNN(5, metric="cosine", algorithm="brute").fit(x, y)
    assert ours.effective_metric_ == "cosine"
    tol = 1e-12 if dtype == "float64" else 1e-6
    for args in ((xq,), (None,)):
        d, i = ours.kneighbors(*args)
        sd, si = theirs.kneighbors(*args)
        np.testing.assert_array_equal(i, si)
        np.testing.assert_allclose(d, sd, atol=tol, rtol=0)
        np.testing.assert_array_equal(ours.predict(*args), theirs.predict(*args))
        np.testing.assert_array_equal(ours.predict_proba(*args), theirs.predict_proba(*args))
    # torch in, torch out, the same neighbours
    d, i = ours.kneighbors(torch.from_numpy(xq))
    np.testing.assert_array_equal(i.numpy(), theirs.kneighbors(xq)[1])
