"""The code pdepth is compared with, one copy for every benchmark: the plain torch pipeline,
faiss, scikit-learn, and how to compare their outputs with pdepth's.

Baselines follow the k-NN rules of docs/design.md section 2 (squared L2, uniform vote, ties
to the lowest class), so their predictions can be compared with pdepth's.
"""

from __future__ import annotations

import torch


def torch_vote(neighbor_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform vote over ``neighbor_labels[M, k]``: one flat bincount of ``row * C + label``;
    ``argmax`` returns the first maximum, i.e. ties go to the lowest class."""
    m = neighbor_labels.shape[0]
    rows = torch.arange(m, device=neighbor_labels.device).unsqueeze(1) * num_classes
    counts = torch.bincount((neighbor_labels + rows).reshape(-1), minlength=m * num_classes)
    return counts.view(m, num_classes).argmax(1)


def torch_pipeline_vote(
    queries: torch.Tensor,
    support: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    num_classes: int,
    *,
    max_elements: int = 2**25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain torch pipeline typical user code writes: expanded distances
    ``|q|^2 - 2 q.s + |s|^2`` with ``torch.addmm`` over query chunks of at most
    ``max_elements`` distances, ``topk(largest=False)``, then :func:`torch_vote`.

    Returns ``(pred[M], index[M, k])``."""
    n = support.shape[0]
    rows = max(1, max_elements // max(n, 1))
    snorm = support.pow(2).sum(1).unsqueeze(0)
    qnorm = queries.pow(2).sum(1, keepdim=True)
    support_t = support.t()
    preds, indices = [], []
    for r0 in range(0, queries.shape[0], rows):
        dist = torch.addmm(snorm, queries[r0 : r0 + rows], support_t, alpha=-2.0)
        dist.add_(qnorm[r0 : r0 + rows])
        index = dist.topk(k, dim=1, largest=False).indices
        preds.append(torch_vote(labels[index], num_classes))
        indices.append(index)
    return torch.cat(preds), torch.cat(indices)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_vote(
    queries: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss-cpu exact search (``IndexFlatL2``: build, add, search) and :func:`torch_vote`.

    CPU float32 tensors only. Returns ``(pred[M], index[M, k])``."""
    import faiss

    index = faiss.IndexFlatL2(support.shape[1])
    index.add(support.contiguous().numpy())
    _, found = index.search(queries.contiguous().numpy(), k)
    found = torch.from_numpy(found)
    return torch_vote(labels[found], num_classes), found


def sklearn_vote(
    queries: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, k: int
) -> torch.Tensor:
    """scikit-learn ``KNeighborsClassifier(n_neighbors=k, algorithm="brute")`` fit + predict
    on the (zero-copy) numpy views. Returns ``pred[M]``."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute")
    clf.fit(support.numpy(), labels.numpy())
    return torch.from_numpy(clf.predict(queries.numpy()))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of equal entries of two prediction vectors."""
    return (a.cpu() == b.cpu()).double().mean().item()


def same_neighbours(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of queries whose k neighbour sets (index rows ``[M, k]``) are equal."""
    return (a.sort(1).values == b.sort(1).values).all(1).double().mean().item()
