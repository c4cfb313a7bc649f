"""Shared helpers of the pdepth benchmarks: data, baselines, timing, machine info, tables.

The benchmark scripts (``bench_*.py``) and the pytest-benchmark suites (``test_bench_*.py``)
import this module; it holds the one copy of every baseline so that all of them time the
same code.

Baselines follow the k-NN rules of design.md section 2 (squared L2, uniform vote, ties to
the lowest class), so their predictions can be compared with pdepth's.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The scripts run as ``python benchmarks/bench_*.py`` put only benchmarks/ on sys.path; make
# the working tree's pdepth importable when it is built in place but not installed (the
# scripts import pdepth after this module).
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


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
    size: int, device: str | torch.device = "cpu", dtype=torch.float32
) -> Callable[[], torch.Tensor]:
    """A ``torch.matmul`` of two ``size`` x ``size`` matrices into a preallocated output
    (2*size^3 flops), to time next to the k-NN methods as their roofline.

    On CUDA the caller decides about TF32 (``torch.backends.cuda.matmul.allow_tf32``)."""
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn((size, size), generator=gen, dtype=dtype, device=device)
    b = torch.randn((size, size), generator=gen, dtype=dtype, device=device)
    out = torch.empty((size, size), dtype=dtype, device=device)
    return lambda: torch.matmul(a, b, out=out)


def matmul_gflops(
    size: int, repeat: int = 3, device: str | torch.device = "cpu", dtype=torch.float32
) -> float:
    """``torch.matmul`` rate on ``size``^3 (GFLOP/s from the median time)."""
    timing = time_fn(matmul_fn(size, device, dtype), repeat=repeat, device=device)
    return 2.0 * size**3 / timing.median / 1e9


class OtherLoad:
    """Measures how busy the machine was with *other* processes while a block ran: the CPU
    time of the whole system (``/proc/stat``) minus this process's own, as a fraction of all
    usable CPUs over the wall time. 0.0 is a quiet machine; 0.5 on 2 cores means another
    process took about one core. ``None`` where ``/proc/stat`` is missing.

        with OtherLoad() as load:
            ...
        load.fraction
    """

    fraction: float | None = None

    @staticmethod
    def _system_busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> OtherLoad:
        self._busy, self._own0, self._t0 = self._system_busy(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = self._system_busy()
        wall = time.perf_counter() - self._t0
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (self._own() - self._own0)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.fraction = max(0.0, others / (wall * (cpus or 1)))


def knn_gflops(m: int, n: int, d: int, seconds: float) -> float:
    """Useful k-NN rate: the 2*M*N*D flops of the cross term per second, in GFLOP/s."""
    return 2.0 * m * n * d / seconds / 1e9


# ---------------------------------------------------------------------------------------
# Targets and tables
# ---------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
}


def check(value: float | None, op: str, threshold: float) -> str:
    """``"PASS"`` / ``"FAIL"`` for ``value op threshold``; ``"n/a"`` without a value."""
    if value is None:
        return "n/a"
    return "PASS" if _OPS[op](value, threshold) else "FAIL"


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (``-`` for None)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table with padded columns (readable as plain text too). Numbers are
    right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(_looks_numeric(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]

    def line(row):
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if num else ":" + "-" * (w + 1)
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _looks_numeric(text: str) -> bool:
    text = text.rstrip("%x").replace(",", "")
    if text in ("-", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    import numpy

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("faiss", "sklearn"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = "not installed"
    return out


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU / GPU, threads, versions, pdepth build, load."""
    import pdepth

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(),
        "pdepth_backend": pdepth.backend(device),
        "pdepth_build": pdepth.build_info(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if info["versions"]["faiss"] != "not installed":
        import faiss

        info["faiss_threads"] = faiss.omp_get_max_threads()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_sms"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """The lines of :func:`machine_info` a benchmark prints above its numbers."""
    v = info["versions"]
    lines = []
    if "gpu" in info:
        lines.append(
            f"GPU: {info['gpu']} ({info['gpu_memory_gib']} GiB, {info['gpu_sms']} SMs), "
            f"CUDA {info['cuda']}"
        )
    lines += [
        f"CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs"
        + (f" ({info['physical_cores']} physical)" if info.get("physical_cores") else "")
        + f", {info['usable_cpus']} usable"
        + (f", {info['memory_gib']} GiB RAM" if "memory_gib" in info else ""),
        f"threads: torch {info['torch_threads']}"
        + (f", faiss {info['faiss_threads']}" if "faiss_threads" in info else ""),
        f"load average at start (1/5/15 min): {info['load_average']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"pdepth backend: {info['pdepth_backend']}, build: {info['pdepth_build']}",
    ]
    return "\n".join(lines)
