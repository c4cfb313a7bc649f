"""The settings of a run (:class:`RunConfig`), its protocol key, and the 50/50 split."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._atomic import file_sha256
from ..categories import CategoryThresholds
from ..data import DATASETS, IMAGE_FOLDER_SIZE
from ..families import TOKENS
from ..figures import REPORT_DEPENDENCIES
from ..models import ARCH_VERSIONS, ARCHITECTURES
from ..ops import FILTERS, METRICS
from ..scores import default_el2n_epoch
from .noise import NOISE_KINDS, asymmetric_map, flip_labels, read_noise_matrix

__all__ = ["MAX_SEED", "MIN_MEMORY_BUDGET", "RUNTIME_KEYS", "RunConfig", "check_out",
           "check_seeds", "flip_labels", "rank_settings", "resolve_device", "run_dependencies",
           "split_halves"]

# Settings that never change a result: left out of the protocol key (so they may change on
# resume, and the per-model files of a run stay valid) and of what the ranks of a distributed
# run must agree on. knn_filter (--knn-filter) only decides how fast the k-NN op finds the
# neighbours, never which (the op's output is the same bits whatever the filter). download
# and workers only decide how the files arrive; a checkpoint enters the key by its content
# (checkpoint_sha256), not by its path (and a dataset by the hash of what was read, which the
# run folder's marker records: docs/protocol.md, "The run folder's rules"). keep_cache only
# keeps the disk cache's files; memory_budget only decides where the embeddings are held and
# in how many blocks the exact k-NN reads them (so a run that ran out of memory resumes with
# a lower one). el2n_epoch only picks which recorded epoch the el2n column reads (every
# epoch's EL2N is saved per model): it changes no model, so a finished run's scores may be
# recomputed with another one.
RUNTIME_KEYS = ("device", "root", "knn_filter", "download", "workers", "checkpoint",
                "keep_cache", "memory_budget", "el2n_epoch")
RUNTIME_KEYS += ("noise_matrix",)  # like checkpoint: in the key by its content
# Runtime settings that earlier versions counted in the key: accepted_keys() also gives the
# key with them, so the files of those runs stay valid.
_LEGACY_KEYS = ("memory_budget",)
# Settings added after the first runs: left out of the key at these values, so that the runs
# of earlier versions keep their key.
_KEY_DEFAULTS = {"image_size": None, "model": None, "checkpoint_sha256": None,
                 "data_sha256": None, "token": None, "metric": "euclidean",
                 "model_args": None}
_KEY_DEFAULTS.update(noise_kind="uniform", noise_matrix_sha256=None)  # --noise-kind
_EPOCHS, _SEEDS = 6, (0, 1, 2, 3, 4)  # the defaults without a checkpoint
DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
# The smallest memory_budget (bytes; --memory-budget 1 MiB). A disk-cached probe is read in
# blocks of half the budget each (pdepth.depth.cache.block_rows): below 1 MiB a block holds a
# few rows (one 16 KiB row at the default --max-dim 4096) and the k-NN of one probe takes
# millions of blocks -- the run looks hung.
MIN_MEMORY_BUDGET = 2**20
# Seeds (seeds, subset_seed, label_noise_seed) lie in 0..MAX_SEED: a model's training is
# seeded with 1000 * seed + half (torch.manual_seed, 64 bits), and seeds name its files.
MAX_SEED = 2**32 - 1
_INT64_MAX = 2**63 - 1
# The flag of each numeric setting that has one, for the messages.
_FLAGS = {"seeds": "--seeds", "epochs": "--epochs", "subset": "--subset", "k": "--k",
          "lr": "--lr", "batch_size": "--batch-size", "max_dim": "--max-dim",
          "memory_budget": "--memory-budget", "image_size": "--image-size",
          "workers": "--workers", "label_noise": "--label-noise",
          "el2n_epoch": "--el2n-epoch"}


@dataclass
class RunConfig:
    """Every setting of a run (all are written to ``config.json``).

    The defaults are the CPU demo: a small CNN on 8,000 random Fashion-MNIST training images,
    5 seeds x 2 halves = 10 models of 6 epochs each, k = 30 (five held-out models per
    example, so its per-example averages take six values, not three).

    ``knn_filter`` is the k-NN op's filter format (``filter=`` of
    :func:`pdepth.stream_prediction_depth`, one of :data:`pdepth.FILTERS`): a speed setting
    only, so like ``device`` and ``root`` it is not part of the protocol key
    (:data:`RUNTIME_KEYS`) and a run may be resumed with another one.

    ``memory_budget`` (``--memory-budget``, bytes) bounds the embeddings a model's scoring
    holds in RAM; where every probe's embeddings of the run's examples exceed it they go to
    the disk cache ``OUT/cache/``, removed after each model unless ``keep_cache``
    (``--keep-cache``, a runtime setting like ``device``; docs/design.md section 12).

    ``metric`` (``--metric``) is the k-NN's metric, ``"euclidean"`` (default) or
    ``"cosine"`` (:data:`pdepth.METRICS`; docs/design.md section 2): it changes results, so
    it enters the protocol key, but only when it is not ``"euclidean"`` (:data:`_KEY_DEFAULTS`),
    so that the runs of earlier versions keep their key.

    ``label_noise`` (``--label-noise P``, ``0 <= P < 1``) flips ``round(P * n)`` of the n
    labels of the run's examples to another class before the halves are drawn
    (:func:`flip_labels`); everything downstream uses the flipped ("given") labels.
    ``label_noise_seed`` seeds the flips; None (the default) means ``subset_seed``, so a
    rerun draws the same flips and every model of the run sees the same ones. It is resolved
    here, so ``config.json`` records the seed used. ``noise_kind`` (``--noise-kind``,
    :data:`pdepth.protocol.noise.NOISE_KINDS`) says which labels flip and to what:
    ``uniform`` (default), ``asymmetric`` (the dataset's class map,
    :func:`pdepth.protocol.noise.asymmetric_map`) or ``confusion`` (a draw from the
    ``noise_matrix`` file, ``--noise-matrix``, or ``heldout:RUN_DIR``, the confusion of a
    finished run's held-out predictions; its hash ``noise_matrix_sha256`` enters the key, not
    its path). Without noise none of them is in the key, nor the uniform kind.

    Data: ``dataset`` names an entry of :data:`pdepth.data.DATASETS` (``root`` its folder;
    ``download`` lets torchvision fetch it; ``workers`` DataLoader processes decode an image
    folder; ``image_size`` is imagefolder's resize, default 32). ``data_sha256`` identifies
    the data of a user ``Dataset`` passed to :func:`pdepth.run` (set there; ``dataset`` is
    then only its name). The dataset settings are checked when :func:`pdepth.run` loads the
    data, before it writes anything (a user ``Dataset`` has no table entry to check here).

    The network: ``arch`` (:data:`pdepth.models.ARCHITECTURES`), or ``model``
    (``"module:factory"``, :func:`pdepth.models.make_model`; ``arch`` is then None). With
    ``checkpoint`` (a state dict file) the network is not trained: one model (seed
    ``seeds[0]``, default 0) is scored with every example of the run in its training split
    (``epochs`` resolves to 0; ``checkpoint_sha256``, the file's hash, enters the protocol
    key). ``epochs`` / ``seeds`` None mean 6 / ``[0, 1]`` (0 / ``[0]`` with a checkpoint).

    ``el2n_epoch`` (``--el2n-epoch``, ``1..epochs``) is the epoch the ``el2n`` score reads
    (docs/scores.md); None resolves to a fifth of ``epochs``, rounded half up, at least 1
    (:func:`pdepth.scores.default_el2n_epoch`; None with a checkpoint). It changes no model,
    so it is not in the protocol key (:data:`RUNTIME_KEYS`).

    Every setting is checked here, before anything is read or written: a ValueError naming
    the setting, its flag and the value (the numbers' ranges: :meth:`_check_numbers`).
    """

    dataset: str = "fashion-mnist"
    root: str | None = None
    arch: str | None = "cnn"
    probes: str | list[str] | None = None
    seeds: list[int] | None = None
    epochs: int | None = None
    subset: int | None = 8000
    subset_seed: int = 0
    k: int = 30
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 2e-3
    weight_decay: float = 0.0
    el2n_epoch: int | None = None  # --el2n-epoch; None: pdepth.scores.default_el2n_epoch
    max_dim: int | None = 4096
    memory_budget: int = 2**30
    device: str = "cpu"
    thresholds: dict = field(default_factory=dict)
    knn_filter: str = "auto"
    label_noise: float = 0.0
    label_noise_seed: int | None = None
    image_size: int | None = None
    model: str | None = None
    model_args: dict | None = None  # --model-arg: more keywords for the model's factory
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    download: bool = False
    workers: int = 0
    data_sha256: str | None = None
    keep_cache: bool = False
    token: str | None = None
    metric: str = "euclidean"
    noise_kind: str = "uniform"
    noise_matrix: str | None = None
    noise_matrix_sha256: str | None = None

    def __post_init__(self):
        self._check_numbers()
        self._check_network()
        self._resolve_training()
        if self.dataset == "imagefolder" and self.image_size is None:
            self.image_size = IMAGE_FOLDER_SIZE  # resolved: one key for one size
        self.device = str(self.device)
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"device (--device) must be cpu, cuda, cuda:N or auto, got "
                             f"{self.device!r}")
        if not isinstance(self.knn_filter, str) or self.knn_filter not in FILTERS:
            raise ValueError(f"knn_filter (--knn-filter) must be one of "
                             f"{', '.join(FILTERS)}, got {self.knn_filter!r}")
        if not isinstance(self.metric, str) or self.metric not in METRICS:
            raise ValueError(f"metric (--metric) must be one of {', '.join(METRICS)}, got "
                             f"{self.metric!r}")
        self.label_noise_seed = (self.subset_seed if self.label_noise_seed is None
                                 else self.label_noise_seed)
        self._check_noise()

    def _check_noise(self) -> None:
        """``noise_kind`` one of the kinds; ``asymmetric`` needs a map for the dataset;
        ``noise_matrix`` with ``confusion`` only (and there required), read and checked here
        (its hash taken; its size against the dataset's classes where the table knows them)."""
        if not isinstance(self.noise_kind, str) or self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind (--noise-kind) must be one of "
                             f"{', '.join(NOISE_KINDS)}, got {self.noise_kind!r}")
        if self.noise_kind == "asymmetric":
            asymmetric_map(self.dataset)
        if (self.noise_matrix is None) != (self.noise_kind != "confusion"):
            raise ValueError(f"noise_matrix (--noise-matrix) goes with --noise-kind confusion "
                             f"and only with it; got --noise-kind {self.noise_kind} and "
                             f"--noise-matrix {self.noise_matrix}")
        if self.noise_matrix is not None:
            self.noise_matrix = str(self.noise_matrix)
            info = DATASETS.get(self.dataset)
            self.noise_matrix_sha256 = read_noise_matrix(
                self.noise_matrix, len(info.classes) if info and info.classes else None)[1]
        else:
            self.noise_matrix_sha256 = None

    def _check_numbers(self) -> None:
        """Every numeric setting in its range, before any file is read: a ValueError naming
        the setting (and its flag) and the value. Integers: ``k``, ``batch_size``,
        ``eval_batch_size`` >= 1; ``workers`` >= 0; ``subset`` >= 4, ``max_dim`` >= 1 and
        ``image_size`` >= 8 or None; ``memory_budget`` >= :data:`MIN_MEMORY_BUDGET` bytes;
        seeds in ``0..MAX_SEED`` (``seeds`` and ``epochs``: :meth:`_resolve_training`).
        Reals: ``lr`` finite > 0, ``weight_decay`` finite >= 0, ``0 <= label_noise < 1``,
        every threshold a fraction in [0, 1]. ``probes`` names at least one module; ``token``
        is a token rule (:data:`pdepth.families.TOKENS`) or None."""
        for name in ("k", "batch_size", "eval_batch_size"):
            setattr(self, name, _integer(getattr(self, name), name, 1))
        self.workers = _integer(self.workers, "workers", 0)
        self.subset_seed = _integer(self.subset_seed, "subset_seed", 0, MAX_SEED)
        if self.label_noise_seed is not None:
            self.label_noise_seed = _integer(self.label_noise_seed, "label_noise_seed", 0,
                                             MAX_SEED)
        for name, low, hint in (("subset", 4, " (or None: every example; --subset all)"),
                                ("max_dim", 1, " (or None: no pooling; --max-dim 0)"),
                                ("image_size", 8, "")):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(getattr(self, name), name, low, hint=hint))
        budget = self.memory_budget
        if not (_is_real(budget) and MIN_MEMORY_BUDGET <= budget <= _INT64_MAX):
            shown = (f"{budget:.6g} bytes ({budget / 2**20:.6g} MiB)" if _is_real(budget)
                     else repr(budget))
            raise ValueError(
                f"memory_budget (--memory-budget) must be a number of bytes in "
                f"{MIN_MEMORY_BUDGET}..{_INT64_MAX} (--memory-budget in MiB: at least "
                f"{MIN_MEMORY_BUDGET // 2**20}; a smaller budget reads the disk cache in blocks "
                f"of a few rows and never finishes), got {shown}")
        self.memory_budget = int(budget)
        _real(self.lr, "lr", 0.0, above=True)
        _real(self.weight_decay, "weight_decay", 0.0)
        noise = self.label_noise
        if not (_is_real(noise) and 0.0 <= noise < 1.0):  # also refuses NaN
            raise ValueError(f"label_noise (--label-noise) must be a fraction with 0 <= P < 1, "
                             f"got {noise!r}")
        self.label_noise = float(noise)
        for name, value in CategoryThresholds.from_dict(self.thresholds).to_dict().items():
            if not (_is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"thresholds[{name!r}] must be a fraction in [0, 1], got "
                                 f"{value!r}")
        if self.token is not None and self.token not in TOKENS:
            raise ValueError(f"token (--token) must be one of {', '.join(TOKENS)}, got "
                             f"{self.token!r}")
        if (isinstance(self.probes, str) and not self.probes.strip()) or (
                isinstance(self.probes, (list, tuple)) and not self.probes):
            raise ValueError(f"probes (--probes) names no module, got {self.probes!r}: give a "
                             "preset or module names in the network's forward order")

    def _check_network(self) -> None:
        """``arch`` xor ``model``; the checkpoint file exists (its hash is taken here)."""
        if self.model is not None:
            if self.arch is not None:
                raise ValueError(f"arch (--arch {self.arch}) and model (--model {self.model}) "
                                 "exclude each other: give one")
        elif self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; valid architectures: "
                             f"{', '.join(ARCHITECTURES)}")
        if self.checkpoint is not None:
            self.checkpoint = str(self.checkpoint)
            try:
                self.checkpoint_sha256 = file_sha256(self.checkpoint)
            except OSError as exc:
                raise ValueError(f"checkpoint (--checkpoint) {self.checkpoint!r} cannot be "
                                 f"read ({exc.strerror or exc})") from None

    def _resolve_training(self) -> None:
        """Seeds and epochs: the defaults, or one model and no training with a checkpoint."""
        trained = self.checkpoint is None
        seeds = self.seeds if self.seeds is not None else (_SEEDS if trained else _SEEDS[:1])
        if not isinstance(seeds, (list, tuple)):
            raise ValueError(f"seeds (--seeds) must be a list of seeds, got {seeds!r}")
        self.seeds = check_seeds(seeds)
        self.epochs = _integer((_EPOCHS if trained else 0) if self.epochs is None
                               else self.epochs, "epochs", 1 if trained else 0)
        if not trained and (self.epochs != 0 or len(self.seeds) != 1):
            raise ValueError(f"a checkpoint (--checkpoint) is scored, not trained: one model, "
                             f"no epochs; got epochs {self.epochs} (--epochs), seeds "
                             f"{self.seeds} (--seeds)")
        # the epoch of the el2n score (docs/scores.md): resolved, so config.json records it
        if self.el2n_epoch is None:
            self.el2n_epoch = default_el2n_epoch(self.epochs)
        elif not trained:
            raise ValueError(f"el2n_epoch (--el2n-epoch) needs training epochs; a checkpoint "
                             f"trains none, got {self.el2n_epoch!r}")
        else:
            self.el2n_epoch = _integer(self.el2n_epoch, "el2n_epoch", 1, self.epochs,
                                       hint=" (at most --epochs)")

    def to_dict(self) -> dict:
        return asdict(self)

    def key_settings(self) -> dict:
        """The settings the protocol key hashes (:meth:`protocol_key`), by name: every setting
        but :data:`RUNTIME_KEYS`; without label noise the label-noise settings are left out,
        and the settings of :data:`_KEY_DEFAULTS` at their defaults, so the runs of earlier
        versions keep their key; an architecture with a version
        (:data:`pdepth.models.ARCH_VERSIONS`) adds it."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS
             and not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}
        if d["label_noise"] == 0.0:
            del d["label_noise"], d["label_noise_seed"]
            for name in ("noise_kind", "noise_matrix_sha256"):
                d.pop(name, None)
        if self.arch in ARCH_VERSIONS:
            d["arch_version"] = ARCH_VERSIONS[self.arch]
        return d

    def protocol_key(self) -> str:
        """A hash of the settings that change results (:meth:`key_settings`: not the device,
        the data root, the k-NN filter, downloading, the workers or the memory budget,
        :data:`RUNTIME_KEYS`)."""
        return _hash_settings(self.key_settings())

    def accepted_keys(self) -> tuple[str, str]:
        """The keys a resume accepts for these settings: :meth:`protocol_key`, and the key
        earlier versions gave them (with the settings of :data:`_LEGACY_KEYS`, which they
        counted), so that their unfinished runs resume with the same settings."""
        legacy = {**self.key_settings(), **{k: getattr(self, k) for k in _LEGACY_KEYS}}
        return self.protocol_key(), _hash_settings(legacy)

    def jobs(self) -> list[tuple[int, int]]:
        """The models of the run, ``(seed, half)`` in seed, half order (with a checkpoint:
        the one model ``(seeds[0], 0)``)."""
        if self.checkpoint is not None:
            return [(self.seeds[0], 0)]
        return [(s, h) for s in self.seeds for h in (0, 1)]

    def split(self, n: int, seed: int, half: int) -> tuple[np.ndarray, np.ndarray]:
        """Model ``(seed, half)``'s ``(training split, held-out split)`` of ``range(n)``:
        :func:`split_halves`, or with a checkpoint every example in the training split (the
        checkpoint is taken to have trained on them) and none held out."""
        if self.checkpoint is not None:
            return np.arange(n), np.arange(0)
        halves = split_halves(n, seed)
        return halves[half], halves[1 - half]


def _hash_settings(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_out(out, config: RunConfig) -> None:
    """``out`` (``--out``) may be used for a run of ``config``: a ValueError for an empty
    name (it would be the current directory; pass ``.`` to mean it) and for a folder that is
    the data's root folder (``config.root``, else the dataset's default one) or inside it
    (the run's files would become data: an image folder would read its PNGs as a new
    class)."""
    if not str(out).strip():
        raise ValueError(f"--out {str(out)!r} names no folder: give the output folder (. for "
                         "the current one)")
    info = DATASETS.get(config.dataset)
    root = config.root if config.root is not None else (info.root if info else None)
    if root is None:
        return
    where, data = Path(out).resolve(), Path(root).resolve()
    if where == data or data in where.parents:
        raise ValueError(f"--out {out} is inside the data's root folder {root} (--root): the "
                         "run's files would be read as data; choose an --out outside it")


def check_seeds(seeds, flag: str = "--seeds") -> list[int]:
    """``seeds`` as a list of distinct ints in ``0..MAX_SEED`` (at least one); else a
    ValueError naming ``flag`` and the bad value."""
    seeds = [_integer(s, f"seeds ({flag})", 0, MAX_SEED) for s in seeds]
    if not seeds:
        raise ValueError(f"seeds ({flag}) must name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds ({flag}) must be distinct, got {seeds}")
    return seeds


def _named(name: str) -> str:
    """A setting's name in messages: with its flag where it has one."""
    return f"{name} ({_FLAGS[name]})" if name in _FLAGS else name


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(
        value)


