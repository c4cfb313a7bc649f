"""Prediction depth (design.md section 1) on top of the k-NN op (section 2).

:func:`prediction_depth` runs one k-NN classifier per probe, streaming the probes one layer
at a time (only one layer's embeddings need to be resident), and reduces the per-probe
predictions to a depth with :func:`depth_from_predictions`. :func:`aggregate` combines the
per-model depths of an ensemble into effective depths per split (train / held out).

The k-NN work is always done by :func:`pdepth.knn_vote` (the compiled op); nothing here
computes distances or votes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ops import SELF_MATCH_POLICIES, knn_vote

__all__ = [
    "REFERENCE_MODES",
    "DepthResult",
    "EnsembleDepth",
    "aggregate",
    "depth_from_predictions",
    "prediction_depth",
]

REFERENCE_MODES = ("network", "labels", "last_probe")
_FORMAT_VERSION = 1


def _version() -> str:
    from ._version import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# The depth rule
# ---------------------------------------------------------------------------------------------


def depth_from_predictions(layer_pred, reference):
    """The prediction-depth rule alone (design.md section 1), vectorised.

    Args:
        layer_pred: ``[L, M]`` integer predictions of the L probes (input to output) for M
            examples (torch tensor or numpy array).
        reference: ``[M]`` integer reference labels (the network's prediction, labels, ...).

    Returns:
        ``[M]`` int64: for each example the smallest ``l`` in ``0..L`` such that
        ``layer_pred[j] == reference`` for every ``j >= l``. 0 means every probe agrees; L
        means the last probe disagrees. A numpy array when ``layer_pred`` is one, else a
        tensor on ``layer_pred``'s device.
    """
    as_numpy = isinstance(layer_pred, np.ndarray)
    lp = torch.as_tensor(layer_pred)
    ref = torch.as_tensor(reference, device=lp.device)
    if lp.dim() != 2:
        raise ValueError(f"layer_pred must be 2-D [L, M], got shape {tuple(lp.shape)}")
    if ref.dim() != 1:
        raise ValueError(f"reference must be 1-D [M], got shape {tuple(ref.shape)}")
    if lp.shape[1] != ref.shape[0]:
        raise ValueError(
            f"reference has {ref.shape[0]} entries but layer_pred has M={lp.shape[1]} "
            f"columns (shape {tuple(lp.shape)})"
        )
    num_layers = lp.shape[0]
    agree = (lp == ref.unsqueeze(0)).to(torch.int64)
    # Number of trailing probes (from the output backwards) that agree with the reference.
    trailing = agree.flip(0).cumprod(0).sum(0) if num_layers else torch.zeros_like(ref, dtype=torch.int64)
    depth = (num_layers - trailing).to(torch.int64)
    return depth.cpu().numpy() if as_numpy else depth


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

_ARRAYS = ("depth", "layer_pred", "reference", "layer_agreement")
_OPTIONAL_ARRAYS = ("layer_accuracy", "labels", "example_index")
_SETTINGS = ("k", "self_match", "reference_mode", "num_layers", "num_classes", "layer_names",
             "version")


@dataclass(eq=False)
class DepthResult:
    """Prediction depth of M examples over L probes (all tensors on the CPU).

    Attributes:
        depth: ``[M]`` int64 in ``0..L``.
        layer_pred: ``[L, M]`` int64, each probe's k-NN prediction.
        reference: ``[M]`` int64, what the probes are compared with.
        layer_agreement: ``[L]`` float64, fraction of examples whose probe prediction equals
            the reference.
        layer_accuracy: ``[L]`` float64, fraction equal to the labels, where labels are known
            (else None).
        labels: ``[M]`` int64 labels of the examples, where known (else None).
        example_index: ``[M]`` int64 dataset indices of the examples (for :func:`aggregate`),
            or None.
        k, self_match, reference_mode, num_layers, num_classes, layer_names: the settings
            used (``reference_mode`` is ``"network"``, ``"labels"``, ``"last_probe"`` or
            ``"tensor"``; ``layer_names`` the keys of an ordered dict of layers, else None).
        version: the pdepth version that computed it.
    """

    depth: torch.Tensor
    layer_pred: torch.Tensor
    reference: torch.Tensor
    layer_agreement: torch.Tensor
    layer_accuracy: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    example_index: torch.Tensor | None = None
    k: int = 30
    self_match: str = "exclude"
    reference_mode: str = "network"
    num_layers: int = 0
    num_classes: int = 0
    layer_names: list[str] | None = None
    version: str = field(default_factory=_version)

    @property
    def num_examples(self) -> int:
        return int(self.depth.shape[0])

    def settings(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return {name: getattr(self, name) for name in _SETTINGS}

    def equals(self, other: DepthResult) -> bool:
        """Exact equality of every array (dtype included) and every setting."""
        if not isinstance(other, DepthResult) or self.settings() != other.settings():
            return False
        return all(
            _same(getattr(self, name), getattr(other, name))
            for name in _ARRAYS + _OPTIONAL_ARRAYS
        )

    def to_pandas(self):
        """One row per example: ``example_index`` (when known), ``depth``, ``reference``,
        ``label`` (when known) and ``pred_0 .. pred_{L-1}``. Settings, layer names and the
        per-layer accuracy / agreement are in ``DataFrame.attrs``."""
        import pandas as pd

        df = pd.DataFrame(self._columns())
        df.attrs.update(self.settings())
        df.attrs["layer_agreement"] = self.layer_agreement.tolist()
        df.attrs["layer_accuracy"] = (
            None if self.layer_accuracy is None else self.layer_accuracy.tolist()
        )
        return df

    def _columns(self) -> dict[str, np.ndarray]:
        cols: dict[str, np.ndarray] = {}
        if self.example_index is not None:
            cols["example_index"] = self.example_index.numpy()
        cols["depth"] = self.depth.numpy()
        cols["reference"] = self.reference.numpy()
        if self.labels is not None:
            cols["label"] = self.labels.numpy()
        for layer in range(self.layer_pred.shape[0]):
            cols[f"pred_{layer}"] = self.layer_pred[layer].numpy()
        return cols

    def _meta(self) -> dict[str, Any]:
        return {"format": "pdepth.DepthResult", "format_version": _FORMAT_VERSION,
                **self.settings()}

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Saves to ``.npz`` (one file) or ``.parquet`` (per-example table, plus a JSON
        sidecar ``<path>.json`` holding the settings, the per-layer statistics, the row count
        and the SHA-256 of the table file).

        ``format`` (``"npz"`` or ``"parquet"``) defaults to the file suffix. Returns the path
        written. :meth:`load` restores an object for which :meth:`equals` holds.

        Each file is written to a temporary file in the same directory and moved into place
        with :func:`os.replace`, so a reader never sees a half-written file. The parquet table
        and its sidecar are two files: the sidecar is replaced last, and it names the
        table's checksum, so :meth:`load` detects a pair from different saves (an interrupted
        save, a copied or edited sidecar or table) instead of loading it.
        """
        path = Path(path)
        fmt = _format(path, format)
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "npz":
            arrays = {name: getattr(self, name).numpy() for name in _ARRAYS}
            for name in _OPTIONAL_ARRAYS:
                if getattr(self, name) is not None:
                    arrays[name] = getattr(self, name).numpy()
            arrays["meta"] = np.array(json.dumps(self._meta()))
            buf = io.BytesIO()  # a file object keeps np.savez from adding ".npz"
            np.savez(buf, **arrays)
            _atomic_write(path, buf.getvalue())
            return path
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table(self._columns()), buf)
        table_bytes = buf.getvalue()
        sidecar = {
            **self._meta(),
            "num_examples": self.num_examples,
            "table_sha256": hashlib.sha256(table_bytes).hexdigest(),
            "layer_agreement": self.layer_agreement.tolist(),
            "layer_accuracy": None if self.layer_accuracy is None else self.layer_accuracy.tolist(),
        }
        _atomic_write(path, table_bytes)
        _atomic_write(_sidecar(path), json.dumps(sidecar, indent=1).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, format: str | None = None) -> DepthResult:
        """Loads a result written by :meth:`save` (format from the suffix by default).

        Raises ``ValueError`` when the file is not a consistent result: arrays whose shapes
        disagree with each other or with the stored ``num_layers`` / ``layer_names``, depths
        that do not follow from ``layer_pred`` and ``reference``, or (parquet) a sidecar that
        does not belong to the table next to it (other row count, other checksum).
        """
        path = Path(path)
        fmt = _format(path, format)
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                if "meta" not in z.files:
                    raise ValueError(f"{path} was not written by DepthResult.save (no 'meta')")
                meta = json.loads(str(z["meta"][()]))
                arrays = {name: torch.from_numpy(z[name].copy()) for name in z.files
                          if name != "meta"}
            _check_meta(meta, path)
            unknown = set(arrays) - set(_ARRAYS) - set(_OPTIONAL_ARRAYS)
            missing = set(_ARRAYS) - set(arrays)
            if unknown or missing:
                raise ValueError(
                    f"{path}: not a DepthResult file: missing arrays {sorted(missing)}, "
                    f"unknown arrays {sorted(unknown)}"
                )
            result = cls(**arrays, **{name: meta[name] for name in _SETTINGS})
            result._validate(path)
            return result
        import pyarrow.parquet as pq

        sidecar = _sidecar(path)
        if not sidecar.exists():
            raise ValueError(f"{path}: its sidecar {sidecar.name} is missing; DepthResult.save "
                             "writes both files")
        meta = json.loads(sidecar.read_text())
        _check_meta(meta, path)
        table_bytes = path.read_bytes()
        want_sha = meta.get("table_sha256")  # absent in files written before pdepth checked it
        if want_sha is not None and hashlib.sha256(table_bytes).hexdigest() != want_sha:
            raise ValueError(
                f"{path}: the sidecar {sidecar.name} does not belong to this table (the "
                "table's checksum differs from the one the sidecar records): the pair comes "
                "from different saves, an interrupted save or an edit. Save the result again."
            )
        table = pq.read_table(io.BytesIO(table_bytes))
        m = meta["num_examples"]
        if table.num_rows != m:
            raise ValueError(
                f"{path}: the table has {table.num_rows} rows but its sidecar {sidecar.name} "
                f"records num_examples={m}; the two files do not belong together"
            )
        cols = {name: torch.from_numpy(table.column(name).to_numpy().copy())
                for name in table.column_names}
        num_layers = meta["num_layers"]
        pred_cols = sorted((name for name in cols if name.startswith("pred_")),
                           key=lambda name: (len(name), name))
        want_cols = [f"pred_{layer}" for layer in range(num_layers)]
        if pred_cols != want_cols:
            raise ValueError(
                f"{path}: the sidecar {sidecar.name} records num_layers={num_layers} but the "
                f"table has the prediction columns {pred_cols}; the two files do not belong "
                "together"
            )
        for name in ("depth", "reference"):
            if name not in cols:
                raise ValueError(f"{path}: the table has no {name!r} column")
        layer_pred = (
            torch.stack([cols[name] for name in want_cols])
            if num_layers else torch.empty(0, m, dtype=torch.int64)
        )
        acc = meta["layer_accuracy"]
        result = cls(
            depth=cols["depth"],
            layer_pred=layer_pred,
            reference=cols["reference"],
            layer_agreement=torch.tensor(meta["layer_agreement"], dtype=torch.float64),
            layer_accuracy=None if acc is None else torch.tensor(acc, dtype=torch.float64),
            labels=cols.get("label"),
            example_index=cols.get("example_index"),
            **{name: meta[name] for name in _SETTINGS},
        )
        result._validate(path)
        return result

    def _validate(self, source) -> None:
        """Raises ValueError naming ``source`` unless the arrays and settings agree."""
        m, num_layers = self.num_examples, self.num_layers
        problems = []

        def shape(name, want):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                problems.append(f"{name} has shape {tuple(t.shape)}, expected {want}")

        if self.depth.dim() != 1:
            problems.append(f"depth must be 1-D, got shape {tuple(self.depth.shape)}")
        else:
            shape("layer_pred", (num_layers, m))
            for name in ("reference", "labels", "example_index"):
                shape(name, (m,))
            for name in ("layer_agreement", "layer_accuracy"):
                shape(name, (num_layers,))
        if self.layer_names is not None and len(self.layer_names) != num_layers:
            problems.append(f"layer_names has {len(self.layer_names)} names for "
                            f"num_layers={num_layers}")
        for name in ("depth", "layer_pred", "reference", "labels", "example_index"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.int64:
                problems.append(f"{name} has dtype {t.dtype}, expected torch.int64")
        if not problems and not torch.equal(
                depth_from_predictions(self.layer_pred, self.reference), self.depth):
            problems.append("depth does not follow from layer_pred and reference")
        if problems:
            raise ValueError(
                f"{source} is not a consistent DepthResult (num_layers={num_layers}, "
                f"{m} entries in depth): " + "; ".join(problems))


_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory and
    :func:`os.replace`: readers see the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; keep open()'s permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Exact equality, dtype included; NaN equals NaN."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def _format(path: Path, format: str | None) -> str:
    fmt = format or path.suffix.lstrip(".").lower()
    if fmt not in ("npz", "parquet"):
        raise ValueError(
            f"cannot tell the format of {str(path)!r}: use a .npz or .parquet suffix, or "
            "format='npz' / 'parquet'"
        )
    return fmt


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _check_meta(meta: dict, path: Path) -> None:
    if meta.get("format") != "pdepth.DepthResult":
        raise ValueError(f"{path} was not written by DepthResult.save")
    if meta.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {meta['format_version']}; this pdepth "
            f"({_version()}) reads up to {_FORMAT_VERSION}"
        )


