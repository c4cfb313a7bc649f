"""Probe accuracy per epoch ("early layers converge faster", docs/design.md section 11): at
initialisation and after every epoch, the k-NN accuracy of every probe on a fixed sample of
the model's training half, leave-one-out (each sample point votes from the other sample
points, its own excluded), against the given labels.

:class:`ProbeCurve` is the snapshot :func:`pdepth.protocol.train.train_model` calls; it runs
the model in eval mode under ``no_grad`` and draws no random number, so training is the same
with and without it (tested). :func:`pdepth.metrics.convergence_epoch` reads the curves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..depth import prediction_depth
from ..probes import ProbeSpec, extract

__all__ = ["PROBE_CURVE_SAMPLE", "ProbeCurve", "probe_curve_sample"]

PROBE_CURVE_SAMPLE = 1000  # at most this many training-half examples per model


def probe_curve_sample(train_index: np.ndarray, seed: int,
                       size: int = PROBE_CURVE_SAMPLE) -> np.ndarray:
    """``[min(size, len(train_index))]`` sorted example indices: a fixed random sample of the
    training half ``train_index``, drawn with its own generator seeded with ``seed``."""
    train_index = np.asarray(train_index)
    perm = torch.randperm(len(train_index), generator=torch.Generator().manual_seed(int(seed)))
    return np.sort(train_index[perm[:size].numpy()])


@dataclass(eq=False)
class ProbeCurve:
    """``curve(model) -> [L]`` float64: each probe's leave-one-out k-NN accuracy on the
    sample ``x [S, ...]`` with the given labels ``y [S]`` (k = ``min(k, S - 1)``)."""

    spec: ProbeSpec
    x: torch.Tensor
    y: torch.Tensor
    k: int
    num_classes: int
    device: torch.device
    batch_size: int = 1000
    filter: str = "auto"
    metric: str = "euclidean"

    @torch.no_grad()
    def __call__(self, model) -> np.ndarray:
        emb = extract(model, self.x, self.spec, batch_size=self.batch_size, device=self.device,
                      storage=self.device)  # eval mode, restored
        res = prediction_depth(emb.layers, self.y.to(self.device), reference="labels",
                               k=min(self.k, self.y.shape[0] - 1),
                               num_classes=self.num_classes, filter=self.filter,
                               metric=self.metric)
        return res.layer_accuracy.numpy()
