"""GPU benchmark of ``pdepth.knn_vote`` against the plain torch pipeline (float32, TF32 off).

    python benchmarks/bench_gpu.py                     # N=50000, Q=10000, D 64/512/4096
    python benchmarks/bench_gpu.py --quick             # sanity run, seconds
    python benchmarks/bench_gpu.py --json out/bench_gpu.json

Times with CUDA events (median of --repeat runs after one warm-up) pdepth against
``torch.addmm`` expanded distances over query chunks + ``topk(largest=False)`` + a bincount
vote, reports the float32 matmul rate at 8192^3 and pdepth's useful rate 2*Q*N*D/t, the
agreement of the predictions and the extra peak GPU memory of each method; the compact
table is printed last. Without a CUDA device it prints a message and exits with status 0.
``--device cpu`` runs the same code on the CPU; it exists only to test this script.

Exit status 1 when pdepth and the torch pipeline disagree on more than 1% of the queries,
or when pdepth's CUDA path is the pure-torch reference (unless --allow-reference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import _repo  # noqa: F401  (the working tree's pdepth, before `import pdepth`)
import torch
from _baselines import agreement, same_neighbours, torch_pipeline_vote
from _data import make_data
from _machine import describe_machine, machine_info
from _tables import fmt, format_table
from _timing import knn_gflops, matmul_gflops, time_many

import pdepth

K = 30
MIN_AGREEMENT = 0.99
# Distances the torch pipeline materialises per query chunk (2**28 float32 = 1 GiB).
TORCH_CHUNK_ELEMENTS = 2**28

SIZES = {
    "full": {
        "n": 50_000,
        "m": 10_000,
        "dims": (64, 512, 4096),
        "classes": (10, 100),
        "matmul": 8192,
        "repeat": 5,
    },
    "quick": {
        "n": 10_000,
        "m": 2_000,
        "dims": (64, 512),
        "classes": (10, 100),
        "matmul": 2048,
        "repeat": 2,
    },
}


def peak_extra_bytes(device: torch.device, fn) -> int | None:
    """Extra peak allocated GPU memory of one ``fn()`` over what was allocated before
    (None on the CPU, where it is not measured)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def bench_case(n: int, m: int, d: int, classes: int, repeat: int, device) -> dict:
    data = make_data(n, m, d, classes, seed=d + classes, device=device)
    q, s, y = data.queries, data.support, data.labels
    runs = {
        "pdepth": lambda: pdepth.knn_vote(q, s, y, K, classes),
        "torch": lambda: torch_pipeline_vote(
            q, s, y, K, classes, max_elements=TORCH_CHUNK_ELEMENTS
        ),
    }
    timings = time_many(runs, repeat=repeat, device=device)
    vote = timings["pdepth"].result
    pred, index = timings["torch"].result
    del timings["pdepth"].result, timings["torch"].result
    extra = {name: peak_extra_bytes(device, fn) for name, fn in runs.items()}
    out = {
        "d": d,
        "classes": classes,
        "seconds": {name: t.median for name, t in timings.items()},
        "times": {name: t.times for name, t in timings.items()},
        "agreement": agreement(vote.pred, pred),
        "neighbours": same_neighbours(vote.index, index),
        "extra_bytes": extra,
    }
    out["ratio"] = out["seconds"]["pdepth"] / out["seconds"]["torch"]
    out["gflops"] = {name: knn_gflops(m, n, d, sec) for name, sec in out["seconds"].items()}
    return out


