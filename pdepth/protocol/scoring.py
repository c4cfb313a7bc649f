"""Scoring one trained model: prediction depth of every example against the model's training
half, over an embedding store (:mod:`pdepth.depth.cache`, docs/design.md section 12).

Where the embeddings of every probe fit ``memory_budget`` they stay in RAM and one forward
pass records them all. Otherwise they go to ``OUT/cache/`` as ``.npy`` files, in as few
passes as the free disk space allows (each pass truncated after its last probe), and the run
is resumable per probe: each probe's predictions, the logits and the trained weights are
saved there as they are computed and read back by a rerun. The model's cache files are
removed once its per-model file is written, unless ``--keep-cache``.

Every cache file has a record (``<file>.json``, :func:`pdepth.depth.cache.write_record`:
its sha256 and its owner -- the run's protocol key and data hash, the model, the file's
role and shape). A rerun reads a file back only where it checks against its record and the
array has the expected shape; any other file is deleted, logged and computed again."""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import _atomic
from ..depth.cache import (
    LayerStore,
    block_bytes,
    check_record,
    extract_to_store,
    layer_knn,
    plan_passes,
    remove_with_record,
    write_record,
)
from ..depth.result import DepthResult, build_result
from ..depth.support import LayerVote
from .errors import DiskSpaceError
from .stages import stage

__all__ = ["CACHE_DIR", "CACHE_NAME", "ModelCache", "Scored", "check_cache_space",
           "score_model"]

CACHE_DIR = "cache"
CACHE_NAME = re.compile(
    r"seed-?\d+-half[01]\.(train\.pt|logits\.npy|(emb|pred|votes)\d{2}\.npy)(\.json)?")
_RESERVE = 2**30  # free space left untouched on the cache's filesystem
# the dtypes of the cached arrays: predictions and vote counts (LayerVote); logits: any
_PRED, _COUNTS, _LOGITS = (np.dtype(np.int64),), (np.dtype(np.int16), np.dtype(np.int32)), None


def cache_bytes(n: int, dims) -> int:
    """Bytes of the embeddings of ``n`` examples at probes of widths ``dims`` (float32)."""
    return 4 * int(n) * sum(int(d) for d in dims)


def uses_disk(n: int, dims, memory_budget: int) -> bool:
    """Whether a model's embeddings go to disk: they do not fit ``memory_budget`` in RAM."""
    return cache_bytes(n, dims) > int(memory_budget)


