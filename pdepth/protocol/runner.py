"""``run()``: the protocol's steps in order -- check the settings and load the data, prepare
the output directory, train and score every model (spread over the ranks of a process group),
aggregate, write the results and the report."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import _atomic
from ..categories import CategoryThresholds
from ..data import (
    DatasetInfo,
    dataset_info,
    decode_dataset,
    load_subset,
    normalize_images,
    subset_index,
)
from ..models import load_checkpoint, make_model
from ..ops import check_filter, knn_plan
from ..probes import pinned, probe_dims, resolve_probes
from .config import (
    RunConfig,
    check_out,
    rank_settings,
    resolve_device,
    run_dependencies,
)
from .errors import require_modules
from .model_run import RunData, check_support, run_model
from .noise import NOISE_RULES, apply_noise, noise_record
from .outdir import data_identity, load_model_file, lock_output, model_path, prepare_output
from .results import write_results
from .scoring import check_cache_space
from .stages import peak_rss_bytes, stage_peaks
from .train import TrainOptions, train_model

__all__ = ["load_run_data", "run", "versions"]


def run(config: RunConfig, out: str | os.PathLike, *, overwrite: bool = False,
        progress: bool = True, log=None, process_group=None, dataset=None) -> Path:
    """Runs the protocol and writes the results to ``out`` (see docs/protocol.md).

    ``dataset``: the run's data as any map-style ``torch.utils.data.Dataset`` of ``(image,
    label)`` instead of ``config.dataset``'s table entry (:func:`pdepth.data.decode_dataset`
    says which images it takes); ``config.dataset`` is then only its name, and
    ``config.data_sha256`` is set to the hash of its decoded images and labels (the protocol
    key). For every kind of data the hash of what was read (images and labels,
    ``RunData.data_sha256``) is recorded in the run folder: a run resumes only on the same
    data.

    Returns the output directory. Raises ``FileNotFoundError`` (dataset missing),
    ``ValueError`` (bad settings, unknown probe names, settings training refuses) or
    :class:`MissingDependencyError` before anything is written; :class:`OutputExistsError`
    for an ``out`` that cannot be used (see :func:`prepare_output`; also while another
    process writes into it: the run holds the folder's lock, :func:`folder_lock`, from
    before it prepares ``out`` until it returns), :class:`ModelFileError` for a damaged or
    misnamed per-model file when resuming.

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
    check_out(out, config)  # "" (which Path makes ".") or a folder inside the data's root
    out = Path(out)
    log = log or (lambda msg: None)
    ranks = _Ranks.of(process_group)
    # Everything that can fail on bad input (settings, data, checkpoint, probes, a training
    # step, disk space) fails here, before the output directory is touched -- so before
    # --overwrite deletes anything -- and under torchrun before any rank starts work.
    data = ranks.together(lambda: load_run_data(config, progress, dataset),
                          "pdepth.run(): checking the settings")
    config = data.config
    ranks.check_same({**rank_settings(config, out, overwrite), "data_sha256": data.data_sha256},
                     "pdepth.run()")
    ranks.together(lambda: check_cache_space(out, data.n, data.dims, config.memory_budget),
                   "pdepth.run(): checking the disk space of the embedding cache")
    cfg = _config_record(config, data)
    with ExitStack() as held:  # rank 0 holds the run folder's lock until the run ends
        kept = ranks.together(lambda: _prepare(out, config, overwrite, cfg, data, held, log),
                              "pdepth.run(): preparing the output directory (rank 0)",
                              rank0_only=True, default=0)
        return _run_models(config, data, out, ranks, cfg, kept, t_start, progress, log)


