"""Top-k lists (pdepth.topk): merging op outputs by the op's rule (merge_topk, used by the
streaming and sharded paths) and gathering the labels of a list with empty slots
(neighbor_labels). Streaming through the op itself: tests/test_knn.py."""

from __future__ import annotations

import pytest
import torch

import pdepth

I64 = torch.int64


def test_merge_topk_is_the_op_rule():
    """Merging per-chunk op outputs (global offsets) gives the op's result on the union."""
    g = torch.Generator().manual_seed(0)
    support = torch.randint(-2, 3, (40, 3), generator=g).float()  # many exact ties
    queries = torch.randint(-2, 3, (9, 3), generator=g).float()
    full = pdepth.knn(queries, support, 8, self_match="include")
    parts = [pdepth.knn(queries, support[a:b], 8, self_match="include",
                        prev=pdepth.empty_topk(9, 8), offset=a)
             for a, b in ((0, 3), (3, 21), (21, 40))]
    merged, order = pdepth.merge_topk(torch.cat([p.dist for p in parts], 1),
                                      torch.cat([p.index for p in parts], 1), 8,
                                      return_order=True)
    assert torch.equal(merged.dist, full.dist) and torch.equal(merged.index, full.index)
    assert torch.equal(torch.cat([p.index for p in parts], 1).gather(1, order), merged.index)



def test_merge_topk_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        pdepth.merge_topk(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="k=4"):
        pdepth.merge_topk(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 4)

def test_neighbor_labels_keeps_empty_slots(device):
    labels = torch.tensor([3, 1, 2], device=device)
    index = torch.tensor([[2, 0, -1], [-1, -1, -1], [1, 1, 0]], device=device)
    got = pdepth.neighbor_labels(labels, index)
    assert got.dtype == I64 and got.device.type == torch.device(device).type
    assert got.cpu().tolist() == [[2, 3, -1], [-1, -1, -1], [1, 1, 3]]
    empty = pdepth.neighbor_labels(labels[:0], torch.full((2, 3), -1, device=device))
    assert empty.cpu().tolist() == [[-1] * 3] * 2


@pytest.mark.parametrize("index,match", [
    ([[0, 3]], r"index must lie in \[-1, 3\) .*got values in \[0, 3\]"),
    ([[0, -2]], r"index must lie in \[-1, 3\) .*got values in \[-2, 0\]"),
])
def test_neighbor_labels_checks_the_index(index, match):
    with pytest.raises(ValueError, match=match):
        pdepth.neighbor_labels(torch.tensor([0, 1, 2]), torch.tensor(index))


def test_neighbor_labels_bad_arguments():
    with pytest.raises(ValueError, match=r"labels must be 1-D"):
        pdepth.neighbor_labels(torch.zeros(3, 1, dtype=I64), torch.zeros(2, 2, dtype=I64))
    with pytest.raises(ValueError, match=r"index must be 2-D"):
        pdepth.neighbor_labels(torch.zeros(3, dtype=I64), torch.zeros(2, dtype=I64))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor"):
        pdepth.neighbor_labels(torch.zeros(3), torch.zeros(2, 2, dtype=I64))
