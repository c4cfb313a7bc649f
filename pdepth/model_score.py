"""Prediction depth of a model trained elsewhere, on the paper's two splits
(:func:`score`, and ``pdepth score``, :func:`score_to_folder`; docs/score.md).

The support set is the training split with its given labels. Training examples are scored
against it with their own row excluded (``self_match="exclude"``); test examples against the
same support. Every example runs through the model once per pass, its probes recorded into
the embedding store of ``pdepth run`` (:mod:`pdepth.depth.cache`: rows in query order,
training rows first; RAM within ``memory_budget``, else a temporary folder on disk), and
:func:`pdepth.depth.cache.layer_knn` scores the training rows against themselves (the
symmetric op) and the test rows against them, so the result equals
:func:`pdepth.prediction_depth` over the embeddings :func:`pdepth.extract` gives (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .depth import DepthResult
from .depth.args import depth_args
from .depth.cache import LayerStore, block_bytes, extract_to_store, layer_knn, plan_passes
from .depth.result import build_result
from .depth.stream import _check_order, peak_rss_bytes
from .depth.support import LocalSupport, _class_count
from .probes import iter_batches, probe_shapes, resolve_probes
from .protocol.scoring import CACHE_DIR, cache_bytes, check_cache_space, disk_budget, uses_disk

__all__ = ["ScoreResult", "ScoreSettings", "score", "score_to_folder"]

REFERENCES = ("network", "labels", "last_probe")


@dataclass(eq=False)
class ScoreResult:
    """What :func:`score` returns: ``train`` and ``test`` (None without a test split) are the
    two splits' :class:`DepthResult`; ``train_logits`` / ``test_logits`` the model's outputs
    (``train_pred`` / ``test_pred`` their argmax, the model's predictions); ``probes`` the
    probe names; ``settings`` the k, reference, token and metric used (None: the library's
    default); ``stats`` the call's memory and time: ``store`` (``"memory"`` / ``"disk"``),
    ``passes`` (over the examples), ``peak_bytes`` (embeddings held at once),
    ``peak_rss_bytes``, ``cuda_peak_bytes`` (None off CUDA), ``extract_seconds`` (the
    forward passes), ``knn_seconds`` (the k-NN of every probe) and ``seconds`` (the whole
    call)."""

    train: DepthResult
    test: DepthResult | None
    train_logits: torch.Tensor
    test_logits: torch.Tensor | None
    probes: list[str]
    settings: dict
    stats: dict

    @property
    def train_pred(self) -> torch.Tensor:
        return self.train_logits.argmax(1)

    @property
    def test_pred(self) -> torch.Tensor | None:
        return None if self.test_logits is None else self.test_logits.argmax(1)

    def splits(self):
        """``(name, DepthResult, logits)`` of each split scored."""
        yield "train", self.train, self.train_logits
        if self.test is not None:
            yield "test", self.test, self.test_logits


def _reference(reference) -> str:
    """``network``, ``labels`` or ``last_probe`` (``last-probe`` is the CLI's spelling)."""
    ref = str(reference).replace("-", "_")
    if ref not in REFERENCES:
        raise ValueError(f"reference (--reference) must be one of network, labels, last-probe, "
                         f"got {reference!r}")
    return ref


def _labels(data, name: str) -> tuple[object, torch.Tensor]:
    """``(inputs, labels [n] int64)`` of a split: an ``(x, y)`` pair of tensors, a Dataset of
    ``(x, y, ...)`` items (its ``targets`` where it has them, else read item by item) or a
    DataLoader yielding ``(x, y, ...)`` batches in a fixed order."""
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: x has {x.shape[0]} rows but y has {y.shape[0]}")
        return x, y
    if isinstance(data, torch.utils.data.DataLoader):
        ys = [torch.as_tensor(b[1]) for b in data if isinstance(b, (tuple, list)) and len(b) > 1]
        if not ys:
            raise ValueError(f"{name}: the DataLoader must yield (x, y) batches")
        return data, torch.cat([y.reshape(-1) for y in ys])
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        targets = getattr(data, "targets", None)
        if targets is not None and len(targets) == len(data):
            return data, torch.as_tensor(targets)
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, (tuple, list)) and len(it) > 1 for it in items):
            raise ValueError(f"{name}: the Dataset's items must be (x, y) pairs")
        return data, torch.as_tensor([int(it[1]) for it in items])
    raise ValueError(f"{name} must be an (x, y) pair of tensors, a Dataset or a DataLoader, "
                     f"got {type(data).__name__}")