def _run_models(config: RunConfig, data: RunData, out: Path, ranks: _Ranks, cfg: dict,
                kept: int, t_start: float, progress: bool, log) -> Path:
    """:func:`run` once the output directory is prepared: every model, then (rank 0) the
    results, the report and the marks of completion."""
    log(f"pdepth run: {config.model or config.arch} on {data.n} {config.dataset} examples, "
        f"seeds {config.seeds}, "
        + (f"{config.epochs} epochs" if config.checkpoint is None else
           f"checkpoint {config.checkpoint}")
        + f", k={config.k}, {data.spec.num_probes} probes, "
        f"device {data.device}" + (f"; resuming ({kept} model(s) already done)" if kept else ""))
    per_model = ranks.together(
        lambda: _score_models(config, data, out, ranks, progress=progress, log=log),
        "pdepth.run(): training and scoring the models")
    if ranks.rank != 0:
        return out
    per_model = [m if m is not None else load_model_file(model_path(out, s, h), config, s, h,
                                                         data.n, data.data_sha256)
                 for m, (s, h) in zip(per_model, config.jobs(), strict=True)]
    t_models = time.perf_counter() - t_start
    cfg["models"] = [m["meta"] for m in per_model]
    cfg["summary"] = write_results(out, per_model, data)
    cfg["timing"] = {"models_seconds": t_models}
    _atomic.write_json(out / "config.json", cfg)
    _finish(out, cfg, t_start)
    log(f"pdepth run: done in {cfg['timing']['total_seconds']:.1f} s; results in {out} "
        f"(report: {out / 'report.html'})")
    return out


@dataclass
class _Ranks:
    """The ranks of a run's process group (one rank without a group)."""

    group: object = None
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, process_group) -> _Ranks:
        if process_group is None:
            return cls()
        import torch.distributed as dist

        return cls(process_group, dist.get_rank(process_group),
                   dist.get_world_size(process_group))

    def together(self, step, what: str, *, rank0_only: bool = False, default=None):
        """``step()`` on every rank (on rank 0 only with ``rank0_only``; ``default`` on the
        others); with several ranks, a failure on any rank raises RuntimeError naming it on
        every rank (:func:`pdepth.distributed.check_all`)."""
        if self.world == 1:
            return step()
        from ..distributed import check_all

        error, result = None, default
        if not rank0_only or self.rank == 0:
            try:
                result = step()
            except Exception as exc:
                error = exc
        check_all(error, what, self.group)
        return result

    def check_same(self, values: dict, what: str) -> None:
        if self.world > 1:
            from ..distributed import check_same

            check_same(values, what, self.group)


def load_run_data(config: RunConfig, progress: bool, dataset=None) -> RunData:
    """Checks the dependencies and settings and loads the data (``dataset``: a user
    ``Dataset``, see :func:`run`); builds the network once to find its probes (and, with a
    checkpoint, loads it: a checkpoint that does not fit fails here)."""
    require_modules(run_dependencies(config, progress), "pdepth run")
    device = resolve_device(config.device)
    try:  # the filter against the device (e.g. tf32 needs CUDA), before any training
        check_filter("knn", config.knn_filter, torch.float32, device)
    except ValueError as exc:
        raise ValueError(f"--knn-filter {config.knn_filter}: "
                         f"{str(exc).split('(): ', 1)[-1]}") from None
    thresholds = CategoryThresholds.from_dict(config.thresholds)
    config, info, images, original, dataset_index, x = _load_data(config, dataset)
    # label noise: after the subset is drawn, before the halves (the same flips for every model)
    labels = apply_noise(config, original, info.num_classes)
    network = make_model(config.arch, config.model, model_args=config.model_args,
                         num_classes=info.num_classes,
                         in_channels=info.channels, image_size=info.image_size)
    if config.checkpoint is not None:
        load_checkpoint(network, config.checkpoint)
    spec = resolve_probes(network, config.probes if config.probes is not None else
                          (config.arch or "auto"), max_dim=config.max_dim, token=config.token)
    dims = probe_dims(network, spec, x[:1])
    train_size = min(len(config.split(int(labels.shape[0]), s, h)[0]) for s, h in config.jobs())
    check_support(config.k, train_size)
    if config.checkpoint is None:
        _check_training(config, network, x, labels, device)
    return RunData(device, thresholds, spec, info, images, labels, dataset_index,
                   pinned(x, device), dims, original_labels=original, config=config,
                   checkpoint_model=network if config.checkpoint is not None else None,
                   data_sha256=config.data_sha256 or data_identity(images, original))


