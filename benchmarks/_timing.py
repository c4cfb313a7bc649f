"""Timing of the benchmarks: interleaved repeated runs (:func:`time_many`), CUDA events on
the GPU, the matmul roofline and useful k-NN rates."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Seconds of ``repeat`` timed runs (after the warm-up) and the last run's result."""

    times: list[float]
    result: Any = field(default=None, repr=False)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the runs were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def _timed_call(fn: Callable[[], Any], cuda: bool) -> tuple[float, Any]:
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        result = fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3, result
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def time_many(
    fns: dict[str, Callable[[], Any]],
    repeat: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, Timing]:
    """Times several functions round-robin: ``warmup`` untimed rounds, then ``repeat``
    timed rounds, each round calling every function once. Interleaving spreads background
    load over all of them, so ratios stay meaningful on a noisy machine.

    On CUDA each call is timed with CUDA events around it (after a synchronise); elsewhere
    with ``time.perf_counter``. Each :class:`Timing` keeps the last call's result."""
    cuda = torch.device(device).type == "cuda"
    timings = {name: Timing([]) for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            seconds, result = _timed_call(fn, cuda)
            timings[name].times.append(seconds)
            timings[name].result = result
    return timings


def time_fn(
    fn: Callable[[], Any],
    repeat: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> Timing:
    """:func:`time_many` for one function."""
    return time_many({"fn": fn}, repeat, warmup, device)["fn"]


def matmul_fn(
    size: int, device: str | torch.device = "cpu", dtype=torch.float32, *,
    shape: tuple[int, int, int] | None = None,
) -> Callable[[], torch.Tensor]:
    """A ``torch.matmul`` of ``[M, K] x [K, N]`` (``shape``; default ``size`` cubed) into a
    preallocated output (2 M K N flops), to time next to the k-NN methods as their roofline.

    The right operand is the transpose of a row-major ``[N, K]`` (the k-NN's ``q @ s.T``):
    on a CPU without AVX512-BF16 or AMX, torch multiplies a row-major ``[K, N]`` bfloat16
    operand in a scalar loop (0.4 GFLOP/s on the 2-core AVX2 EPYC, minutes per 4096^3 call)
    and the transposed one at 19.5 GFLOP/s. On CUDA the caller decides about TF32
    (``torch.backends.cuda.matmul.allow_tf32``)."""
    m, k, n = shape if shape is not None else (size, size, size)
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn((m, k), generator=gen, dtype=dtype, device=device)
    b = torch.randn((n, k), generator=gen, dtype=dtype, device=device)
    out = torch.empty((m, n), dtype=dtype, device=device)
    return lambda: torch.matmul(a, b.t(), out=out)


def matmul_gflops(
    size: int, repeat: int = 3, device: str | torch.device = "cpu", dtype=torch.float32
) -> float:
    """``torch.matmul`` rate on ``size``^3 (GFLOP/s from the median time)."""
    timing = time_fn(matmul_fn(size, device, dtype), repeat=repeat, device=device)
    return 2.0 * size**3 / timing.median / 1e9


def knn_gflops(m: int, n: int, d: int, seconds: float) -> float:
    """Useful k-NN rate: the 2*M*N*D flops of the cross term per second, in GFLOP/s."""
    return 2.0 * m * n * d / seconds / 1e9
