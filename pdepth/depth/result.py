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

from .._atomic import write_bytes as _atomic_write
from .rule import depth_from_predictions

__all__ = ["DepthResult", "build_result"]

_FORMAT_VERSION = 2  # 2: vote_counts (a file without them is still written as version 1)


def _version() -> str:
    from .._version import __version__

    return __version__


_ARRAYS = ("depth", "layer_pred", "reference", "layer_agreement")
_OPTIONAL_ARRAYS = ("layer_accuracy", "labels", "example_index", "vote_counts")
_COUNT_DTYPES = (torch.int16, torch.int32)
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
        vote_counts: ``[L, M, C]`` int16 (int32 for k >= 2^15): how many of the k neighbours
            of each example carry each class at each probe (``vote_counts=True``), or None.
            ``layer_pred`` is the first class of largest count.
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
    vote_counts: torch.Tensor | None = None
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
        ``label`` (when known), ``pred_0 .. pred_{L-1}`` and, with vote counts,
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
        version = _FORMAT_VERSION if self.vote_counts is not None else 1
        return {"format": "pdepth.DepthResult", "format_version": version, **self.settings()}

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
        (self._save_npz if fmt == "npz" else self._save_parquet)(path)
        return path

    def _save_npz(self, path: Path) -> None:
        arrays = {name: getattr(self, name).numpy() for name in _ARRAYS}
        for name in _OPTIONAL_ARRAYS:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name).numpy()
        arrays["meta"] = np.array(json.dumps(self._meta()))
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
        _atomic_write(path, table_bytes)
        _atomic_write(_sidecar(path), json.dumps(sidecar, indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike, format: str | None = None) -> DepthResult:
        """Loads a result written by :meth:`save` (format from the suffix by default).

        Raises ``ValueError`` when the file is not a consistent result: arrays whose shapes
        disagree with each other or with the stored ``num_layers`` / ``layer_names``, depths
        that do not follow from ``layer_pred`` and ``reference``, or (parquet) a sidecar that
        does not belong to the table next to it (other row count, other checksum).
        """
        path = Path(path)
        result = (cls._load_npz if _format(path, format) == "npz" else cls._load_parquet)(path)
        result._validate(path)
        return result

    @classmethod
    def _load_npz(cls, path: Path) -> DepthResult:
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
        return cls(**arrays, **{name: meta[name] for name in _SETTINGS})

    @classmethod
    def _load_parquet(cls, path: Path) -> DepthResult:
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
        return cls(
            depth=cols["depth"],
            layer_pred=layer_pred,
            reference=cols["reference"],
            layer_agreement=torch.tensor(meta["layer_agreement"], dtype=torch.float64),
            layer_accuracy=None if acc is None else torch.tensor(acc, dtype=torch.float64),
            labels=cols.get("label"),
            example_index=cols.get("example_index"),
            vote_counts=_counts_from_columns(cols, num_layers, meta["num_classes"], m),
            **{name: meta[name] for name in _SETTINGS},
        )

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
            shape("vote_counts", (num_layers, m, self.num_classes))
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
        if not problems and self.vote_counts is not None:
            problems += _count_problems(self.vote_counts, self.layer_pred, self.k)
        if problems:
            raise ValueError(
                f"{source} is not a consistent DepthResult (num_layers={num_layers}, "
                f"{m} entries in depth): " + "; ".join(problems))


def _count_problems(counts: torch.Tensor, layer_pred: torch.Tensor, k: int) -> list[str]:
    """What is wrong with ``vote_counts`` next to ``layer_pred`` and ``k``."""
    if counts.dtype not in _COUNT_DTYPES:
        return [f"vote_counts has dtype {counts.dtype}, expected torch.int16 or torch.int32"]
    problems = []
    if counts.numel() and not bool((counts.sum(-1) == k).all()):
        problems.append(f"vote_counts do not sum to k={k} for every example and probe")
    if counts.numel() and not torch.equal(counts.argmax(-1), layer_pred):
        problems.append("layer_pred is not the first class of largest count in vote_counts")
    return problems


def _counts_from_columns(cols: dict, num_layers: int, num_classes: int,
                         m: int) -> torch.Tensor | None:
    """``vote_counts [L, M, C]`` from a table's ``votes_<l>_<c>`` columns (None without)."""
    if "votes_0_0" not in cols:
        return None
    names = [[f"votes_{layer}_{c}" for c in range(num_classes)] for layer in range(num_layers)]
    missing = [name for row in names for name in row if name not in cols]
    if missing:
        raise ValueError(f"the table lacks the vote-count columns {missing[:5]}")
    return torch.stack([torch.stack([cols[name] for name in row], 1) for row in names]) \
        if num_layers else torch.empty(0, m, num_classes, dtype=torch.int16)


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


def build_result(layer_pred: torch.Tensor, reference: torch.Tensor, *,
                 query_labels: torch.Tensor | None, example_index: torch.Tensor | None,
                 k: int, self_match: str, reference_mode: str, num_classes: int,
                 layer_names: list[str] | None,
                 vote_counts: torch.Tensor | None = None) -> DepthResult:
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
        layer_agreement=(layer_pred == reference).to(torch.float64).mean(1),
        layer_accuracy=None if labels is None else
        (layer_pred == labels).to(torch.float64).mean(1),
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
    )
