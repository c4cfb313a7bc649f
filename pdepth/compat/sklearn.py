"""A drop-in for scikit-learn's ``KNeighborsClassifier`` (uniform vote, Euclidean or cosine
distance).

Before::

    from sklearn.neighbors import KNeighborsClassifier

After::

    from pdepth.compat.sklearn import KNeighborsClassifier

A real scikit-learn estimator (``ClassifierMixin`` + ``BaseEstimator``): it works with
``clone``, ``Pipeline``/``make_pipeline``, ``GridSearchCV``, ``cross_val_score`` and
``is_classifier``, and passes ``sklearn.utils.estimator_checks`` (the tests run
``parametrize_with_checks``). It needs scikit-learn installed (``import pdepth`` does not).

Predictions equal scikit-learn's (neighbours by Euclidean distance; vote ties to the lowest
class; ``predict`` on the fitted data counts each point as its own neighbour; ``kneighbors()``
and ``predict()`` without ``X`` leave each point out). The search runs in the pdepth k-NN op.

Supported: ``n_neighbors``, ``weights="uniform"`` (or None), ``metric`` ``"minkowski"`` with
``p=2``, ``"euclidean"``, ``"l2"`` or ``"cosine"``, ``algorithm`` ``"auto"`` or ``"brute"``
(scikit-learn itself takes ``"cosine"`` only with ``"brute"``; ``"auto"`` is brute here); ``leaf_size``
and ``n_jobs`` are accepted and ignored. pdepth's own parameters: ``dtype``, ``device`` and
``filter`` (the k-NN op's filter format, :func:`pdepth.knn`; speed only). As in
scikit-learn, the constructor and ``set_params`` only store parameters; ``fit`` validates
them and raises :class:`ValueError` for anything else (a
``sklearn.utils._param_validation.InvalidParameterError`` for values scikit-learn itself
rejects, e.g. ``n_neighbors=0``).

Inputs are validated as scikit-learn does (``validate_data``: lists, object arrays of numbers,
pandas DataFrames with ``feature_names_in_``; NaN, infinity, complex, sparse and zero-feature
input are rejected). numpy in, numpy out; torch tensors in, tensors out on the input's device
(except predicted labels that torch cannot hold, e.g. strings, which come back as numpy).
``classes_`` may be any sortable labels; they are mapped to ``0..C-1`` internally, as
scikit-learn does. Methods called before ``fit`` raise :class:`NotFittedError` (scikit-learn's,
and also a ``RuntimeError``, which this shim raised before).

Exactness: scikit-learn accumulates distances in float64 even for float32 input, so this
estimator computes in float64 by default (``dtype="float64"``). ``dtype=None`` keeps the
input's floating dtype (float32 is about twice as fast; neighbours may then differ from
scikit-learn's between points whose distances differ by less than the tolerance documented
in :func:`pdepth.reference.distance_tolerance`). Points at exactly equal distance are ordered
by lower index (pdepth's rule); scikit-learn's order between exact ties is unspecified.

``metric="cosine"``: the rows are L2-normalised by :func:`pdepth.normalize_rows` (in the
compute dtype) and ranked by the squared L2 distance of the normalised rows, which orders
them as scikit-learn's cosine distance ``1 - cos`` does; ``kneighbors`` returns that cosine
distance (half the squared distance of the normalised rows), as scikit-learn does. One
difference: pdepth keeps a zero row zero, at squared distance 1 (cosine distance 0.5) from
every nonzero row, where scikit-learn puts it at cosine distance 1 (docs/design.md
section 2, "The cosine metric").
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch

from ..ops import FILTERS, check_filter, knn, knn_vote

try:
    import sklearn  # noqa: F401
except ImportError:  # scikit-learn is optional for pdepth; this shim needs it
    _SKLEARN_IMPORT_ERROR: ImportError | None = ImportError(
        "pdepth.compat.sklearn.KNeighborsClassifier is a scikit-learn estimator and needs "
        "scikit-learn: pip install scikit-learn"
    )
else:
    _SKLEARN_IMPORT_ERROR = None

__all__ = ["KNeighborsClassifier", "NotFittedError"]


def __getattr__(name: str):
    if _SKLEARN_IMPORT_ERROR is not None and name in __all__:
        raise _SKLEARN_IMPORT_ERROR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if _SKLEARN_IMPORT_ERROR is None:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.exceptions import NotFittedError as _SKNotFittedError
    from sklearn.metrics import accuracy_score
    from sklearn.utils import assert_all_finite, check_consistent_length, column_or_1d
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted

    try:
        from sklearn.utils.validation import validate_data as _validate_data
    except ImportError:  # scikit-learn < 1.6

        def _validate_data(estimator, *args, **kwargs):
            return estimator._validate_data(*args, **kwargs)

    try:
        from sklearn.utils._param_validation import Interval, Options, StrOptions
    except ImportError:  # scikit-learn < 1.2: fit's own checks below still apply
        _CONSTRAINTS: dict = {}
    else:
        _CONSTRAINTS = {
            "n_neighbors": [Interval(Integral, 1, None, closed="left")],
            "weights": [StrOptions({"uniform", "distance"}), callable, None],
            "algorithm": [StrOptions({"auto", "ball_tree", "kd_tree", "brute"})],
            "leaf_size": [Interval(Integral, 1, None, closed="left")],
            "p": [Interval(Real, 0, None, closed="right"), None],
            "metric": [str, callable],
            "metric_params": [dict, None],
            "n_jobs": [Integral, None],
            "dtype": [StrOptions({"float64", "float32"}),
                      Options(torch.dtype, {torch.float64, torch.float32}),
                      Options(type, {np.float64, np.float32}), None],
            "device": [str, torch.device, Integral, None],
            "filter": [StrOptions(set(FILTERS))],
        }

    # scikit-learn's spellings of the metrics this shim runs -> pdepth's metric
    _METRICS = {"minkowski": "euclidean", "euclidean": "euclidean", "l2": "euclidean",
                "cosine": "cosine"}
    _DTYPES = {"float64": torch.float64, "float32": torch.float32,
               torch.float64: torch.float64, torch.float32: torch.float32,
               np.float64: torch.float64, np.float32: torch.float32}
    _NP_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}
    _TORCH_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                           torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.bool)

    class NotFittedError(_SKNotFittedError, RuntimeError):
        """Raised by methods called before ``fit``: scikit-learn's ``NotFittedError`` (hence
        a ``ValueError`` and an ``AttributeError``), and a ``RuntimeError`` for code written
        against earlier versions of this shim."""

    class KNeighborsClassifier(ClassifierMixin, BaseEstimator):
        """k-nearest-neighbours vote, with scikit-learn's ``KNeighborsClassifier`` interface.

        Args:
            n_neighbors: k (default 5, as scikit-learn).
            weights: only ``"uniform"`` (None means uniform, as in scikit-learn).
            algorithm: ``"auto"`` or ``"brute"`` (pdepth always searches exhaustively,
                exactly).
            leaf_size: ignored.
            p: 2 (with ``metric="minkowski"``; None means 2).
            metric: ``"minkowski"`` (p=2), ``"euclidean"``, ``"l2"`` or ``"cosine"``.
            metric_params: must be None or empty.
            n_jobs: ignored (the op uses torch's intra-op threads).
            dtype: compute dtype, ``"float64"`` (default: scikit-learn's precision) or
                ``"float32"``; None keeps the input's floating dtype (float32 or float64;
                other inputs become float64).
            device: where the fitted data and the search live (default: the fitted input's
                device for tensors, else the CPU).
            filter: the GEMM format the k-NN op filters candidates with (:func:`pdepth.knn`):
                ``"auto"`` (default), ``"fp32"``, ``"bf16"``, ``"bf16x3"`` or ``"tf32"``
                (CUDA only). Speed only: predictions and neighbours are the same. The
                bfloat16 and TF32 formats need float32 compute (``dtype="float32"``, or None
                with float32 input); ``fit`` raises ``ValueError`` otherwise.

        Parameters are stored as given and validated by ``fit`` (scikit-learn's convention).

        Attributes (after ``fit``): ``classes_``, ``n_features_in_``, ``feature_names_in_``
        (only for input with string column names, e.g. a DataFrame), ``n_samples_fit_``,
        ``effective_metric_`` (``"euclidean"`` or ``"cosine"``), ``effective_metric_params_``,
        ``outputs_2d_`` (False).
        """

        _parameter_constraints: dict = _CONSTRAINTS

        def __init__(
            self,
            n_neighbors: int = 5,
            *,
            weights: str | None = "uniform",
            algorithm: str = "auto",
            leaf_size: int = 30,
            p: float | None = 2,
            metric: str = "minkowski",
            metric_params: dict | None = None,
            n_jobs: int | None = None,
            dtype: str | torch.dtype | None = "float64",
            device: str | torch.device | None = None,
            filter: str = "auto",
        ):
            self.n_neighbors = n_neighbors
            self.weights = weights
            self.algorithm = algorithm
            self.leaf_size = leaf_size
            self.p = p
            self.metric = metric
            self.metric_params = metric_params
            self.n_jobs = n_jobs
            self.dtype = dtype
            self.device = device
            self.filter = filter

        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.input_tags.allow_nan = False
            tags.input_tags.sparse = False
            tags.target_tags.multi_output = False
            return tags

        def __sklearn_is_fitted__(self) -> bool:
            return hasattr(self, "_fit_X")

        # -- parameters ---------------------------------------------------------------------

        def _check_params(self) -> None:
            """Validates the parameters (called by ``fit``): scikit-learn's constraints first,
            then the settings this shim supports."""
            if self._parameter_constraints and hasattr(self, "_validate_params"):
                self._validate_params()

            def unsupported(what: str) -> ValueError:
                return ValueError(
                    "pdepth.compat.sklearn.KNeighborsClassifier supports only uniform weights "
                    f"and the Euclidean or cosine distance; got {what}. Use sklearn.neighbors."
                    "KNeighborsClassifier for other settings."
                )

            _check_n_neighbors(self.n_neighbors)
            if self.weights is not None and not (
                isinstance(self.weights, str) and self.weights == "uniform"
            ):
                raise unsupported(f"weights={self.weights!r}")
            metric = self.metric
            if not isinstance(metric, str) or metric not in _METRICS:
                raise unsupported(f"metric={metric!r}")
            if metric == "minkowski" and self.p is not None and self.p != 2:
                raise unsupported(f"metric='minkowski' with p={self.p!r} (only p=2)")
            if self.metric_params:
                raise unsupported(f"metric_params={self.metric_params!r}")
            if not isinstance(self.algorithm, str) or self.algorithm not in ("auto", "brute"):
                raise unsupported(
                    f"algorithm={self.algorithm!r} (pdepth searches exhaustively: use 'auto' "
                    "or 'brute')"
                )
            if self.dtype is not None and not _hashable_in(self.dtype, _DTYPES):
                raise ValueError(
                    f"dtype must be 'float64', 'float32' or None, got {self.dtype!r}"
                )

        # -- input handling -----------------------------------------------------------------

        def _compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
            if self.dtype is not None:
                return _DTYPES[self.dtype]
            return input_dtype if input_dtype in (torch.float32, torch.float64) else \
                torch.float64

        def _torch_X(self, X: torch.Tensor, reset: bool) -> torch.Tensor:
            """Validates a tensor as ``validate_data`` validates arrays (dims, dtype, sample
            and feature counts, finiteness); returns it on its own device, dtype unchanged."""
            if X.layout != torch.strided:
                raise TypeError(
                    "Sparse data was passed for X, but dense data is required; pass a dense "
                    "tensor"
                )
            if X.dim() != 2:
                raise ValueError(
                    f"Expected 2D array, got {X.dim()}D array instead (shape "
                    f"{tuple(X.shape)}); reshape your data to (n_samples, n_features)"
                )
            if X.is_complex():
                raise ValueError("Complex data not supported")
            if X.dtype not in _TORCH_INPUT_DTYPES:
                raise ValueError(f"X: dtype {X.dtype} is not supported")
            n, d = X.shape
            if n < 1:
                raise ValueError(f"Found array with 0 sample(s) (shape={tuple(X.shape)}) "
                                 "while a minimum of 1 is required by KNeighborsClassifier.")
            if d < 1:
                raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) "
                                 "while a minimum of 1 is required by KNeighborsClassifier.")
            if X.is_floating_point() and not torch.isfinite(X).all():
                raise ValueError("Input X contains NaN or infinity.")
            if reset:
                self.n_features_in_ = int(d)
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            elif d != self.n_features_in_:
                raise ValueError(
                    f"X has {d} features, but KNeighborsClassifier is expecting "
                    f"{self.n_features_in_} features as input."
                )
            return X.detach()

        def _numpy_dtype(self):
            if self.dtype is not None:
                return _NP_DTYPES[_DTYPES[self.dtype]]
            return [np.float64, np.float32]

        @staticmethod
        def _from_numpy(X: np.ndarray) -> torch.Tensor:
            # C-contiguous and writable (torch warns on read-only arrays, e.g. memmaps)
            return torch.from_numpy(np.require(X, requirements=["C", "W"]))

        def _check_fitted(self) -> None:
            try:
                check_is_fitted(self)
            except _SKNotFittedError as e:
                raise NotFittedError(str(e)) from None

        def _queries(self, X):
            """(queries, self_index or None, self_match, output-as-torch, output device)."""
            self._check_fitted()
            if X is None:
                n = self.n_samples_fit_
                return (self._fit_X, torch.arange(n, device=self._fit_X.device), "exclude",
                        self._fit_torch, self._fit_out_device)
            if isinstance(X, torch.Tensor):
                q = self._torch_X(X, reset=False)
                out = (True, X.device)
            else:
                q = self._from_numpy(_validate_data(self, X, reset=False,
                                                    dtype=self._numpy_dtype()))
                out = (False, None)
            q = q.to(device=self._fit_X.device, dtype=self._fit_X.dtype)
            return (q, None, "include", *out)

        def _k(self, n_neighbors, self_excluded: bool, n_queries: int) -> int:
            k = _check_n_neighbors(self.n_neighbors if n_neighbors is None else n_neighbors)
            n = self.n_samples_fit_
            if self_excluded and k >= n:
                raise ValueError(
                    f"Expected n_neighbors < n_samples_fit, but n_neighbors = {k}, "
                    f"n_samples_fit = {n}, n_samples = {n_queries}"
                )
            if k > n:
                raise ValueError(
                    f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                    f"n_samples_fit = {n}, n_samples = {n_queries}"
                )
            return int(k)

        def _labels_out(self, pred: torch.Tensor, as_torch: bool, device):
            labels = self.classes_[pred.cpu().numpy()]
            if as_torch and labels.dtype.kind in "biuf":
                return torch.as_tensor(labels, device=device)
            return labels

        @staticmethod
        def _array_out(t: torch.Tensor, as_torch: bool, device):
            return t.to(device) if as_torch else t.cpu().numpy()

        # -- API ----------------------------------------------------------------------------

        def fit(self, X, y):
            """Validates the parameters and stores the training data. ``X`` ``[n, d]``
            (array-like or tensor), ``y`` ``[n]`` class labels of any sortable kind (numbers,
            strings). Returns ``self``."""
            self._check_params()
            if isinstance(y, torch.Tensor):
                y = y.detach().cpu().numpy()
            if isinstance(X, torch.Tensor):
                x = self._torch_X(X, reset=True)
                if y is None:
                    raise ValueError("This KNeighborsClassifier estimator requires y to be "
                                     "passed, but the target y is None.")
                y = column_or_1d(y, warn=True)
                check_consistent_length(x, y)
                if y.dtype.kind in "fc":
                    assert_all_finite(y, input_name="y")
                fit_torch, out_device = True, X.device
            else:
                x, y = _validate_data(self, X, y, dtype=self._numpy_dtype())
                x = self._from_numpy(x)
                fit_torch, out_device = False, None
            check_classification_targets(y)
            device = self.device
            if device is None:
                device = x.device if fit_torch else "cpu"
            fit_x = x.to(device=torch.device(device), dtype=self._compute_dtype(x.dtype))
            # the op's rule for filter= against the compute dtype and device, before storing
            check_filter("KNeighborsClassifier.fit", self.filter, fit_x.dtype, fit_x.device)
            classes, y_enc = np.unique(y, return_inverse=True)
            self.classes_ = classes
            self._fit_X = fit_x
            self._y = torch.as_tensor(y_enc.reshape(-1), dtype=torch.int64,
                                      device=fit_x.device)
            self._fit_torch = fit_torch
            self._fit_out_device = out_device
            self.n_samples_fit_ = int(fit_x.shape[0])
            self.effective_metric_ = _METRICS[self.metric]
            self.effective_metric_params_ = {}
            self.outputs_2d_ = False
            self._fit_method = "brute"
            return self

        def kneighbors(self, X=None, n_neighbors: int | None = None,
                       return_distance: bool = True):
            """The ``n_neighbors`` nearest fitted points of each row of ``X``: Euclidean (or,
            with ``metric="cosine"``, cosine) distances ``[m, k]`` (float64, ascending) and indices ``[m, k]`` (int64). Without
            ``X``, the fitted points' neighbours, each point left out of its own list."""
            q, self_index, policy, as_torch, device = self._queries(X)
            k = self._k(n_neighbors, X is None, q.shape[0])
            dist, index = knn(q, self._fit_X, k, self_index=self_index, self_match=policy,
                              filter=self.filter, metric=self.effective_metric_)
            index = self._array_out(index, as_torch, device)
            if not return_distance:
                return index
            dist = dist.to(torch.float64).clamp_min_(0.0)
            # scikit-learn's distances: Euclidean, or the cosine distance 1 - cos = d2 / 2
            dist = dist.sqrt_() if self.effective_metric_ == "euclidean" else dist.mul_(0.5)
            return self._array_out(dist, as_torch, device), index

        def predict(self, X=None):
            """Predicted class labels ``[m]`` (the majority label of the k nearest fitted
            points; ties to the lowest class). Without ``X``, the fitted points, each leaving
            itself out."""
            q, self_index, policy, as_torch, device = self._queries(X)
            k = self._k(None, X is None, q.shape[0])
            pred = knn_vote(q, self._fit_X, self._y, k, len(self.classes_),
                            self_index=self_index, self_match=policy, filter=self.filter,
                            metric=self.effective_metric_).pred
            return self._labels_out(pred, as_torch, device)

        def predict_proba(self, X=None):
            """Class probabilities ``[m, C]`` (float64): the fraction of the k nearest fitted
            points in each class, columns in the order of ``classes_``."""
            q, self_index, policy, as_torch, device = self._queries(X)
            k = self._k(None, X is None, q.shape[0])
            index = knn(q, self._fit_X, k, self_index=self_index, self_match=policy,
                        filter=self.filter, metric=self.effective_metric_).index
            neighbor_labels = self._y[index]
            counts = torch.zeros(q.shape[0], len(self.classes_), dtype=torch.float64,
                                 device=q.device)
            counts.scatter_add_(1, neighbor_labels,
                                torch.ones_like(neighbor_labels, dtype=torch.float64))
            return self._array_out(counts / k, as_torch, device)

        def score(self, X, y, sample_weight=None) -> float:
            """Mean accuracy of ``predict(X)`` against ``y`` (optionally weighted), as
            scikit-learn's ``accuracy_score``: labels of ``y`` never seen in ``fit`` are
            simply wrong predictions."""
            pred = self.predict(X)
            pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else pred
            y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
            if isinstance(sample_weight, torch.Tensor):
                sample_weight = sample_weight.detach().cpu().numpy()
            return float(accuracy_score(y, pred, sample_weight=sample_weight))

    def _check_n_neighbors(k):
        """``k`` when it is a positive integer (booleans are not), else ``ValueError``."""
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"n_neighbors must be a positive integer, got {k!r}")
        return k

    def _hashable_in(value, table: dict) -> bool:
        try:
            return value in table
        except TypeError:  # unhashable value
            return False