def _integer(value, name: str, low: int, high: int = _INT64_MAX, hint: str = "") -> int:
    """``value`` as an int in ``low..high`` (at most int64); else a ValueError naming the
    setting ``name`` and the value. bools and non-integral numbers are refused."""
    number = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif _is_real(value) and float(value).is_integer():
        number = int(value)
    if number is None or not low <= number <= high:
        limits = (f">= {low}" if high == _INT64_MAX and (number is None or number < low)
                  else f"in {low}..{high}")
        raise ValueError(f"{_named(name)} must be an integer {limits}{hint}, got {value!r}")
    return number


def _real(value, name: str, low: float, *, above: bool = False) -> None:
    """ValueError naming the setting unless ``value`` is a finite number ``>= low`` (``>
    low`` with ``above``)."""
    if not (_is_real(value) and (value > low if above else value >= low)):
        raise ValueError(f"{_named(name)} must be a finite number {'>' if above else '>='} "
                         f"{low:g}, got {value!r}")


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random 50/50 split of ``range(n)`` (sorted index arrays; the first half gets
    ``n // 2``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def run_dependencies(config: RunConfig, progress: bool) -> list[str]:
    """The optional modules a run with these settings imports."""
    # the table's datasets but the Debian Fashion-MNIST are read (or fetched) by torchvision;
    # SVHN's .mat files by scipy
    torchvision = (config.arch == "resnet18" or config.download
                   or config.dataset in set(DATASETS) - {"fashion-mnist"})
    return (list(REPORT_DEPENDENCIES) + (["tqdm"] if progress else [])
            + (["torchvision"] if torchvision else [])
            + (["scipy"] if config.dataset == "svhn" else []))


def resolve_device(device: str) -> torch.device:
    """``config.device`` as a torch device (``auto``: CUDA when available); ValueError for a
    CUDA device that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False; "
                         "use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} "
                         "CUDA device(s) are visible")
    return dev


def rank_settings(config: RunConfig, out: Path, overwrite: bool) -> dict:
    """What every rank of a distributed run must agree on (not :data:`RUNTIME_KEYS`: each rank
    scores its own models, and neither its device nor its k-NN filter changes them)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_KEYS}
    return {**settings, "out": str(out), "overwrite": overwrite}
