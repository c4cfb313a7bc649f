"""What the numbers were measured on (CPU / GPU, threads, versions, pdepth's build) and how
busy the machine was with other processes while a benchmark ran (:class:`OtherLoad`);
docs/design.md section 5."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch


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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU flags that decide the k-NN filter's GEMM (docs/design.md section 6).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_id() -> str:
    """Vendor, family, model and stepping from ``/proc/cpuinfo`` (a virtual machine's model
    name is often generic, e.g. "AMD EPYC"); empty where it is missing."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return ""
    keys = ("vendor_id", "cpu family", "model", "stepping")
    return ", ".join(f"{k} {fields[k]}" for k in keys if k in fields)


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` ``/proc/cpuinfo`` lists (empty where it is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return {flag: flag in have for flag in CPU_FLAGS}
    except OSError:
        pass
    return {}


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
        "cpu_id": cpu_id(),
        "cpu_flags": cpu_flags(),
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
        f"CPU: {info['cpu']}"
        + (f" ({info['cpu_id']})" if info.get("cpu_id") else "")
        + f", {info['logical_cpus']} logical CPUs"
        + (f" ({info['physical_cores']} physical)" if info.get("physical_cores") else "")
        + f", {info['usable_cpus']} usable"
        + (f", {info['memory_gib']} GiB RAM" if "memory_gib" in info else ""),
        "CPU flags: "
        + (", ".join(f"{f} {'yes' if v else 'no'}" for f, v in info.get("cpu_flags", {}).items())
           or "unknown"),
        f"threads: torch {info['torch_threads']}"
        + (f", faiss {info['faiss_threads']}" if "faiss_threads" in info else ""),
        f"load average at start (1/5/15 min): {info['load_average']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"pdepth backend: {info['pdepth_backend']}, build: {info['pdepth_build']}",
    ]
    return "\n".join(lines)
