"""The settings of a run (:class:`RunConfig`), its protocol key, and the 50/50 split."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..categories import CategoryThresholds
from ..data import DATASETS, IMAGE_FOLDER_SIZE
from ..models import ARCH_VERSIONS, ARCHITECTURES, file_sha256
from ..ops import FILTERS
from ..report import REPORT_DEPENDENCIES

__all__ = ["RUNTIME_KEYS", "RunConfig", "flip_labels", "rank_settings", "resolve_device",
           "run_dependencies", "split_halves"]

# Settings that never change a result: left out of the protocol key (so they may change on
# resume, and the per-model files of a run stay valid) and of what the ranks of a distributed
# run must agree on. knn_filter (--knn-filter) only decides how fast the k-NN op finds the
# neighbours, never which (the op's output is the same bits whatever the filter). download
# and workers only decide how the files arrive; a checkpoint enters the key by its content
# (checkpoint_sha256), not by its path (and a dataset by the hash of what was read, which the
# run folder's marker records: docs/protocol.md, "The run folder's rules"). keep_cache only
# keeps the disk cache's files; memory_budget only decides where the embeddings are held and
# in how many blocks the exact k-NN reads them (so a run that ran out of memory resumes with
# a lower one).
RUNTIME_KEYS = ("device", "root", "knn_filter", "download", "workers", "checkpoint",
                "keep_cache", "memory_budget")
# Runtime settings that earlier versions counted in the key: accepted_keys() also gives the
# key with them, so the files of those runs stay valid.
_LEGACY_KEYS = ("memory_budget",)
# Settings added after the first runs: left out of the key at these values, so that the runs
# of earlier versions keep their key.
_KEY_DEFAULTS = {"image_size": None, "model": None, "checkpoint_sha256": None,
                 "data_sha256": None}
_EPOCHS, _SEEDS = 6, (0, 1, 2, 3, 4)  # the defaults without a checkpoint
DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


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

    ``label_noise`` (``--label-noise P``, ``0 <= P < 1``) flips ``round(P * n)`` of the n
    labels of the run's examples to another class before the halves are drawn
    (:func:`flip_labels`); everything downstream uses the flipped ("given") labels.
    ``label_noise_seed`` seeds the flips; None (the default) means ``subset_seed``, so a
    rerun draws the same flips and every model of the run sees the same ones. It is resolved
    here, so ``config.json`` records the seed used.

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
    max_dim: int | None = 4096
    memory_budget: int = 2**30
    device: str = "cpu"
    thresholds: dict = field(default_factory=dict)
    knn_filter: str = "auto"
    label_noise: float = 0.0
    label_noise_seed: int | None = None
    image_size: int | None = None
    model: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    download: bool = False
    workers: int = 0
    data_sha256: str | None = None
    keep_cache: bool = False

    def __post_init__(self):
        self._check_network()
        self._resolve_training()
        if self.dataset == "imagefolder" and self.image_size is None:
            self.image_size = IMAGE_FOLDER_SIZE  # resolved: one key for one size
        if int(self.workers) < 0:
            raise ValueError(f"workers (--workers) must be >= 0, got {self.workers!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.subset is not None and self.subset < 4:
            raise ValueError(f"subset must be at least 4 examples, got {self.subset}")
        self.device = str(self.device)
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"device (--device) must be cpu, cuda, cuda:N or auto, got "
                             f"{self.device!r}")
        CategoryThresholds.from_dict(self.thresholds)  # validates the names
        if not isinstance(self.knn_filter, str) or self.knn_filter not in FILTERS:
            raise ValueError(f"knn_filter (--knn-filter) must be one of "
                             f"{', '.join(FILTERS)}, got {self.knn_filter!r}")
        try:
            noise = float(self.label_noise)
        except (TypeError, ValueError):
            noise = float("nan")
        if not 0.0 <= noise < 1.0:  # also refuses NaN
            raise ValueError(f"label_noise (--label-noise) must be a fraction with 0 <= P < 1, "
                             f"got {self.label_noise!r}")
        self.label_noise = noise
        self.label_noise_seed = int(self.subset_seed if self.label_noise_seed is None
                                    else self.label_noise_seed)

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
        self.seeds = [int(s) for s in (self.seeds if self.seeds is not None
                                       else (_SEEDS if trained else _SEEDS[:1]))]
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        self.epochs = int((_EPOCHS if trained else 0) if self.epochs is None else self.epochs)
        if trained and self.epochs < 1:
            raise ValueError(f"epochs (--epochs) must be >= 1, got {self.epochs}")
        if not trained and (self.epochs != 0 or len(self.seeds) != 1):
            raise ValueError(f"a checkpoint (--checkpoint) is scored, not trained: one model, "
                             f"no epochs; got epochs {self.epochs} (--epochs), seeds "
                             f"{self.seeds} (--seeds)")

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


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random 50/50 split of ``range(n)`` (sorted index arrays; the first half gets
    ``n // 2``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label noise: ``labels [n]`` (int64) with exactly ``round(fraction * n)`` of them moved
    to another class, uniformly among the other ``num_classes - 1``.

    One ``torch.Generator`` seeded with ``seed`` draws a permutation of the n examples (the
    first ``round(fraction * n)`` are flipped) and then one offset in ``1..C-1`` per example
    (the new class is ``(label + offset) % C``). Both draws take the same numbers of values
    whatever the fraction, so with one seed a smaller fraction flips a subset of the examples a
    larger one flips, each to the same class. Returns ``(given [n] int64, flipped [n]
    bool)``; ``given`` equals ``labels`` where ``flipped`` is False."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    n = int(labels.shape[0])
    if num_classes < 2:
        raise ValueError(f"flip_labels(): num_classes must be >= 2 to flip a label, got "
                         f"{num_classes}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    offsets = torch.randint(1, num_classes, (n,), generator=gen)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[perm[:round(fraction * n)]] = True
    given = torch.where(flipped, (labels + offsets) % num_classes, labels)
    return given, flipped


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
