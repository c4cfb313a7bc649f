"""The end-to-end protocol of Baldock et al. (2021), on one dataset and architecture.

For every seed s the dataset (or a random ``subset`` of it) is split 50/50 at random; model
``(s, h)`` trains on half h and holds out the other half. Every model:

1. trains for ``epochs`` epochs (Adam, cosine learning rate), recording every example's
   prediction after each epoch (and at initialisation);
2. computes prediction depth (:func:`pdepth.stream_prediction_depth`) for its training half
   (each example's own support point excluded) and for its held-out half, with its training
   half as the k-NN support set (labels = the given labels; reference = the network's own
   prediction, design.md section 1);
3. saves its arrays to ``models/seed<s>-half<h>.npz`` as soon as it is done (an interrupted
   run resumes from these files).

The per-model results are then aggregated per example (:func:`pdepth.metrics.summarize`),
categorised (:func:`pdepth.categorize`) and written out with a report
(:mod:`pdepth.report`). See docs/protocol.md for the output files and their columns.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .categories import CATEGORIES, CategoryThresholds, categorize
from .data import DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_subset, normalize_images
from .metrics import layer_accuracy, summarize
from .models import ARCHITECTURES, build_model
from .probes import ProbeSpec, probe_dims, resolve_probes
from .report import FIGURES, REPORT_DEPENDENCIES
from .stream import peak_rss_bytes, stream_prediction_depth

__all__ = [
    "MARKER",
    "MissingDependencyError",
    "ModelFileError",
    "OutputExistsError",
    "RunConfig",
    "load_results",
    "run",
    "split_halves",
    "train_model",
]

RESULT_FILES = ("results.parquet", "per_model.npz", "data.npz", "config.json", "report.html",
                "COMPLETE")
RESULT_DIRS = ("models", "figures")
MARKER = ".pdepth-run.json"  # written first into every run directory: {"protocol_key": ...}
_MODEL_NAME = re.compile(r"seed-?\d+-half[01]\.npz")
_TMP_NAME = re.compile(r"\..+\.tmp-\d+(\.[a-z]+)?")  # an atomic write's temporary name
_RUNTIME_KEYS = ("device", "root")  # may change on resume
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
INSTALL_HINT = 'pip install "pdepth[run]"'


class OutputExistsError(RuntimeError):
    """The output directory cannot be used as it is: it holds results, other settings or
    files pdepth did not write."""


class ModelFileError(OutputExistsError):
    """A per-model file of an unfinished run is unreadable or is not the model its name
    says."""


class MissingDependencyError(ImportError):
    """An optional dependency of ``pdepth run`` / ``pdepth report`` is not installed."""


def require_modules(modules, what: str) -> None:
    """Raises :class:`MissingDependencyError` naming every module of ``modules`` that cannot
    be imported, so that a run fails before any work instead of half-way."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"{what} needs {', '.join(missing)}, not installed: {INSTALL_HINT}")


def run_dependencies(config: RunConfig, progress: bool) -> list[str]:
    """The optional modules a run with these settings imports."""
    return (list(REPORT_DEPENDENCIES) + (["tqdm"] if progress else [])
            + (["torchvision"] if config.arch == "resnet18" else []))