def _check_training(config: RunConfig, network, x: torch.Tensor, labels: torch.Tensor,
                    device: torch.device) -> None:
    """One epoch of :func:`train_model` with the run's settings, on a copy of the network
    and a few examples: whatever training would refuse (the optimizer's settings, the batch
    size, a network that cannot train on a batch) is refused here, before the output
    directory is touched (``--overwrite`` deletes nothing for a run that cannot train)."""
    import copy

    m = min(8, int(labels.shape[0]))
    options = TrainOptions(epochs=1, lr=config.lr, weight_decay=config.weight_decay,
                           batch_size=config.batch_size, eval_batch_size=config.eval_batch_size)
    with torch.random.fork_rng(devices=[]):  # the run's random numbers stay as they were
        try:
            train_model(copy.deepcopy(network), x[:m], labels[:m], torch.arange(m), options,
                        device=device)
        except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as exc:
            raise ValueError(f"training with these settings fails (--lr {config.lr}, "
                             f"--batch-size {config.batch_size}, weight_decay "
                             f"{config.weight_decay}): {type(exc).__name__}: {exc}") from None


def _load_data(config: RunConfig, dataset):
    """``(config, info, images uint8, labels, dataset_index, x float32 [n, C, H, W])``: the
    run's examples from the dataset table, or from a user ``Dataset`` (then ``config`` gains
    ``data_sha256``)."""
    if dataset is None:
        info = dataset_info(config.dataset, config.root, config.image_size)
        images, labels, index = load_subset(
            config.dataset, config.root, config.subset, config.subset_seed,
            download=config.download, workers=config.workers, image_size=config.image_size)
        info = info.with_stats(images)  # imagefolder: from the run's examples
        x = normalize_images(images, info.mean, info.std)
    else:
        config, info, images, labels, index, x = _user_data(config, dataset)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise ValueError(f"dataset {config.dataset}: labels must lie in 0..{info.num_classes - 1}"
                         f" (its {info.num_classes} classes), got {int(labels.min())}.."
                         f"{int(labels.max())}")
    return config, info, images, labels, index, x