# ---------------------------------------------------------------------------------------------
# prediction_depth
# ---------------------------------------------------------------------------------------------


def _int_vector(x, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _layer_iter(layers, name: str):
    """(names or None, iterator over layers) for a list, ordered dict, generator or a stacked
    tensor / array [L, n, ...]."""
    if isinstance(layers, Mapping):
        return [str(key) for key in layers.keys()], iter(layers.values())
    if isinstance(layers, (torch.Tensor, np.ndarray)) and layers.ndim < 3:
        raise ValueError(
            f"{name} must be a list, ordered dict or generator of L tensors shaped (n, ...), "
            f"got a single array of shape {tuple(layers.shape)}; wrap one layer in a list"
        )
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(
            f"{name} must be a list, ordered dict or generator of L tensors shaped (n, ...), "
            f"got {type(layers).__name__}"
        )
    return None, iter(layers)


def _embedding(x, layer: str, what: str, device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if device is not None:
        t = t.to(device)
    if t.dim() == 0:
        raise ValueError(f"{layer}: {what} is a scalar; each layer must be shaped (n, ...)")
    t = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if t.is_complex():
        raise ValueError(f"{layer}: {what} is complex ({t.dtype}); embeddings must be real")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _layer_label(layer: int, names: list[str] | None) -> str:
    if names is not None and layer < len(names):
        return f"layer {layer} ({names[layer]!r})"
    return f"layer {layer}"


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_num_classes(num_classes) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _class_count(num_classes: int | None, named) -> int:
    """Checks the class-id vectors ``named`` (``(name, tensor or None)`` pairs) and returns
    the number of classes.

    Every vector must hold ids ``>= 0``, and ``< num_classes`` when ``num_classes`` is given.
    Without it the count is one more than the largest id in *any* of the vectors, so a class
    that occurs only among the query labels or the reference (absent from the support set,
    as real splits produce) counts too: the probes simply never predict it.
    """
    top = -1
    for name, t in named:
        if t is None or not t.numel():
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            raise ValueError(
                f"{name} must hold class ids >= 0, got values in [{lo}, {hi}]; map the labels "
                "to 0..C-1 first"
            )
        if num_classes is not None and hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, num_classes={num_classes}), got values in "
                f"[{lo}, {hi}]; raise num_classes or leave it out to infer it from the labels"
            )
        top = max(top, hi)
    return num_classes if num_classes is not None else max(top + 1, 1)


