"""The result of a prediction-depth call: :class:`DepthResult`, its one builder
(:func:`build_result`, used by both drivers) and its files (:meth:`DepthResult.save` /
:meth:`DepthResult.load`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._args import INT64_MAX
from .._atomic import write_bytes as _atomic_write
from ..ops import MAX_CLASSES, METRICS, SELF_MATCH_POLICIES
from .rule import REFERENCE_MODES, depth_from_predictions

__all__ = ["DepthResult", "build_result"]

_FORMAT_NAME = "pdepth.DepthResult"
# 1: the first format (a parquet sidecar may lack table_sha256: pdepth recorded it later);
# 2: vote counts, table_sha256 always; 3: every file records a SHA-256 of its whole content
# ("sha256"), with or without vote counts; 4: the k-NN metric ("metric"; older files were
# all euclidean). Older versions still load (DepthResult.load).
_FORMAT_VERSION = 4


def _version() -> str:
    from .._version import __version__

    return __version__


_ARRAYS = ("depth", "layer_pred", "reference", "layer_agreement")
_OPTIONAL_ARRAYS = ("layer_accuracy", "labels", "example_index", "vote_counts")
_COUNT_DTYPES = (torch.int16, torch.int32)
_SETTINGS = ("k", "self_match", "reference_mode", "num_layers", "num_classes", "layer_names",
             "version", "metric")
# the numpy dtypes each array of a file may have (native byte order)
_DTYPES = {**{name: (np.dtype(np.int64),) for name in
              ("depth", "layer_pred", "reference", "labels", "example_index")},
           "layer_agreement": (np.dtype(np.float64),), "layer_accuracy": (np.dtype(np.float64),),
           "vote_counts": (np.dtype(np.int16), np.dtype(np.int32))}
_TABLE_COLUMNS = {"example_index", "depth", "reference", "label"}  # and pred_<l>, votes_<l>_<c>
# The fields of the npz's meta and of the parquet sidecar, by format version: (required,
# optional). A field a version always wrote is required, its checksums included.
_META_KEYS = {"format", "format_version", *_SETTINGS} - {"metric"}  # versions 1-3
_SIDECAR_KEYS = _META_KEYS | {"num_examples", "layer_agreement", "layer_accuracy"}
_KEYS = {
    "meta": {1: (_META_KEYS, set()), 2: (_META_KEYS, set()), 3: (_META_KEYS | {"sha256"}, set()),
             4: (_META_KEYS | {"sha256", "metric"}, set())},
    "sidecar": {1: (_SIDECAR_KEYS, {"table_sha256"}), 2: (_SIDECAR_KEYS | {"table_sha256"}, set()),
                3: (_SIDECAR_KEYS | {"table_sha256", "sha256"}, set()),
                4: (_SIDECAR_KEYS | {"table_sha256", "sha256", "metric"}, set())},
}


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
        vote_counts: ``[L, M, C]`` int16 (int32 for k >= 2^15): how many of the k neighbours
            of each example carry each class at each probe (``vote_counts=True``), or None.
            ``layer_pred`` is the first class of largest count.
        k, self_match, reference_mode, num_layers, num_classes, layer_names, metric: the
            settings used (``reference_mode`` is ``"network"``, ``"labels"``,
            ``"last_probe"`` or ``"tensor"``; ``layer_names`` the keys of an ordered dict of
            layers, else None; ``metric`` the k-NN metric, ``"euclidean"`` or ``"cosine"``:
            files of format version 3 and older load as ``"euclidean"``).
        version: the pdepth version that computed it.
    """

    depth: torch.Tensor
    layer_pred: torch.Tensor
    reference: torch.Tensor
    layer_agreement: torch.Tensor
    layer_accuracy: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    example_index: torch.Tensor | None = None
    vote_counts: torch.Tensor | None = None
    k: int = 30
    self_match: str = "exclude"
    reference_mode: str = "network"
    num_layers: int = 0
    num_classes: int = 0
    layer_names: list[str] | None = None
    version: str = field(default_factory=_version)
    metric: str = "euclidean"

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
        ``label`` (when known), ``pred_0`` to ``pred_{L-1}`` and, with vote counts,
        ``votes_<l>_<c>`` (probe l, class c). Settings, layer names and the
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
        if self.vote_counts is not None:
            for layer, counts in enumerate(self.vote_counts.numpy()):
                cols.update({f"votes_{layer}_{c}": counts[:, c] for c in range(counts.shape[1])})
        return cols

    def _meta(self) -> dict[str, Any]:
        return {"format": _FORMAT_NAME, "format_version": _FORMAT_VERSION, **self.settings()}

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

        Every file records a SHA-256 of its whole content (format version 3 on): the npz's
        ``meta`` one of the settings and every array, the sidecar one of itself (the table's
        own checksum included). It catches damage and edits, not a forger, who can recompute
        it; :meth:`load` checks every field as well.
        """
        path = Path(path)
        fmt = _format(path, format)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self._save_npz if fmt == "npz" else self._save_parquet)(path)
        return path

    def _save_npz(self, path: Path) -> None:
        arrays = {name: getattr(self, name).numpy() for name in _ARRAYS}
        for name in _OPTIONAL_ARRAYS:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name).numpy()
        meta = self._meta()
        meta["sha256"] = _digest(meta, arrays)
        arrays["meta"] = np.array(json.dumps(meta))
        buf = io.BytesIO()  # a file object keeps np.savez from adding ".npz"
        np.savez(buf, **arrays)
        _atomic_write(path, buf.getvalue())

    def _save_parquet(self, path: Path) -> None:
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
        sidecar["sha256"] = _digest(sidecar)
        _atomic_write(path, table_bytes)
        _atomic_write(_sidecar(path), json.dumps(sidecar, indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike, format: str | None = None) -> DepthResult:
        """Loads a result written by :meth:`save` (format from the suffix by default).

        Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` naming
        the file and the field for anything that is not a result :meth:`save` could have
        written: a damaged or truncated file; a sidecar or ``meta`` that is not the JSON
        object of the format (a missing, unknown or mistyped field, ``k < 1``, a
        ``self_match`` or ``reference_mode`` outside the allowed values, ``num_classes``
        outside ``1..MAX_CLASSES``); a checksum that is missing (required from format version
        3 on, and for a version-2 parquet table) or does not match; arrays of another dtype
        or shape than the settings say; class ids outside ``[0, num_classes)``; values that
        do not follow from the others (``depth`` from ``layer_pred`` and ``reference``,
        ``layer_agreement`` and ``layer_accuracy`` from the predictions, the reference of
        ``reference_mode`` "labels" / "last_probe", vote counts that do not sum to ``k`` or
        elect another class); or (parquet) a sidecar that does not belong to the table next
        to it. Files of format version 1 and 2 (earlier pdepth) load under the same checks,
        without the checksums pdepth did not write then: an npz of version 1 or 2 has none,
        a version-1 sidecar may lack ``table_sha256`` (a version-2 one may not).
        """
        path = Path(path)
        result = (cls._load_npz if _format(path, format) == "npz" else cls._load_parquet)(path)
        result._validate(path)
        return result

    @classmethod
    def _load_npz(cls, path: Path) -> DepthResult:
        meta, arrays = _read_npz(path)
        version = _check_meta(meta, path, "meta")
        unknown = set(arrays) - set(_ARRAYS) - set(_OPTIONAL_ARRAYS)
        missing = set(_ARRAYS) - set(arrays)
        if unknown or missing:
            raise ValueError(
                f"{path}: not a DepthResult file: missing arrays {sorted(missing)}, "
                f"unknown arrays {sorted(unknown)}"
            )
        if "sha256" in meta and _digest(meta, arrays) != meta["sha256"]:
            raise ValueError(
                f"{path}: its arrays or settings do not match the SHA-256 its meta records "
                "(the file was edited or damaged); save the result again")
        _check_counts_version(version, "vote_counts" in arrays, path)
        for name, a in arrays.items():
            if a.dtype not in _DTYPES[name]:
                raise ValueError(f"{path}: array {name} has dtype {a.dtype}, expected "
                                 + " or ".join(str(d) for d in _DTYPES[name]))
        return cls(**{name: torch.from_numpy(a) for name, a in arrays.items()},
                   **_settings_of(meta))

    @classmethod
    def _load_parquet(cls, path: Path) -> DepthResult:
        sidecar = _sidecar(path)
        if not sidecar.exists():
            raise ValueError(f"{path}: its sidecar {sidecar.name} is missing; DepthResult.save "
                             "writes both files")
        meta = _read_json(sidecar)
        version = _check_meta(meta, sidecar, "sidecar")
        if "sha256" in meta and _digest(meta) != meta["sha256"]:
            raise ValueError(f"{sidecar}: its fields do not match the SHA-256 it records (the "
                             "sidecar was edited or damaged); save the result again")
        table_bytes = path.read_bytes()
        want_sha = meta.get("table_sha256")  # only a version-1 sidecar may lack it
        if want_sha is not None and hashlib.sha256(table_bytes).hexdigest() != want_sha:
            raise ValueError(
                f"{path}: the sidecar {sidecar.name} does not belong to this table (the "
                "table's checksum differs from the one the sidecar records): the pair comes "
                "from different saves, an interrupted save or an edit. Save the result again."
            )
        cols = _read_table(path, table_bytes)
        want_cols, counts = _check_columns(cols, meta, version, path, sidecar)
        m, num_layers = meta["num_examples"], meta["num_layers"]
        t = {name: torch.from_numpy(a) for name, a in cols.items()}
        layer_pred = (
            torch.stack([t[name] for name in want_cols])
            if num_layers else torch.empty(0, m, dtype=torch.int64)
        )
        acc = meta["layer_accuracy"]
        return cls(
            depth=t["depth"],
            layer_pred=layer_pred,
            reference=t["reference"],
            layer_agreement=torch.tensor(meta["layer_agreement"], dtype=torch.float64),
            layer_accuracy=None if acc is None else torch.tensor(acc, dtype=torch.float64),
            labels=t.get("label"),
            example_index=t.get("example_index"),
            vote_counts=counts,
            **_settings_of(meta),
        )

    def _validate(self, source) -> None:
        """Raises ValueError naming ``source`` unless the arrays and settings agree."""
        m, num_layers = (self.num_examples if self.depth.dim() else 0), self.num_layers
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
            shape("vote_counts", (num_layers, m, self.num_classes))
        if self.layer_names is not None and len(self.layer_names) != num_layers:
            problems.append(f"layer_names has {len(self.layer_names)} names for "
                            f"num_layers={num_layers}")
        for name in ("depth", "layer_pred", "reference", "labels", "example_index"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.int64:
                problems.append(f"{name} has dtype {t.dtype}, expected torch.int64")
        for name in ("layer_agreement", "layer_accuracy"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.float64:
                problems.append(f"{name} has dtype {t.dtype}, expected torch.float64")
        if not problems:
            problems += self._value_problems()
        if not problems and self.vote_counts is not None:
            problems += _count_problems(self.vote_counts, self.layer_pred, self.k)
        if problems:
            raise ValueError(
                f"{source} is not a consistent DepthResult (num_layers={num_layers}, "
                f"{m} entries in depth): " + "; ".join(problems))

    def _value_problems(self) -> list[str]:
        """What is wrong with the values of arrays of the right shapes and dtypes: class ids
        out of range, and every value that follows from others but differs from them."""
        problems = []
        c = self.num_classes
        for name in ("layer_pred", "reference", "labels"):
            t = getattr(self, name)
            if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
                problems.append(f"{name} must lie in [0, num_classes={c}), got values in "
                                f"[{int(t.min())}, {int(t.max())}]")
        if problems:
            return problems
        if not torch.equal(depth_from_predictions(self.layer_pred, self.reference), self.depth):
            problems.append("depth does not follow from layer_pred and reference")
        if not _same(self.layer_agreement, _agreement(self.layer_pred, self.reference)):
            problems.append("layer_agreement is not the fraction of layer_pred equal to the "
                            "reference")
        if (self.labels is None) != (self.layer_accuracy is None):
            problems.append("labels and layer_accuracy must be both present or both absent")
        elif self.labels is not None and not _same(self.layer_accuracy,
                                                   _agreement(self.layer_pred, self.labels)):
            problems.append("layer_accuracy is not the fraction of layer_pred equal to the "
                            "labels")
        if self.reference_mode == "labels" and (
                self.labels is None or not torch.equal(self.reference, self.labels)):
            problems.append('reference_mode "labels" needs a reference equal to the labels')
        if self.reference_mode == "last_probe" and (
                self.num_layers == 0 or not torch.equal(self.reference, self.layer_pred[-1])):
            problems.append('reference_mode "last_probe" needs a reference equal to the last '
                            "probe's prediction")
        return problems


def _count_problems(counts: torch.Tensor, layer_pred: torch.Tensor, k: int) -> list[str]:
    """What is wrong with ``vote_counts`` next to ``layer_pred`` and ``k``."""
    want = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
    if counts.dtype != want:
        return [f"vote_counts has dtype {counts.dtype}, expected {want} for k={k}"]
    problems = []
    if counts.numel() and int(counts.min()) < 0:
        problems.append("vote_counts has negative counts")
    if counts.numel() and not bool((counts.sum(-1) == k).all()):
        problems.append(f"vote_counts do not sum to k={k} for every example and probe")
    if counts.numel() and not torch.equal(counts.argmax(-1), layer_pred):
        problems.append("layer_pred is not the first class of largest count in vote_counts")
    return problems


def _agreement(layer_pred: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``[L]`` float64: the fraction of each probe's predictions equal to ``other``."""
    return (layer_pred == other).to(torch.float64).mean(1)


def _vote_names(num_layers: int, num_classes: int) -> list[list[str]]:
    return [[f"votes_{layer}_{c}" for c in range(num_classes)] for layer in range(num_layers)]


def _check_columns(cols: dict[str, np.ndarray], meta: dict, version: int, path: Path,
                   sidecar: Path) -> tuple[list[str], torch.Tensor | None]:
    """``(the prediction columns, vote_counts or None)`` of a table whose columns ``cols``
    are those the sidecar ``meta`` describes; ValueError naming ``path`` otherwise."""
    m, num_layers, num_classes = meta["num_examples"], meta["num_layers"], meta["num_classes"]
    rows = len(next(iter(cols.values()))) if cols else 0
    if rows != m:
        raise ValueError(
            f"{path}: the table has {rows} rows but its sidecar {sidecar.name} "
            f"records num_examples={m}; the two files do not belong together"
        )
    pred_cols = sorted((name for name in cols if name.startswith("pred_")),
                       key=lambda name: (len(name), name))
    want_cols = [f"pred_{layer}" for layer in range(min(num_layers, len(pred_cols) + 1))]
    if pred_cols != want_cols or len(want_cols) != num_layers:
        raise ValueError(
            f"{path}: the sidecar {sidecar.name} records num_layers={num_layers} but the "
            f"table has the prediction columns {pred_cols}; the two files do not belong "
            "together"
        )
    for name in ("depth", "reference"):
        if name not in cols:
            raise ValueError(f"{path}: the table has no {name!r} column")
    counts = _counts_from_columns(cols, num_layers, num_classes, m, path)
    _check_counts_version(version, counts is not None, path)
    votes = {name for row in _vote_names(num_layers, num_classes) for name in row} \
        if counts is not None else set()
    unknown = sorted(set(cols) - _TABLE_COLUMNS - set(want_cols) - votes)
    if unknown:
        raise ValueError(f"{path}: the table has columns a DepthResult does not write: "
                         f"{unknown[:5]}")
    return want_cols, counts


def _counts_from_columns(cols: dict, num_layers: int, num_classes: int, m: int,
                         path: Path) -> torch.Tensor | None:
    """``vote_counts [L, M, C]`` from a table's ``votes_<l>_<c>`` columns (None without)."""
    have = [name for name in cols if name.startswith("votes_")]
    if not have:
        return None
    if len(have) != num_layers * num_classes:  # before listing L x C names
        raise ValueError(f"{path}: the table has {len(have)} vote-count columns, expected "
                         f"num_layers x num_classes = {num_layers} x {num_classes}")
    names = _vote_names(num_layers, num_classes)
    missing = [name for row in names for name in row if name not in cols]
    if missing:
        raise ValueError(f"{path}: the table lacks the vote-count columns {missing[:5]}")
    if len({cols[name].dtype for name in have}) != 1:
        raise ValueError(f"{path}: the vote-count columns do not all have one type")
    return torch.from_numpy(np.stack([np.stack([cols[name] for name in row], 1)
                                      for row in names]))


def _read_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of an npz written by :meth:`DepthResult.save`."""
    data = path.read_bytes()  # a missing file stays a FileNotFoundError
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = z["meta"] if "meta" in z.files else None
            arrays = {name: z[name] for name in z.files if name != "meta"}
    except Exception as exc:  # whatever a damaged zip or .npy header raises
        raise ValueError(f"{path}: not a readable .npz file ({_one_line(exc)})") from None
    if meta is None:
        raise ValueError(f"{path} was not written by DepthResult.save (no 'meta')")
    if meta.dtype.kind != "U" or meta.shape != ():
        raise ValueError(f"{path}: its meta must be one JSON string, got an array of dtype "
                         f"{meta.dtype} and shape {meta.shape}")
    return _parse_json(str(meta[()]), path, "its meta"), arrays


def _read_json(path: Path) -> Any:
    return _parse_json(path.read_bytes(), path, "not")


def _parse_json(text, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, nesting
        raise ValueError(f"{path}: {what} a JSON document ({_one_line(exc)})") from None


def _read_table(path: Path, data: bytes) -> dict[str, np.ndarray]:
    """The columns of the parquet table ``data``, as numpy arrays that own their memory.

    Read from an Arrow buffer in this thread (``use_threads=False``, ``pre_buffer=False``):
    no Python file object for pyarrow's I/O threads to call and no thread pool started, and
    no Arrow object outlives the call. A process that had read a table from an
    ``io.BytesIO`` with pyarrow's threads aborted at exit now and then ("terminate called
    without an active exception")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(pa.BufferReader(data), pre_buffer=False) as f:
            table = f.read(use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable parquet table ({_one_line(exc)})") from None
    names = table.column_names
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: the table has duplicate column names")
    cols = {}
    for name in names:
        col = table.column(name)
        types = (pa.int16(), pa.int32()) if name.startswith("votes_") else (pa.int64(),)
        if col.type not in types or col.null_count:
            raise ValueError(f"{path}: column {name!r} has type {col.type}"
                             f"{' with nulls' if col.null_count else ''}, expected "
                             + " or ".join(str(t) for t in types))
        cols[name] = np.array(col.to_numpy(), copy=True)
    return cols


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _is_int(v) -> bool:
    return type(v) is int and -INT64_MAX - 1 <= v <= INT64_MAX


def _is_numbers(v) -> bool:
    return isinstance(v, list) and all(type(x) in (int, float) for x in v)


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


# Each field of the meta / sidecar: (rule, what it must be).
_FIELDS = {
    "k": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "self_match": (lambda v: v in SELF_MATCH_POLICIES, f"one of {SELF_MATCH_POLICIES}"),
    "reference_mode": (lambda v: v in (*REFERENCE_MODES, "tensor"),
                       f"one of {(*REFERENCE_MODES, 'tensor')}"),
    "num_layers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_classes": (lambda v: _is_int(v) and 1 <= v <= MAX_CLASSES,
                    f"an integer in 1..MAX_CLASSES={MAX_CLASSES}"),
    "layer_names": (lambda v: v is None or (isinstance(v, list)
                                            and all(isinstance(x, str) for x in v)),
                    "null or a list of strings"),
    "version": (lambda v: isinstance(v, str), "a string"),
    "metric": (lambda v: v in METRICS, f"one of {METRICS}"),
    "num_examples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "table_sha256": (_is_sha256, "a SHA-256 in hex"),
    "sha256": (_is_sha256, "a SHA-256 in hex"),
    "layer_agreement": (_is_numbers, "a list of numbers"),
    "layer_accuracy": (lambda v: v is None or _is_numbers(v), "null or a list of numbers"),
}


def _check_meta(meta: Any, file: Path, keys: str) -> int:
    """The format version of ``meta`` (``keys`` "meta": an npz's, "sidecar": a parquet
    sidecar) after checking every field it must have, may have and holds; ValueError
    naming ``file`` and the field otherwise."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
        raise ValueError(f"{file} was not written by DepthResult.save (its {keys} is not a "
                         f"{_FORMAT_NAME} record)")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise ValueError(f"{file}: format_version must be a positive integer, got "
                         f"{_short(version)}")
    if version > _FORMAT_VERSION:
        raise ValueError(f"{file} has format version {version}; this pdepth ({_version()}) "
                         f"reads up to {_FORMAT_VERSION}")
    required, optional = _KEYS[keys][version]
    missing, unknown = sorted(required - set(meta)), sorted(set(meta) - required - optional)
    if missing or unknown:
        raise ValueError(f"{file}: a {keys} of format version {version} "
                         + (f"lacks the fields {missing}" if missing else "")
                         + (" and " if missing and unknown else "")
                         + (f"has unknown fields {unknown[:5]}" if unknown else "")
                         + " (DepthResult.save writes every field, checksums included)")
    for name, value in meta.items():
        if name in _FIELDS and not _FIELDS[name][0](value):
            raise ValueError(f"{file}: {name} must be {_FIELDS[name][1]}, got {_short(value)}")
    return version


def _settings_of(meta: dict) -> dict[str, Any]:
    """The settings a checked meta / sidecar records (before version 4: euclidean)."""
    return {name: meta.get(name, "euclidean") if name == "metric" else meta[name]
            for name in _SETTINGS}


def _check_counts_version(version: int, has_counts: bool, path: Path) -> None:
    if version == 1 and has_counts:
        raise ValueError(f"{path}: a file of format version 1 holds no vote counts; this one "
                         "does (a version was edited)")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(meta: dict, arrays: dict[str, np.ndarray] | None = None) -> str:
    """SHA-256 of ``meta`` without its own "sha256" (keys sorted) and of ``arrays`` (each
    array's name, dtype, shape and bytes, by name): what format versions 3 and 4 record."""
    h = hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "sha256"}))
    for name in sorted(arrays or {}):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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


def build_result(layer_pred: torch.Tensor, reference: torch.Tensor, *,
                 query_labels: torch.Tensor | None, example_index: torch.Tensor | None,
                 k: int, self_match: str, reference_mode: str, num_classes: int,
                 layer_names: list[str] | None,
                 vote_counts: torch.Tensor | None = None,
                 metric: str = "euclidean") -> DepthResult:
    """The :class:`DepthResult` of per-probe predictions ``layer_pred [L, M]`` against
    ``reference [M]``, with the per-probe ``vote_counts [L, M, C']`` where given (widened
    with zeros to ``num_classes`` columns: the labels or the reference may name classes that
    no support label has). The one place a result is assembled, for both drivers."""
    reference = reference.cpu()
    if vote_counts is not None and vote_counts.shape[-1] < num_classes:
        vote_counts = torch.nn.functional.pad(vote_counts,
                                              (0, num_classes - vote_counts.shape[-1]))
    labels = None if query_labels is None else query_labels.cpu()
    return DepthResult(
        depth=depth_from_predictions(layer_pred, reference),
        layer_pred=layer_pred,
        reference=reference,
        layer_agreement=_agreement(layer_pred, reference),
        layer_accuracy=None if labels is None else _agreement(layer_pred, labels),
        labels=labels,
        example_index=None if example_index is None else example_index.cpu(),
        vote_counts=vote_counts,
        k=k,
        self_match=self_match,
        reference_mode=reference_mode,
        num_layers=int(layer_pred.shape[0]),
        num_classes=int(num_classes),
        layer_names=layer_names,
        version=_version(),
        metric=metric,
    )
