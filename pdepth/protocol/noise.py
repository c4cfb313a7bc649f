"""Label noise (``pdepth run --label-noise P --noise-kind K``): which labels a run flips, and to
what (docs/protocol.md, "Label noise").

Three kinds (:data:`NOISE_KINDS`), all seeded and exact:

- ``uniform``: ``round(P * n)`` examples move to a uniformly chosen other class;
- ``asymmetric``: each class moves to one fixed other class, a dataset's map
  (:data:`ASYMMETRIC_MAPS`, their sources in :data:`MAP_SOURCES`); only the examples of the
  classes with a target can flip, and ``round(P * m)`` of those ``m`` examples do (Patrini et
  al. 2017's rule: P is the flip rate within the mapped classes);
- ``confusion``: ``round(P * n)`` examples move to a class drawn from their class's row of a
  C x C row-stochastic matrix (``--noise-matrix FILE``, :func:`load_noise_matrix`) with the
  diagonal left out and the rest of the row renormalised (a flipped label always changes).

Every kind takes the same seeded permutation of the n examples first and flips a prefix of it,
so with one seed a smaller P flips a subset of the examples a larger one flips, and two kinds
with every class mapped flip the same examples (only the new labels differ).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..data import DATASETS

__all__ = ["ASYMMETRIC_MAPS", "MAP_SOURCES", "NOISE_KINDS", "NOISE_RULES", "ROW_TOLERANCE",
           "apply_noise", "asymmetric_map", "flip_labels", "heldout_matrix", "load_noise_matrix",
           "noise_record", "off_diagonal", "read_noise_matrix"]

NOISE_KINDS = ("uniform", "asymmetric", "confusion")
# config.json's resolved.label_noise.rule, per kind
NOISE_RULES = {
    "uniform": "round(fraction * n) examples moved uniformly to another class "
               "(pdepth.protocol.noise.flip_labels)",
    "asymmetric": "round(fraction * m) of the m examples whose class has a target moved to "
                  "it, the dataset's fixed class map (pdepth.protocol.noise.asymmetric_map)",
    "confusion": "round(fraction * n) examples moved to a class drawn from their class's row "
                 "of the --noise-matrix, its diagonal left out and the row renormalised "
                 "(pdepth.protocol.noise.off_diagonal)",
}
# |row sum - 1| allowed in a --noise-matrix (a CSV written with 3 decimals passes); the rows
# are renormalised anyway, the check catches a column-stochastic matrix or raw counts.
ROW_TOLERANCE = 1e-3

# --noise-kind asymmetric: class -> the one class its flipped examples get, by dataset name
# (class ids of pdepth.data.DATASETS). Classes not listed never flip.
ASYMMETRIC_MAPS: dict[str, dict[int, int]] = {
    # Patrini et al. 2017 (CVPR, "Making deep neural networks robust to label noise: a loss
    # correction approach", the experiments): truck -> automobile, bird -> airplane, deer -> horse,
    # cat <-> dog.
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    # Patrini et al. 2017, the same experiments: 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1.
    "mnist": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    # No map from the literature that we can cite: each class -> the wrong class a reference
    # model predicts most often for it (the held-out ensemble of `pdepth run --subset 8000
    # --epochs 3 --seeds 2`, 4 cnn models, 84.4% held-out accuracy; `python
    # benchmarks/bench_label_noise.py --confusion-map RUN_DIR`): T-shirt/top -> Shirt,
    # Trouser -> Dress, Pullover -> Coat, Dress -> Shirt, Coat -> Shirt, Sandal -> Sneaker,
    # Shirt -> T-shirt/top, Sneaker -> Ankle boot, Bag -> Shirt, Ankle boot -> Sneaker.
    "fashion-mnist": {0: 6, 1: 3, 2: 4, 3: 6, 4: 6, 5: 7, 6: 0, 7: 9, 8: 6, 9: 7},
}
MAP_SOURCES = {
    "cifar10": "Patrini et al. 2017 (truck->automobile, bird->airplane, deer->horse, cat<->dog)",
    "mnist": "Patrini et al. 2017 (2->7, 3->8, 5<->6, 7->1)",
    "fashion-mnist": "each class to the class a reference cnn confuses it with most "
                     "(docs/protocol.md, Label noise)",
}


def asymmetric_map(dataset: str, num_classes: int | None = None) -> np.ndarray:
    """``[C]`` int64: the target class of each class of ``dataset`` under ``--noise-kind
    asymmetric``, -1 where a class never flips (C: ``num_classes``, default the dataset's). ValueError (one line) for a dataset without a
    map or a map that does not fit ``num_classes``."""
    if dataset not in ASYMMETRIC_MAPS:
        raise ValueError(f"noise_kind (--noise-kind) asymmetric has no class map for dataset "
                         f"{dataset!r} (maps: {', '.join(sorted(ASYMMETRIC_MAPS))}); use "
                         "--noise-kind uniform, or confusion with --noise-matrix FILE")
    pairs = ASYMMETRIC_MAPS[dataset]
    size = num_classes if num_classes is not None else len(DATASETS[dataset].classes)
    if max(max(pairs), max(pairs.values())) >= size:
        raise ValueError(f"noise_kind (--noise-kind) asymmetric: the map of {dataset!r} names "
                         f"classes up to {max(max(pairs), max(pairs.values()))}, the data has "
                         f"{size} classes")
    target = np.full(size, -1, dtype=np.int64)
    for source, dest in pairs.items():
        target[source] = dest
    return target


def load_noise_matrix(path, num_classes: int | None = None) -> np.ndarray:
    """The ``--noise-matrix`` file (``.npy``, or ``.csv``: one row per line, comma-separated,
    no header) as a ``[C, C]`` float64 array, checked: square with C >= 2 (and C ==
    ``num_classes`` where given), finite, non-negative, every row summing to 1 within
    :data:`ROW_TOLERANCE`, and every row with some mass off the diagonal (a flipped label
    must change). ValueError / FileNotFoundError naming the flag, the file and the problem."""
    path = Path(path)
    where = f"noise_matrix (--noise-matrix) {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            m = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            m = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        else:
            raise ValueError(f"{where}: must be a .npy or .csv file")
    except (OSError, ValueError) as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where} cannot be read as a matrix: {exc}".splitlines()[0]) from None
    if m.dtype.kind not in "biuf":
        raise ValueError(f"{where}: must hold numbers, got dtype {m.dtype}")
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"{where}: must be a C x C matrix with C >= 2, got shape {m.shape}")
    if num_classes is not None and m.shape[0] != num_classes:
        raise ValueError(f"{where}: is {m.shape[0]} x {m.shape[0]}, the data has {num_classes} "
                         "classes")
    _check_values(m, where)
    return m


HELDOUT = "heldout:"  # --noise-matrix heldout:RUN_DIR


def read_noise_matrix(spec, num_classes: int | None = None) -> tuple[np.ndarray, str]:
    """``--noise-matrix``: a file (:func:`load_noise_matrix`) or ``heldout:RUN_DIR``
    (:func:`heldout_matrix`). Returns ``(matrix [C, C] float64, sha256 hex)``: the hash of the
    file's bytes, or of the estimated matrix's float64 bytes (what enters the protocol key)."""
    spec = str(spec)
    if spec.startswith(HELDOUT):
        matrix = heldout_matrix(spec[len(HELDOUT):], num_classes)
        return matrix, hashlib.sha256(np.ascontiguousarray(matrix).tobytes()).hexdigest()
    from .._atomic import file_sha256

    return load_noise_matrix(spec, num_classes), file_sha256(spec)


def heldout_matrix(run_dir, num_classes: int | None = None) -> np.ndarray:
    """``[C, C]`` float64: the confusion of a finished run's held-out predictions, rows
    normalised: row i = the share of the examples of (original) class i that the held-out
    ensemble (per example, the mean softmax of the models that did not train on it) predicts
    as each class. Read from ``RUN_DIR/per_model.npz`` (``probs [R, n, C]``, ``in_train [R,
    n]``, ``original_labels [n]``); examples held out by no model are left out. Checked like a
    file (:func:`load_noise_matrix`): a class the run never mistook is refused."""
    where = f"noise_matrix (--noise-matrix) {HELDOUT}{run_dir}"
    path = Path(run_dir) / "per_model.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no {path} (a finished pdepth run folder is needed)")
    try:
        with np.load(path, allow_pickle=False) as z:
            probs, in_train = np.asarray(z["probs"], np.float64), np.asarray(z["in_train"], bool)
            labels = np.asarray(z["original_labels"] if "original_labels" in z else z["labels"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{where}: {path} cannot be read ({exc})".splitlines()[0]) from None
    if probs.ndim != 3 or in_train.shape != probs.shape[:2] or labels.shape != probs.shape[1:2]:
        raise ValueError(f"{where}: {path} holds probs {probs.shape}, in_train "
                         f"{in_train.shape}, labels {labels.shape}: not one run's arrays")
    held = ~in_train
    seen = held.any(0)
    mean = (probs * held[:, :, None]).sum(0)[seen]
    c = int(probs.shape[2])
    counts = np.zeros((c, c))
    np.add.at(counts, (labels[seen].astype(np.int64), mean.argmax(1)), 1.0)
    if num_classes is not None and c != num_classes:
        raise ValueError(f"{where}: the run has {c} classes, the data has {num_classes}")
    if (counts.sum(1) == 0).any():
        raise ValueError(f"{where}: class {int(np.flatnonzero(counts.sum(1) == 0)[0])} has no "
                         "held-out example in that run")
    matrix = counts / counts.sum(1, keepdims=True)
    _check_values(matrix, where)
    return matrix


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """``[C, C]`` float64: ``matrix`` with its diagonal set to 0 and each row renormalised to
    sum to 1: where a flipped example of class c goes (P decides how many flip, so the
    matrix's probability of keeping a label is not used)."""
    q = np.array(matrix, dtype=np.float64)
    np.fill_diagonal(q, 0.0)
    return q / q.sum(axis=1, keepdims=True)


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int,
                kind: str = "uniform", *, target: np.ndarray | None = None,
                matrix: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Label noise: ``labels [n]`` (int64) with some of them moved to another class.

    One ``torch.Generator`` seeded with ``seed`` draws a permutation of the n examples; the
    flipped examples are a prefix of it: the first ``round(fraction * n)`` (``uniform``,
    ``confusion``), or the first ``round(fraction * m)`` of the m examples whose class has a
    target (``asymmetric``). The new class: ``uniform``, ``(label + offset) % C`` with one
    offset in ``1..C-1`` per example drawn next; ``asymmetric``, ``target[label]`` (``target
    [C]`` int64, -1 for a class that never flips, :func:`asymmetric_map`); ``confusion``, a
    draw from row ``label`` of :func:`off_diagonal` ``(matrix)`` (``matrix [C, C]``), by one
    float64 uniform per example drawn next. Each draw takes the same numbers of values
    whatever the fraction, so a smaller fraction flips a subset of the examples a larger one
    flips, each to the same class. Returns ``(given [n] int64, flipped [n] bool)``;
    ``given`` equals ``labels`` where ``flipped`` is False and differs from it elsewhere."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    n = int(labels.shape[0])
    if num_classes < 2:
        raise ValueError(f"flip_labels(): num_classes must be >= 2 to flip a label, got "
                         f"{num_classes}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"flip_labels(): kind must be one of {', '.join(NOISE_KINDS)}, got "
                         f"{kind!r}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    flipped = torch.zeros(n, dtype=torch.bool)
    if kind == "uniform":
        offsets = torch.randint(1, num_classes, (n,), generator=gen)
        flipped[perm[:round(fraction * n)]] = True
        return torch.where(flipped, (labels + offsets) % num_classes, labels), flipped
    if kind == "asymmetric":
        dest = torch.as_tensor(_checked_target(target, num_classes))
        movable = perm[dest[labels[perm]] >= 0]  # the mapped classes' examples, in perm order
        flipped[movable[:round(fraction * int(movable.shape[0]))]] = True
        return torch.where(flipped, dest[labels].clamp(min=0), labels), flipped
    cum = torch.as_tensor(np.cumsum(off_diagonal(_checked_matrix(matrix, num_classes)), axis=1))
    cum = cum / cum[:, -1:]  # the last entry exactly 1: every u < 1 finds a class
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    # the first class whose cumulative mass exceeds u: never one of mass 0 (the diagonal)
    drawn = torch.searchsorted(cum[labels], u.unsqueeze(1), right=True).squeeze(1)
    flipped[perm[:round(fraction * n)]] = True
    return torch.where(flipped, drawn, labels), flipped


def apply_noise(config, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The given labels ``[n]`` int64 of a run (``config``: a RunConfig, checked): ``labels``
    with ``config.label_noise`` of them flipped the ``config.noise_kind`` way. A
    ``--noise-matrix`` is read again here and must still have the hash the config took."""
    kind = config.noise_kind
    extra = {}
    if kind == "asymmetric":
        extra["target"] = asymmetric_map(config.dataset, num_classes)
    elif kind == "confusion":
        extra["matrix"], sha256 = read_noise_matrix(config.noise_matrix, num_classes)
        if sha256 != config.noise_matrix_sha256:
            raise ValueError(f"noise_matrix (--noise-matrix) {config.noise_matrix!r} changed "
                             "while the run was starting; pass it again")
    given, _ = flip_labels(labels, config.label_noise, num_classes, config.label_noise_seed,
                           kind, **extra)
    return given


def noise_record(config, num_classes: int) -> dict:
    """What ``config.json`` records of the noise kind beyond its rule: the class map and its
    source (``asymmetric``), the matrix file and its hash (``confusion``)."""
    if config.noise_kind == "asymmetric":
        target = asymmetric_map(config.dataset, num_classes)
        return {"map": {str(c): int(t) for c, t in enumerate(target) if t >= 0},
                "map_source": MAP_SOURCES[config.dataset]}
    if config.noise_kind == "confusion":
        return {"matrix": config.noise_matrix, "matrix_sha256": config.noise_matrix_sha256}
    return {}


def _checked_target(target, num_classes: int) -> np.ndarray:
    if target is None:
        raise ValueError("flip_labels(): kind 'asymmetric' needs target (asymmetric_map())")
    target = np.asarray(target, dtype=np.int64)
    if target.shape != (num_classes,) or (target >= num_classes).any() or (target < -1).any() \
            or (target == np.arange(num_classes)).any():
        raise ValueError(f"flip_labels(): target must be [{num_classes}] classes (or -1), none "
                         f"its own, got {target.tolist()}")
    return target


def _checked_matrix(matrix, num_classes: int) -> np.ndarray:
    if matrix is None:
        raise ValueError("flip_labels(): kind 'confusion' needs matrix (load_noise_matrix())")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"flip_labels(): matrix must be {num_classes} x {num_classes}, got "
                         f"shape {matrix.shape}")
    _check_values(matrix, "flip_labels(): matrix")
    return matrix


def _check_values(m: np.ndarray, where: str) -> None:
    """Finite, non-negative, rows summing to 1, every row with mass off the diagonal."""
    if not np.isfinite(m).all():
        raise ValueError(f"{where}: holds non-finite values")
    if (m < 0).any():
        raise ValueError(f"{where}: holds negative values (row {int(np.where(m < 0)[0][0])})")
    sums = m.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_TOLERANCE)
    if bad.size:
        raise ValueError(f"{where}: rows must sum to 1 (within {ROW_TOLERANCE:g}; row i is "
                         f"p(new label | class i)), row {int(bad[0])} sums to "
                         f"{sums[bad[0]]:.6g}")
    off = m.sum(axis=1) - np.diag(m)
    empty = np.flatnonzero(off <= 0)
    if empty.size:
        raise ValueError(f"{where}: row {int(empty[0])} has no mass off the diagonal, so a "
                         "flipped example of that class has no other label to take")

