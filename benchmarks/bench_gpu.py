"""GPU benchmark of ``pdepth.knn_vote`` in every filter mode against the plain torch pipeline
(float32, TF32 off), and the paper-scale k-NN stage.

    python benchmarks/bench_gpu.py                     # N=50000, Q=10000, k=30, D 512/4096
    python benchmarks/bench_gpu.py --quick             # sanity run, seconds
    python benchmarks/bench_gpu.py --paper-scale       # ResNet-18 unpooled widths, 60,000 x 30,000
    python benchmarks/bench_gpu.py --json out/bench_gpu.json

Times with CUDA events (median of --repeat runs after one warm-up) pdepth in each filter mode
(--filters) against ``torch.addmm`` expanded distances over query chunks +
``topk(largest=False)`` + a bincount vote, reports the float32 matmul rate at 8192^3 and
pdepth's useful rate 2*Q*N*D/t, whether every mode gives fp32's neighbours bit for bit, the
agreement with the torch pipeline's predictions and the extra peak GPU memory of each method;
the compact table is printed last. Without a CUDA device it prints a message and exits with
status 0. ``--device cpu`` runs the same code on the CPU; it exists only to test this script.

``--paper-scale``: the k-NN of one full-set model of the paper protocol on synthetic ReLU
features of the ResNet-18 unpooled probe widths (60,000 queries against the 30,000 of the
first half, self excluded, k = 30, 11 probes, 8.75e14 flop), per probe and mode: time, rate
and peak memory (the CPU took 74 min on 2 cores).

Exit status 1 when a mode's neighbours differ from fp32's, when pdepth and the torch pipeline
disagree on more than 1% of the queries, or when pdepth's CUDA path is the pure-torch
reference (unless --allow-reference).
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

FILTERS = ("fp32", "tf32", "bf16", "bf16x3", "auto")
# ResNet-18, every probe unpooled, on 28x28 inputs (benchmarks/RESULTS.md, issue 15).
PAPER_DIMS = (784, 50176, 50176, 50176, 25088, 25088, 12544, 12544, 8192, 8192, 10)
PAPER_N = 60_000

SIZES = {
    "full": {
        "n": 50_000,
        "m": 10_000,
        "dims": (512, 4096),
        "classes": (10,),
        "matmul": 8192,
        "repeat": 5,
    },
    "quick": {
        "n": 10_000,
        "m": 2_000,
        "dims": (64, 512),
        "classes": (10,),
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


def bench_case(n: int, m: int, d: int, classes: int, repeat: int, device, filters) -> dict:
    data = make_data(n, m, d, classes, seed=d + classes, device=device)
    q, s, y = data.queries, data.support, data.labels
    runs = {f: (lambda f=f: pdepth.knn_vote(q, s, y, K, classes, filter=f)) for f in filters}
    runs["torch"] = lambda: torch_pipeline_vote(
        q, s, y, K, classes, max_elements=TORCH_CHUNK_ELEMENTS
    )
    timings = time_many(runs, repeat=repeat, device=device)  # methods interleaved
    seconds = {name: t.median for name, t in timings.items()}
    pred, index = timings.pop("torch").result
    ref = timings[filters[0]].result
    out = {
        "d": d,
        "classes": classes,
        "seconds": seconds,
        "identical": {},
        "agreement": agreement(ref.pred, pred),
        "neighbours": same_neighbours(ref.index, index),
    }
    for f, t in timings.items():
        out["identical"][f] = bool(
            torch.equal(t.result.index, ref.index) and torch.equal(t.result.dist, ref.dist)
        )
    del timings, ref
    out["extra_bytes"] = {name: peak_extra_bytes(device, fn) for name, fn in runs.items()}
    out["gflops"] = {name: knn_gflops(m, n, d, sec) for name, sec in out["seconds"].items()}
    return out


def results_table(results: list[dict], matmul: float, filters) -> tuple[str, list[str]]:
    rows, bad = [], []
    mib = 2**20
    for r in results:
        if r["agreement"] < MIN_AGREEMENT:
            bad.append(
                f"D={r['d']}: predictions agree with the torch pipeline on "
                f"{r['agreement']:.4f} of the queries"
            )
        torch_s = r["seconds"]["torch"]
        for f in filters:
            if not r["identical"][f]:
                bad.append(f"D={r['d']} filter={f}: neighbours differ from {filters[0]}")
            extra = r["extra_bytes"][f]
            rows.append(
                [
                    r["d"],
                    f,
                    fmt(1e3 * r["seconds"][f]),
                    fmt(1e3 * torch_s),
                    f"{torch_s / r['seconds'][f]:.2f}x",
                    fmt(r["gflops"][f] / 1e3),
                    f"{100 * r['gflops'][f] / matmul:.0f}%",
                    "yes" if r["identical"][f] else "NO",
                    f"{r['agreement']:.4f}",
                    "-" if extra is None else f"{extra / mib:.0f}",
                    "-" if r["extra_bytes"]["torch"] is None
                    else f"{r['extra_bytes']['torch'] / mib:.0f}",
                ]
            )
    headers = [
        "D",
        "filter",
        "pdepth ms",
        "torch ms",
        "speed-up",
        "TFLOP/s",
        "% fp32 matmul",
        f"== {filters[0]}",
        "agree torch",
        "extra MiB",
        "torch MiB",
    ]
    return format_table(headers, rows), bad


def paper_scale(device, filters, json_out=None) -> int:
    """The k-NN of one full-set model on synthetic ReLU features of the paper's probe widths:
    60,000 queries against the first 30,000 (self excluded), k = 30, per probe and mode."""
    half = PAPER_N // 2
    self_index = torch.cat([torch.arange(half), torch.full((PAPER_N - half,), -1)]).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    results, total = [], {f: 0.0 for f in filters}
    for p, d in enumerate(PAPER_DIMS):
        x = torch.randn(PAPER_N, d, device=device, generator=gen).relu_()
        ref = None
        for f in filters:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            out = pdepth.knn(x, x[:half], K, self_index=self_index, filter=f)
            t1.record()
            torch.cuda.synchronize(device)
            sec = t0.elapsed_time(t1) / 1e3
            peak = torch.cuda.max_memory_allocated(device) - before
            same = ref is None or bool(torch.equal(out.index, ref.index))
            ref = out if ref is None else ref
            total[f] += sec
            flop = 2.0 * PAPER_N * half * d
            results.append({"probe": p, "d": d, "filter": f, "seconds": sec,
                            "tflops": flop / sec / 1e12, "extra_bytes": peak, "identical": same})
            print(f"  probe {p} D={d} {f}: {sec:.2f} s, {flop / sec / 1e12:.1f} TFLOP/s, "
                  f"extra {peak / 2**20:.0f} MiB, == {filters[0]}: {same}", flush=True)
        del x, ref, out
        torch.cuda.empty_cache()
    rows = [[r["probe"], r["d"], r["filter"], f"{r['seconds']:.2f}", f"{r['tflops']:.1f}",
             f"{r['extra_bytes'] / 2**20:.0f}", "yes" if r["identical"] else "NO"]
            for r in results]
    print()
    print(f"## {torch.cuda.get_device_name(device)}: paper-scale k-NN stage, {PAPER_N} queries x "
          f"{half} support, k={K}, 11 probes (8.75e14 flop)")
    print(format_table(["probe", "D", "filter", "s", "TFLOP/s", "extra MiB", "identical"], rows))
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w") as fh:
            json.dump({"machine": machine_info(device), "results": results}, fh, indent=1)
    bad = [r for r in results if not r["identical"]]
    print("paper-scale total: " + ", ".join(f"{f} {total[f]:.1f} s" for f in filters)
          + (f"; {len(bad)} probe/mode pairs DIFFER" if bad else "; every mode identical"))
    return 1 if bad else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    p.add_argument("--repeat", type=int, help="timed runs after one warm-up (default 5)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument(
        "--filters",
        default=",".join(FILTERS),
        help=f"comma-separated filter modes, the first the reference (default {','.join(FILTERS)})",
    )
    p.add_argument(
        "--paper-scale",
        action="store_true",
        help="the paper-scale k-NN stage instead (ResNet-18 unpooled widths, 60,000 x 30,000)",
    )
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
    filters = tuple(args.filters.split(","))
    bad_filter = [f for f in filters if f not in pdepth.FILTERS]
    if bad_filter:
        print(f"bench_gpu: --filters: unknown mode {bad_filter[0]!r}; valid: {pdepth.FILTERS}")
        return 2
    if device.type == "cpu":
        filters = tuple(f for f in filters if f != "tf32")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.paper_scale:
        if device.type != "cuda":
            print("bench_gpu: --paper-scale needs a CUDA device")
            return 2
        print(describe_machine(machine_info(device)))
        return paper_scale(device, filters, args.json)
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
            r = bench_case(n, m, d, classes, repeat, device, filters)
            results.append(r)
            print(
                f"  D={d}: "
                + ", ".join(f"{f} {1e3 * sec:.2f} ms" for f, sec in r["seconds"].items()),
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()

    table, bad = results_table(results, matmul, filters)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "config": {**cfg, "k": K, "repeat": repeat, "dtype": "float32",
                               "filters": list(filters)},
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
        f"## {card}: pdepth knn_vote (each filter) vs torch addmm+topk+vote, float32, N={n}, Q={m}, "
        f"k={K}; matmul {cfg['matmul']}^3 = {matmul / 1e3:.2f} TFLOP/s"
    )
    print(table)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
