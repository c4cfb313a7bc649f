"""One model's work: train it on its half, score both halves (prediction depth with the
training half as the k-NN support set, :mod:`.scoring`) and save its per-model file."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..categories import CategoryThresholds
from ..data import DatasetInfo
from ..metrics import vote_shares
from ..models import make_model
from ..probes import ProbeSpec
from .config import RunConfig
from .convergence import ProbeCurve, probe_curve_sample
from .outdir import save_model_file
from .scoring import CACHE_DIR, ModelCache, score_model, uses_disk
from .stages import stage
from .train import EPOCH_SCORES, TrainOptions, train_model

__all__ = ["RunData", "check_support", "run_model"]


@dataclass
class RunData:
    """What every model of a run shares: the resolved settings and the data."""

    device: torch.device
    thresholds: CategoryThresholds
    spec: ProbeSpec
    dataset: DatasetInfo
    images: torch.Tensor  # uint8, as loaded
    labels: torch.Tensor  # [n] int64, the given labels (after --label-noise): what trains
    dataset_index: torch.Tensor
    x: torch.Tensor  # normalised images, the models' input
    dims: list[int]  # embedding width per probe
    original_labels: torch.Tensor | None = None  # [n] int64, the dataset's (None: = labels)
    config: RunConfig | None = None  # the run's settings as resolved (data_sha256)
    checkpoint_model: nn.Module | None = None  # --checkpoint: the loaded network (CPU)
    data_sha256: str | None = None  # the data's identity (:func:`data_identity`)

    def __post_init__(self):
        if self.original_labels is None:
            self.original_labels = self.labels

    @property
    def label_flipped(self) -> torch.Tensor:
        """``[n]`` bool: the given label differs from the dataset's (label noise)."""
        return self.labels != self.original_labels

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """The dataset's classes (its table entry; a user Dataset's ``classes`` or one more
        than its largest label)."""
        return self.dataset.num_classes


def check_support(k: int, num_support: int) -> None:
    """Raises ValueError when ``k`` neighbours cannot be voted from a training half of
    ``num_support`` examples (its own example excluded), before any model is trained.

    The rule is the op's (docs/design.md section 2): this asks the depth layer itself, on a
    one-dimensional stand-in of the support set, instead of repeating the rule here."""
    from ..depth import prediction_depth

    try:
        prediction_depth([torch.zeros(num_support, 1)], torch.zeros(num_support, dtype=torch.long),
                         [torch.zeros(2, 1)], k=k, self_index=torch.tensor([0, -1]),
                         reference="labels", query_labels=torch.zeros(2, dtype=torch.long),
                         num_classes=1)
    except ValueError as exc:
        raise ValueError(f"k={k} is too large for a training half of {num_support} examples "
                         f"({exc})") from None


def run_model(config: RunConfig, data: RunData, seed: int, half: int, *, path: Path,
              progress: bool = False, log=None) -> dict:
    """Trains and scores model ``(seed, half)``, saves it to ``path`` and returns its arrays
    with ``"meta"`` (what :func:`pdepth.protocol.outdir.load_model_file` returns). Where the
    embeddings go to disk (:mod:`pdepth.protocol.scoring`), an interrupted model resumes from
    its trained weights and its last scored probe."""
    t0 = time.perf_counter()
    train_idx, held_idx = config.split(data.n, seed, half)
    folder = path.parent.parent / CACHE_DIR
    owner = {"protocol_key": config.protocol_key(), "data_sha256": data.data_sha256}
    cache = ModelCache(folder if uses_disk(data.n, data.dims, config.memory_budget) else None,
                       path.stem, owner, log)
    model, epoch_pred, history, trained = _trained(config, data, (seed, half), train_idx,
                                                   cache, progress)
    res = score_model(model, cache, data, config, (train_idx, held_idx), progress=progress)
    order = np.argsort(np.concatenate([train_idx, held_idx]))  # back to example order
    probs = res.probs.numpy()[order].astype(np.float32)
    final = ((history["train_accuracy"][-1], history["held_out_accuracy"][-1]) if history["loss"]
             else (float((probs[train_idx].argmax(1) == data.labels.numpy()[train_idx]).mean()),
                   None))  # a checkpoint's accuracy on its training split, from its scores
    meta = {
        "protocol_key": config.protocol_key(), "data_sha256": data.data_sha256,
        "seed": int(seed), "half": int(half),
        "knn_filter": config.knn_filter, "trained": data.checkpoint_model is None,
        "train_seconds": trained["seconds"], "depth_seconds": res.seconds,
        "seconds": time.perf_counter() - t0,
        "final_train_accuracy": final[0], "final_held_out_accuracy": final[1],
        "layer_accuracy": res.depth.layer_accuracy.tolist(),
        "memory": res.stats(),
        "stages": {"train": trained, **res.stages},
    }
    in_train = np.zeros(data.n, bool)
    in_train[train_idx] = True
    pred = res.depth.reference.numpy()[order]  # the network's prediction
    arrays = {
        "seed": np.array(seed), "half": np.array(half),
        "train_index": np.asarray(train_idx), "held_out_index": np.asarray(held_idx),
        "in_train": in_train,
        "depth": res.depth.depth.numpy()[order].astype(np.int16),
        "layer_pred": res.depth.layer_pred.numpy()[:, order].astype(np.int16),
        "probs": probs,
        "knn_vote_share": vote_shares(res.depth.vote_counts.numpy()[:, order],
                                      data.labels.numpy(), pred),
        "probe_accuracy_epochs": np.asarray(history["snapshots"], np.float64).reshape(
            len(history["snapshots"]), data.spec.num_probes),
        "epoch_pred": np.asarray(epoch_pred).astype(np.int16),
        **{f"epoch_{name}": np.asarray(history["epoch_scores"][name]).astype(np.float16)
           .reshape(-1, data.n) for name in EPOCH_SCORES},
        "loss": np.array(history["loss"]),
        "train_accuracy": np.array(history["train_accuracy"]),
        "held_out_accuracy": np.array(history["held_out_accuracy"]),
    }
    save_model_file(path, arrays, meta)
    if not config.keep_cache:  # also what a run with a lower --memory-budget left
        ModelCache(folder if folder.is_dir() else None, path.stem).remove()
    if log:
        held = meta["final_held_out_accuracy"]
        log(f"  seed {seed} half {half}: "
            + (f"train {trained['seconds']:.1f} s" if meta["trained"]
               else "checkpoint, not trained")
            + f" (train acc {meta['final_train_accuracy']:.3f}, held-out acc "
            + ("none" if held is None else f"{held:.3f}")
            + f"), depth {res.seconds:.1f} s, embeddings "
              f"{'on disk' if res.on_disk else 'in memory'}, "
              f"{res.peak_bytes / 2**20:.0f} MiB resident")
    return {**arrays, "meta": meta}


