"""Synthetic k-NN problems of the benchmarks: Gaussian blobs (:func:`make_data`), generated
on the device with a fixed seed and without N x D temporaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_GEN_CHUNK_ROWS = 8192


@dataclass
class KnnData:
    """A synthetic k-NN problem: ``support[N, D]`` with ``labels[N]`` and ``queries[M, D]``
    (with their own ``query_labels[M]``), all on one device."""

    support: torch.Tensor
    labels: torch.Tensor
    queries: torch.Tensor
    query_labels: torch.Tensor
    num_classes: int

    def nbytes(self) -> int:
        """Bytes of the op's inputs (support, labels, queries)."""
        return sum(t.numel() * t.element_size() for t in (self.support, self.labels, self.queries))


def _blobs(n: int, d: int, centers: torch.Tensor, gen: torch.Generator):
    labels = torch.randint(0, centers.shape[0], (n,), generator=gen, device=centers.device)
    x = torch.randn((n, d), generator=gen, device=centers.device, dtype=centers.dtype)
    # Centres added chunk by chunk so that generating the data has no N x D temporaries
    # (the peak-memory measurement allocates its inputs with this function).
    for r0 in range(0, n, _GEN_CHUNK_ROWS):
        x[r0 : r0 + _GEN_CHUNK_ROWS].add_(centers[labels[r0 : r0 + _GEN_CHUNK_ROWS]])
    return x, labels


def make_data(
    n: int,
    m: int,
    d: int,
    num_classes: int = 10,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    spread: float = 0.3,
) -> KnnData:
    """Gaussian blobs: class centres ~ N(0, spread^2 I), points = centre + N(0, I), labels
    uniform over the classes.

    With ``spread=0.3`` the classes overlap (a k-NN vote is neither trivial nor random),
    like embeddings of a network's middle layers. Generated on ``device`` with a fixed
    seed: the same numbers on every run on the same kind of device."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    centers = torch.randn((num_classes, d), generator=gen, device=device, dtype=dtype)
    centers.mul_(spread)
    support, labels = _blobs(n, d, centers, gen)
    queries, query_labels = _blobs(m, d, centers, gen)
    return KnnData(support, labels, queries, query_labels, num_classes)
