"""The ``sym`` suite of bench_knn.py: the protocol's self-scoring (the training split against
itself, self match excluded: ``knn_vote(x, x, labels, k, self_index=arange(N))``) through
the symmetric op (docs/design.md section 13) against the general op, in each filter mode,
on clustered ReLU features (:func:`make_relu_data`), timed round-robin in the same run.

Prints per (D, mode): both times, their ratio, the useful rate of each (``2 N^2 D`` flops, the
general computation's, per second: the symmetric path counts as the speed it gives), the
canonical keys per row of each, and whether pred, dist and index are bit-identical.
"""

from __future__ import annotations

import torch
from _data import make_relu_data
from _timing import time_many

import pdepth
from pdepth import ops

SYM_SIZES = {"full": {"n": 3000, "dims": (4096, 12544)},
             "quick": {"n": 600, "dims": (512, 2048)}}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _self_vote(x, labels, k, filter, symmetric: bool):
    """The self-scoring call on the symmetric op (every D and format: the dispatch rule of
    pdepth.ops is what this measures) or on the general op."""
    def run():
        saved = ops.SYMMETRIC, ops.SYMMETRIC_MIN_D, ops.SYMMETRIC_FILTERS
        ops.SYMMETRIC, ops.SYMMETRIC_MIN_D, ops.SYMMETRIC_FILTERS = symmetric, 0, ops.FILTERS
        try:
            return pdepth.knn_vote(x, x, labels, k, self_index=torch.arange(x.shape[0]),
                                   filter=filter)
        finally:
            ops.SYMMETRIC, ops.SYMMETRIC_MIN_D, ops.SYMMETRIC_FILTERS = saved
    return run


def _keys_per_row(fn, n: int) -> float:
    pdepth.knn_stats(reset=True)
    fn()
    return pdepth.knn_stats()["candidates"] / n


def run_sym_suite(sizes: str, filters, repeat: int, k: int) -> tuple[list[dict], bool]:
    """``(rows, all identical)`` of the suite at ``sizes`` ("full" or "quick")."""
    cfg = SYM_SIZES["quick" if sizes == "quick" else "full"]
    n, rows, ok = cfg["n"], [], True
    for d in cfg["dims"]:
        data = make_relu_data(n, 1, d)
        x, labels = data.support, data.labels
        for f in filters:
            fns = {"general": _self_vote(x, labels, k, f, False),
                   "symmetric": _self_vote(x, labels, k, f, True)}
            t = time_many(fns, repeat=repeat)
            g, s = t["general"].result, t["symmetric"].result
            same = (torch.equal(g.pred, s.pred) and torch.equal(g.index, s.index)
                    and torch.equal(_bits(g.dist), _bits(s.dist)))
            ok &= same
            tg, ts = t["general"].median, t["symmetric"].median
            rows.append({"n": n, "d": d, "filter": f, "general_s": tg, "symmetric_s": ts,
                         "ratio": ts / tg,
                         "general_gflops": 2 * n * n * d / tg / 1e9,
                         "symmetric_gflops": 2 * n * n * d / ts / 1e9,
                         "keys_general": _keys_per_row(fns["general"], n),
                         "keys_symmetric": _keys_per_row(fns["symmetric"], n),
                         "identical": same})
            print(f"  sym N={n} D={d} {f}: general {tg:.3f}s, symmetric {ts:.3f}s "
                  f"({ts / tg:.2f}x){'' if same else '  NOT IDENTICAL'}", flush=True)
    return rows, ok


def sym_table(rows: list[dict]) -> str:
    head = ("| N | D | filter | general s | symmetric s | sym / general | general GFLOP/s | "
            "symmetric GFLOP/s (useful) | keys/row general | keys/row sym | identical |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['d']} | {r['filter']} | {r['general_s']:.3f} | "
            f"{r['symmetric_s']:.3f} | {r['ratio']:.2f} | {r['general_gflops']:.0f} | "
            f"{r['symmetric_gflops']:.0f} | {r['keys_general']:.1f} | "
            f"{r['keys_symmetric']:.1f} | {'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines)