@dataclass
class RunConfig:
    """Every setting of a run (all are written to ``config.json``).

    The defaults are the CPU demo: a small CNN on 8,000 random Fashion-MNIST training images,
    2 seeds x 2 halves = 4 models of 6 epochs each, k = 30.
    """

    dataset: str = "fashion-mnist"
    root: str | None = None
    arch: str = "cnn"
    probes: str | list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 6
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

    def __post_init__(self):
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; valid architectures: "
                             f"{', '.join(ARCHITECTURES)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid datasets: "
                             f"{', '.join(DATASETS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.subset is not None and self.subset < 4:
            raise ValueError(f"subset must be at least 4 examples, got {self.subset}")
        self.device = str(self.device)
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device (--device) must be cpu, cuda, cuda:N or auto, got "
                             f"{self.device!r}")
        CategoryThresholds.from_dict(self.thresholds)  # validates the names

    def to_dict(self) -> dict:
        return asdict(self)

    def protocol_key(self) -> str:
        """A hash of the settings that change results (not the device or the data root)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_KEYS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random 50/50 split of ``range(n)`` (sorted index arrays; the first half gets
    ``n // 2``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


@torch.no_grad()
def _predict(model, x, batch_size, device) -> torch.Tensor:
    was = model.training
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).argmax(1).cpu()
           for i in range(0, x.shape[0], batch_size)]
    model.train(was)
    return torch.cat(out)


def train_model(model, x, y, train_index, *, epochs, lr=2e-3, weight_decay=0.0, batch_size=128,
                eval_batch_size=1000, seed=0, device="cpu", progress=False, desc="train"):
    """Trains ``model`` on ``x[train_index]`` and records the prediction on every row of ``x``
    at initialisation and after each epoch.

    Returns ``(epoch_pred [epochs + 1, n] int64, history)`` with ``history`` holding per-epoch
    ``loss``, ``train_accuracy`` (on the training half, eval mode) and ``held_out_accuracy``.
    """
    device = torch.device(device)
    model.to(device)
    train_index = torch.as_tensor(train_index)
    held = torch.ones(x.shape[0], dtype=torch.bool)
    held[train_index] = False
    xt, yt = x[train_index].to(device), y[train_index].to(device)
    steps_per_epoch = max(1, -(-xt.shape[0] // batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(int(seed))
    loss_fn = torch.nn.CrossEntropyLoss()
    preds = [_predict(model, x, eval_batch_size, device)]
    history = {"loss": [], "train_accuracy": [], "held_out_accuracy": []}
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=desc, unit="epoch", leave=False)
    for _ in epochs_iter:
        model.train()
        perm = torch.randperm(xt.shape[0], generator=gen).to(device)
        total = 0.0
        for i in range(0, xt.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.shape[0]
        pred = _predict(model, x, eval_batch_size, device)
        preds.append(pred)
        correct = pred == y
        history["loss"].append(total / xt.shape[0])
        history["train_accuracy"].append(float(correct[~held].float().mean()))
        history["held_out_accuracy"].append(
            float(correct[held].float().mean()) if held.any() else float("nan"))
        if progress:
            epochs_iter.set_postfix(loss=f"{history['loss'][-1]:.3f}",
                                    train=f"{history['train_accuracy'][-1]:.3f}",
                                    held_out=f"{history['held_out_accuracy'][-1]:.3f}")
    return torch.stack(preds), history


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, default=_json_default).encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def _is_pdepth_name(folder: str, name: str) -> bool:
    """Whether ``folder/name`` ("" for the top level) is a file name pdepth writes."""
    if _TMP_NAME.fullmatch(name):  # left behind by an interrupted atomic write
        return folder in ("",) + RESULT_DIRS
    if folder == "models":
        return _MODEL_NAME.fullmatch(name) is not None
    if folder == "figures":
        return name in FIGURES
    return folder == "" and (name in RESULT_FILES or name == MARKER)


def _foreign_entries(out: Path) -> list[str]:
    """The entries of ``out`` (and of its models/ and figures/) that pdepth did not write."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in RESULT_DIRS and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir())
                        if not (e.is_file() and _is_pdepth_name(entry.name, e.name))]
        elif not (entry.is_file() and _is_pdepth_name("", entry.name)):
            foreign.append(entry.name)
    return foreign


