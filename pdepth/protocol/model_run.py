"""One model's work: train it on its half, score both halves (prediction depth with the
training half as the k-NN support set) and save its per-model file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..categories import CategoryThresholds
from ..data import DatasetInfo
from ..models import make_model
from ..probes import ProbeSpec, pinned
from .config import RunConfig
from .outdir import save_model_file
from .train import TrainOptions, train_model

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
    with ``"meta"`` (what :func:`pdepth.protocol.outdir.load_model_file` returns)."""
    t0 = time.perf_counter()
    train_idx, held_idx = config.split(data.n, seed, half)
    model, epoch_pred, history = _trained(config, data, (seed, half), train_idx, progress)
    t_train = time.perf_counter() - t0
    res, order = _score(model, config, data, (train_idx, held_idx), progress)
    probs = res.probs.numpy()[order].astype(np.float32)
    final = ((history["train_accuracy"][-1], history["held_out_accuracy"][-1]) if history["loss"]
             else (float((probs[train_idx].argmax(1) == data.labels.numpy()[train_idx]).mean()),
                   None))  # a checkpoint's accuracy on its training split, from its scores
    meta = {
        "protocol_key": config.protocol_key(), "seed": int(seed), "half": int(half),
        "knn_filter": config.knn_filter, "trained": data.checkpoint_model is None,
        "train_seconds": t_train, "depth_seconds": res.seconds,
        "seconds": time.perf_counter() - t0,
        "final_train_accuracy": final[0], "final_held_out_accuracy": final[1],
        "layer_accuracy": res.depth.layer_accuracy.tolist(),
        "memory": res.stats(),
    }
    in_train = np.zeros(data.n, bool)
    in_train[train_idx] = True
    arrays = {
        "seed": np.array(seed), "half": np.array(half),
        "train_index": np.asarray(train_idx), "held_out_index": np.asarray(held_idx),
        "in_train": in_train,
        "depth": res.depth.depth.numpy()[order].astype(np.int16),
        "layer_pred": res.depth.layer_pred.numpy()[:, order].astype(np.int16),
        "probs": probs,
        "epoch_pred": epoch_pred.numpy().astype(np.int16),
        "loss": np.array(history["loss"]),
        "train_accuracy": np.array(history["train_accuracy"]),
        "held_out_accuracy": np.array(history["held_out_accuracy"]),
    }
    save_model_file(path, arrays, meta)
    if log:
        held = meta["final_held_out_accuracy"]
        log(f"  seed {seed} half {half}: "
            + (f"train {t_train:.1f} s" if meta["trained"] else "checkpoint, not trained")
            + f" (train acc {meta['final_train_accuracy']:.3f}, held-out acc "
            + ("none" if held is None else f"{held:.3f}")
            + f"), depth {res.seconds:.1f} s, peak {res.peak_bytes / 2**20:.0f} MiB "
              f"({res.num_chunks} chunk(s))")
    return {**arrays, "meta": meta}


def _trained(config: RunConfig, data: RunData, job: tuple[int, int], train_idx: np.ndarray,
             progress: bool):
    """Model ``job = (seed, half)`` trained on ``train_idx``: ``(model, epoch_pred [E+1, n],
    history)`` (:func:`train_model`); for a checkpoint the loaded network, no epochs
    (``epoch_pred [0, n]``, empty histories: the learning-speed columns become NaN)."""
    if data.checkpoint_model is not None:
        history = {"loss": [], "train_accuracy": [], "held_out_accuracy": []}
        return (data.checkpoint_model.to(data.device),
                torch.zeros(0, data.n, dtype=torch.int64), history)
    seed, half = job
    torch.manual_seed(1000 * seed + half)
    model = make_model(config.arch, config.model, num_classes=data.num_classes,
                       in_channels=data.dataset.channels,
                       image_size=data.dataset.image_size).to(data.device)
    options = TrainOptions(epochs=config.epochs, lr=config.lr,
                           weight_decay=config.weight_decay, batch_size=config.batch_size,
                           eval_batch_size=config.eval_batch_size, seed=1000 * seed + half)
    # trains on the given labels; the held-out accuracy per epoch asks "is the network
    # right", so it is measured against the dataset's (original) labels
    epoch_pred, history = train_model(model, data.x, data.labels, train_idx, options,
                                      device=data.device, progress=progress,
                                      desc=f"train seed {seed} half {half}",
                                      held_out_labels=data.original_labels)
    return model, epoch_pred, history


def _score(model, config: RunConfig, data: RunData, split, progress: bool):
    """Prediction depth of every example against the training half (self match excluded for
    the training half's own examples). Returns the StreamResult and the permutation that puts
    its queries back in example order."""
    from ..stream import stream_prediction_depth

    train_idx, held_idx = split
    query_idx = np.concatenate([train_idx, held_idx])
    self_index = np.concatenate([np.arange(len(train_idx)), np.full(len(held_idx), -1)])
    train_t, query_t = torch.as_tensor(train_idx), torch.as_tensor(query_idx)
    res = stream_prediction_depth(
        model, pinned(data.x[train_t], data.device), data.labels[train_t],
        pinned(data.x[query_t], data.device), probes=data.spec,
        k=config.k, self_index=torch.as_tensor(self_index), query_labels=data.labels[query_t],
        num_classes=data.num_classes, example_index=query_t,
        batch_size=config.eval_batch_size, memory_budget=config.memory_budget,
        device=data.device, filter=config.knn_filter, progress=progress)
    order = np.argsort(query_idx)  # back to example order 0..n-1
    assert np.array_equal(query_idx[order], np.arange(data.n))
    return res, order

