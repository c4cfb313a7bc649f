"""``pdepth improve RUN_DIR``: what finding label errors buys. The run's architecture is
retrained on the run's own examples (both halves) under four variants and each is evaluated on
the untouched test split of the dataset (Fashion-MNIST: the 10,000 ``t10k`` images):

- ``baseline``: every example, labels as given;
- ``pdepth_remove``: the examples flagged ``label_error`` in ``results.parquet`` removed;
- ``pdepth_relabel``: every example, the flagged ones relabelled to ``suggested_label``;
- ``cleanlab_remove``: the examples cleanlab's confident learning flags
  (``cleanlab.filter.find_label_issues(labels=given, pred_probs=held-out probabilities)``,
  the held-out probabilities being, per example, the mean softmax of the run's models that
  did not train on it) removed. cleanlab is optional (``pip install "pdepth[label-errors]"``);
  without it, or with ``cleanlab=False``, the variant is recorded as skipped with the reason.

Every variant trains the same way (the run's architecture, epochs, optimiser settings and
batch size, :func:`pdepth.protocol.train_model`, the same training seeds for all) so the only
difference is the training set. The flags come from the run's files alone; the test split is
read only after every training set is fixed, and only to evaluate. Where the run knows which
labels were flipped (``label_flipped``, ``pdepth run --label-noise``), each flagging variant
also gets the precision, recall and F1 of its flags against the flips.

The result is ``RUN_DIR/improve.json`` (written atomically), see :func:`improve`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import _atomic

__all__ = ["IMPROVE_FILE", "REQUIRED_FILES", "VARIANTS", "Retraining", "Variant",
           "flag_metrics", "heldout_probs", "improve", "load_run", "load_test_split",
           "plan_variants", "retraining", "train_and_test"]

IMPROVE_FILE = "improve.json"
REQUIRED_FILES = ("results.parquet", "per_model.npz", "config.json")
VARIANTS = ("baseline", "pdepth_remove", "pdepth_relabel", "cleanlab_remove")
CLEANLAB_HINT = 'pip install "pdepth[label-errors]"'


@dataclass
class Variant:
    """One training set: ``index`` (rows of the run's examples, ascending) with ``labels``
    (one per row of ``index``); ``flags`` (bool per run example) for a flagging variant."""

    index: np.ndarray
    labels: np.ndarray
    flags: np.ndarray | None = None


@dataclass
class RunFiles:
    """What :func:`improve` reads from a run directory."""

    out: Path
    config: dict
    labels: np.ndarray  # given (possibly noisy) labels, one per example
    dataset_index: np.ndarray  # index into the dataset's training split
    label_error: np.ndarray  # bool
    suggested_label: np.ndarray
    label_flipped: np.ndarray | None  # bool; None where the run has no noise information
    probs: np.ndarray  # [models, N, C]
    in_train: np.ndarray  # [models, N] bool

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[2])


def load_run(run_dir: str | os.PathLike) -> RunFiles:
    """Reads a finished run directory; FileNotFoundError (one line, naming what is missing)
    for a directory that is not one, ValueError (one line, naming the file and column) for a
    run without the label-error columns or with values no run writes: ``label`` and
    ``suggested_label`` class ids below the classes of ``probs``, booleans ``label_error`` /
    ``label_flipped``, distinct ``dataset_index`` values, finite ``probs``, and at least one
    example not flagged (``pdepth_remove`` trains on the others)."""
    out = Path(run_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory; run `pdepth run --out {out}` first")
    missing = [f for f in REQUIRED_FILES if not (out / f).exists()]
    if missing or not (out / "COMPLETE").exists():
        raise FileNotFoundError(
            f"{out} holds no finished pdepth run (missing: {', '.join(missing) or 'COMPLETE'});"
            f" run `pdepth run --out {out}` first")
    from .protocol import require_modules

    require_modules(["pandas", "pyarrow"], "pdepth improve")
    import pandas as pd

    try:
        df = pd.read_parquet(out / "results.parquet")
        with np.load(out / "per_model.npz") as z:
            pm = {k: z[k] for k in ("probs", "in_train", "labels", "dataset_index")
                  if k in z.files}
        config = json.loads((out / "config.json").read_text())
    except Exception as exc:
        raise ValueError(f"{out}: cannot read the run's files ({type(exc).__name__}: {exc}); "
                         f"rerun `pdepth run --out {out} --overwrite`") from None
    need = ["label", "label_error", "suggested_label"]
    absent = [c for c in need if c not in df.columns]
    absent += [f"per_model.npz:{k}" for k in ("probs", "in_train") if k not in pm]
    if absent:
        raise ValueError(f"{out}: the run has no {', '.join(absent)} (written by `pdepth run` "
                         f"from pdepth 0.2 on); rerun `pdepth run --out {out} --overwrite`")
    if not isinstance(config, dict) or not isinstance(config.get("config", {}), dict):
        raise ValueError(f"{out / 'config.json'}: not a pdepth run's config (its 'config' is "
                         "not an object)")
    probs, in_train = pm["probs"], pm["in_train"]
    if (probs.ndim != 3 or probs.shape[2] < 1 or probs.dtype.kind != "f"
            or not np.isfinite(probs).all() or in_train.dtype.kind not in "bui"):
        raise ValueError(f"{out / 'per_model.npz'}: probs must be finite floats [models, "
                         f"examples, classes] and in_train booleans, got probs {probs.dtype} "
                         f"{probs.shape}, in_train {in_train.dtype}")
    num_classes = probs.shape[2]
    table = out / "results.parquet"
    labels = _column(df, "label", table, num_classes)
    label_error = _column(df, "label_error", table)
    suggested = _column(df, "suggested_label", table, num_classes)
    n = labels.shape[0]
    if label_error.all():  # pdepth_remove would train on nothing
        raise ValueError(f"{table}: column label_error flags every one of the {n} examples; "
                         "pdepth_remove would have no example to train on")
    dataset_index = (_column(df, "dataset_index", table, np.iinfo(np.int64).max)
                     if "dataset_index" in df.columns else pm.get("dataset_index"))
    in_train = in_train.astype(bool)
    if (probs.shape[1] != n or in_train.shape != probs.shape[:2]
            or dataset_index is None or len(dataset_index) != n
            or ("labels" in pm and not np.array_equal(pm["labels"], labels))):
        raise ValueError(f"{out}: results.parquet and per_model.npz do not belong together "
                         f"(labels, dataset_index, probs or in_train disagree); rerun "
                         f"`pdepth run --out {out} --overwrite`")
    dataset_index = np.asarray(dataset_index)
    if dataset_index.dtype.kind not in "iu" or len(np.unique(dataset_index)) != n:
        raise ValueError(f"{table}: column dataset_index must hold distinct image indices, got "
                         f"{dataset_index.dtype} with {n - len(np.unique(dataset_index))} "
                         "repeated")
    resolved = config.get("resolved", {})
    recorded = resolved.get("num_classes") if isinstance(resolved, dict) else None
    if recorded is not None and recorded != num_classes:
        raise ValueError(f"{out / 'config.json'}: resolved.num_classes {recorded!r} is not the "
                         f"{num_classes} classes of per_model.npz probs")
    flipped = (_column(df, "label_flipped", table) if "label_flipped" in df.columns else None)
    return RunFiles(out, config, labels, dataset_index.astype(np.int64), label_error,
                    suggested, flipped, probs.astype(np.float64), in_train)


def _column(df, name: str, path: Path, classes: int | None = None) -> np.ndarray:
    """Column ``name`` of ``df`` (the file ``path``) checked: booleans where ``classes`` is
    None, else integers in ``[0, classes)``; a one-line ValueError naming the file, the
    column and the first bad value (an edited table must fail before any training, not
    after it)."""
    values = df[name].to_numpy()
    if classes is None:
        if values.dtype != bool:
            raise ValueError(f"{path}: column {name} must hold booleans, got {values.dtype}")
        return values.astype(bool)  # a copy: pyarrow's may be read-only
    if values.dtype.kind not in "iu":
        bad = next((v for v in values if not isinstance(v, (int, np.integer))), None)
        raise ValueError(f"{path}: column {name} must hold integers, got {values.dtype} "
                         f"(e.g. {bad!r})")
    wrong = (values < 0) | (values >= classes)
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        want = f"0..{classes - 1}" if classes < 2**31 else ">= 0"
        raise ValueError(f"{path}: column {name} must hold values {want}, got {values[row]} "
                         f"at row {row}")
    return values.astype(np.int64)


def heldout_probs(probs: np.ndarray, in_train: np.ndarray) -> np.ndarray:
    """Per example, the mean of ``probs [models, N, C]`` over the models where ``in_train``
    ``[models, N]`` is False, renormalised to sum to 1 (float64 ``[N, C]``). ValueError if
    an example was held out by no model."""
    held = ~np.asarray(in_train, bool)
    count = held.sum(0)
    if (count == 0).any():
        raise ValueError(f"{int((count == 0).sum())} example(s) were held out by no model; "
                         "held-out probabilities need every example held out at least once")
    p = (np.asarray(probs, np.float64) * held[:, :, None]).sum(0) / count[:, None]
    return p / p.sum(1, keepdims=True)


def flag_metrics(flags: np.ndarray, flipped: np.ndarray | None) -> dict:
    """``flagged`` (count) and, where ``flipped`` is known, ``precision`` (share of flags that
    are flips), ``recall`` (share of flips flagged) and their harmonic mean ``f1``; None for
    a ratio whose denominator is 0, and all three None where no label was flipped (a run
    without noise: there is nothing to find, so no flag can be judged right or wrong)."""
    flags = np.asarray(flags, bool)
    out = {"flagged": int(flags.sum())}
    if flipped is None:
        return out
    flipped = np.asarray(flipped, bool)
    hit = int((flags & flipped).sum())
    if not flipped.any():
        out.update(flipped=0, true_flags=0, precision=None, recall=None, f1=None)
        return out
    precision = hit / int(flags.sum()) if flags.any() else None
    recall = hit / int(flipped.sum()) if flipped.any() else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    out.update(flipped=int(flipped.sum()), true_flags=hit, precision=precision, recall=recall,
               f1=f1)
    return out


def cleanlab_flags(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """cleanlab's confident learning flags (bool per example); ImportError without
    cleanlab."""
    from cleanlab.filter import find_label_issues

    return np.asarray(find_label_issues(labels=labels, pred_probs=pred_probs, n_jobs=1), bool)


def plan_variants(run: RunFiles, *, cleanlab: bool = True) -> tuple[dict, dict]:
    """The training sets, from the run's files alone (nothing of the test split).

    Returns ``(variants, skipped)``: name -> :class:`Variant` for each variant that will be
    trained, and name -> reason for each skipped one (``cleanlab_remove`` when disabled or
    cleanlab is missing)."""
    y, flags, n = run.labels, run.label_error, run.n
    everything = np.arange(n)
    variants = {
        "baseline": Variant(everything, y.copy()),
        "pdepth_remove": Variant(everything[~flags], y[~flags], flags),
        "pdepth_relabel": Variant(everything, np.where(flags, run.suggested_label, y), flags),
    }
    skipped = {}
    if not cleanlab:
        skipped["cleanlab_remove"] = "disabled (--no-cleanlab / cleanlab=False)"
    else:
        try:
            cl = cleanlab_flags(y, heldout_probs(run.probs, run.in_train))
        except ImportError:
            skipped["cleanlab_remove"] = f"cleanlab is not installed ({CLEANLAB_HINT})"
        except Exception as exc:  # e.g. too few examples of a class: reported, not fatal
            skipped["cleanlab_remove"] = (f"cleanlab.filter.find_label_issues failed: "
                                          f"{type(exc).__name__}: {exc}")
        else:
            if cl.all():  # nothing left to train on: reported, not fatal
                skipped["cleanlab_remove"] = "cleanlab flagged every example"
            else:
                variants["cleanlab_remove"] = Variant(everything[~cl], y[~cl], cl)
    return variants, skipped


def improve(run_dir: str | os.PathLike, *, epochs: int | None = None, device: str = "cpu",
            progress: bool = True, cleanlab: bool = True, seeds=(0,), log=print,
            command: str | None = None, model: str | None = None) -> dict:
    """Retrains the run's architecture under each variant (module docstring), evaluates it on
    the test split and writes ``RUN_DIR/improve.json``; returns what it wrote.

    ``epochs`` (default: the run's), ``device`` (cpu, cuda, cuda:N, auto), ``seeds`` (the
    training seeds, an int or a list: every variant trains once per seed, from the seed's
    initial weights and batch order, so the variants of one seed are a paired comparison;
    test accuracy on a few thousand noisy examples varies by several points between seeds),
    ``cleanlab=False`` skips ``cleanlab_remove``. ``log`` (default print; None for silence)
    gets one line when cleanlab is missing and one per variant.

    A run folder is data: nothing named in it is imported or called. A run of a built-in
    ``--arch`` is rebuilt from :data:`pdepth.models.ARCHITECTURES` by name; for a run of the
    user's ``--model module:factory``, ``model`` (``--model``) must name it again, equal to
    the recorded one, and its module must not resolve to a file inside the run folder (e.g.
    a ``nets.py`` there, found because the current directory is the run folder). The
    dataset (:data:`pdepth.data.DATASETS`) and the training settings of ``config.json`` are
    checked likewise, and every input (:func:`load_run`) before any training. The folder
    must hold only pdepth's files, no symbolic link among them, and its lock is held
    throughout (:func:`pdepth.protocol.outdir.open_for_writing`, the rules of every command
    that writes into a run folder).

    ``improve.json``: one entry per name of :data:`VARIANTS` with ``test_accuracy`` (the mean
    over the seeds), ``test_accuracy_per_seed``, ``test_accuracy_std`` (sample standard
    deviation; 0 for one seed), ``train_examples``, ``train_seconds`` and, for the flagging
    variants, ``flagged`` and (where the run has ``label_flipped``) ``flipped``,
    ``true_flags``, ``precision``, ``recall``, ``f1`` (null where no label was flipped); a
    skipped variant is ``{"skipped": true, "reason": ...}``. Then ``settings`` (epochs,
    seeds, device, command and the training settings), ``test_split`` (what was evaluated
    on) and ``noise_known``.
    """
    from .protocol.outdir import open_for_writing

    with open_for_writing(run_dir, "pdepth improve"):
        return _improve(run_dir, epochs=epochs, device=device, progress=progress,
                        cleanlab=cleanlab, seeds=seeds, log=log, command=command, model=model)


@dataclass
class Retraining:
    """What retraining the run's network on rows of its examples needs (:func:`retraining`):
    the run, its training settings (``options``), the device, the network (``arch`` or the
    user's ``model``), the dataset (``info``, ``root``, ``loader_options``) and the run's
    examples' images (uint8 ``[N, H, W]`` or ``[N, H, W, C]``, rows of ``run``)."""

    run: RunFiles
    options: object  # pdepth.protocol.train.TrainOptions
    device: torch.device
    arch: str | None
    model: str | None
    info: object  # pdepth.data.DatasetInfo
    root: str
    loader_options: dict
    images: torch.Tensor


def retraining(run: RunFiles, *, epochs: int | None, device: str, model: str | None,
               command: str = "pdepth improve") -> Retraining:
    """Every check of retraining ``run``'s network (``epochs``, default the run's;
    ``device``; the user's ``model`` named again, :func:`_network`; the dataset and its
    classes) and the run's examples read from the dataset's training split (checked against
    data.npz). Reads nothing of the test split (:func:`load_test_split` does, later)."""
    from .data import dataset_info
    from .protocol.config import DEVICE, resolve_device

    if not DEVICE.fullmatch(str(device)):
        raise ValueError(f"device (--device) must be cpu, cuda, cuda:N or auto, got {device!r}")
    cfg = run.config.get("config", {})
    options = _train_options(run, epochs)
    dev = resolve_device(device)
    if cfg.get("data_sha256"):
        raise ValueError(f"{run.out}: the run's data came from a Python Dataset; {command} "
                         "needs a dataset of the table (its test split)")
    dataset, root, image_size, loader_options = _dataset_settings(run)
    info = dataset_info(dataset, root, image_size)
    root = root or info.root
    if info.classes and info.num_classes != run.num_classes:
        raise ValueError(f"{run.out}: the run has {run.num_classes} classes (per_model.npz "
                         f"probs) but {info.name} at {root} has {info.num_classes}")
    arch, user_model = _network(run, model, command)  # the last check: imports the user's module
    train_images, _ = info.load(root, "train", **loader_options)
    # The run's examples: images of the training split, by dataset_index (checked against
    # the run's own copy in data.npz where there is one).
    if run.dataset_index.min() < 0 or run.dataset_index.max() >= train_images.shape[0]:
        raise ValueError(f"{run.out}: dataset_index outside the {info.name} training split")
    images = train_images[torch.as_tensor(run.dataset_index)]
    _check_run_images(run, images)
    return Retraining(run, options, dev, arch, user_model, info, root, loader_options, images)


def load_test_split(r: Retraining):
    """``(x_all, x_test, test_labels, info)``: the run's examples and the dataset's test
    split normalised with the run's statistics (float32 ``[n, C, H, W]``), the test labels
    (int64) and the dataset entry with those statistics. Call it only once every training
    set is fixed: it reads the test split."""
    from .data import normalize_images

    test_images, test_labels = r.info.load(r.root, "test", **r.loader_options)
    info = r.info.with_stats(r.images)  # imagefolder: the run's statistics, from its examples
    return (normalize_images(r.images, info.mean, info.std),
            normalize_images(test_images, info.mean, info.std), test_labels, info)


def train_and_test(r: Retraining, x_all, rows, labels, seed: int, x_test, test_labels, *,
                   progress: bool, desc: str) -> tuple[float, float]:
    """Trains the run's network from ``torch.manual_seed(seed)``'s initial weights (so every
    training set of one seed starts alike) on ``x_all[rows]`` with ``labels`` (one per row),
    batch order seeded with ``seed``, and returns ``(test accuracy, final training
    accuracy)``."""
    from .models import make_model
    from .protocol.train import predict, train_model

    torch.manual_seed(seed)
    net = make_model(r.arch, r.model, num_classes=r.run.num_classes,
                     model_args=r.run.config.get("config", {}).get("model_args"),
                     in_channels=r.info.channels, image_size=r.info.image_size).to(r.device)
    rows = torch.as_tensor(rows)
    _, history = train_model(net, x_all[rows], torch.as_tensor(labels),
                             torch.arange(len(rows)),
                             dataclasses.replace(r.options, seed=seed), device=r.device,
                             progress=progress, desc=desc)
    pred = predict(net, x_test, r.options.eval_batch_size, r.device)
    return float((pred == test_labels).float().mean()), float(history["train_accuracy"][-1])


def _improve(run_dir, *, epochs, device, progress, cleanlab, seeds, log, command, model):
    from .protocol.errors import require_modules

    t0 = time.perf_counter()
    seeds = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(x) for x in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds (--seeds) must name distinct training seeds, got {seeds}")
    user_log = log
    warn = log or (lambda msg: print(msg, file=sys.stderr, flush=True))  # even when quiet
    log = log or (lambda msg: None)
    run = load_run(run_dir)
    cfg = run.config.get("config", {})
    if progress:
        require_modules(["tqdm"], "pdepth improve")
    r = retraining(run, epochs=epochs, device=device, model=model)
    epochs, arch, user_model, options, dev = (r.options.epochs, r.arch, r.model, r.options,
                                              r.device)

    variants, skipped = plan_variants(run, cleanlab=cleanlab)
    for name, reason in skipped.items():
        if cleanlab:  # not asked to skip it: say why it is missing
            warn(f"pdepth improve: {name} skipped: {reason}")
    # Every training set is fixed now, from the run's files alone. No leak of the test split:
    # each variant trains on rows of the run's examples, all from the training split.
    for v in variants.values():
        assert v.index.ndim == 1 and ((v.index >= 0) & (v.index < run.n)).all()
        assert len(v.labels) == len(v.index)
    flags_before = {k: v.flags.copy() for k, v in variants.items() if v.flags is not None}

    x_all, x_test, test_labels, info = load_test_split(r)  # only to evaluate

    result: dict = {}
    names = [v for v in VARIANTS if v in variants]
    bar, say = names, log
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(names, desc="pdepth improve", unit="variant")
        if user_log is not None:  # above the bar, not through it
            say = lambda msg: bar.write(msg, file=sys.stderr)  # noqa: E731
    for name in bar:
        v = variants[name]
        t = time.perf_counter()
        accuracy, train_accuracy = [], []
        for seed in seeds:  # one seed: the same initial weights for every variant
            acc, train_acc = train_and_test(r, x_all, v.index, v.labels, seed, x_test,
                                            test_labels, progress=progress,
                                            desc=f"train {name} seed {seed}")
            accuracy.append(acc)
            train_accuracy.append(train_acc)
        entry = {"test_accuracy": float(np.mean(accuracy)),
                 "test_accuracy_per_seed": accuracy,
                 "test_accuracy_std": float(np.std(accuracy, ddof=1)) if len(seeds) > 1
                 else 0.0,
                 "train_examples": int(len(v.index)),
                 "final_train_accuracy": float(np.mean(train_accuracy)),
                 "train_seconds": time.perf_counter() - t}
        if v.flags is not None:
            entry.update(flag_metrics(v.flags, run.label_flipped))
        if name == "pdepth_relabel":
            entry["relabelled"] = int((v.labels != run.labels).sum())
        result[name] = entry
        if progress:
            bar.set_postfix(last=f"{name} {entry['test_accuracy']:.4f}")
        say(f"pdepth improve: {name}: test accuracy {entry['test_accuracy']:.4f} "
            f"({entry['train_examples']} training examples"
            + (f", {entry['flagged']} flagged" if "flagged" in entry else "") + ")")
    for name, reason in skipped.items():
        result[name] = {"skipped": True, "reason": reason}
    for k, f in flags_before.items():  # the flags were not touched by evaluation
        assert np.array_equal(variants[k].flags, f)

    if command is None:
        command = shlex.join(["pdepth", "improve", str(run.out)]
                             + (["--epochs", str(epochs)] if epochs != cfg.get("epochs") else [])
                             + ["--device", str(device)]
                             + (["--seeds", ",".join(map(str, seeds)) + ","]
                                if seeds != [0] else [])
                             + (["--model", user_model] if user_model else [])
                             + ([] if cleanlab else ["--no-cleanlab"]))
    result = {name: result[name] for name in VARIANTS if name in result}
    result["noise_known"] = run.label_flipped is not None
    result["settings"] = {
        "epochs": epochs, "seeds": seeds, "seed": seeds[0], "device": str(dev),
        "command": command,
        "arch": arch, "model": user_model, "lr": options.lr, "weight_decay": options.weight_decay,
        "batch_size": options.batch_size, "run_examples": run.n,
        "run_epochs": cfg.get("epochs"), "run_seeds": cfg.get("seeds"),
        "run_label_noise": cfg.get("label_noise"),
        "training": "every variant: the run's architecture trained from the same initial "
                    "weights (torch.manual_seed(seed)) with Adam and a cosine schedule "
                    "(pdepth.protocol.train_model), batch order seeded with seed, once per "
                    "seed of seeds; test_accuracy is the mean over the seeds",
        "cleanlab": _cleanlab_version(),
        "seconds": time.perf_counter() - t0,
    }
    result["test_split"] = {"dataset": info.name, "split": "test", "root": str(r.root),
                            "examples": int(test_labels.shape[0]),
                            "used_for": "evaluation only: every training set and every flag "
                                        "comes from the run's examples (training split)"}
    _atomic.write_json(run.out / IMPROVE_FILE, result)
    return result


def _network(run: RunFiles, model: str | None,
             command: str = "pdepth improve") -> tuple[str | None, str | None]:
    """``(arch, model)`` to rebuild the run's network, never taken from the run folder alone:
    a built-in ``arch`` of :data:`pdepth.models.ARCHITECTURES`, or the user's ``model``
    (``--model``), which must equal the one ``config.json`` records and may not be a module
    inside the run folder; imported here, before any data is read."""
    from .models import ARCHITECTURES, load_factory

    cfg, path = run.config.get("config", {}), run.out / "config.json"
    recorded = cfg.get("model")
    if recorded is None:
        arch = cfg.get("arch", "cnn")
        if model is not None:
            raise ValueError(f"--model {model}: the run {run.out} was made with --arch "
                             f"{arch}, not a --model; leave --model out")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise ValueError(f"{path}: arch {arch!r} is not one of pdepth's architectures "
                             f"({', '.join(ARCHITECTURES)})")
        return arch, None
    if model is None:
        raise ValueError(f"{run.out} was made with the user's network --model {recorded} "
                         f"(config.json); {command} imports no code a run folder names: "
                         f"pass --model {recorded} yourself if you trust that code")
    if model != recorded:
        raise ValueError(f"--model {model} is not the run's network: {path} records --model "
                         f"{recorded}")
    _module_outside(model, run.out, command)
    load_factory(model)  # an import error now, not after the data is read
    return None, model


def _module_outside(spec: str, out: Path, command: str = "pdepth improve") -> None:
    """ValueError where the module of ``spec`` (``module:factory``), or a package on its way,
    would be imported from a file inside the run folder ``out`` (e.g. the current directory
    is the run folder, and ``''`` or it is on ``sys.path``). Each dotted prefix is resolved
    with :func:`importlib.util.find_spec` before it is imported, which runs only the
    already-checked parents."""
    import importlib.util

    folder = out.resolve()
    parts = spec.partition(":")[0].split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return  # load_factory says it cannot be imported
        if found is None:
            return
        places = [*([found.origin] if found.has_location else []),
                  *(found.submodule_search_locations or [])]  # relative: to the cwd
        for place in places:
            if place and Path(place).resolve().is_relative_to(folder):
                raise ValueError(f"--model {spec}: module {name} would be imported from "
                                 f"{place}, inside the run folder {folder}; {command} runs "
                                 "no code from a run folder (move the module out, or run from "
                                 "another directory)")


def _train_options(run: RunFiles, epochs: int | None):
    """The run's training settings (``config.json``), checked: ``epochs`` (``--epochs``,
    default the run's) >= 1, ``lr`` > 0, ``weight_decay`` >= 0 (finite), ``batch_size`` and
    ``eval_batch_size`` >= 1."""
    from .protocol.train import TrainOptions

    cfg, path = run.config.get("config", {}), run.out / "config.json"
    flag = epochs is not None
    epochs = cfg.get("epochs", 6) if epochs is None else epochs
    if not _is_int(epochs) or epochs < 1:
        where = "epochs (--epochs)" if flag else f"{path}: epochs"
        raise ValueError(f"{where} must be >= 1, got {epochs!r}"
                         + (" (the run scored a checkpoint: pass --epochs to retrain)"
                            if cfg.get("checkpoint") else ""))
    values = {}
    for key, default, kind in (("lr", 2e-3, "positive"), ("weight_decay", 0.0, "non-negative"),
                               ("batch_size", 128, "count"), ("eval_batch_size", 1000, "count")):
        v = cfg.get(key, default)
        if kind == "count":
            ok, want = _is_int(v) and v >= 1, "an integer >= 1"
        else:
            finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = finite and (v > 0 if kind == "positive" else v >= 0)
            want = f"a finite {'number > 0' if kind == 'positive' else 'number >= 0'}"
        if not ok:
            raise ValueError(f"{path}: {key} {v!r} is not {want}")
        values[key] = int(v) if kind == "count" else float(v)
    return TrainOptions(epochs=int(epochs), **values)


def _dataset_settings(run: RunFiles) -> tuple[str, str | None, int | None, dict]:
    """``(dataset, root, image_size, loader options)`` from ``config.json``, checked: a name of
    :data:`pdepth.data.DATASETS`, a folder path (or none: the dataset's default), an integer
    image size and worker count."""
    from .data import DATASETS

    cfg, path = run.config.get("config", {}), run.out / "config.json"
    resolved = run.config.get("resolved", {})
    dataset = cfg.get("dataset", "fashion-mnist")
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise ValueError(f"{path}: dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    root = cfg.get("root") or (resolved.get("root") if isinstance(resolved, dict) else None)
    if root is not None and not isinstance(root, str):
        raise ValueError(f"{path}: root {root!r} is not a folder path")
    for key in ("image_size", "workers"):
        v = cfg.get(key)
        if v is not None and (not _is_int(v) or v < 0):
            raise ValueError(f"{path}: {key} {v!r} is not an integer >= 0")
    # only the options the run set: a loader may take (root, split) alone
    options = {k: cfg[k] for k in ("image_size", "workers") if cfg.get(k)}
    return dataset, root, cfg.get("image_size"), options


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_run_images(run: RunFiles, images: torch.Tensor) -> None:
    """The run's own copy of its images (data.npz), where there is one, must be the training
    split's images at ``dataset_index``: the retraining uses exactly the run's examples."""
    path = run.out / "data.npz"
    if not path.exists():
        return
    with np.load(path) as z:
        own = z["images"] if "images" in z.files else None
    if own is not None and not np.array_equal(own, images.numpy()):
        raise ValueError(f"{run.out}: the images in data.npz are not the training split's "
                         "images at dataset_index (another dataset root?)")


def _cleanlab_version() -> str | None:
    try:
        import cleanlab
    except ImportError:
        return None
    return getattr(cleanlab, "__version__", "unknown")