def disk_budget(folder: Path) -> int:
    """Bytes the cache may use on ``folder``'s filesystem (free space less 1 GiB)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free - _RESERVE


def check_cache_space(out: Path, n: int, dims, memory_budget: int) -> None:
    """Before any training: raises :class:`DiskSpaceError` when the run's embeddings need the
    disk cache and its widest probe does not fit the free space (each pass holds at least
    one probe)."""
    if not uses_disk(n, dims, memory_budget):
        return
    folder = Path(out) / CACHE_DIR
    need, free = cache_bytes(n, [max(dims)]), disk_budget(folder)
    if need > free:
        raise DiskSpaceError(
            f"the embeddings of {n} examples ({_atomic.human_bytes(cache_bytes(n, dims))} "
            f"over {len(dims)} probes) exceed --memory-budget, so they go to {folder}; its "
            f"widest probe alone needs {_atomic.human_bytes(need)} but the disk has "
            f"{_atomic.human_bytes(free)} to spare (free space less 1 GiB). Free space, "
            "lower --max-dim or --subset, or raise --memory-budget")


@dataclass
class ModelCache:
    """The cache files of one model: ``folder/{prefix}.*`` (folder None: nothing on disk;
    else the folder is created), each with its record. ``owner``: what every file of this
    model belongs to (the run's protocol key and data hash); ``log`` hears of each file that
    fails its check and is computed again."""

    folder: Path | None
    prefix: str
    owner: dict = field(default_factory=dict)
    log: Callable[[str], None] | None = None

    def __post_init__(self):
        if self.folder is not None:
            self.folder.mkdir(exist_ok=True)

    def path(self, what: str) -> Path:
        return self.folder / f"{self.prefix}.{what}"

    def file_owner(self, what: str) -> dict:
        """The owner in the record of file ``what`` (e.g. ``pred03.npy``)."""
        return {**self.owner, "model": self.prefix, "file": what}

    def discard(self, what: str, problem: str) -> None:
        """Deletes file ``what`` (and its record), saying why: it is computed again."""
        if self.log:
            self.log(f"  {self.path(what)} {problem}: computing it again")
        remove_with_record(self.path(what))

    def _checked(self, what: str) -> bool:
        """Whether file ``what`` exists and checks against its record (else it is gone)."""
        if self.folder is None or not self.path(what).exists():
            return False
        problem = check_record(self.path(what), self.file_owner(what))
        if problem:
            self.discard(what, problem)
        return problem is None

    def load_array(self, what: str, shape: tuple, dtypes=None) -> np.ndarray | None:
        """The array saved as ``what`` by :meth:`save_array`, or None where there is none or
        it fails a check (record, shape ``shape``, a dtype of ``dtypes``): then it is
        deleted, to be computed again."""
        if not self._checked(what):
            return None
        try:
            a = np.load(self.path(what), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001  (any damage: recomputed, never used)
            self.discard(what, f"cannot be read ({type(exc).__name__})")
            return None
        if a.shape != tuple(shape) or (dtypes is not None and a.dtype not in dtypes):
            self.discard(what, f"holds {a.dtype} {a.shape}, expected {tuple(shape)}")
            return None
        return a

    def save_array(self, what: str, a: np.ndarray) -> None:
        if self.folder is not None:
            _atomic.write_with(self.path(what), lambda f: np.save(f, a, allow_pickle=False))
            write_record(self.path(what), self.file_owner(what))

    def load_train(self, key: str) -> dict | None:
        """The trained state saved by :meth:`save_train` for this run and model, or None
        (also where the file fails its check or cannot be read: it is deleted)."""
        if not self._checked("train.pt"):
            return None
        try:
            state = torch.load(self.path("train.pt"), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (garbage, truncated, pickled: retrained)
            self.discard("train.pt", f"cannot be read ({type(exc).__name__})")
            return None
        if not isinstance(state, dict) or state.get("protocol_key") != key or \
                state.get("model") != self.prefix:
            self.discard("train.pt", "holds another run's or model's training")
            return None
        return state

    def save_train(self, state: dict) -> None:
        if self.folder is not None:
            buf = io.BytesIO()
            torch.save({**state, "model": self.prefix}, buf)
            _atomic.write_bytes(self.path("train.pt"), buf.getvalue())
            write_record(self.path("train.pt"), self.file_owner("train.pt"))

    def remove(self) -> None:
        """Deletes this model's cache files and their records (and the folder once
        empty)."""
        if self.folder is None or not self.folder.is_dir():
            return
        for entry in self.folder.iterdir():
            if entry.name.startswith(self.prefix + ".") and CACHE_NAME.fullmatch(entry.name):
                entry.unlink()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


@dataclass(eq=False)
class Scored:
    """One model's prediction depth, in query order (training half first), its logits, and
    the time and peak memory of each stage."""

    depth: DepthResult
    logits: torch.Tensor
    stages: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_bytes: int = 0
    on_disk: bool = False

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    def stats(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "seconds": self.seconds,
                "cache": "disk" if self.on_disk else "memory"}


def score_model(model, cache: ModelCache, data, config, split, *, progress: bool = False
                ) -> Scored:
    """Prediction depth of every example (training half first, then the held-out half)
    against the training half ``split = (train_idx, held_idx)``, self matches excluded.
    Probes already scored by an interrupted run (their predictions in the cache) are read
    back, not computed again; with ``config.keep_cache`` the embeddings stay on disk."""
    t0 = time.perf_counter()
    train_idx, held_idx = split
    rows = np.concatenate([train_idx, held_idx])
    n_train, L = len(train_idx), len(data.dims)
    n = len(rows)
    store = LayerStore(n, data.dims, cache.folder, cache.prefix,
                       owner={**cache.owner, "model": cache.prefix}, log=cache.log,
                       metric=config.metric)
    labels = data.labels[torch.as_tensor(train_idx)]
    self_index = torch.cat([torch.arange(n_train), torch.full((len(held_idx),), -1)])
    C = data.num_classes
    votes = {layer: LayerVote(torch.from_numpy(p), torch.from_numpy(c)) for layer in range(L)
             if (p := cache.load_array(f"pred{layer:02d}.npy", (n,), _PRED)) is not None
             and (c := cache.load_array(f"votes{layer:02d}.npy", (n, C), _COUNTS)) is not None}
    logits = cache.load_array("logits.npy", (n, C), _LOGITS)
    logits = None if logits is None else torch.from_numpy(logits)
    stages: dict = {"extract": [], "knn": []}
    todo = [layer for layer in range(L) if layer not in votes]
    budget = disk_budget(cache.folder) if store.on_disk else config.memory_budget
    passes = plan_passes([layer for layer in todo if not store.has(layer)], data.dims,
                         len(rows), budget)
    if logits is None and not passes:
        passes = [[]]  # a pass that records no probe, for the logits alone
    knn = _ProbeScorer(store, cache, data, config, labels, self_index, stages["knn"], progress)
    for layer in todo:
        if store.has(layer):  # left whole by an interrupted run
            votes[layer] = knn(layer)
    for i, layers in enumerate(passes, 1):
        want_logits = logits is None and i == len(passes)
        with stage({"probes": [data.spec.names[x] for x in layers]}) as rec:
            lg = extract_to_store(model, data.x, rows, data.spec, layers, store,
                                  logits=want_logits, batch_size=config.eval_batch_size,
                                  device=data.device, progress=progress,
                                  desc=f"extract pass {i}/{len(passes)}")
        stages["extract"].append(rec)
        if want_logits:
            logits = lg
            cache.save_array("logits.npy", lg.numpy())
        for layer in layers:
            votes[layer] = knn(layer)
    result = build_result(torch.stack([votes[layer].pred for layer in range(L)]),
                          logits.argmax(1), query_labels=data.labels[rows],
                          example_index=torch.as_tensor(rows), k=config.k,
                          self_match="exclude", reference_mode="network",
                          num_classes=data.num_classes, layer_names=data.spec.names,
                          vote_counts=torch.stack([votes[layer].counts for layer in range(L)]),
                          metric=config.metric)
    peak = knn.peak if store.on_disk else cache_bytes(len(rows), data.dims)
    return Scored(result, logits, stages, time.perf_counter() - t0, int(peak), store.on_disk)


@dataclass(eq=False)
class _ProbeScorer:
    """``scorer(layer)``: one probe's k-NN over the store, timed into ``records``, its vote
    saved to the cache (for resuming) and its embeddings freed (kept on disk with
    ``keep_cache``), with a progress bar over its blocks if ``progress``; ``peak`` is the
    most embedding bytes a probe held at once."""

    store: LayerStore
    cache: ModelCache
    data: object
    config: object
    labels: torch.Tensor
    self_index: torch.Tensor
    records: list
    progress: bool = False
    peak: int = 0

    def __call__(self, layer: int) -> LayerVote:
        data, config, store = self.data, self.config, self.store
        with stage({"probe": data.spec.names[layer], "dim": data.dims[layer]}) as rec:
            vote = layer_knn(store, layer, self.labels, k=config.k,
                             num_classes=data.num_classes, self_index=self.self_index,
                             memory_budget=config.memory_budget, filter=config.knn_filter,
                             device=data.device, counts=True, progress=self.progress,
                             desc=f"k-NN {data.spec.names[layer]}")
        self.records.append(rec)
        self.cache.save_array(f"pred{layer:02d}.npy", vote.pred.numpy())
        self.cache.save_array(f"votes{layer:02d}.npy", vote.counts.numpy())
        self.peak = max(self.peak, block_bytes(store, layer, len(self.labels), config.k,
                                               config.memory_budget))
        if not (config.keep_cache and store.on_disk):
            store.drop(layer)
        return vote