def _read_marker(out: Path) -> dict | None:
    """The marker's content; None without a marker, {} for a damaged one (still pdepth's)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _check_output(out: Path, config: RunConfig, overwrite: bool) -> None:
    """Raises :class:`OutputExistsError` unless the non-empty directory ``out`` may be used:
    it must be a pdepth run (marker) holding only pdepth's files; a finished run or other
    settings need ``overwrite``."""
    if _read_marker(out) is None:
        raise OutputExistsError(
            f"--out {out} is not empty and is not a pdepth run directory (no {MARKER}, which "
            f"pdepth writes first into every run directory; it holds e.g. "
            f"{_listing(sorted(p.name for p in out.iterdir()))}); pdepth never writes into or "
            "deletes from such a directory, even with --overwrite: choose a new or empty --out"
        )
    foreign = _foreign_entries(out)
    if foreign:
        raise OutputExistsError(
            f"--out {out} is a pdepth run directory but holds files pdepth did not write: "
            f"{_listing(foreign)}; move them elsewhere (--overwrite never deletes them) or "
            "choose another --out"
        )
    if overwrite:
        return
    if (out / "COMPLETE").exists():
        raise OutputExistsError(
            f"--out {out} already holds the results of a finished pdepth run; pass --overwrite "
            "to replace them (it deletes only the files pdepth wrote), or choose another --out"
        )
    if _read_marker(out).get("protocol_key") != config.protocol_key():
        raise OutputExistsError(
            f"--out {out} holds an unfinished pdepth run with different settings; rerun with "
            "its settings to resume it, pass --overwrite to replace it (it deletes only the "
            "files pdepth wrote), or choose another --out"
        )


def _listing(names: list[str], most: int = 5) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _remove_pdepth_files(out: Path) -> None:
    """Deletes the files pdepth wrote (checked by :func:`_check_output`), keeping the marker;
    removes models/ and figures/ only when that leaves them empty."""
    for folder in RESULT_DIRS:
        sub = out / folder
        if sub.is_dir():
            for entry in sub.iterdir():
                if entry.is_file() and _is_pdepth_name(folder, entry.name):
                    entry.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()
    for entry in out.iterdir():
        if entry.is_file() and entry.name != MARKER and _is_pdepth_name("", entry.name):
            entry.unlink()


def prepare_output(out: Path, config: RunConfig, overwrite: bool) -> int:
    """Creates / checks the output directory (the rules: docs/protocol.md, "Bad input,
    interruption, resuming"). Returns the number of per-model files kept for resuming.

    A new or empty directory is used as it is. Any other directory must be a pdepth run
    (its marker, :data:`MARKER`, written first) holding only files pdepth writes; a finished
    run or one with other settings is refused unless ``overwrite``, which deletes pdepth's
    files and nothing else. An unfinished run with the same settings is resumed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory; choose another "
                                "--out")
    if out.is_dir() and any(out.iterdir()):
        _check_output(out, config, overwrite)
        if overwrite:
            _remove_pdepth_files(out)
    out.mkdir(parents=True, exist_ok=True)
    # The marker comes first: whatever pdepth writes later lies in a recognisable run.
    _atomic_json(out / MARKER, {"pdepth_run": 1, "protocol_key": config.protocol_key()})
    (out / "models").mkdir(exist_ok=True)
    return len([p for p in (out / "models").iterdir() if _MODEL_NAME.fullmatch(p.name)])


