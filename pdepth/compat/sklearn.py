"""A drop-in for scikit-learn's ``KNeighborsClassifier`` (uniform vote, Euclidean distance).

Before::

    from sklearn.neighbors import KNeighborsClassifier

After::

    from pdepth.compat.sklearn import KNeighborsClassifier

Predictions equal scikit-learn's (neighbours by Euclidean distance; vote ties to the lowest
class; ``predict`` on the fitted data counts each point as its own neighbour; ``kneighbors()``
and ``predict()`` without ``X`` leave each point out). The search runs in the pdepth k-NN op.

Supported: ``n_neighbors``, ``weights="uniform"``, ``metric`` ``"minkowski"`` with ``p=2``,
``"euclidean"`` or ``"l2"``, ``algorithm`` ``"auto"`` or ``"brute"``; ``leaf_size`` and
``n_jobs`` are accepted and ignored. Anything else raises :class:`ValueError` at construction
and at ``fit``. Inputs may be numpy arrays (outputs are numpy) or torch tensors (outputs are
tensors on the input's device, except predicted labels that torch cannot hold, e.g. strings,
which come back as numpy). ``classes_`` may be any sortable labels; they are mapped to
``0..C-1`` internally, as scikit-learn does.

Exactness: scikit-learn accumulates distances in float64 even for float32 input, so this
estimator computes in float64 by default (``dtype="float64"``). ``dtype=None`` keeps the
input's floating dtype (float32 is about twice as fast; neighbours may then differ from
scikit-learn's between points whose distances differ by less than the tolerance documented
in :func:`pdepth.reference.distance_tolerance`). Points at exactly equal distance are ordered
by lower index (pdepth's rule); scikit-learn's order between exact ties is unspecified.
"""

from __future__ import annotations

import numpy as np
import torch

from ..knn import knn, knn_vote

__all__ = ["KNeighborsClassifier"]

_PARAMS = ("n_neighbors", "weights", "algorithm", "leaf_size", "p", "metric", "metric_params",
           "n_jobs", "dtype", "device")
_DTYPES = {"float64": torch.float64, "float32": torch.float32, torch.float64: torch.float64,
           torch.float32: torch.float32, np.float64: torch.float64, np.float32: torch.float32}


