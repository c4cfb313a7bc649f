"""Bad arguments to the k-NN ops raise ValueError (RuntimeError for a device mismatch) with a
message that names the offending argument or value."""

from __future__ import annotations

import pytest
import torch

import pdepth

I64 = torch.int64


def _data(device, m=4, n=6, d=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m, d, generator=g).to(device=device, dtype=dtype)
    s = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    return q, s


# (id, call(device), match): each call must raise ValueError matching `match`.
KNN_CASES = [
    ("dim-mismatch",
     lambda dev: pdepth.knn(*_data(dev)[:1], _data(dev, d=4)[1], 2),
     r"same dimension D.*queries \[4, 3\].*support \[6, 4\]"),
    ("dtype-mismatch",
     lambda dev: pdepth.knn(_data(dev)[0], _data(dev)[1].double(), 2),
     r"same dtype.*queries Float and support Double"),
    ("half-vs-float",
     lambda dev: pdepth.knn(_data(dev)[0].half(), _data(dev)[1], 2),
     r"same dtype.*queries Half and support Float"),
    ("queries-1d",
     lambda dev: pdepth.knn(_data(dev)[0][0], _data(dev)[1], 2),
     r"queries must be 2-D \[M, D\], got shape \[3\]"),
    ("queries-3d",
     lambda dev: pdepth.knn(_data(dev)[0][None], _data(dev)[1], 2),
     r"queries must be 2-D \[M, D\], got shape \[1, 4, 3\]"),
    ("support-1d",
     lambda dev: pdepth.knn(_data(dev)[0], _data(dev)[1][:, 0], 2),
     r"support must be 2-D \[N, D\], got shape \[6\]"),
    ("int-queries",
     lambda dev: pdepth.knn(_data(dev)[0].long(), _data(dev)[1].long(), 2),
     r"queries must be float16, bfloat16, float32 or float64, got Long"),
    ("int-support",
     lambda dev: pdepth.knn(_data(dev)[0], _data(dev)[1].int(), 2),
     r"same dtype.*support Int"),
    ("k-zero",
     lambda dev: pdepth.knn(*_data(dev), 0),
     r"k must be >= 1, got k=0"),
    ("k-negative",
     lambda dev: pdepth.knn(*_data(dev), -3),
     r"k must be >= 1, got k=-3"),
    ("k-above-n",
     lambda dev: pdepth.knn(*_data(dev), 7, self_match="include"),
     r"k=7 is larger than the usable support: 6 points"),
    ("k-above-n-minus-self",
     lambda dev: pdepth.knn(*_data(dev), 6,
                            self_index=torch.tensor([-1, 2, -1, -1], device=dev)),
     r"k=6 is larger than the usable support: 6 points, 1 excluded as the self match"),
    ("k-above-n-drop-nearest",
     lambda dev: pdepth.knn(*_data(dev), 6, self_match="drop_nearest"),
     r"k=6 \(\+1 dropped nearest\) is larger than the usable support: 6 points"),
    ("self-index-below-minus-1",
     lambda dev: pdepth.knn(*_data(dev), 2, self_index=torch.tensor([0, -2, 1, 1], device=dev)),
     r"self_index values must be >= -1.*got -2"),
    ("self-index-equals-n",
     lambda dev: pdepth.knn(*_data(dev), 2, self_index=torch.tensor([0, 6, 1, 1], device=dev)),
     r"self_index value 6 is out of range for a support set of 6 points"),
    ("self-index-beyond-offset-n",
     lambda dev: pdepth.knn(*_data(dev), 2, offset=10,
                            self_index=torch.tensor([0, 16, 1, 1], device=dev)),
     r"self_index value 16 is out of range.*valid: -1 or 0\.\.15"),
    ("self-index-wrong-length",
     lambda dev: pdepth.knn(*_data(dev), 2, self_index=torch.tensor([0, 1], device=dev)),
     r"self_index must be 1-D with one entry per query \(4\), got shape \[2\]"),
    ("self-index-float",
     lambda dev: pdepth.knn(*_data(dev), 2, self_index=torch.zeros(4, device=dev)),
     r"self_index must be an integer tensor, got torch.float32"),
    ("nan-in-queries",
     lambda dev: pdepth.knn(_data(dev)[0].index_fill(0, torch.tensor([2], device=dev),
                                                     float("nan")),
                            _data(dev)[1], 2),
     r"queries contains NaN or Inf \(first at row 2\)"),
    ("inf-in-support",
     lambda dev: pdepth.knn(_data(dev)[0],
                            _data(dev)[1].index_fill(0, torch.tensor([5], device=dev),
                                                     float("inf")), 2),
     r"support contains NaN or Inf \(first at row 5\)"),
    ("neg-inf-in-support-half",
     lambda dev: pdepth.knn(_data(dev)[0].half(),
                            _data(dev)[1].half().index_fill(0, torch.tensor([1], device=dev),
                                                            float("-inf")), 2),
     r"support contains NaN or Inf \(first at row 1\)"),
    ("square-overflow",
     lambda dev: pdepth.knn(_data(dev)[0] * 1e20, _data(dev)[1], 2),
     r"queries contains NaN or Inf .*or values whose squares overflow"),
    ("bad-self-match",
     lambda dev: pdepth.knn(*_data(dev), 2, self_match="skip"),
     r"self_match must be one of \('exclude', 'include', 'drop_nearest'\), got 'skip'"),
    ("prev-wrong-k",
     lambda dev: pdepth.knn(*_data(dev), 2, prev=pdepth.empty_topk(4, 3, device=dev)),
     r"prev distances must have shape \[4, 2\], got \[4, 3\]"),
    ("prev-wrong-m",
     lambda dev: pdepth.knn(*_data(dev), 2, prev=pdepth.empty_topk(5, 2, device=dev)),
     r"prev distances must have shape \[4, 2\], got \[5, 2\]"),
    ("prev-index-wrong-shape",
     lambda dev: pdepth.knn(*_data(dev), 2,
                            prev=(pdepth.empty_topk(4, 2, device=dev).dist,
                                  torch.full((4, 3), -1, dtype=I64, device=dev))),
     r"prev indices must have shape \[4, 2\], got \[4, 3\]"),
    ("prev-dist-dtype",
     lambda dev: pdepth.knn(*_data(dev), 2,
                            prev=pdepth.empty_topk(4, 2, dtype=torch.float64, device=dev)),
     r"prev distances must be Float for Float inputs, got Double"),
    ("prev-dist-dtype-half",
     lambda dev: pdepth.knn(*_data(dev, dtype=torch.half), 2,
                            prev=pdepth.empty_topk(4, 2, dtype=torch.half, device=dev)),
     r"prev distances must be Float for Half inputs, got Half"),
    ("prev-index-dtype",
     lambda dev: pdepth.knn(*_data(dev), 2,
                            prev=(pdepth.empty_topk(4, 2, device=dev).dist,
                                  torch.full((4, 2), -1, dtype=torch.int32, device=dev))),
     r"prev indices must be int64, got Int"),
    ("drop-nearest-with-prev",
     lambda dev: pdepth.knn(*_data(dev), 2, self_match="drop_nearest",
                            prev=pdepth.empty_topk(4, 3, device=dev)),
     r"streaming \(prev\) is not supported with self_match='drop_nearest'"),
    ("negative-offset",
     lambda dev: pdepth.knn(*_data(dev), 2, offset=-1),
     r"offset must be >= 0, got offset=-1"),
]