def _check_self_index(self_index: torch.Tensor | None, n: int | None) -> None:
    """``self_index`` holds -1 or a support index in ``[0, n)`` (``n`` None: unknown here,
    e.g. a sharded support set whose global size the ranks agree on later)."""
    if self_index is None or not self_index.numel():
        return
    lo, hi = int(self_index.min()), int(self_index.max())
    if lo < -1 or (n is not None and hi >= n):
        valid = "-1 (no self match) or a support index" + ("" if n is None else f" in [0, N={n})")
        raise ValueError(f"self_index must hold {valid}, got values in [{lo}, {hi}]")


def prediction_depth(
    support_layers,
    support_labels,
    query_layers=None,
    *,
    reference: str | torch.Tensor | np.ndarray = "network",
    network_pred=None,
    query_labels=None,
    k: int = 30,
    self_match: str = "exclude",
    self_index=None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    example_index=None,
    progress: bool = False,
    shard_offset: int | None = None,
    process_group=None,
) -> DepthResult:
    """Prediction depth (Baldock et al. 2021) of queries against a labelled support set.

    At each of L probes a k-NN classifier (k nearest support points by squared L2 distance,
    uniform vote, ties to the lower index / lowest class, design.md section 2) is built on the
    support embeddings; the depth of a query is the first probe from which every later probe's
    k-NN prediction equals the reference (:func:`depth_from_predictions`).

    Args:
        support_layers: the support set's embeddings at L probes, input to output: a list, an
            ordered dict (its keys become ``layer_names``) or a generator of L tensors or
            arrays shaped ``(N, ...)`` (flattened to ``(N, D_l)``). Consumed one layer at a
            time, so a generator only needs one layer resident. Integer embeddings are
            converted to float32.
        support_labels: ``[N]`` integer labels of the support set (the model's training split
            labels, or e.g. ensemble consensus labels).
        query_layers: the queries' embeddings at the same L probes (same container kinds),
            ``(M, ...)`` per layer, zipped with ``support_layers`` layer by layer. None scores
            the support points themselves (M = N).
        reference: ``"network"`` (default; needs ``network_pred``), ``"labels"`` (needs
            ``query_labels``, or uses ``support_labels`` when scoring the support itself),
            ``"last_probe"`` (the last probe's k-NN prediction), or an ``[M]`` integer tensor
            used as is.
        network_pred: ``[M]`` the network's argmax prediction per query (``[M, C]`` logits or
            probabilities are reduced with argmax).
        query_labels: ``[M]`` labels of the queries, used for ``reference="labels"`` and for
            ``layer_accuracy``. Defaults to ``support_labels`` when ``query_layers`` is None.
        k: neighbours per query.
        self_match: ``"exclude"`` (default; skip each query's own support point given by
            ``self_index``), ``"include"`` (count it, as sklearn's ``predict`` on the fitted
            data does) or ``"drop_nearest"`` (legacy: take k+1 and drop the nearest).
        self_index: ``[M]`` support index of each query, -1 for none. Defaults to
            ``arange(N)`` when ``query_layers`` is None, else no self matches.
        num_classes: number of classes. Default: one more than the largest class id among
            ``support_labels``, ``query_labels`` and the reference (a class that only the
            queries have is never predicted, but it is not an error). Given, every one
            of them must lie in ``[0, num_classes)``.
        device: where to run the k-NN (default: where each support layer lives).
        example_index: ``[M]`` dataset indices of the queries, stored in the result for
            :func:`aggregate`. Defaults to ``arange(N)`` when ``query_layers`` is None.
        progress: show a tqdm progress bar over layers.
        shard_offset: sharded support set (:mod:`pdepth.distributed`): ``support_layers`` and
            ``support_labels`` are this rank's contiguous shard of the support set, starting
            at global row ``shard_offset``; each layer's vote is
            :func:`pdepth.distributed.knn_vote` over all ranks. Collective: every rank calls
            with the same ``query_layers`` (required), ``self_index`` (global indices),
            ``num_classes`` (required), ``k`` and reference. Every rank gets the whole result,
            equal to the single-process one.
        process_group: the ``torch.distributed`` group of the shards (default: the world);
            only with ``shard_offset``.

    Returns:
        :class:`DepthResult` (tensors on the CPU).

    Raises:
        ValueError: on bad input, naming the layer index where the problem is in a layer
            (rows that differ from the labels or from layer 0, NaN/Inf embeddings, k larger
            than the support, mismatched layer counts), and naming the argument otherwise
            (a missing ``network_pred``, a reference of the wrong length, class ids that are
            negative or not below an explicit ``num_classes``, ``self_index`` outside
            ``[-1, N)``).
    """
    if self_match not in SELF_MATCH_POLICIES:
        raise ValueError(f"self_match must be one of {SELF_MATCH_POLICIES}, got {self_match!r}")
    k = _check_k(k)
    scoring_support = query_layers is None
    sharded = shard_offset is not None or process_group is not None
    if sharded:
        if shard_offset is None:
            raise ValueError("process_group= needs shard_offset=, the global index of this "
                             "rank's first support row")
        if scoring_support or num_classes is None:
            raise ValueError("a sharded support set (shard_offset=) needs query_layers= and "
                             "num_classes=, the same on every rank")
    labels = _int_vector(support_labels, "support_labels")
    n = labels.shape[0]
    num_classes = _check_num_classes(num_classes)

    # --- the reference and the query-side vectors (checked again once M is known) ---
    if isinstance(reference, str):
        if reference not in REFERENCE_MODES:
            raise ValueError(
                f"reference must be one of {REFERENCE_MODES} or an [M] integer tensor, got "
                f"{reference!r}"
            )
        reference_mode = reference
        ref_vector = None
    else:
        reference_mode = "tensor"
        ref_vector = _int_vector(reference, "reference")
    if query_labels is not None:
        q_labels = _int_vector(query_labels, "query_labels")
    elif scoring_support:
        q_labels = labels
    else:
        q_labels = None
    if reference_mode == "network":
        if network_pred is None:
            raise ValueError(
                'reference="network" needs network_pred=, the network\'s argmax prediction '
                "per query ([M] integers, or [M, C] logits). Pass reference=\"labels\" to "
                'measure depth against the labels, or reference="last_probe".'
            )
        net = torch.as_tensor(network_pred)
        if net.dim() == 2 and (net.is_floating_point() or net.shape[1] > 1):
            net = net.argmax(1)
        ref_vector = _int_vector(net, "network_pred")
    elif reference_mode == "labels":
        if q_labels is None:
            raise ValueError(
                'reference="labels" needs query_labels= when query_layers is given'
            )
        ref_vector = q_labels
    # Every label the call sees counts towards the number of classes (design: a class absent
    # from the support set is never predicted, but it is a class). A sharded support set's
    # labels differ per rank: they are checked inside the collective, so that every rank
    # raises alike.
    checked = [("support_labels", None if sharded else labels)]
    if q_labels is not None and q_labels is not labels:
        checked.append(("query_labels", q_labels))
    if ref_vector is not None and ref_vector is not labels and ref_vector is not q_labels:
        checked.append(("network_pred (reference='network')" if reference_mode == "network"
                        else "reference", ref_vector))
    num_classes = _class_count(num_classes, checked)
    if self_index is None and scoring_support:
        self_index = torch.arange(n)
    elif self_index is not None:
        self_index = _int_vector(self_index, "self_index")
        _check_self_index(self_index, None if sharded else n)
    if example_index is None and scoring_support:
        example_index = torch.arange(n)
    elif example_index is not None:
        example_index = _int_vector(example_index, "example_index")

    # --- layers ---
    names, support_iter = _layer_iter(support_layers, "support_layers")
    query_iter = None
    if not scoring_support:
        q_names, query_iter = _layer_iter(query_layers, "query_layers")
        if names is not None and q_names is not None and names != q_names:
            raise ValueError(
                f"support_layers and query_layers name different layers: {names} vs {q_names}"
            )
        names = names if names is not None else q_names
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None
        for obj in (support_layers, query_layers):
            if isinstance(obj, Sequence | Mapping):
                total = len(obj)
        bar = tqdm(total=total, desc="prediction depth", unit="layer")

    preds: list[torch.Tensor] = []
    m = None
    dev_labels: dict[torch.device, tuple] = {}
    layer = 0
    try:
        while True:
            # Fetched by hand (not zip) so that no reference to the previous layer survives
            # while the next one is produced: a generator needs one layer resident at a time.
            s_raw = next(support_iter, _MISSING)
            q_raw = None if query_iter is None else next(query_iter, _MISSING)
            if s_raw is _MISSING and (q_raw is None or q_raw is _MISSING):
                break
            where = _layer_label(layer, names)
            if s_raw is _MISSING or q_raw is _MISSING:
                longer, shorter = ("query_layers", "support_layers") if s_raw is _MISSING \
                    else ("support_layers", "query_layers")
                raise ValueError(
                    f"{where}: support_layers and query_layers have different numbers of "
                    f"layers: {longer} has at least {layer + 1}, {shorter} has {layer}"
                )
            s = _embedding(s_raw, where, "support_layers", device)
            if s.shape[0] != n:
                raise ValueError(
                    f"{where}: support_layers has {s.shape[0]} rows but support_labels has {n}"
                )
            if scoring_support:
                q = s
            else:
                q = _embedding(q_raw, where, "query_layers", s.device)
                if q.dtype != s.dtype:
                    common = torch.promote_types(q.dtype, s.dtype)
                    q, s = q.to(common), s.to(common)
            del s_raw, q_raw
            if m is None:
                m = q.shape[0]
                _check_lengths(m, q_labels, ref_vector, self_index, example_index,
                               reference_mode)
            elif q.shape[0] != m:
                raise ValueError(
                    f"{where}: query_layers has {q.shape[0]} rows but layer 0 had {m}"
                )
            if s.device not in dev_labels:
                dev_labels[s.device] = (
                    labels.to(s.device),
                    None if self_index is None else self_index.to(s.device),
                )
            lab, sidx = dev_labels[s.device]
            try:
                if sharded:
                    from . import distributed

                    pred = distributed.knn_vote(
                        q, s, lab, k, num_classes, shard_offset=shard_offset, self_index=sidx,
                        self_match=self_match, process_group=process_group).pred
                else:
                    pred = knn_vote(q, s, lab, k, num_classes, self_index=sidx,
                                    self_match=self_match).pred
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            del s, q
            preds.append(pred.cpu())
            layer += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if m is None:
        raise ValueError("support_layers holds no layers; prediction depth needs L >= 1 probes")

    layer_pred = torch.stack(preds)
    if reference_mode == "last_probe":
        ref_vector = layer_pred[-1].clone()
    ref = ref_vector.cpu()
    depth = depth_from_predictions(layer_pred, ref)
    agreement = (layer_pred == ref).to(torch.float64).mean(1)
    accuracy = None
    if q_labels is not None:
        q_labels = q_labels.cpu()
        accuracy = (layer_pred == q_labels).to(torch.float64).mean(1)
    return DepthResult(
        depth=depth,
        layer_pred=layer_pred,
        reference=ref,
        layer_agreement=agreement,
        layer_accuracy=accuracy,
        labels=q_labels,
        example_index=None if example_index is None else example_index.cpu(),
        k=k,
        self_match=self_match,
        reference_mode=reference_mode,
        num_layers=int(layer_pred.shape[0]),
        num_classes=num_classes,
        layer_names=names,
        version=_version(),
    )


