"""Regressions of the k-NN reliability issue: mixed meta/real devices, distances near
overflow, streams with fewer usable points than k, non-integral k / offset / num_classes,
and the ops' (non-)differentiability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pdepth
from pdepth import reference

I64 = torch.int64

needs_extension = pytest.mark.skipif(
    pdepth.backend() != "extension",
    reason=f"the compiled extension is not loaded: {pdepth.build_info()}",
)


def check_int(*args, **kw):
    from pdepth.ops import check_int as impl  # the shared helper other modules use

    return impl(*args, **kw)


def _data(m=5, n=20, d=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(m, d, generator=g, dtype=dtype),
            torch.randn(n, d, generator=g, dtype=dtype))


# ---- 1. mixed meta / real devices raise like any device mismatch ----------------------

META_CASES = [
    ("knn-support-meta", lambda q, s: pdepth.knn(q, s.to("meta"), 3),
     r"queries and support must be on the same device, got queries on cpu and support on meta"),
    ("knn-queries-meta", lambda q, s: pdepth.knn(q.to("meta"), s, 3),
     r"queries and support must be on the same device, got queries on meta and support on cpu"),
    ("knn-self-index-meta",
     lambda q, s: pdepth.knn(q, s, 3, self_index=torch.zeros(5, dtype=I64, device="meta")),
     r"self_index must be on the queries' device cpu, got meta"),
    ("knn-prev-meta",
     lambda q, s: pdepth.knn(q, s, 3, prev=pdepth.empty_topk(5, 3, device="meta")),
     r"prev must be on the queries' device cpu"),
    ("knn-vote-support-meta",
     lambda q, s: pdepth.knn_vote(q, s.to("meta"), torch.zeros(20, dtype=I64), 3, 2),
     r"knn_vote\(\): queries and support must be on the same device"),
    ("knn-vote-labels-meta",
     lambda q, s: pdepth.knn_vote(q, s, torch.zeros(20, dtype=I64, device="meta"), 3, 2),
     r"support_labels must be on cpu, got meta"),
    ("raw-knn-support-meta",
     lambda q, s: torch.ops.pdepth.knn(q, s.to("meta"), 3, None, 0, None, None, 0),
     r"queries and support must be on the same device"),
]


@needs_extension
@pytest.mark.parametrize("call,match", [c[1:] for c in META_CASES],
                         ids=[c[0] for c in META_CASES])
def test_mixed_meta_and_cpu_raise(call, match):
    q, s = _data()
    with pytest.raises(RuntimeError, match=match):
        call(q, s)


@needs_extension
def test_all_meta_inputs_give_meta_outputs():
    q, s = _data()
    out = pdepth.knn(q.to("meta"), s.to("meta"), 3)
    assert out.index.device.type == "meta" and out.index.shape == (5, 3)
    v = pdepth.vote(torch.zeros(5, 3, dtype=I64, device="meta"), 2)
    assert v.device.type == "meta" and v.shape == (5,)


FAKE_CASES = [
    ("dtype", lambda q, s, dev: torch.ops.pdepth.knn(q, s.double(), 3, None, 0, None, None, 0),
     r"same dtype.*queries Float and support Double"),
    ("dim", lambda q, s, dev: torch.ops.pdepth.knn(q, s[:, :3], 3, None, 0, None, None, 0),
     r"same dimension D"),
    ("k", lambda q, s, dev: torch.ops.pdepth.knn(q, s, 0, None, 0, None, None, 0),
     r"k must be >= 1, got k=0"),
    ("k-above-n", lambda q, s, dev: torch.ops.pdepth.knn(q, s, 21, None, 0, None, None, 0),
     r"k=21 is larger than the usable support: 20 points"),
    ("prev-shape",
     lambda q, s, dev: torch.ops.pdepth.knn(q, s, 3, None, 0,
                                            *pdepth.empty_topk(5, 4, device=dev), 0),
     r"prev distances must have shape \[5, 3\], got \[5, 4\]"),
    ("vote-labels-len",
     lambda q, s, dev: torch.ops.pdepth.knn_vote(q, s, torch.zeros(3, dtype=I64, device=dev),
                                                 3, 2, None, 0),
     r"support_labels must be 1-D with 20 entries"),
    ("vote-dtype",
     lambda q, s, dev: torch.ops.pdepth.vote(torch.zeros(5, 3, dtype=torch.int32, device=dev),
                                             2),
     r"neighbor_labels must be int64, got Int"),
]


@needs_extension
@pytest.mark.parametrize("dev", ["cpu", "meta"])
@pytest.mark.parametrize("call,match", [c[1:] for c in FAKE_CASES],
                         ids=[c[0] for c in FAKE_CASES])
def test_fake_kernels_check_like_the_op(dev, call, match):
    q, s = _data()
    with pytest.raises(ValueError, match=match):
        call(q.to(dev), s.to(dev), dev)


# ---- 2. distances near overflow raise, never a wrong neighbour ------------------------

OVERFLOW = [
    (torch.float32, 1.8e19, r"too large for Float squared distances"),
    (torch.float64, 1.3e154, r"too large for Double squared distances"),
]


def _overflow_data(x, dtype):
    q = torch.tensor([[x], [-x]], dtype=dtype)
    s = torch.tensor([[0.0], [x]], dtype=dtype)
    return q, s


@pytest.mark.parametrize("dtype,x,match", OVERFLOW, ids=["float32", "float64"])
def test_overflowing_distances_raise(device, dtype, x, match):
    q, s = _overflow_data(x, dtype)
    q, s = q.to(device), s.to(device)
    with pytest.raises(ValueError, match=r"knn\(\): .*" + match):
        pdepth.knn(q, s, 1)
    with pytest.raises(ValueError, match=match):
        pdepth.knn(q, s, 1, self_match="include")
    with pytest.raises(ValueError, match=r"knn_vote\(\): .*" + match):
        pdepth.knn_vote(q, s, torch.tensor([0, 1], device=device), 1, 2)
    # streaming: every chunk, whatever its own values, is checked against the queries
    run = pdepth.empty_topk(2, 1, dtype, device)
    with pytest.raises(ValueError, match=match):
        for o in range(2):
            run = pdepth.knn(q, s[o:o + 1], 1, prev=run, offset=o)
    # swapped roles: the large values in the support only
    with pytest.raises(ValueError, match=match):
        pdepth.knn(s[:1].expand(2, 1).contiguous(), torch.cat([q, s]), 1)


@pytest.mark.parametrize("dtype,x,match", OVERFLOW, ids=["float32", "float64"])
def test_reference_overflowing_distances_raise(dtype, x, match):
    q, s = _overflow_data(x, dtype)
    with pytest.raises(ValueError, match=match):
        reference.knn(q, s, 1)
    with pytest.raises(ValueError, match=match):
        reference.knn_vote(q, s, torch.tensor([0, 1]), 1, 2)
    with pytest.raises(ValueError, match=match):
        reference.knn(q, s[1:], 1, prev=pdepth.empty_topk(2, 1, dtype), offset=1)


@pytest.mark.parametrize("dtype,x", [(torch.float32, 2.0**60), (torch.float64, 2.0**508)],
                         ids=["float32", "float64"])
def test_large_but_representable_distances_are_exact(device, dtype, x):
    """Just inside the documented range: 8 * (max |q|^2 + max |s|^2) is finite."""
    q, s = _overflow_data(x, dtype)
    out = pdepth.knn(q.to(device), s.to(device), 1)
    assert out.index.cpu().tolist() == [[1], [0]]
    assert out.dist.cpu().tolist() == [[0.0], [x * x]]
    rd, ri = reference.knn(q, s, 1)
    assert ri.tolist() == [[1], [0]] and rd.tolist() == [[0.0], [x * x]]
    run = pdepth.empty_topk(2, 2, out.dist.dtype, device)
    for o in range(2):
        run = pdepth.knn(q.to(device), s[o:o + 1].to(device), 2, prev=run, offset=o)
    assert run.index.cpu().tolist() == [[1, 0], [0, 1]]


# ---- 3. streams with fewer usable points than k: -1 slots never vote ------------------


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_vote_ignores_empty_slots(device, impl):
    vote = pdepth.vote if impl == "op" else reference.vote
    nl = torch.tensor([[2, -1, -1, -1], [-1, -1, -1, -1], [1, 0, -1, 0], [-1, 2, 2, 1]],
                      device=device)
    assert vote(nl, 3).cpu().tolist() == [2, -1, 0, 2]


def test_readme_streaming_pattern_with_too_few_points(device):
    """Fewer usable points than k: the missing slots stay -1 and do not vote (before, the
    pattern ``labels[run.index]`` read index -1 as the last label)."""
    q = torch.tensor([[0.0], [10.0]], device=device)
    s = torch.tensor([[0.0], [1.0], [10.0]], device=device)
    labels = torch.tensor([0, 0, 1], device=device)
    run = pdepth.empty_topk(2, 5, device=device)
    for o in range(0, 3, 2):
        run = pdepth.knn(q, s[o:o + 2], 5, prev=run, offset=o)
    assert (run.index[:, 3:] == -1).all()
    nl = pdepth.neighbor_labels(labels, run.index)
    # 2 votes for class 0 and 1 for class 1 in both rows; the last label (1) must not count
    assert pdepth.vote(nl, 2).cpu().tolist() == [0, 0]
    assert reference.vote(nl.cpu(), 2).tolist() == [0, 0]


def test_vote_still_rejects_other_negative_labels(device):
    with pytest.raises(ValueError, match=r"got values in \[-2, 1\]"):
        pdepth.vote(torch.tensor([[1, -2]], device=device), 3)


# ---- 4. k / offset / num_classes must be integers that fit in int64 -------------------

BAD_INT_TYPE = [2.7, 3.0, True, False, np.bool_(True), torch.tensor(3.0), torch.tensor(True),
                torch.tensor([3]), "3", None]


@pytest.mark.parametrize("value", BAD_INT_TYPE, ids=repr)
def test_non_integral_k_offset_num_classes_raise_type_error(value):
    q, s = _data()
    with pytest.raises(TypeError, match=r"knn\(\): k must be an integer"):
        pdepth.knn(q, s, value)
    with pytest.raises(TypeError, match=r"knn_vote\(\): k must be an integer"):
        pdepth.knn_vote(q, s, torch.zeros(20, dtype=I64), value, 2)
    if value is not None:
        with pytest.raises(TypeError, match=r"knn\(\): offset must be an integer"):
            pdepth.knn(q, s, 3, prev=pdepth.empty_topk(5, 3), offset=value)
        with pytest.raises(TypeError, match=r"knn_vote\(\): num_classes must be an integer"):
            pdepth.knn_vote(q, s, torch.zeros(20, dtype=I64), 3, value)
        with pytest.raises(TypeError, match=r"vote\(\): num_classes must be an integer"):
            pdepth.vote(torch.zeros(5, 3, dtype=I64), value)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_k_outside_int64_raises_value_error(value):
    q, s = _data()
    with pytest.raises(ValueError, match=r"knn\(\): k=-?\d+ does not fit in int64"):
        pdepth.knn(q, s, value)
    with pytest.raises(ValueError, match=r"offset=-?\d+ does not fit in int64"):
        pdepth.knn(q, s, 3, prev=pdepth.empty_topk(5, 3), offset=value)
    with pytest.raises(ValueError, match=r"num_classes=-?\d+ does not fit in int64"):
        pdepth.vote(torch.zeros(5, 3, dtype=I64), value)


def test_int64_extremes_reach_the_op_checks():
    q, s = _data()
    with pytest.raises(ValueError, match=r"k=9223372036854775807 .*larger than the usable"):
        pdepth.knn(q, s, 2**63 - 1)
    with pytest.raises(ValueError, match=r"k=9223372036854775807 is too large"):
        pdepth.knn(q, s, 2**63 - 1, self_match="drop_nearest")
    with pytest.raises(ValueError, match=r"offset \+ N must fit in int64"):
        pdepth.knn(q, s, 3, prev=pdepth.empty_topk(5, 3), offset=2**63 - 5)


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3),
                                   torch.tensor(3, dtype=torch.int32)], ids=repr)
def test_integer_like_k_accepted(value):
    q, s = _data()
    expected = pdepth.knn(q, s, 3)
    assert torch.equal(pdepth.knn(q, s, value).index, expected.index)
    assert torch.equal(pdepth.knn_vote(q, s, torch.zeros(20, dtype=I64), value, value).index,
                       expected.index)
    assert check_int(value, "k") == 3 and type(check_int(value, "k")) is int


def test_check_int_min_value():
    assert check_int(0, "x", min_value=0) == 0
    with pytest.raises(ValueError, match=r"^f\(\): x must be >= 1, got x=0$"):
        check_int(0, "x", op="f", min_value=1)


# ---- 5. the ops are not differentiable: outputs never require grad --------------------


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_outputs_do_not_require_grad(device, impl):
    mod = pdepth if impl == "op" else reference
    q, s = _data()
    q = q.to(device).requires_grad_()
    s = s.to(device).requires_grad_()
    out = mod.knn(q, s, 3)
    assert not out[0].requires_grad and not out[1].requires_grad and out[0].grad_fn is None
    v = mod.knn_vote(q, s, torch.zeros(20, dtype=I64, device=device), 3, 2)
    assert not any(t.requires_grad for t in v)
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        out[0].sum().backward()
    run = pdepth.empty_topk(5, 3, device=device)
    run = (run[0].requires_grad_(), run[1])
    out = mod.knn(q, s, 3, prev=run)
    assert not out[0].requires_grad