def _trained(config: RunConfig, data: RunData, job: tuple[int, int], train_idx: np.ndarray,
             cache: ModelCache, progress: bool):
    """Model ``job = (seed, half)`` trained on ``train_idx``: ``(model, epoch_pred [E+1, n],
    history, stage record)`` (:func:`train_model`); read back from the cache where an
    interrupted run left it. For a checkpoint the loaded network, no epochs (``epoch_pred
    [0, n]``, empty histories: the learning-speed columns become NaN)."""
    if data.checkpoint_model is not None:
        history = {"loss": [], "train_accuracy": [], "held_out_accuracy": [], "snapshots": [],
                   "epoch_scores": {name: torch.zeros(0, data.n) for name in EPOCH_SCORES}}
        return (data.checkpoint_model.to(data.device),
                torch.zeros(0, data.n, dtype=torch.int64), history,
                {"seconds": 0.0, "peak_rss_bytes": 0, "peak_is_stage": False})
    seed, half = job
    torch.manual_seed(1000 * seed + half)
    model = make_model(config.arch, config.model, model_args=config.model_args,
                       num_classes=data.num_classes,
                       in_channels=data.dataset.channels,
                       image_size=data.dataset.image_size).to(data.device)
    key = config.protocol_key()
    saved = _saved_training(cache, key, model, (config.epochs + 1, data.n))
    if saved is not None:
        return model, saved["epoch_pred"], saved["history"], saved["stage"]
    options = TrainOptions(epochs=config.epochs, lr=config.lr,
                           weight_decay=config.weight_decay, batch_size=config.batch_size,
                           eval_batch_size=config.eval_batch_size, seed=1000 * seed + half)
    with stage({}) as trained:
        # trains on the given labels; the held-out accuracy per epoch asks "is the network
        # right", so it is measured against the dataset's (original) labels
        epoch_pred, history = train_model(model, data.x, data.labels, train_idx, options,
                                          device=data.device, progress=progress,
                                          desc=f"train seed {seed} half {half}",
                                          held_out_labels=data.original_labels, scores=True,
                                          snapshot=_probe_curve(config, data, train_idx, seed))
    # plain lists: the cache is read back with weights_only=True, which refuses numpy arrays
    history["snapshots"] = [np.asarray(a).tolist() for a in history["snapshots"]]
    cache.save_train({"protocol_key": key, "state": model.state_dict(),
                      "epoch_pred": epoch_pred, "history": history, "stage": trained})
    return model, epoch_pred, history, trained


def _saved_training(cache: ModelCache, key: str, model: nn.Module, epoch_pred_shape):
    """The training an interrupted run saved in the cache (:meth:`ModelCache.load_train`),
    loaded into ``model``; None where there is none or it does not fit this model and run
    (the file is then deleted and the model trained again): also a file of an older version,
    without the per-epoch scores (``history["epoch_scores"]``, one ``[E+1, n]`` tensor per
    :data:`EPOCH_SCORES` name)."""
    saved = cache.load_train(key)
    if saved is None:
        return None
    try:
        copy.deepcopy(model).load_state_dict(saved["state"])  # a failed load changes a part
        epochs = epoch_pred_shape[0] - 1
        fits = (tuple(saved["epoch_pred"].shape) == tuple(epoch_pred_shape)
                and all(len(saved["history"][name]) == epochs for name in
                        ("loss", "train_accuracy", "held_out_accuracy"))
                and len(saved["history"]["snapshots"]) == epochs + 1
                and all(tuple(saved["history"]["epoch_scores"][name].shape)
                        == tuple(epoch_pred_shape) for name in EPOCH_SCORES)
                and isinstance(saved["stage"], dict))
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        fits, problem = False, f"does not fit this model ({type(exc).__name__})"
    else:
        problem = "does not hold this run's training (shapes differ)"
    if not fits:
        cache.discard("train.pt", problem)
        return None
    model.load_state_dict(saved["state"])
    return saved


def _probe_curve(config: RunConfig, data: RunData, train_idx, seed: int) -> ProbeCurve:
    """The per-epoch probe snapshot of a model: a fixed sample of its training half
    (:func:`pdepth.protocol.convergence.probe_curve_sample`, seeded with the split's seed)."""
    sample = torch.as_tensor(probe_curve_sample(train_idx, seed))
    return ProbeCurve(data.spec, data.x[sample], data.labels[sample], k=config.k,
                      num_classes=data.num_classes, device=data.device,
                      batch_size=config.eval_batch_size, filter=config.knn_filter,
                      metric=config.metric)