_MISSING = object()


def _check_lengths(m, q_labels, ref_vector, self_index, example_index, reference_mode) -> None:
    for name, t in (("query_labels", q_labels), ("self_index", self_index),
                    ("example_index", example_index)):
        if t is not None and t.shape[0] != m:
            raise ValueError(
                f"{name} has {t.shape[0]} entries but there are {m} queries (rows of layer 0)"
            )
    if ref_vector is not None and ref_vector.shape[0] != m:
        source = {"network": "network_pred", "labels": "the labels"}.get(reference_mode,
                                                                          "reference")
        raise ValueError(
            f"reference ({reference_mode}): {source} has {ref_vector.shape[0]} entries but "
            f"there are {m} queries (rows of layer 0)"
        )


# ---------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class EnsembleDepth:
    """Effective prediction depth over an ensemble of R models and n dataset examples.

    Attributes:
        per_model: ``[R, n]`` float64 depth of example i under model r (NaN: not scored).
        in_train: ``[R, n]`` bool, example i was in model r's training split.
        held_out: ``[R, n]`` bool, example i was scored by model r while held out from it.
        train_mean, train_std: ``[n]`` float64 mean and standard deviation (``ddof``) of the
            depth over the models that trained on the example (NaN where none did, or where
            the count is ``<= ddof``).
        train_count: ``[n]`` int64 number of such models.
        held_out_mean, held_out_std, held_out_count: the same over the models that held the
            example out.
        ddof: delta degrees of freedom of the standard deviations.
    """

    per_model: torch.Tensor
    in_train: torch.Tensor
    held_out: torch.Tensor
    train_mean: torch.Tensor
    train_std: torch.Tensor
    train_count: torch.Tensor
    held_out_mean: torch.Tensor
    held_out_std: torch.Tensor
    held_out_count: torch.Tensor
    ddof: int = 0

    @property
    def num_models(self) -> int:
        return int(self.per_model.shape[0])

    def to_pandas(self, per_model: bool = False):
        """One row per example with the mean / std / count per split; with
        ``per_model=True`` also ``depth_<r>`` and ``train_<r>`` columns per model."""
        import pandas as pd

        cols = {
            "train_mean": self.train_mean.numpy(),
            "train_std": self.train_std.numpy(),
            "train_count": self.train_count.numpy(),
            "held_out_mean": self.held_out_mean.numpy(),
            "held_out_std": self.held_out_std.numpy(),
            "held_out_count": self.held_out_count.numpy(),
        }
        if per_model:
            for r in range(self.num_models):
                cols[f"depth_{r}"] = self.per_model[r].numpy()
                cols[f"train_{r}"] = self.in_train[r].numpy()
        df = pd.DataFrame(cols)
        df.index.name = "example_index"
        df.attrs["num_models"] = self.num_models
        df.attrs["ddof"] = self.ddof
        return df


