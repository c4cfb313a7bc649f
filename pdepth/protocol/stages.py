"""Time and peak memory per stage of a model's work (training, extraction, the k-NN of each
probe), for ``config.json`` and the report.

The peak is the resident set's high-water mark (``VmHWM``), reset at the start of each stage
through ``/proc/self/clear_refs`` (Linux); where that cannot be done the process's peak so
far is recorded instead, and the record says so (``peak_is_stage: false``)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from ..depth.stream import peak_rss_bytes as process_peak_rss_bytes

__all__ = ["peak_rss_bytes", "stage", "stage_peaks"]


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident set's high-water mark in bytes (since the last reset, on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process_peak_rss_bytes()  # getrusage: the process's peak, never reset


@contextmanager
def stage(record: dict):
    """Fills ``record`` with ``seconds``, ``peak_rss_bytes`` and ``peak_is_stage`` of the
    ``with`` block (also when it raises)."""
    reset = _reset_peak()
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - t0
        record["peak_rss_bytes"] = peak_rss_bytes()
        record["peak_is_stage"] = reset


def stage_peaks(models: list[dict]) -> list[int]:
    """The peak of every stage recorded in the models' ``meta["stages"]`` (the process's
    peak is their maximum: each stage resets the high-water mark)."""
    peaks = []
    for meta in models:
        for records in meta.get("stages", {}).values():
            for rec in records if isinstance(records, list) else [records]:
                peaks.append(int(rec.get("peak_rss_bytes", 0)))
    return peaks
