"""Argument conversion for the k-NN ops: Python values and array-likes to what the op schemas
take (int64 integers, int64 index tensors), and the class limit every vote shares
(:data:`MAX_CLASSES`). Otherwise conversion only: the ops' rules (ranges, shapes, devices) are
checked by the ops themselves (csrc/knn.cpp, and the fake kernels in :mod:`pdepth.ops`)."""

from __future__ import annotations

import operator

import torch

__all__ = ["MAX_CLASSES", "as_index", "check_class_ids", "check_int", "check_num_classes"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The most classes a vote takes (class ids 0 .. MAX_CLASSES - 1). A vote keeps one count per
# class, sized by the largest id (the CPU kernel one int64 per class per thread: 128 MiB at
# this cap; vote counts [M, C]), so an unmapped identifier such as 2**40 as a label would fail
# in the allocator (std::bad_alloc). 2**24 is far above any classification data set
# (ImageNet-21k has 21,841 classes); larger ids must be mapped to 0..C-1 first.
MAX_CLASSES = 2**24


def check_int(value, name: str, *, op: str | None = None, min_value: int | None = None) -> int:
    """``value`` as a Python int, for integer arguments such as ``k``, ``offset`` and
    ``num_classes``.

    Accepts Python ints, numpy integers and 0-d integer tensors (and SymInts, unchanged).
    Raises ``TypeError`` for anything else, booleans included (``k=2.7`` or ``k=True`` is a
    bug, never truncated), and ``ValueError`` when the value does not fit in int64 (the ops'
    integer type) or is below ``min_value``. ``op`` prefixes messages with ``op():``.
    """
    prefix = f"{op}(): " if op else ""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        )
        what = f"a tensor of dtype {value.dtype} and shape {list(value.shape)}"
    else:
        # bool is an int subclass and numpy's bool_ has a dtype: both are rejected.
        ok = not isinstance(value, bool) and getattr(value, "dtype", None) != "bool"
        what = f"{value!r} ({type(value).__name__})"
    if ok:
        try:
            value = operator.index(value)
        except TypeError:
            ok = False
    if not ok:
        raise TypeError(f"{prefix}{name} must be an integer, got {what}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{prefix}{name}={value} does not fit in int64")
    if min_value is not None and value < min_value:
        raise ValueError(f"{prefix}{name} must be >= {min_value}, got {name}={value}")
    return value


def as_index(t, name: str) -> torch.Tensor | None:
    """``t`` (a tensor or array-like of integers, or None) as an int64 tensor; ``ValueError``
    for floating, complex or boolean values (never truncated)."""
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.long()


def check_num_classes(num_classes: int, op: str) -> int:
    """``num_classes`` (an integer, see :func:`check_int`) unless it exceeds
    :data:`MAX_CLASSES`; values below 1 are left to the op's own message."""
    num_classes = check_int(num_classes, "num_classes", op=op)
    if num_classes > MAX_CLASSES:
        raise ValueError(f"{op}(): num_classes={num_classes} exceeds the limit of "
                         f"MAX_CLASSES={MAX_CLASSES} classes (a vote keeps one count per "
                         "class); map the labels to 0..C-1 first")
    return num_classes


def check_class_ids(labels: torch.Tensor, name: str, op: str | None = None) -> None:
    """Raises ``ValueError`` naming ``name``, its largest value and :data:`MAX_CLASSES` when
    a class id in ``labels`` is at or above the limit (the range's other rules are the
    op's)."""
    hi = int(labels.max()) if labels.numel() else -1
    if hi >= MAX_CLASSES:
        prefix = f"{op}(): " if op else ""
        raise ValueError(f"{prefix}{name} holds class ids up to {hi}, above the limit "
                         f"MAX_CLASSES={MAX_CLASSES} (ids 0..{MAX_CLASSES - 1}: a vote keeps "
                         "one count per class); map the labels to 0..C-1 first (e.g. "
                         "torch.unique(labels, return_inverse=True))")