def _as_index_set(x, n: int | None, what: str) -> torch.Tensor:
    """A boolean mask [n] from a mask or from integer indices."""
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D (a boolean mask or integer indices), got shape "
                         f"{tuple(t.shape)}")
    if t.dtype == torch.bool:
        if n is not None and t.shape[0] != n:
            raise ValueError(f"{what} is a mask of length {t.shape[0]}, expected n={n}")
        return t.cpu()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what} must be a boolean mask or integer indices, got {t.dtype}")
    t = t.long().cpu()
    if t.numel() and (int(t.min()) < 0 or (n is not None and int(t.max()) >= n)):
        raise ValueError(f"{what} holds indices outside [0, n={n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[t] = True
    return mask


def _model_depths(result, n: int | None, r: int) -> torch.Tensor:
    """[n] float64 depths of one model over the dataset index space, NaN where not scored."""
    if isinstance(result, DepthResult):
        depth = result.depth.to(torch.float64)
        index = result.example_index
        if index is None:
            if n is not None and depth.shape[0] != n:
                raise ValueError(
                    f"results[{r}] is a DepthResult over {depth.shape[0]} examples without "
                    f"example_index; give example_index, or score all n={n} examples"
                )
            return depth
        out = torch.full((n,), float("nan"), dtype=torch.float64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"results[{r}].example_index holds indices outside [0, n={n})")
        out[index.long()] = depth
        return out
    t = torch.as_tensor(result)
    if t.dim() != 1:
        raise ValueError(f"results[{r}] must be a DepthResult or a 1-D [n] depth array, got "
                         f"shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"results[{r}] has {t.shape[0]} entries, expected n={n}")
    t = t.to(torch.float64).cpu()
    return torch.where(t < 0, torch.full_like(t, float("nan")), t)  # -1 / NaN: not scored


def _infer_n(results, split_masks) -> int:
    for res in results:
        if isinstance(res, DepthResult) and res.example_index is None:
            return res.num_examples
        if not isinstance(res, DepthResult):
            return int(torch.as_tensor(res).shape[0])
    for split in split_masks:
        for part in (split.values() if isinstance(split, Mapping) else [split]):
            t = torch.as_tensor(part)
            if t.dtype == torch.bool:
                return int(t.shape[0])
    top = -1
    for res in results:
        if res.example_index is not None and res.example_index.numel():
            top = max(top, int(res.example_index.max()))
    for split in split_masks:
        for part in (split.values() if isinstance(split, Mapping) else [split]):
            t = torch.as_tensor(part)
            if t.numel():
                top = max(top, int(t.max()))
    return top + 1


def _stats(values: torch.Tensor, mask: torch.Tensor, ddof: int):
    count = mask.sum(0)
    v = torch.where(mask, values, torch.zeros_like(values))
    mean = v.sum(0) / count
    dev = torch.where(mask, values - mean, torch.zeros_like(values))
    var = dev.pow(2).sum(0) / (count - ddof)
    nan = torch.full_like(mean, float("nan"))
    mean = torch.where(count > 0, mean, nan)
    std = torch.where(count > ddof, var.sqrt(), nan)
    return mean, std, count.to(torch.int64)


def aggregate(
    results: Sequence,
    split_masks: Sequence,
    *,
    num_examples: int | None = None,
    ddof: int = 0,
) -> EnsembleDepth:
    """Effective prediction depth of an ensemble: per-example mean depth per split.

    Model r scores some examples of a dataset of n examples (its training split, the held-out
    examples, or both); its depths are split by whether the example was in its training split.

    Args:
        results: R per-model results, each either

            * a :class:`DepthResult` with ``example_index`` ``[M_r]`` (the dataset indices of
              its queries; without it, M_r must equal n and the order is the dataset's), or
            * a 1-D ``[n]`` depth array over the dataset, with NaN or a negative value for
              examples the model did not score.

            A model that scored its training split and its held-out split in two calls can be
            given as two entries with the same split mask, or merged beforehand.
        split_masks: R entries (one per result, same order), each either a boolean ``[n]``
            mask or an integer index array of the examples in that model's training split, or
            a dict ``{"train": mask_or_indices, "held_out": mask_or_indices}`` (``held_out``
            defaults to every scored example outside ``train``).
        num_examples: n; inferred from the masks / arrays / indices when not given.
        ddof: delta degrees of freedom for the standard deviations (0: population std, so a
            single model gives 0).

    Returns:
        :class:`EnsembleDepth` with ``per_model [R, n]``, ``in_train [R, n]``,
        ``held_out [R, n]`` and per-example ``train_mean / train_std / train_count`` and
        ``held_out_mean / held_out_std / held_out_count`` (``[n]`` each).
    """
    results = list(results)
    split_masks = list(split_masks)
    if len(results) != len(split_masks):
        raise ValueError(
            f"aggregate(): {len(results)} results but {len(split_masks)} split masks; give one "
            "split mask per model"
        )
    if not results:
        raise ValueError("aggregate(): no results given")
    n = int(num_examples) if num_examples is not None else _infer_n(results, split_masks)
    per_model, in_train, held_out = [], [], []
    for r, (res, split) in enumerate(zip(results, split_masks, strict=True)):
        depth = _model_depths(res, n, r)
        scored = ~depth.isnan()
        if isinstance(split, Mapping):
            unknown = set(split) - {"train", "held_out"}
            if unknown or "train" not in split:
                raise ValueError(
                    f"split_masks[{r}] must have a 'train' key and optionally 'held_out', got "
                    f"keys {sorted(split)}"
                )
            train = _as_index_set(split["train"], n, f"split_masks[{r}]['train']")
            if split.get("held_out") is not None:
                out = _as_index_set(split["held_out"], n, f"split_masks[{r}]['held_out']")
                if (train & out).any():
                    raise ValueError(
                        f"split_masks[{r}]: {int((train & out).sum())} examples are in both "
                        "'train' and 'held_out'"
                    )
            else:
                out = ~train
        else:
            train = _as_index_set(split, n, f"split_masks[{r}]")
            out = ~train
        per_model.append(depth)
        in_train.append(train)
        held_out.append(out & scored)
    values = torch.stack(per_model)
    train_mask = torch.stack(in_train)
    out_mask = torch.stack(held_out)
    train_scored = train_mask & ~values.isnan()
    train_mean, train_std, train_count = _stats(values, train_scored, ddof)
    out_mean, out_std, out_count = _stats(values, out_mask, ddof)
    return EnsembleDepth(
        per_model=values,
        in_train=train_mask,
        held_out=out_mask,
        train_mean=train_mean,
        train_std=train_std,
        train_count=train_count,
        held_out_mean=out_mean,
        held_out_std=out_std,
        held_out_count=out_count,
        ddof=ddof,
    )