def _user_data(config: RunConfig, dataset):
    """:func:`_load_data` for a user ``Dataset``: decoded once, subset, normalised (uint8
    images; float ones are the input as they are), hashed into ``config.data_sha256``."""
    images, labels, x, classes = decode_dataset(dataset, config.workers)
    index = subset_index(labels.shape[0], config.subset, config.subset_seed)
    images, labels = images[index], labels[index]
    info = DatasetInfo(config.dataset, None, classes, None, None, None,
                       1 if images.dim() == 3 else images.shape[3], images.shape[1])
    if x is None:  # uint8 images: normalised like imagefolder's
        info = info.with_stats(images)
        x = normalize_images(images, info.mean, info.std)
    else:
        x = x[index]
    digest = hashlib.sha256(x.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return (dataclasses.replace(config, data_sha256=digest.hexdigest()), info, images, labels,
            index, x)


def _config_record(config: RunConfig, data: RunData) -> dict:
    """``config.json`` of a running run (the models, summary and timing come later)."""
    return {
        "status": "running",
        "protocol_key": config.protocol_key(),
        "config": config.to_dict(),
        "resolved": {
            "device": str(data.device),
            "root": config.root or data.dataset.root,
            "image_shape": [data.dataset.channels, data.dataset.image_size,
                            data.dataset.image_size],
            "normalization": {"mean": data.dataset.mean, "std": data.dataset.std},
            "num_examples": data.n,
            "num_classes": data.num_classes,
            "class_names": list(data.dataset.classes),
            "probes": data.spec.names,
            "probe_preset": data.spec.preset,
            "probe_token": data.spec.token,
            "probe_dims": data.dims,
            "num_layers": data.spec.num_probes,
            "num_models": len(config.jobs()),
            "trained": config.checkpoint is None,
            "thresholds": data.thresholds.to_dict(),
            "reference": "network",
            "self_match": "exclude",
            "support": ("the model's training half, given labels" if config.checkpoint is None
                        else "every example (the checkpoint's training data), given labels"),
            "label_noise": {"fraction": config.label_noise, "seed": config.label_noise_seed,
                            "flipped": int(data.label_flipped.sum()),
                            "kind": config.noise_kind,
                            "rule": NOISE_RULES[config.noise_kind],
                            **noise_record(config, data.num_classes)},
            "knn_filter": _filters(config, data),
        },
        "versions": versions(),
    }


def _filters(config: RunConfig, data: RunData) -> list[str | None]:
    """The filter format the k-NN op uses at each probe (``--knn-filter`` resolved for the
    probe's width on this device, :func:`pdepth.knn_plan`; None where it cannot say)."""
    resolved = []
    for dim in data.dims:
        try:
            plan = knn_plan(dim, device=data.device, filter=config.knn_filter)
        except Exception:  # pragma: no cover  (a record, never a reason to stop a run)
            plan = {}
        resolved.append(plan.get("filter"))
    return resolved


def _prepare(out: Path, config: RunConfig, overwrite: bool, cfg: dict, data: RunData,
             held: ExitStack, log) -> int:
    """Takes the lock of ``out`` (``held`` keeps it), prepares ``out``
    (:func:`prepare_output`) and writes ``config.json`` and ``data.npz``; returns the number
    of per-model files kept for resuming."""
    held.enter_context(lock_output(out))
    kept = prepare_output(out, config, overwrite, data_sha256=data.data_sha256, log=log)
    _atomic.write_json(out / "config.json", cfg)
    _atomic.savez(out / "data.npz", images=data.images.numpy(), labels=data.labels.numpy(),
                  original_labels=data.original_labels.numpy(),
                  dataset_index=data.dataset_index.numpy())
    return kept


def _score_models(config: RunConfig, data: RunData, out: Path, ranks: _Ranks, *,
                  progress: bool, log) -> list[dict | None]:
    """This rank's models, in seed, half order (None for another rank's model): loaded from
    their files when an earlier run saved them, else trained, scored and saved."""
    per_model: list[dict | None] = []
    for job, (seed, half) in enumerate(config.jobs()):
        if job % ranks.world != ranks.rank:
            per_model.append(None)  # another rank's model: rank 0 reads it from its file
            continue
        path = model_path(out, seed, half)
        if path.exists():
            per_model.append(load_model_file(path, config, seed, half, data.n,
                                             data.data_sha256))
            log(f"  seed {seed} half {half}: loaded {path.name}")
            continue
        per_model.append(run_model(config, data, seed, half, path=path, progress=progress,
                                   log=log))
    return per_model


def _finish(out: Path, cfg: dict, t_start: float) -> None:
    """Draws the report, then marks the run complete (``config.json`` status, ``COMPLETE``)."""
    from ..report import write_report

    t_report = time.perf_counter()
    write_report(out)
    cfg["status"] = "complete"
    cfg["timing"]["report_seconds"] = time.perf_counter() - t_report
    cfg["timing"]["total_seconds"] = time.perf_counter() - t_start
    cfg["peak_rss_bytes"] = max([peak_rss_bytes()] + stage_peaks(cfg.get("models", [])))
    _atomic.write_json(out / "config.json", cfg)
    _atomic.write_bytes(out / "COMPLETE", f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())


def versions() -> dict:
    """The versions of pdepth, its dependencies, the extension and the machine."""
    from .._version import __version__
    from ..ops import build_info

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
