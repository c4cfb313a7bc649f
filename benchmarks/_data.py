"""The k-NN problems of the benchmarks, each with a fixed seed: Gaussian blobs
(:func:`make_data`, generated on the device without N x D temporaries), clustered ReLU
features (:func:`make_relu_data`), real Fashion-MNIST pixels (:func:`fashion_mnist_pixels`)
and the hidden ReLU features of an MLP trained on Fashion-MNIST
(:func:`trained_mlp_features`); :func:`describe_geometry` says how hard each is for a
low-precision filter."""

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


def make_relu_data(
    n: int,
    m: int,
    d: int,
    num_classes: int = 10,
    *,
    seed: int = 0,
    latent: int = 64,
    spread: float = 1.0,
    noise: float = 0.5,
    offset: float = 0.5,
    feature_noise: float = 0.1,
) -> KnnData:
    """Clustered ReLU features, like a trained network's: ``relu(z W + b + e)`` with
    ``z = centre[label] + N(0, I)`` in ``latent`` dimensions (centres ~ N(0, spread^2 I)),
    a fixed random projection ``W`` (``latent x d``, entries N(0, 1/latent)), a positive
    per-feature bias ``b ~ offset + N(0, 0.5^2)`` and a little per-feature noise ``e``.

    About a third of the features are zero and every point lies far from the origin
    compared with the distances between neighbours (the points sit near a ``latent``-
    dimensional manifold in the positive orthant): the hard case for a low-precision
    filter, whose error grows with ``|a|^2 + |b|^2`` while the gaps between neighbours do
    not. Generated in row chunks (no N x D temporaries besides the output)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn((num_classes, latent), generator=gen) * spread
    proj = torch.randn((latent, d), generator=gen) / latent**0.5
    bias = offset + 0.5 * torch.randn((d,), generator=gen)

    def rows(count: int):
        labels = torch.randint(0, num_classes, (count,), generator=gen)
        out = torch.empty((count, d))
        for r0 in range(0, count, _GEN_CHUNK_ROWS):
            lab = labels[r0 : r0 + _GEN_CHUNK_ROWS]
            z = centers[lab] + noise * torch.randn((len(lab), latent), generator=gen)
            chunk = torch.addmm(bias, z, proj)
            chunk.add_(torch.randn(chunk.shape, generator=gen), alpha=feature_noise)
            out[r0 : r0 + len(lab)] = chunk.relu_()
        return out, labels

    support, labels = rows(n)
    queries, query_labels = rows(m)
    return KnnData(support, labels, queries, query_labels, num_classes)


def fashion_mnist_pixels(n: int, m: int, root: str | None = None) -> KnnData:
    """Real Fashion-MNIST pixels / 255 (D = 784): support = the first ``n`` training images,
    queries = the first ``m`` test images (at most 60,000 / 10,000)."""
    import pdepth

    root = root or pdepth.data.FASHION_MNIST_ROOT
    train_x, train_y = pdepth.load_fashion_mnist(root, "train")
    test_x, test_y = pdepth.load_fashion_mnist(root, "test")
    support = train_x[:n].reshape(-1, 784).float().div_(255)
    queries = test_x[:m].reshape(-1, 784).float().div_(255)
    return KnnData(support, train_y[:n].clone(), queries, test_y[:m].clone(), 10)


def trained_mlp_features(
    n: int,
    m: int,
    widths: tuple[int, ...] = (1024, 2048),
    *,
    root: str | None = None,
    epochs: int = 2,
    batch: int = 128,
    seed: int = 0,
) -> tuple[dict[int, KnnData], dict]:
    """Embeddings of a trained network: an MLP ``784 -> widths... -> 10`` (ReLU) trained with
    Adam for ``epochs`` epochs on the first ``n`` Fashion-MNIST training images (normalised
    pixels), then the ReLU output of every hidden layer for those images (the support) and
    the first ``m`` test images (the queries).

    Returns ``({width: KnnData}, info)`` with the training time and the test accuracy in
    ``info``. A few seconds per epoch at n = 20,000 on 2 cores; deterministic for a fixed
    seed and thread count."""
    import time

    import pdepth

    root = root or pdepth.data.FASHION_MNIST_ROOT
    train_x, train_y = pdepth.load_fashion_mnist(root, "train")
    test_x, test_y = pdepth.load_fashion_mnist(root, "test")
    mean, std = pdepth.data.FASHION_MNIST_MEAN, pdepth.data.FASHION_MNIST_STD

    def prep(x):
        return (x.reshape(len(x), -1).float() / 255 - mean) / std

    xs, ys = prep(train_x[:n]), train_y[:n].clone()
    xq, yq = prep(test_x[:m]), test_y[:m].clone()
    torch.manual_seed(seed)
    dims = (784, *widths)
    hidden = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
    head = torch.nn.Linear(dims[-1], 10)

    def forward(x):
        feats = []
        for layer in hidden:
            x = torch.relu(layer(x))
            feats.append(x)
        return head(x), feats

    params = [*hidden.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=gen)
        for b0 in range(0, len(xs), batch):
            idx = order[b0 : b0 + batch]
            loss = torch.nn.functional.cross_entropy(forward(xs[idx])[0], ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        logits_q, feats_q = forward(xq)
        _, feats_s = forward(xs)
    acc = (logits_q.argmax(1) == yq).double().mean().item()
    out = {
        w: KnnData(fs.contiguous(), ys, fq.contiguous(), yq, 10)
        for w, fs, fq in zip(widths, feats_s, feats_q, strict=True)
    }
    return out, {"train_seconds": train_s, "test_accuracy": acc, "epochs": epochs,
                 "widths": list(widths), "n_train": n}


def describe_geometry(data: KnnData, k: int = 30, rows: int = 200) -> dict:
    """How hard the data is for a low-precision filter: the fraction of zero features, and
    for ``rows`` queries the k-th neighbour's squared distance over ``|q|^2 + |s|^2`` (the
    filter margin scales with the latter; a small ratio means the neighbours are close
    compared with how far the points are from the origin)."""
    q = data.queries[:rows].double()
    s = data.support.double()
    dist = torch.cdist(q, s).pow_(2)
    kth, idx = dist.topk(k, dim=1, largest=False)
    scale = q.pow(2).sum(1, keepdim=True) + s.pow(2).sum(1)[idx]
    zeros = (data.support == 0).double().mean().item()
    return {"zero_fraction": zeros, "kth_dist_over_norms": (kth[:, -1:] / scale[:, -1:])
            .median().item()}