def _first_input(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[:1]
    if isinstance(data, torch.utils.data.DataLoader):
        return next(iter(data))[0][:1]
    item = data[0]
    x = item[0] if isinstance(item, (tuple, list)) else item
    return torch.as_tensor(x).unsqueeze(0)


def _check_width(width: int, num_classes: int, reference: str) -> int:
    """The model's number of outputs ``width``, checked: with reference ``network`` it must
    equal the data's ``num_classes`` (the network's prediction is then a class of the data),
    else ValueError naming both and the other references."""
    if reference == "network" and width != num_classes:
        raise ValueError(
            f"--reference network: the model's head has {width} outputs but the data has "
            f"{num_classes} classes, so its predictions are not the data's classes; use "
            "--reference labels or --reference last-probe (reference='labels' / "
            "'last_probe'), or a model whose head predicts the data's classes")
    return width


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def score(model: nn.Module, train, test=None, *, probes=None, token: str | None = None,
          metric: str | None = None, k: int = 30, reference: str = "network",
          num_classes: int | None = None, max_dim: int | None = None, batch_size: int = 256,
          device=None, memory_budget: int | None = 2**30, progress: bool = False
          ) -> ScoreResult:
    """Prediction depth of every training and test example for a trained ``model``.

    Every example runs through the model once per pass (the training rows, then the test
    rows), its probes recorded into an embedding store (:mod:`pdepth.depth.cache`, as
    ``pdepth run``): one pass when the embeddings of all ``N + M`` examples fit
    ``memory_budget`` in RAM; otherwise they go to a temporary folder on disk (removed
    afterwards, also on error), in as few passes as its free space allows. Then each probe's
    k-NN: the training rows against themselves with their own row excluded (the symmetric
    op), the test rows against the training rows. Before the passes one example runs once
    more, alone, for the head's and the probes' widths.

    Args:
        model: the network (run in eval mode; its mode is restored); its output is the
            logits ``[B, C]``.
        train: the training split, the support set: an ``(x, y)`` pair of tensors
            (``x [N, ...]``, ``y [N]`` integer labels), a Dataset of ``(x, y)`` items or a
            DataLoader of ``(x, y)`` batches in a fixed order (no shuffling). Its labels are
            the support labels.
        test: the test split (``M`` examples), same kinds, or None (then only ``train`` is
            scored).
        probes: a :class:`ProbeSpec`, a preset name or module names (None: ``"auto"``).
        token: how block outputs ``[B, T, C]`` become one row (``"cls"``, ``"mean"``,
            ``"all"``; None: the probes' default), :func:`pdepth.probes.resolve_probes`.
        metric: the k-NN metric, ``"euclidean"`` or ``"cosine"`` (each row L2-normalised as
            it is stored); None: ``"euclidean"``.
        k: neighbours per example (at most ``N - 1``: a training example is not its own
            neighbour).
        reference: ``"network"`` (the model's prediction: its head must predict the data's
            classes, else ValueError), ``"labels"`` or ``"last_probe"`` (``"last-probe"``).
        num_classes: the data's classes (default: one more than the largest label).
        max_dim: pool conv maps to at most this many features.
        batch_size: examples per forward call (for a DataLoader: its own batches).
        device: where the model and the k-NN run (default: the model's device).
        memory_budget: bytes of embeddings held in RAM (the store's budget, as
            ``pdepth run``'s ``--memory-budget``): beyond it the store goes to disk and the
            k-NN reads it one probe at a time in blocks of this size. None: RAM, whatever
            the size.
        progress: tqdm progress bars.

    Returns:
        :class:`ScoreResult`: ``.train`` (``N`` rows, ``self_match="exclude"``,
        ``example_index`` ``arange(N)``) and ``.test`` (``M`` rows, None without a test
        split) DepthResults with ``layer_pred [L, .]``, ``depth``, ``reference`` and the
        labels; ``train_logits [N, C]`` / ``test_logits [M, C]`` (float32); ``stats``: the
        store (``"memory"`` / ``"disk"``), ``passes``, ``peak_bytes`` (embeddings held at
        once), ``peak_rss_bytes``, ``cuda_peak_bytes``, ``extract_seconds`` (forward
        passes), ``knn_seconds`` and ``seconds`` (the whole call).

    Raises:
        ValueError: one line naming the argument: a split that is none of the kinds above
            (or a shuffling DataLoader), labels that are not integer class ids, a bad
            ``reference``, ``k`` larger than ``N - 1``, probes or tokens the model does not
            have, or ``reference="network"`` with a head whose outputs are not the data's
            classes (use ``"labels"`` or ``"last_probe"``).
        DiskSpaceError: the embeddings exceed ``memory_budget`` and the widest probe alone
            does not fit the temporary folder's free space (less 1 GiB).
    """
    start = time.perf_counter()
    ref = _reference(reference)
    for data, name in ((train, "train"), (test, "test")):
        _check_order(data, name, "its rows are paired with its labels by position")
    x_tr, y_tr = _labels(train, "train")
    x_te, y_te = _labels(test, "test") if test is not None else (None, None)
    labels = y_tr if y_te is None else torch.cat([y_tr.reshape(-1), y_te.reshape(-1)])
    n, total = int(y_tr.shape[0]), int(labels.shape[0])
    classes = int(num_classes) if num_classes is not None else (
        int(labels.max()) + 1 if labels.numel() else 1)
    self_index = torch.cat([torch.arange(n), torch.full((total - n,), -1)])
    args = depth_args(y_tr, support=LocalSupport(), scoring_support=False,
                      queries_arg="test", reference=ref, query_labels=labels,
                      self_index=self_index, example_index=None, k=k, num_classes=classes,
                      from_model=True, op="score", device=device,
                      metric="euclidean" if metric is None else metric)
    args.support.check_k(args.k, n, self_index)
    spec = resolve_probes(model, probes, max_dim=max_dim, token=token)
    device = torch.device(_model_device(model) if device is None else device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    width, dims = probe_shapes(model, spec, _first_input(x_tr).to(device))
    _check_width(width, classes, ref)
    on_disk = memory_budget is not None and uses_disk(total, dims, memory_budget)
    run = _StoreRun(model, spec, dims, args, self_index, n, memory_budget, device, progress)
    preds, lg = run.score((x_tr, x_te), batch_size, on_disk)
    logits = lg.float()
    layer_pred = torch.stack([preds[layer] for layer in range(len(dims))])
    ref_t, ref_name = args.resolve_reference(layer_pred, network=logits.argmax(1),
                                             query_labels=args.query_labels)
    args.check_lengths(total, reference=ref_t, reference_name=ref_name)
    classes = max(args.num_classes, _class_count(
        args.num_classes_given, [(args.query_labels_arg, args.query_labels), (ref_name, ref_t)]))

    def split(rows: slice, example_index) -> DepthResult:
        return build_result(layer_pred[:, rows], ref_t[rows],
                            query_labels=args.query_labels[rows], example_index=example_index,
                            k=args.k, self_match="exclude", reference_mode=args.mode,
                            num_classes=classes, layer_names=spec.names, metric=args.metric)

    tr = split(slice(0, n), torch.arange(n))
    te = None if y_te is None else split(slice(n, total), None)
    settings = {"k": int(k), "reference": ref, "token": token, "metric": metric,
                "num_classes": classes,
                "self_index": {"train": "its own row (excluded)", "test": "none"}}
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stats = {"store": "disk" if on_disk else "memory", "passes": run.passes,
             "peak_bytes": int(run.peak),
             "extract_seconds": run.extract_seconds, "knn_seconds": run.knn_seconds,
             "peak_rss_bytes": peak_rss_bytes(),
             "cuda_peak_bytes": None if cuda_peak is None else int(cuda_peak),
             "seconds": time.perf_counter() - start}
    return ScoreResult(tr, te, logits[:n], None if te is None else logits[n:],
                       list(spec.names), settings, stats)


@dataclass(eq=False)
class _StoreRun:
    """:func:`score`'s passes over the examples (train rows, then test rows) into the
    embedding store, each probe's k-NN right after its pass; the time of each stage and the
    most embedding bytes held at once."""

    model: nn.Module
    spec: object
    dims: list
    args: object
    self_index: torch.Tensor
    n: int
    memory_budget: int | None
    device: torch.device
    progress: bool
    passes: int = 0
    peak: int = 0
    extract_seconds: float = 0.0
    knn_seconds: float = 0.0

    def score(self, splits, batch_size: int, on_disk: bool) -> tuple[dict, torch.Tensor]:
        """``({probe: pred [N + M]}, logits [N + M, C])``; a disk store lives in a temporary
        folder, removed afterwards (also on error)."""
        total = len(self.self_index)
        with tempfile.TemporaryDirectory(prefix="pdepth-score-") if on_disk \
                else contextlib.nullcontext() as tmp:
            folder = None
            if on_disk:
                check_cache_space(Path(tmp), total, self.dims, self.memory_budget)
                folder = Path(tmp) / CACHE_DIR
                folder.mkdir()
            store = LayerStore(total, self.dims, folder, "score", metric=self.args.metric)
            budget = disk_budget(folder) if on_disk else cache_bytes(total, self.dims)
            passes = plan_passes(list(range(len(self.dims))), self.dims, total, budget) or [[]]
            self.passes = len(passes)
            self.peak = 0 if on_disk else cache_bytes(total, self.dims)
            preds = {}
            for i, layers in enumerate(passes, 1):
                t0 = time.perf_counter()
                batches = (xb for data in splits if data is not None
                           for xb, _ in iter_batches(data, batch_size))
                lg = extract_to_store(self.model, batches, None, self.spec, layers, store,
                                      logits=i == len(passes), batch_size=batch_size,
                                      device=self.device, progress=self.progress,
                                      desc=f"extract pass {i}/{len(passes)}")
                t1 = time.perf_counter()
                self.extract_seconds += t1 - t0
                for layer in layers:
                    preds[layer] = self._knn(store, layer, on_disk)
                self.knn_seconds += time.perf_counter() - t1
        return preds, lg

    def _knn(self, store: LayerStore, layer: int, on_disk: bool) -> torch.Tensor:
        a = self.args
        pred = layer_knn(store, layer, a.labels, k=a.k, num_classes=a.num_classes,
                         self_index=self.self_index, memory_budget=self.memory_budget,
                         device=self.device, progress=self.progress,
                         desc=f"k-NN {self.spec.names[layer]}").pred
        if on_disk:
            self.peak = max(self.peak, block_bytes(store, layer, self.n, a.k,
                                                   self.memory_budget))
        store.drop(layer)
        return pred


# --------------------------------------------------------------------------------------------
# pdepth score: the command (data by name, a model by name, the output folder)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSettings:
    """The settings of ``pdepth score`` (the CLI's flags). Its key (the marker's
    ``protocol_key``) hashes the ones that change results, as ``RunConfig``'s does for
    ``pdepth run``, so the output folder's rules are the same."""

    model: str
    dataset: str = "fashion-mnist"
    root: str | None = None
    model_args: dict = dataclasses.field(default_factory=dict)
    checkpoint: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    subset: int | None = None
    test_subset: int | None = None
    probes: str | list[str] | None = None
    token: str | None = None
    metric: str | None = None
    k: int = 30
    reference: str = "network"
    max_dim: int | None = None
    memory_budget: int = 2**30
    device: str = "cpu"
    batch_size: int = 256
    image_size: int | None = None
    workers: int = 0
    subset_seed: int = 0

    RUNTIME = ("device", "memory_budget", "batch_size", "workers", "root")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key_settings(self) -> dict:
        return {"command": "score", **{k: v for k, v in self.to_dict().items()
                                       if k not in self.RUNTIME}}

    def protocol_key(self) -> str:
        import json

        text = json.dumps(self.key_settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def accepted_keys(self) -> tuple[str]:
        return (self.protocol_key(),)

    def check(self) -> ScoreSettings:
        """Checks the numbers and names, naming the flag; returns self with the reference
        in its library spelling."""
        for name, flag, low in (("k", "--k", 1), ("batch_size", "--batch-size", 1),
                                ("subset", "--subset", 2), ("test_subset", "--test-subset", 1)):
            v = getattr(self, name)
            if v is None and name in ("subset", "test_subset"):
                continue
            if type(v) is not int or v < low:
                raise ValueError(f"{name} ({flag}) must be an integer >= {low}, got {v!r}")
        if not (isinstance(self.memory_budget, int) and self.memory_budget >= 2**20):
            raise ValueError(f"memory_budget (--memory-budget) must be at least 1 MiB, got "
                             f"{self.memory_budget!r} bytes")
        return dataclasses.replace(self, reference=_reference(self.reference))


@dataclass
class _Split:
    images: torch.Tensor  # uint8 [n, H, W(, C)]
    labels: torch.Tensor
    index: torch.Tensor
    classes: tuple


def score_dependencies(s: ScoreSettings, progress: bool) -> tuple[list[str], list[str]]:
    """``(modules of the run extra, modules of the models extra)`` a score needs."""
    from .builders import model_dependencies

    run = ["pandas", "pyarrow", "matplotlib"] + (["tqdm"] if progress else [])  # the report
    if s.dataset not in ("fashion-mnist",) and not s.dataset.startswith("hf:"):
        run.append("torchvision")
    models = [m for m in model_dependencies(s.model) if m != "torchvision"]
    if model_dependencies(s.model) == ("torchvision",):
        run.append("torchvision")
    if s.dataset.startswith("hf:"):
        models.append("datasets")
    return run, models


def _load_split(s: ScoreSettings, split: str, subset: int | None) -> _Split:
    from .data import dataset_info, load_subset

    if s.dataset.startswith("hf:"):
        from .hf_data import load_hf_split

        images, labels, index, classes = load_hf_split(
            s.dataset[3:], split, image_column=s.image_column, label_column=s.label_column,
            subset=subset, seed=s.subset_seed)
        return _Split(images, labels, index, classes)
    info = dataset_info(s.dataset, s.root, s.image_size)
    images, labels, index = load_subset(s.dataset, s.root, subset, s.subset_seed, split=split,
                                        workers=s.workers, image_size=s.image_size)
    return _Split(images, labels, index, info.classes or tuple(
        str(i) for i in range(int(labels.max()) + 1)))


def _dataset_stats(s: ScoreSettings, train: _Split):
    from .data import DATASETS, channel_stats

    info = DATASETS.get(s.dataset)
    if info is not None and info.mean is not None:
        return info.mean, info.std
    return channel_stats(train.images)


@dataclass
class _Prepared:
    settings: ScoreSettings
    built: object
    train: _Split
    test: _Split
    x_train: torch.utils.data.Dataset  # PreprocessedImages: made batch by batch
    x_test: torch.utils.data.Dataset
    preprocessing: dict
    spec: object
    dims: list[int]
    num_classes: int
    head: int
    device: torch.device


def prepare_score(s: ScoreSettings, progress: bool = False) -> _Prepared:
    """Everything that can fail on bad input, before the output folder is touched:
    dependencies, settings, both splits, the model, its checkpoint and preprocessing, the
    head against ``--reference``, the probes and k."""
    from .builders import (
        MODELS_HINT,
        PreprocessedImages,
        build_named_model,
        input_transform,
        parse_model_args,
    )
    from .protocol import require_modules
    from .protocol.config import resolve_device
    from .protocol.model_run import check_support

    run_deps, model_deps = score_dependencies(s, progress)
    require_modules(run_deps, "pdepth score")
    require_modules(model_deps, "pdepth score", MODELS_HINT)
    s = s.check()
    if isinstance(s.model_args, (list, tuple)):
        s = dataclasses.replace(s, model_args=parse_model_args(s.model_args))
    device = resolve_device(s.device)
    train = _load_split(s, "train", s.subset)
    test = _load_split(s, "test", s.test_subset)
    classes = train.classes if len(train.classes) >= len(test.classes) else test.classes
    num_classes = max(len(classes), int(torch.cat([train.labels, test.labels]).max()) + 1)
    channels = 1 if train.images.dim() == 3 else int(train.images.shape[3])
    with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
        torch.manual_seed(0)  # random weights (no --checkpoint): the same on every run
        built = build_named_model(s.model, s.model_args, checkpoint=s.checkpoint,
                                  num_classes=num_classes, in_channels=channels,
                                  image_size=int(train.images.shape[1]))
    mean, std = _dataset_stats(s, train)
    # The model's inputs are made batch by batch as the passes read them: a split resized
    # to the model's size is never held whole (3 GB of float32 per 5,000 images at 224).
    t_train, pre = input_transform(train.images, built.model, built.preprocessing, mean, std)
    t_test, _ = input_transform(test.images, built.model, built.preprocessing, mean, std)
    x_train = PreprocessedImages(train.images, train.labels, t_train)
    x_test = PreprocessedImages(test.images, test.labels, t_test)
    built.model.to(device)
    spec = resolve_probes(built.model, s.probes, max_dim=s.max_dim, token=s.token)
    width, dims = probe_shapes(built.model, spec, t_train(train.images[:1]).to(device))
    head = _check_width(width, num_classes, s.reference)
    check_support(s.k, int(train.labels.shape[0]))
    return _Prepared(s, built, train, test, x_train, x_test, pre, spec, dims, num_classes,
                     head, device)


def _data_sha256(p: _Prepared) -> str:
    digest = hashlib.sha256()
    for split in (p.train, p.test):
        digest.update(split.images.numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
    return digest.hexdigest()


def score_to_folder(settings: ScoreSettings, out, *, overwrite: bool = False,
                    progress: bool = False, log=None) -> Path:
    """``pdepth score``: :func:`prepare_score` (every check, nothing written), then the
    output folder prepared under the rules of ``pdepth run`` (its marker, its lock,
    ``--overwrite`` deleting only pdepth's files), :func:`score`, and ``results.parquet``
    (one row per example, ``split`` train / test), ``config.json``, ``report.html`` with
    ``figures/`` (:mod:`pdepth.score_report`) and ``COMPLETE``."""
    from . import _atomic
    from .protocol.outdir import lock_output, prepare_output
    from .score_report import draw_score_report

    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    if not str(out).strip():
        raise ValueError(f"--out {str(out)!r} names no folder")
    p = prepare_score(settings, progress)
    s = p.settings
    out = Path(out)
    sha = _data_sha256(p)
    with lock_output(out):
        prepare_output(out, s, overwrite, data_sha256=sha, log=log)
        cfg = _config(p, sha)
        _atomic.write_json(out / "config.json", cfg)
        log(f"pdepth score: {s.model} on {p.train.labels.shape[0]} train + "
            f"{p.test.labels.shape[0]} test {s.dataset} examples, {p.spec.num_probes} probes")
        t1 = time.perf_counter()
        res = score(p.built.model, p.x_train, p.x_test,
                    probes=p.spec, token=s.token, metric=s.metric, k=s.k,
                    reference=s.reference, num_classes=p.num_classes,
                    batch_size=s.batch_size, device=p.device,
                    memory_budget=s.memory_budget, progress=progress)
        _atomic.write_parquet(out / "results.parquet", results_table(res, p))
        cfg.update(status="complete", stats=res.stats,
                   timing={"load_seconds": t1 - t0, "score_seconds": time.perf_counter() - t1})
        _atomic.write_json(out / "config.json", cfg)
        draw_score_report(out)  # before COMPLETE: a finished score has its report
        _atomic.write_bytes(out / "COMPLETE", f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        if (out / "models").is_dir() and not any((out / "models").iterdir()):
            (out / "models").rmdir()  # prepare_output's folder for pdepth run's models
    return out


def results_table(res: ScoreResult, p: _Prepared):
    """One row per example: ``split``, ``dataset_index``, ``label``, ``prediction`` (the
    model's), ``reference``, ``depth``, ``correct``, and ``pred_<i>`` per probe."""
    import numpy as np
    import pandas as pd

    frames = []
    for (name, r, logits), split in zip(res.splits(), (p.train, p.test), strict=True):
        cols = {"split": name, "dataset_index": split.index.numpy(),
                "label": split.labels.numpy(), "prediction": logits.argmax(1).numpy(),
                "reference": r.reference.numpy(), "depth": r.depth.numpy()}
        cols["correct"] = cols["prediction"] == cols["label"]
        for i in range(r.num_layers):
            cols[f"pred_{i}"] = r.layer_pred[i].numpy().astype(np.int64)
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def _config(p: _Prepared, sha: str) -> dict:
    from ._atomic import file_sha256
    from .protocol.runner import versions

    s = p.settings
    return {
        "command": "pdepth score",
        "status": "running",
        "protocol_key": s.protocol_key(),
        "settings": s.to_dict(),
        "resolved": {
            "model": {"spec": s.model, "kind": p.built.kind, "args": p.built.args,
                      "checkpoint": s.checkpoint,
                      "checkpoint_sha256": file_sha256(s.checkpoint) if s.checkpoint else None,
                      "weights": "checkpoint" if s.checkpoint else (
                          "as saved" if p.built.kind == "hf" else "random (none loaded)"),
                      "outputs": p.head},
            "device": str(p.device),
            "preprocessing": p.preprocessing,
            "num_classes": p.num_classes,
            "class_names": list(p.train.classes),
            "num_train": int(p.train.labels.shape[0]),
            "num_test": int(p.test.labels.shape[0]),
            "probes": p.spec.names,
            "probe_preset": getattr(p.spec, "preset", None),
            "probe_dims": p.dims,
            "token": getattr(p.spec, "token", s.token),
            "metric": s.metric or "euclidean",
            "reference": s.reference,
            "support": "the training split, given labels",
            "self_index": {"train": "its own row (excluded)", "test": "none"},
            "data_sha256": sha,
        },
        "versions": versions(),
    }


def _finite_mib(value: float) -> int:
    if not math.isfinite(value):
        raise ValueError(f"memory_budget (--memory-budget) must be a finite number of MiB, "
                         f"got {value}")
    return int(value * 2**20)
