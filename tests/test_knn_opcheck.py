"""torch.library.opcheck on the three ops: schema (no aliasing / mutation), the fake kernels
registered in pdepth/ops.py against the real kernels, and AOT dispatch (static and dynamic
shapes)."""

from __future__ import annotations

import pytest
import torch

import pdepth  # registers torch.ops.pdepth.* and the fake kernels

# "test_autograd_registration" is left out here: opcheck skips it silently when no input
# requires grad (and these inputs don't); test_opcheck_requires_grad runs it. The ops return
# a ranking (distances of selected pairs, integer indices) and are not differentiable: their
# Autograd kernels (csrc/knn.cpp) run them below autograd, so outputs never require grad.
# "test_aot_dispatch_static" is added to the default set.
TEST_UTILS = (
    "test_schema",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)


def _data(device, m, n, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(m * 1000 + n)
    q = torch.randn(m, d, generator=g).to(device=device, dtype=dtype)
    s = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    return q, s


def _knn_args(device):
    q, s = _data(device, 129, 1025, 17)
    si = torch.randint(-1, 1025, (129,), generator=torch.Generator().manual_seed(1)).to(device)
    prev = torch.ops.pdepth.knn(q, s[:500], 30, None, 0, None, None, 0)
    q16, s16 = _data(device, 20, 40, 3, torch.float16)
    q64, s64 = _data(device, 20, 40, 3, torch.float64)
    qb, sb = _data(device, 7, 40, 3, torch.bfloat16)
    qw, sw = _data(device, 40, 1100, 300)
    return {
        "filter-fp32": (qw, sw, 10, None, 0, None, None, 0, "fp32"),
        "filter-bf16": (qw, sw, 10, None, 0, None, None, 0, "bf16"),
        "filter-bf16x3": (qw, sw, 10, None, 1, None, None, 0, "bf16x3"),
        "plain": (q, s, 30, None, 0, None, None, 0),
        "self-index": (q, s, 30, si, 0, None, None, 0),
        "drop-nearest": (q, s, 5, None, 1, None, None, 0),
        "stream": (q, s[500:], 30, si, 0, prev[0], prev[1], 500),
        "float16": (q16, s16, 4, None, 0, None, None, 0),
        "bfloat16": (qb, sb, 4, None, 0, None, None, 0),
        "float64": (q64, s64, 40, None, 0, None, None, 0),
        "no-queries": (q[:0], s, 5, None, 0, None, None, 0),
    }


def _knn_vote_args(device):
    q, s = _data(device, 129, 1025, 17)
    labels = (torch.arange(1025, device=device) * 7) % 10
    si = torch.arange(129, device=device) * 3 - 1
    return {
        "filter-bf16": (q, s, labels, 30, 10, si, 0, "bf16"),
        "plain": (q, s, labels, 30, 10, None, 0),
        "self-index": (q, s, labels, 30, 10, si, 0),
        "drop-nearest": (q, s, labels, 30, 10, None, 1),
        "no-queries": (q[:0], s, labels, 5, 10, None, 0),
    }


def _vote_args(device):
    g = torch.Generator().manual_seed(3)
    return {
        "plain": (torch.randint(0, 10, (300, 30), generator=g).to(device), 10),
        "k1": (torch.randint(0, 3, (5, 1), generator=g).to(device), 3),
        "empty": (torch.zeros(0, 4, dtype=torch.int64, device=device), 2),
    }


ARGS = {"knn": _knn_args, "knn_vote": _knn_vote_args, "vote": _vote_args}
CASES = [
    ("knn", name)
    for name in ("plain", "self-index", "drop-nearest", "stream", "float16", "bfloat16",
                 "float64", "no-queries", "filter-fp32", "filter-bf16", "filter-bf16x3")
] + [
    ("knn_vote", name)
    for name in ("plain", "self-index", "drop-nearest", "no-queries", "filter-bf16")
] + [("vote", name) for name in ("plain", "k1", "empty")]

pytestmark = pytest.mark.skipif(
    pdepth.backend() != "extension",
    reason=f"the compiled extension is not loaded: {pdepth.build_info()}",
)


@pytest.mark.parametrize("op_name,case", CASES, ids=[f"{o}-{c}" for o, c in CASES])
def test_opcheck(device, op_name, case):
    args = ARGS[op_name](device)[case]
    assert not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    op = getattr(torch.ops.pdepth, op_name).default
    torch.library.opcheck(op, args, test_utils=TEST_UTILS)


@pytest.mark.parametrize("op_name", ["knn", "knn_vote"])
def test_opcheck_requires_grad(device, op_name):
    """Inputs that require grad: an Autograd kernel is registered, and the outputs do not
    require grad (the ops are not differentiable)."""
    args = list(ARGS[op_name](device)["self-index"])
    args[0] = args[0].clone().requires_grad_()
    args[1] = args[1].clone().requires_grad_()
    op = getattr(torch.ops.pdepth, op_name).default
    torch.library.opcheck(op, tuple(args), test_utils=TEST_UTILS + ("test_autograd_registration",))
    assert not any(t.requires_grad or t.grad_fn is not None for t in op(*args))


def test_fake_kernel_shapes():
    """The fake kernels give the shapes and dtypes of the real ones (k, not k + skip)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(7, 3, dtype=torch.float16)
        s = torch.empty(11, 3, dtype=torch.float16)
        d, i = torch.ops.pdepth.knn(q, s, 4, None, 1, None, None, 0)
        assert d.shape == (7, 4) and d.dtype == torch.float32 and i.dtype == torch.int64
        p, d, i = torch.ops.pdepth.knn_vote(
            q.double(), s.double(), torch.empty(11, dtype=torch.int64), 4, 3, None, 0
        )
        assert p.shape == (7,) and d.dtype == torch.float64 and i.shape == (7, 4)
        v = torch.ops.pdepth.vote(torch.empty(5, 4, dtype=torch.int64), 3)
        assert v.shape == (5,) and v.dtype == torch.int64