class KNeighborsClassifier:
    """k-nearest-neighbours vote, with scikit-learn's ``KNeighborsClassifier`` interface.

    Args:
        n_neighbors: k (default 5, as scikit-learn).
        weights: only ``"uniform"``.
        algorithm: ``"auto"`` or ``"brute"`` (pdepth always searches exhaustively, exactly).
        leaf_size: ignored.
        p: 2 (with ``metric="minkowski"``).
        metric: ``"minkowski"`` (p=2), ``"euclidean"`` or ``"l2"``.
        metric_params: must be None.
        n_jobs: ignored (the op uses torch's intra-op threads).
        dtype: compute dtype, ``"float64"`` (default: scikit-learn's precision) or
            ``"float32"``; None keeps the input's floating dtype (integers become float64).
        device: where the fitted data and the search live (default: the fitted input's
            device for tensors, else the CPU).
    """

    def __init__(
        self,
        n_neighbors: int = 5,
        *,
        weights: str = "uniform",
        algorithm: str = "auto",
        leaf_size: int = 30,
        p: float = 2,
        metric: str = "minkowski",
        metric_params: dict | None = None,
        n_jobs: int | None = None,
        dtype: str | torch.dtype | None = "float64",
        device: str | torch.device | None = None,
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
        self._check_params()

    # -- scikit-learn estimator protocol ----------------------------------------------------

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in _PARAMS}

    def set_params(self, **params) -> KNeighborsClassifier:
        for name, value in params.items():
            if name not in _PARAMS:
                raise ValueError(f"Invalid parameter {name!r} for KNeighborsClassifier; "
                                 f"valid parameters are {_PARAMS}")
            setattr(self, name, value)
        self._check_params()
        return self

    def __repr__(self) -> str:
        defaults = KNeighborsClassifier.__init__.__kwdefaults__
        changed = [f"{name}={getattr(self, name)!r}" for name in _PARAMS
                   if name != "n_neighbors" and getattr(self, name) != defaults.get(name)]
        if self.n_neighbors != 5:
            changed.insert(0, f"n_neighbors={self.n_neighbors!r}")
        return f"KNeighborsClassifier({', '.join(changed)})"

    def _check_params(self) -> None:
        def unsupported(what: str) -> ValueError:
            return ValueError(
                f"pdepth.compat.sklearn.KNeighborsClassifier supports only uniform weights and "
                f"the Euclidean distance; got {what}. Use sklearn.neighbors."
                "KNeighborsClassifier for other settings."
            )

        if isinstance(self.n_neighbors, bool) or not isinstance(
            self.n_neighbors, (int, np.integer)
        ) or self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        if self.weights != "uniform":
            raise unsupported(f"weights={self.weights!r}")
        metric = self.metric
        if not isinstance(metric, str) or metric not in ("minkowski", "euclidean", "l2"):
            raise unsupported(f"metric={metric!r}")
        if metric == "minkowski" and self.p != 2:
            raise unsupported(f"metric='minkowski' with p={self.p!r} (only p=2)")
        if self.metric_params:
            raise unsupported(f"metric_params={self.metric_params!r}")
        if self.algorithm not in ("auto", "brute"):
            raise unsupported(
                f"algorithm={self.algorithm!r} (pdepth searches exhaustively: use 'auto' or "
                "'brute')"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float64', 'float32' or None, got {self.dtype!r}")

    # -- input handling ---------------------------------------------------------------------

    def _tensor(self, X, name: str = "X", device=None) -> torch.Tensor:
        if hasattr(X, "tocsr") or getattr(X, "is_sparse", False):
            raise ValueError(f"{name}: sparse input is not supported; pass a dense array")
        t = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))
        if t.dim() != 2:
            raise ValueError(
                f"Expected 2D array for {name}, got shape {tuple(t.shape)}; reshape your data "
                "to (n_samples, n_features)"
            )
        if t.is_complex() or not (t.is_floating_point() or t.dtype in (
            torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool
        )):
            raise ValueError(f"{name}: dtype {t.dtype} is not supported")
        if self.dtype is not None:
            dtype = _DTYPES[self.dtype]
        elif t.is_floating_point() and t.dtype in (torch.float32, torch.float64):
            dtype = t.dtype
        else:
            dtype = torch.float64
        t = t.to(device=device if device is not None else t.device, dtype=dtype)
        if t.numel() and not torch.isfinite(t).all():
            raise ValueError(f"Input {name} contains NaN or infinity.")
        return t

    def _check_fitted(self) -> None:
        if not hasattr(self, "_fit_X"):
            raise RuntimeError(
                "This KNeighborsClassifier instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )

    def _queries(self, X):
        """(queries, self_index or None, self_match, output-as-torch, output device)."""
        self._check_fitted()
        if X is None:
            n = self.n_samples_fit_
            return (self._fit_X, torch.arange(n, device=self._fit_X.device), "exclude",
                    self._fit_torch, self._fit_out_device)
        q = self._tensor(X, "X", device=self._fit_X.device)
        if q.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {q.shape[1]} features, but KNeighborsClassifier is expecting "
                f"{self.n_features_in_} features as input."
            )
        is_torch = isinstance(X, torch.Tensor)
        return q, None, "include", is_torch, X.device if is_torch else None

    def _k(self, n_neighbors, self_excluded: bool, n_queries: int) -> int:
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_neighbors must be a positive integer, got {k!r}")
        n = self.n_samples_fit_
        if self_excluded and k >= n:
            raise ValueError(
                f"Expected n_neighbors < n_samples_fit, but n_neighbors = {k}, n_samples_fit = "
                f"{n}, n_samples = {n_queries}"
            )
        if k > n:
            raise ValueError(
                f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, n_samples_fit = "
                f"{n}, n_samples = {n_queries}"
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

    # -- API --------------------------------------------------------------------------------

    def fit(self, X, y) -> KNeighborsClassifier:
        """Stores the training data. ``X`` ``[n, d]``, ``y`` ``[n]`` labels of any sortable
        kind (numbers, strings)."""
        self._check_params()
        device = self.device
        if device is None and isinstance(X, torch.Tensor):
            device = X.device
        fit_x = self._tensor(X, "X", device=torch.device(device) if device is not None else
                             torch.device("cpu"))
        y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        if y_np.ndim == 2 and y_np.shape[1] == 1:
            y_np = y_np.ravel()
        if y_np.ndim != 1:
            raise ValueError(
                f"y must be 1-D (n_samples,), got shape {y_np.shape}; multi-output targets "
                "are not supported"
            )
        if y_np.shape[0] != fit_x.shape[0]:
            raise ValueError(
                "Found input variables with inconsistent numbers of samples: "
                f"[{fit_x.shape[0]}, {y_np.shape[0]}]"
            )
        if fit_x.shape[0] == 0:
            raise ValueError("Found array with 0 sample(s) (shape=(0, d)) while a minimum of 1 "
                             "is required.")
        classes, y_enc = np.unique(y_np, return_inverse=True)
        self.classes_ = classes
        self._fit_X = fit_x
        self._y = torch.as_tensor(y_enc.reshape(-1), dtype=torch.int64, device=fit_x.device)
        self._fit_torch = isinstance(X, torch.Tensor)
        self._fit_out_device = X.device if self._fit_torch else None
        self.n_features_in_ = int(fit_x.shape[1])
        self.n_samples_fit_ = int(fit_x.shape[0])
        self.effective_metric_ = "euclidean"
        self.effective_metric_params_ = {}
        self.outputs_2d_ = False
        self._fit_method = "brute"
        return self

    def kneighbors(self, X=None, n_neighbors: int | None = None, return_distance: bool = True):
        """The ``n_neighbors`` nearest fitted points of each row of ``X``: Euclidean distances
        ``[m, k]`` (float64, ascending) and indices ``[m, k]`` (int64). Without ``X``, the
        fitted points' neighbours, each point left out of its own list."""
        q, self_index, policy, as_torch, device = self._queries(X)
        k = self._k(n_neighbors, X is None, q.shape[0])
        dist, index = knn(q, self._fit_X, k, self_index=self_index, self_match=policy)
        index = self._array_out(index, as_torch, device)
        if not return_distance:
            return index
        dist = dist.to(torch.float64).clamp_min_(0.0).sqrt_()
        return self._array_out(dist, as_torch, device), index

    def predict(self, X=None):
        """Predicted class labels ``[m]`` (the majority label of the k nearest fitted points;
        ties to the lowest class). Without ``X``, the fitted points, each leaving itself out."""
        q, self_index, policy, as_torch, device = self._queries(X)
        k = self._k(None, X is None, q.shape[0])
        pred = knn_vote(q, self._fit_X, self._y, k, len(self.classes_), self_index=self_index,
                        self_match=policy).pred
        return self._labels_out(pred, as_torch, device)

    def predict_proba(self, X=None):
        """Class probabilities ``[m, C]`` (float64): the fraction of the k nearest fitted points
        in each class, columns in the order of ``classes_``."""
        q, self_index, policy, as_torch, device = self._queries(X)
        k = self._k(None, X is None, q.shape[0])
        index = knn(q, self._fit_X, k, self_index=self_index, self_match=policy).index
        neighbor_labels = self._y[index]
        counts = torch.zeros(q.shape[0], len(self.classes_), dtype=torch.float64,
                             device=q.device)
        counts.scatter_add_(1, neighbor_labels, torch.ones_like(neighbor_labels,
                                                                dtype=torch.float64))
        return self._array_out(counts / k, as_torch, device)

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy of ``predict(X)`` against ``y`` (optionally weighted)."""
        pred = self.predict(X)
        pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        w = None if sample_weight is None else (
            sample_weight.detach().cpu().numpy() if isinstance(sample_weight, torch.Tensor)
            else np.asarray(sample_weight)
        )
        return float(np.average(pred == y_np.reshape(pred.shape), weights=w))