RAW_CASES = [
    ("raw-skip-2",
     lambda dev: torch.ops.pdepth.knn(*_data(dev), 2, None, 2, None, None, 0),
     r"skip must be 0 or 1, got 2"),
    ("raw-prev-dist-only",
     lambda dev: torch.ops.pdepth.knn(*_data(dev), 2, None, 0,
                                      torch.zeros(4, 2, device=dev), None, 0),
     r"prev needs both the distances and the indices"),
    ("raw-self-index-int32",
     lambda dev: torch.ops.pdepth.knn(*_data(dev), 2, torch.zeros(4, dtype=torch.int32,
                                                                  device=dev), 0, None, None, 0),
     r"self_index must be int64, got Int"),
    ("raw-knn-vote-labels-int32",
     lambda dev: torch.ops.pdepth.knn_vote(*_data(dev), torch.zeros(6, dtype=torch.int32,
                                                                    device=dev), 2, 3, None, 0),
     r"support_labels must be int64, got Int"),
    ("raw-vote-int32",
     lambda dev: torch.ops.pdepth.vote(torch.zeros(3, 2, dtype=torch.int32, device=dev), 3),
     r"neighbor_labels must be int64, got Int"),
    # The ops' own check (not only the Python entry points'): the counts are sized by it.
    ("raw-knn-vote-num-classes-above-max",
     lambda dev: torch.ops.pdepth.knn_vote(*_data(dev), torch.zeros(6, dtype=I64, device=dev),
                                           2, 2**40, None, 0),
     r"^knn_vote\(\): num_classes=1099511627776 exceeds the limit of MAX_CLASSES=16777216"),
    ("raw-vote-num-classes-above-max",
     lambda dev: torch.ops.pdepth.vote(torch.zeros(3, 2, dtype=I64, device=dev), 2**24 + 1),
     r"^vote\(\): num_classes=16777217 exceeds the limit of MAX_CLASSES=16777216"),
]

