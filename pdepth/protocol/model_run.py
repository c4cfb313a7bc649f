"""One model's work: train it on its half, score both halves (prediction depth with the
training half as the k-NN support set) and save its per-model file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..categories import CategoryThresholds
from ..data import DatasetInfo
from ..metrics import vote_shares
from ..models import build_model
from ..probes import ProbeSpec
from .config import RunConfig, split_halves
from .convergence import ProbeCurve, probe_curve_sample
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
        return int(self.labels.max()) + 1


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
    halves = split_halves(data.n, seed)
    train_idx, held_idx = halves[half], halves[1 - half]
    torch.manual_seed(1000 * seed + half)
    model = build_model(config.arch, num_classes=data.num_classes).to(data.device)
    options = TrainOptions(epochs=config.epochs, lr=config.lr,
                           weight_decay=config.weight_decay, batch_size=config.batch_size,
                           eval_batch_size=config.eval_batch_size, seed=1000 * seed + half)
    # trains on the given labels; the held-out accuracy per epoch asks "is the network
    # right", so it is measured against the dataset's (original) labels
    epoch_pred, history = train_model(model, data.x, data.labels, train_idx, options,
                                      device=data.device, progress=progress,
                                      desc=f"train seed {seed} half {half}",
                                      held_out_labels=data.original_labels,
                                      snapshot=_probe_curve(config, data, train_idx, seed))
    t_train = time.perf_counter() - t0
    res, order = _score(model, config, data, (train_idx, held_idx), progress)
    meta = {
        "protocol_key": config.protocol_key(), "seed": int(seed), "half": int(half),
        "knn_filter": config.knn_filter,
        "train_seconds": t_train, "depth_seconds": res.seconds,
        "seconds": time.perf_counter() - t0,
        "final_train_accuracy": history["train_accuracy"][-1],
        "final_held_out_accuracy": history["held_out_accuracy"][-1],
        "layer_accuracy": res.depth.layer_accuracy.tolist(),
        "memory": res.stats(),
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
        "probs": res.probs.numpy()[order].astype(np.float32),
        "knn_vote_share": vote_shares(res.depth.vote_counts.numpy()[:, order],
                                      data.labels.numpy(), pred),
        "probe_accuracy_epochs": np.stack(history["snapshots"]),
        "epoch_pred": epoch_pred.numpy().astype(np.int16),
        "loss": np.array(history["loss"]),
        "train_accuracy": np.array(history["train_accuracy"]),
        "held_out_accuracy": np.array(history["held_out_accuracy"]),
    }
    save_model_file(path, arrays, meta)
    if log:
        log(f"  seed {seed} half {half}: train {t_train:.1f} s (train acc "
            f"{meta['final_train_accuracy']:.3f}, held-out acc "
            f"{meta['final_held_out_accuracy']:.3f}), depth {res.seconds:.1f} s, peak "
            f"{res.peak_bytes / 2**20:.0f} MiB ({res.num_chunks} chunk(s))")
    return {**arrays, "meta": meta}


def _probe_curve(config: RunConfig, data: RunData, train_idx, seed: int) -> ProbeCurve:
    """The per-epoch probe snapshot of a model: a fixed sample of its training half
    (:func:`pdepth.protocol.convergence.probe_curve_sample`, seeded with the split's seed)."""
    sample = torch.as_tensor(probe_curve_sample(train_idx, seed))
    return ProbeCurve(data.spec, data.x[sample], data.labels[sample], k=config.k,
                      num_classes=data.num_classes, device=data.device,
                      batch_size=config.eval_batch_size, filter=config.knn_filter)


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
        model, data.x[train_t], data.labels[train_t], data.x[query_t], probes=data.spec,
        k=config.k, self_index=torch.as_tensor(self_index), query_labels=data.labels[query_t],
        num_classes=data.num_classes, example_index=query_t,
        batch_size=config.eval_batch_size, memory_budget=config.memory_budget,
        device=data.device, filter=config.knn_filter, progress=progress, vote_counts=True)
    order = np.argsort(query_idx)  # back to example order 0..n-1
    assert np.array_equal(query_idx[order], np.arange(data.n))
    return res, order