def versions() -> dict:
    from ._version import __version__
    from .ops import build_info

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover
        tv = None
    info = {
        "pdepth": __version__,
        "torch": torch.__version__,
        "torchvision": tv,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import pandas
        import pyarrow

        info["pandas"] = pandas.__version__
        info["pyarrow"] = pyarrow.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["extension"] = build_info()
    except Exception as exc:  # pragma: no cover
        info["extension"] = {"error": str(exc)}
    return info


def _model_path(out: Path, seed: int, half: int) -> Path:
    return out / "models" / f"seed{seed}-half{half}.npz"


_MODEL_ARRAYS = ("seed", "half", "train_index", "held_out_index", "in_train", "depth",
                 "layer_pred", "probs", "epoch_pred", "loss", "train_accuracy",
                 "held_out_accuracy")


def _load_model_file(path: Path, key: str, seed: int, half: int, n: int) -> dict:
    """Reads ``models/seed<s>-half<h>.npz`` of an unfinished run and checks that it is model
    ``(seed, half)`` of this run (settings, split, sizes), whatever its name says."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        meta = json.loads(str(arrays.pop("meta")[()]))
    except Exception as exc:  # truncated or damaged: zipfile, zlib, EOF, JSON, KeyError...
        raise ModelFileError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it to recompute "
            "that model, then rerun the same command") from exc
    problem = _model_mismatch(arrays, meta, key, seed, half, n)
    if problem:
        raise ModelFileError(f"{path} {problem}; delete it to recompute that model, then "
                             "rerun the same command")
    arrays["meta"] = meta
    return arrays


def _model_mismatch(arrays: dict, meta: dict, key: str, seed: int, half: int,
                    n: int) -> str | None:
    """What is wrong with a loaded model file, or None."""
    if meta.get("protocol_key") != key:
        return (f"was computed with other settings (protocol key "
                f"{meta.get('protocol_key')!r}, this run {key!r})")
    missing = [name for name in _MODEL_ARRAYS if name not in arrays]
    if missing:
        return f"lacks the arrays {', '.join(missing)}"
    said = (int(arrays["seed"]), int(arrays["half"]), meta.get("seed"), meta.get("half"))
    if said != (seed, half, seed, half):
        return (f"holds the model of seed {said[0]} half {said[1]}, not seed {seed} half "
                f"{half} as its name says")
    if arrays["in_train"].shape != (n,) or not np.array_equal(
            arrays["train_index"], split_halves(n, seed)[half]):
        return f"does not hold the split of seed {seed} half {half} of these {n} examples"
    return None


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
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


def run(config: RunConfig, out: str | os.PathLike, *, overwrite: bool = False,
        progress: bool = True, log=None, process_group=None) -> Path:
    """Runs the protocol and writes the results to ``out`` (see docs/protocol.md).

    Returns the output directory. Raises ``FileNotFoundError`` (dataset missing),
    ``ValueError`` (bad settings, unknown probe names) or :class:`MissingDependencyError`
    before anything is written; :class:`OutputExistsError` for an ``out`` that cannot be used
    (see :func:`prepare_output`), :class:`ModelFileError` for a damaged or misnamed per-model
    file when resuming.

    ``process_group`` (a ``torch.distributed`` group, e.g. ``torch.distributed.group.WORLD``
    under torchrun) spreads the models over its ranks: every rank calls ``run`` with the same
    arguments and an ``out`` on a filesystem all ranks share; rank 0 prepares ``out``, model
    ``j`` (in seed, half order) is trained and scored by rank ``j % world_size`` and saved to
    ``models/``, and rank 0 then aggregates and writes the results and the report (the other
    ranks return once every model is saved). With CUDA, call
    ``torch.cuda.set_device(local_rank)`` first: ``device="cuda"`` means the current device.
    A failure on any rank (including bad settings or existing results on rank 0) raises
    ``RuntimeError`` naming it on every rank; ranks whose settings differ raise ``ValueError``
    on every rank before any work.
    """
    t_start = time.perf_counter()
    out = Path(out)
    log = log or (lambda msg: None)
    rank, world = 0, 1
    if process_group is not None:
        import torch.distributed as dist

        from .distributed import check_all, check_same

        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    # Everything that can fail on bad input fails before the output directory is touched,
    # and under torchrun before any rank starts work.
    setup, error = None, None
    try:
        setup = _setup(config, progress)
    except Exception as exc:
        if world == 1:
            raise
        error = exc
    if world > 1:
        check_all(error, "pdepth.run(): checking the settings", process_group)
        check_same(_rank_settings(config, out, overwrite), "pdepth.run()", process_group)
    device, thresholds, spec, images, labels, dataset_index, x, dims = setup
    n = int(labels.shape[0])
    num_classes = int(labels.max()) + 1

    key = config.protocol_key()
    models_meta = []
    cfg = {
        "status": "running",
        "protocol_key": key,
        "config": config.to_dict(),
        "resolved": {
            "device": str(device),
            "root": config.root or FASHION_MNIST_ROOT,
            "num_examples": n,
            "num_classes": num_classes,
            "class_names": list(FASHION_MNIST_CLASSES),
            "probes": spec.names,
            "probe_preset": spec.preset,
            "probe_dims": dims,
            "num_layers": spec.num_probes,
            "num_models": 2 * len(config.seeds),
            "thresholds": thresholds.to_dict(),
            "reference": "network",
            "self_match": "exclude",
            "support": "the model's training half, given labels",
        },
        "versions": versions(),
    }

    def prepare() -> int:
        kept = prepare_output(out, config, overwrite)
        _atomic_json(out / "config.json", cfg)
        _atomic_savez(out / "data.npz", images=images.numpy(), labels=labels.numpy(),
                      dataset_index=dataset_index.numpy())
        return kept

    if world == 1:
        kept = prepare()
    else:
        error, kept = None, 0
        if rank == 0:
            try:
                kept = prepare()
            except Exception as exc:
                error = exc
        check_all(error, "pdepth.run(): preparing the output directory (rank 0)",
                  process_group)
    log(f"pdepth run: {config.arch} on {n} {config.dataset} examples, seeds {config.seeds}, "
        f"{config.epochs} epochs, k={config.k}, {spec.num_probes} probes, device {device}"
        + (f"; resuming ({kept} model(s) already done)" if kept else ""))

    per_model = []
    error = None
    try:
        for job, (seed, half) in enumerate((s, h) for s in config.seeds for h in (0, 1)):
            if job % world != rank:
                per_model.append(None)  # another rank's model: read from its file below
                continue
            halves = split_halves(n, seed)
            path = _model_path(out, seed, half)
            if path.exists():
                per_model.append(_load_model_file(path, key, seed, half, n))
                log(f"  seed {seed} half {half}: loaded {path.name}")
                continue
            train_idx, held_idx = halves[half], halves[1 - half]
            per_model.append(_run_model(config, spec, x, labels, train_idx, held_idx, seed,
                                        half, device, num_classes, key, path, progress, log))
    except Exception as exc:
        if world == 1:
            raise
        error = exc
    if world > 1:
        check_all(error, "pdepth.run(): training and scoring the models", process_group)
        if rank != 0:
            return out
        jobs = [(s, h) for s in config.seeds for h in (0, 1)]
        per_model = [m if m is not None else _load_model_file(_model_path(out, s, h), key, s,
                                                              h, n)
                     for m, (s, h) in zip(per_model, jobs, strict=True)]
    t_models = time.perf_counter() - t_start

    # aggregate
    depth = np.stack([m["depth"] for m in per_model]).astype(np.int64)
    in_train = np.stack([m["in_train"] for m in per_model])
    probs = np.stack([m["probs"] for m in per_model])
    layer_pred = np.stack([m["layer_pred"] for m in per_model]).astype(np.int64)
    epoch_pred = np.stack([m["epoch_pred"] for m in per_model]).astype(np.int64)
    y = labels.numpy()
    df = summarize(depth, in_train, probs, layer_pred, epoch_pred, y,
                   early_fraction=thresholds.early_fraction)
    df["category"] = categorize(df, spec.num_probes, thresholds, num_classes=num_classes)
    df.insert(0, "dataset_index", dataset_index.numpy())
    df.insert(2, "label_name", [FASHION_MNIST_CLASSES[i] for i in y])
    cat = df.pop("category")
    df.insert(3, "category", cat)
    tmp = out / f".results.parquet.tmp-{os.getpid()}"
    df.to_parquet(tmp)
    os.replace(tmp, out / "results.parquet")
    _atomic_savez(
        out / "per_model.npz",
        depth=depth, in_train=in_train, probs=probs.astype(np.float32),
        layer_pred=layer_pred.astype(np.int16), epoch_pred=epoch_pred.astype(np.int16),
        seeds=np.array([m["seed"] for m in per_model]),
        halves=np.array([m["half"] for m in per_model]),
        labels=y, dataset_index=dataset_index.numpy(),
        layer_names=np.array(spec.names),
        loss=np.stack([m["loss"] for m in per_model]),
        train_accuracy=np.stack([m["train_accuracy"] for m in per_model]),
        held_out_accuracy=np.stack([m["held_out_accuracy"] for m in per_model]),
    )
    models_meta = [m["meta"] for m in per_model]
    summary = {
        "layer_knn_accuracy_train": layer_accuracy(layer_pred, y, in_train).tolist(),
        "layer_knn_accuracy_held_out": layer_accuracy(layer_pred, y, ~in_train).tolist(),
        "mean_train_depth": float(np.nanmean(df["train_depth"])),
        "mean_held_out_depth": float(np.nanmean(df["held_out_depth"])),
        "held_out_accuracy": float(np.nanmean(df["held_out_accuracy"])),
        "train_accuracy": float(np.nanmean(df["train_accuracy"])),
        "categories": {c: int((df["category"] == c).sum()) for c in CATEGORIES},
    }
    cfg.update(models=models_meta, summary=summary)
    cfg["timing"] = {"models_seconds": t_models}
    _atomic_json(out / "config.json", cfg)

    from .report import write_report

    t_report = time.perf_counter()
    write_report(out)
    cfg["status"] = "complete"
    cfg["timing"]["report_seconds"] = time.perf_counter() - t_report
    cfg["timing"]["total_seconds"] = time.perf_counter() - t_start
    cfg["peak_rss_bytes"] = peak_rss_bytes()
    _atomic_json(out / "config.json", cfg)
    _atomic_write_bytes(out / "COMPLETE", f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    log(f"pdepth run: done in {cfg['timing']['total_seconds']:.1f} s; results in {out} "
        f"(report: {out / 'report.html'})")
    return out


def _setup(config: RunConfig, progress: bool) -> tuple:
    """Checks the dependencies and settings and loads the data: ``(device, thresholds, probe
    spec, images, labels, dataset_index, normalised images, probe dims)``."""
    require_modules(run_dependencies(config, progress), "pdepth run")
    device = _resolve_device(config.device)
    thresholds = CategoryThresholds.from_dict(config.thresholds)
    probe_model = build_model(config.arch)
    spec = resolve_probes(probe_model, config.probes if config.probes is not None else
                          config.arch, max_dim=config.max_dim)
    images, labels, dataset_index = load_subset(config.dataset, config.root, config.subset,
                                                config.subset_seed)
    x = normalize_images(images)
    dims = probe_dims(probe_model, spec, x[:1])
    n = int(labels.shape[0])
    if config.k > n // 2 - 1:
        raise ValueError(f"k={config.k} is too large for a training half of {n // 2} examples")
    return device, thresholds, spec, images, labels, dataset_index, x, dims


def _rank_settings(config: RunConfig, out: Path, overwrite: bool) -> dict:
    """What every rank of a distributed run must agree on."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_KEYS}
    return {**settings, "out": str(out), "overwrite": overwrite}


def _run_model(config, spec: ProbeSpec, x, labels, train_idx, held_idx, seed, half, device,
               num_classes, key, path, progress, log) -> dict:
    t0 = time.perf_counter()
    n = x.shape[0]
    torch.manual_seed(1000 * seed + half)
    model = build_model(config.arch, num_classes=num_classes).to(device)
    epoch_pred, history = train_model(
        model, x, labels, train_idx, epochs=config.epochs, lr=config.lr,
        weight_decay=config.weight_decay, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, seed=1000 * seed + half, device=device,
        progress=progress, desc=f"train seed {seed} half {half}")
    t_train = time.perf_counter() - t0

    query_idx = np.concatenate([train_idx, held_idx])
    self_index = np.concatenate([np.arange(len(train_idx)), np.full(len(held_idx), -1)])
    res = stream_prediction_depth(
        model, x[torch.as_tensor(train_idx)], labels[torch.as_tensor(train_idx)],
        x[torch.as_tensor(query_idx)], probes=spec, k=config.k,
        self_index=torch.as_tensor(self_index), query_labels=labels[torch.as_tensor(query_idx)],
        num_classes=num_classes, example_index=torch.as_tensor(query_idx),
        batch_size=config.eval_batch_size, memory_budget=config.memory_budget, device=device,
        progress=progress)
    order = np.argsort(query_idx)  # back to example order 0..n-1
    assert np.array_equal(query_idx[order], np.arange(n))
    in_train = np.zeros(n, bool)
    in_train[train_idx] = True
    t_total = time.perf_counter() - t0
    meta = {
        "protocol_key": key, "seed": int(seed), "half": int(half),
        "train_seconds": t_train, "depth_seconds": res.seconds, "seconds": t_total,
        "final_train_accuracy": history["train_accuracy"][-1],
        "final_held_out_accuracy": history["held_out_accuracy"][-1],
        "layer_accuracy": res.depth.layer_accuracy.tolist(),
        "memory": res.stats(),
    }
    arrays = {
        "seed": np.array(seed), "half": np.array(half),
        "train_index": np.asarray(train_idx), "held_out_index": np.asarray(held_idx),
        "in_train": in_train,
        "depth": res.depth.depth.numpy()[order].astype(np.int16),
        "layer_pred": res.depth.layer_pred.numpy()[:, order].astype(np.int16),
        "probs": res.probs.numpy()[order].astype(np.float32),
        "epoch_pred": epoch_pred.numpy().astype(np.int16),
        "loss": np.array(history["loss"]),
        "train_accuracy": np.array(history["train_accuracy"]),
        "held_out_accuracy": np.array(history["held_out_accuracy"]),
    }
    _atomic_savez(path, meta=np.array(json.dumps(meta)), **arrays)
    log(f"  seed {seed} half {half}: train {t_train:.1f} s (train acc "
        f"{meta['final_train_accuracy']:.3f}, held-out acc {meta['final_held_out_accuracy']:.3f}),"
        f" depth {res.seconds:.1f} s, peak {res.peak_bytes / 2**20:.0f} MiB "
        f"({res.num_chunks} chunk(s))")
    arrays["meta"] = meta
    return arrays


def load_results(out: str | os.PathLike):
    """``(results DataFrame, per-model arrays dict, config dict)`` of a finished run."""
    import pandas as pd

    out = Path(out)
    if not (out / "COMPLETE").exists():
        raise FileNotFoundError(f"{out} holds no finished pdepth run (no COMPLETE marker)")
    df = pd.read_parquet(out / "results.parquet")
    with np.load(out / "per_model.npz", allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    return df, arrays, json.loads((out / "config.json").read_text())