def results_table(results: list[dict], matmul: float) -> tuple[str, list[str]]:
    rows, bad = [], []
    mib = 2**20
    for r in results:
        agree = f"{r['agreement']:.4f} / {r['neighbours']:.4f}"
        if r["agreement"] < MIN_AGREEMENT:
            agree += " MISMATCH"
            bad.append(
                f"D={r['d']} classes={r['classes']}: predictions agree on "
                f"{r['agreement']:.4f} of the queries"
            )
        rows.append(
            [
                r["d"],
                r["classes"],
                fmt(1e3 * r["seconds"]["pdepth"]),
                fmt(1e3 * r["seconds"]["torch"]),
                f"{r['ratio']:.3f}",
                fmt(r["gflops"]["pdepth"] / 1e3),
                f"{100 * r['gflops']['pdepth'] / matmul:.1f}%",
                fmt(r["gflops"]["torch"] / 1e3),
                f"{100 * r['gflops']['torch'] / matmul:.1f}%",
                agree,
                " / ".join(
                    "-" if r["extra_bytes"][name] is None else f"{r['extra_bytes'][name] / mib:.0f}"
                    for name in ("pdepth", "torch")
                ),
            ]
        )
    headers = [
        "D",
        "classes",
        "pdepth ms",
        "torch ms",
        "pdepth/torch",
        "pdepth TFLOP/s",
        "pdepth % matmul",
        "torch TFLOP/s",
        "torch % matmul",
        "agree pred / nbrs",
        "extra MiB pdepth / torch",
    ]
    return format_table(headers, rows), bad


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    p.add_argument("--repeat", type=int, help="timed runs after one warm-up (default 5)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument(
        "--device", default="cuda", help="torch device (default cuda; 'cpu' only tests this script)"
    )
    p.add_argument(
        "--allow-reference",
        action="store_true",
        help="run even if pdepth uses the pure-torch reference on this device",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device available (torch.cuda.is_available() is False); "
            "nothing to benchmark."
        )
        return 0
    if pdepth.backend(device) != "extension" and not args.allow_reference:
        print(
            f"bench_gpu: pdepth runs the pure-torch reference on {device} "
            f"(build: {pdepth.build_info()}); rebuild with FORCE_CUDA=1, or pass "
            "--allow-reference to time the reference anyway."
        )
        return 1
    cfg = SIZES["quick" if args.quick else "full"]
    repeat = args.repeat or cfg["repeat"]
    n, m = cfg["n"], cfg["m"]
    # Plain float32 everywhere: no TF32 in the baseline's matmul nor in the roofline.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    info = machine_info(device)
    print(
        f"# pdepth k-NN vote, {device.type.upper()}"
        + (" (script test only)" if device.type != "cuda" else "")
    )
    print(describe_machine(info))
    print(
        f"dtype float32 (TF32 off), N={n} support, Q={m} queries, k={K}, "
        f"classes {list(cfg['classes'])}, D in {list(cfg['dims'])}; data: Gaussian blobs"
    )
    timer = "CUDA events" if device.type == "cuda" else "perf_counter"
    print(
        f"median of {repeat} runs after 1 warm-up ({timer}, methods interleaved); the torch "
        f"pipeline chunks queries to at most {TORCH_CHUNK_ELEMENTS} distances"
    )
    sys.stdout.flush()

    matmul = matmul_gflops(cfg["matmul"], repeat=repeat, device=device)
    print(f"torch.matmul {cfg['matmul']}^3 float32: {matmul / 1e3:.2f} TFLOP/s", flush=True)
    results = []
    for d in cfg["dims"]:
        for classes in cfg["classes"]:
            r = bench_case(n, m, d, classes, repeat, device)
            results.append(r)
            print(
                f"  D={d} classes={classes}: pdepth {1e3 * r['seconds']['pdepth']:.2f} ms, "
                f"torch {1e3 * r['seconds']['torch']:.2f} ms",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()

    table, bad = results_table(results, matmul)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "config": {**cfg, "k": K, "repeat": repeat, "dtype": "float32", "tf32": False},
                    "matmul_gflops": matmul,
                    "results": results,
                },
                f,
                indent=1,
            )
    for line in bad:
        print("MISMATCH:", line)
    card = info.get("gpu", info["cpu"])
    print()
    print(
        f"## {card}: pdepth knn_vote vs torch addmm+topk+vote, float32, N={n}, Q={m}, "
        f"k={K}; matmul {cfg['matmul']}^3 = {matmul / 1e3:.2f} TFLOP/s"
    )
    print(table)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