VOTE_CASES = [
    ("knn-vote-label-too-large",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.tensor([0, 1, 2, 3, 0, 1], device=dev), 2,
                                 3),
     r"support_labels must lie in \[0, num_classes=3\), got values in \[0, 3\]"),
    ("knn-vote-label-negative",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.tensor([0, 1, -1, 1, 0, 1], device=dev),
                                 2),
     r"support_labels must lie in \[0, num_classes=2\), got values in \[-1, 1\]"),
    ("knn-vote-labels-wrong-length",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.tensor([0, 1, 1], device=dev), 2, 3),
     r"support_labels must be 1-D with 6 entries, got shape \[3\]"),
    ("knn-vote-labels-float",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.zeros(6, device=dev), 2, 3),
     r"support_labels must be an integer tensor, got torch.float32"),
    ("knn-vote-num-classes-zero",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.zeros(6, dtype=I64, device=dev), 2, 0),
     r"num_classes must be >= 1, got 0"),
    ("knn-vote-k-above-n",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.zeros(6, dtype=I64, device=dev), 7, 2,
                                 self_match="include"),
     r"knn_vote\(\): k=7 is larger than the usable support: 6 points"),
    ("knn-vote-k-above-n-minus-self",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.zeros(6, dtype=I64, device=dev), 6, 2,
                                 self_index=torch.tensor([3, -1, -1, -1], device=dev)),
     r"k=6 is larger than the usable support: 6 points, 1 excluded as the self match"),
    ("knn-vote-bad-self-match",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.zeros(6, dtype=I64, device=dev), 2, 2,
                                 self_match="Exclude"),
     r"self_match must be one of .*got 'Exclude'"),
    ("knn-vote-nan",
     lambda dev: pdepth.knn_vote(_data(dev)[0] * float("nan"), _data(dev)[1],
                                 torch.zeros(6, dtype=I64, device=dev), 2, 2),
     r"queries contains NaN or Inf"),
    ("knn-vote-dim-mismatch",
     lambda dev: pdepth.knn_vote(_data(dev)[0], _data(dev, d=5)[1],
                                 torch.zeros(6, dtype=I64, device=dev), 2, 2),
     r"knn_vote\(\): queries and support must have the same dimension D"),
    # Regression: a label such as 2**40 sized the vote's counts by it (std::bad_alloc).
    ("knn-vote-label-above-max-classes",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.tensor([0, 1, 2, 3, 0, 2**40], device=dev),
                                 2),
     r"^knn_vote\(\): support_labels holds class ids up to 1099511627776, above the limit "
     r"MAX_CLASSES=16777216 .*map the labels to 0..C-1"),
    ("knn-vote-num-classes-above-max",
     lambda dev: pdepth.knn_vote(*_data(dev), torch.zeros(6, dtype=I64, device=dev), 2, 2**40),
     r"^knn_vote\(\): num_classes=1099511627776 exceeds the limit of MAX_CLASSES=16777216"),
    ("vote-num-classes-above-max",
     lambda dev: pdepth.vote(torch.zeros(3, 2, dtype=I64, device=dev), 2**40),
     r"^vote\(\): num_classes=1099511627776 exceeds the limit of MAX_CLASSES=16777216"),
    ("vote-counts-num-classes-above-max",
     lambda dev: pdepth.topk.vote_counts(torch.zeros(3, 2, dtype=I64, device=dev), 2**40),
     r"^vote_counts\(\): num_classes=1099511627776 exceeds the limit"),
    ("vote-label-too-large",
     lambda dev: pdepth.vote(torch.tensor([[0, 1], [2, 3]], device=dev), 3),
     r"neighbor_labels must lie in \[0, num_classes=3\) or be -1 .*got values in \[0, 3\]"),
    ("vote-label-minus-2",  # -1 marks a missing neighbour (no vote); below that is an error
     lambda dev: pdepth.vote(torch.tensor([[1, -2]], device=dev), 3),
     r"neighbor_labels must lie in \[0, num_classes=3\) or be -1 .*got values in \[-2, 1\]"),
    ("vote-1d",
     lambda dev: pdepth.vote(torch.tensor([0, 1], device=dev), 3),
     r"neighbor_labels must be 2-D \[M, k\] with k >= 1, got shape \[2\]"),
    ("vote-k-zero",
     lambda dev: pdepth.vote(torch.zeros(3, 0, dtype=I64, device=dev), 3),
     r"neighbor_labels must be 2-D \[M, k\] with k >= 1, got shape \[3, 0\]"),
    ("vote-num-classes-zero",
     lambda dev: pdepth.vote(torch.zeros(3, 2, dtype=I64, device=dev), 0),
     r"num_classes must be >= 1, got 0"),
    ("vote-float-labels",
     lambda dev: pdepth.vote(torch.zeros(3, 2, device=dev), 2),
     r"neighbor_labels must be an integer tensor, got torch.float32"),
]

ALL_CASES = KNN_CASES + RAW_CASES + VOTE_CASES


@pytest.mark.parametrize("call,match", [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_bad_arguments_raise_value_error(device, call, match):
    with pytest.raises(ValueError, match=match):
        call(device)


def test_error_names_the_op():
    q, s = _data("cpu")
    with pytest.raises(ValueError, match=r"^knn\(\): k must be >= 1"):
        pdepth.knn(q, s, 0)
    with pytest.raises(ValueError, match=r"^knn_vote\(\): k must be >= 1"):
        pdepth.knn_vote(q, s, torch.zeros(6, dtype=I64), 0, 2)
    with pytest.raises(ValueError, match=r"^vote\(\): num_classes"):
        pdepth.vote(torch.zeros(3, 2, dtype=I64), 0)


def test_k_above_n_is_fine_for_empty_queries_and_streams():
    """With no queries there is nothing to check k against; while streaming, a chunk may hold
    fewer than k points."""
    q, s = _data("cpu")
    assert pdepth.knn(q[:0], s, 50).index.shape == (0, 50)
    out = pdepth.knn(q, s, 8, self_match="include", prev=pdepth.empty_topk(4, 8))
    assert (out.index[:, 6:] == -1).all()


def test_nan_in_one_row_is_reported_even_when_other_rows_are_fine():
    q, s = _data("cpu", m=300, n=2049)
    q[257, 1] = float("nan")
    with pytest.raises(ValueError, match=r"queries contains NaN or Inf \(first at row 257\)"):
        pdepth.knn(q, s, 3)
    q[257, 1] = 0.0
    s[1500, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"support contains NaN or Inf \(first at row 1500\)"):
        pdepth.knn(q, s, 3)


# ---- device mismatch (needs a GPU) ---------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)


@pytest.mark.cuda
@needs_cuda
def test_device_mismatch_raises_runtime_error():
    q, s = _data("cpu")
    with pytest.raises(RuntimeError, match=r"queries and support must be on the same device"):
        pdepth.knn(q.cuda(), s, 2)
    with pytest.raises(RuntimeError, match=r"queries and support must be on the same device"):
        pdepth.knn(q, s.cuda(), 2)
    with pytest.raises(RuntimeError, match=r"self_index must be on the queries' device"):
        pdepth.knn(q.cuda(), s.cuda(), 2, self_index=torch.zeros(4, dtype=I64))
    with pytest.raises(RuntimeError, match=r"prev must be on the queries' device"):
        pdepth.knn(q.cuda(), s.cuda(), 2, prev=pdepth.empty_topk(4, 2))
    with pytest.raises(RuntimeError, match=r"support_labels must be on cuda"):
        pdepth.knn_vote(q.cuda(), s.cuda(), torch.zeros(6, dtype=I64), 2, 2)
