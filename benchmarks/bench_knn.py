"""CPU benchmark of ``pdepth.knn_vote`` against faiss-cpu, scikit-learn and plain torch.

Prints the machine, the sizes and a table of median seconds, ratios pdepth/baseline and the
issue's targets (PASS/FAIL), the matmul roofline, the agreement of the predictions, and the
peak memory of one large call measured in a fresh subprocess.

    python benchmarks/bench_knn.py --sizes full --json out/bench_knn.json
    python benchmarks/bench_knn.py --sizes small        # smoke test, a few seconds

Exit status 1 when pdepth's predictions disagree with a baseline's on more than 1% of the
queries (a fast but wrong result); missed speed targets are reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import _repo  # noqa: F401  (the working tree's pdepth, before `import pdepth`)
import torch
from _baselines import (
    agreement,
    faiss_available,
    faiss_vote,
    same_neighbours,
    sklearn_vote,
    torch_pipeline_vote,
)
from _data import make_data
from _machine import OtherLoad, describe_machine, machine_info
from _tables import check, fmt, format_table
from _timing import knn_gflops, matmul_fn, time_many

import pdepth

K = 30
NUM_CLASSES = 10
MIN_AGREEMENT = 0.99

SIZES = {
    "full": {
        "n": 20_000,
        "m": 5_000,
        "dims": (64, 512, 2048),
        "matmul": 4096,
        "memory": {"n": 200_000, "m": 5_000, "d": 512},
    },
    "small": {
        "n": 2_000,
        "m": 500,
        "dims": (16, 64, 256),
        "matmul": 1024,
        "memory": {"n": 20_000, "m": 500, "d": 64},
    },
}

# Issue 2 targets, as (op, threshold) on pdepth_time / baseline_time.
FAISS_TARGET = {64: ("<=", 0.8)}  # any other D: <= 1.0
SKLEARN_TARGET = ("<=", 0.2)  # >= 5x faster
TORCH_TARGET = ("<", 1.0)
MATMUL_TARGET = (">=", 85.0)  # percent of the matmul rate, at the largest D
MEMORY_TARGET = ("<=", 1.5)  # total peak (inputs + extra) / inputs


def bench_dim(n: int, m: int, d: int, repeat: int, has_faiss: bool, matmul_size: int) -> dict:
    """Times pdepth, the baselines and the roofline matmul at one D, interleaved run by run;
    returns times, agreement, ratios, rates and how busy other processes kept the CPUs."""
    data = make_data(n, m, d, NUM_CLASSES, seed=d)
    q, s, y = data.queries, data.support, data.labels
    runs = {
        "pdepth": lambda: pdepth.knn_vote(q, s, y, K, NUM_CLASSES),
        "faiss": (lambda: faiss_vote(q, s, y, K, NUM_CLASSES)) if has_faiss else None,
        "sklearn": lambda: sklearn_vote(q, s, y, K),
        "torch": lambda: torch_pipeline_vote(q, s, y, K, NUM_CLASSES),
        "matmul": matmul_fn(matmul_size),
    }
    with OtherLoad() as load:
        timings = time_many({name: fn for name, fn in runs.items() if fn is not None}, repeat)
    matmul = timings.pop("matmul")
    vote = timings["pdepth"].result
    out = {"d": d, "seconds": {}, "spread": {}, "times": {}, "agreement": {}, "neighbours": {}}
    out["matmul_gflops"] = 2.0 * matmul_size**3 / matmul.median / 1e9
    out["matmul_times"] = matmul.times
    out["other_load"] = load.fraction
    for name, t in timings.items():
        out["seconds"][name] = t.median
        out["spread"][name] = t.spread
        out["times"][name] = t.times
        if name == "pdepth":
            continue
        pred = t.result if name == "sklearn" else t.result[0]
        out["agreement"][name] = agreement(vote.pred, pred)
        if name != "sklearn":
            out["neighbours"][name] = same_neighbours(vote.index, t.result[1])
    out["ratio"] = {
        name: out["seconds"]["pdepth"] / sec
        for name, sec in out["seconds"].items()
        if name != "pdepth"
    }
    out["gflops"] = knn_gflops(m, n, d, out["seconds"]["pdepth"])
    out["roofline_s"] = 2.0 * m * n * d / (out["matmul_gflops"] * 1e9)
    return out


def target_for(name: str, d: int) -> tuple[str, float]:
    if name == "faiss":
        return FAISS_TARGET.get(d, ("<=", 1.0))
    return SKLEARN_TARGET if name == "sklearn" else TORCH_TARGET


METHOD_NAMES = {
    "pdepth": "pdepth knn_vote",
    "faiss": "faiss IndexFlatL2 add+search + vote",
    "sklearn": "sklearn KNeighborsClassifier brute fit+predict",
    "torch": "torch addmm + topk + vote",
}


def results_table(results: list[dict]) -> tuple[str, list[str]]:
    """The main table and the list of failed agreement checks.

    "bound" is the best pdepth/method ratio reachable at torch.matmul's rate: the time of
    pdepth's 2*Q*N*D flops at the matmul rate measured in the same rounds, over the method's
    time. A target below it needs a faster GEMM than torch's; its FAIL says so."""
    rows, bad = [], []
    for r in results:
        d = r["d"]
        for name in ("pdepth", "faiss", "sklearn", "torch"):
            label = METHOD_NAMES[name]
            if name not in r["seconds"]:
                rows.append([d, label, "-", "-", "-", "-", "-", "skipped (no faiss)", "-"])
                continue
            sec, spread = fmt(r["seconds"][name]), f"{100 * r['spread'][name]:.0f}%"
            if name == "pdepth":
                rows.append([d, label, sec, spread, "-", "-", "-", "-", "-"])
                continue
            ratio, bound = r["ratio"][name], r["roofline_s"] / r["seconds"][name]
            op, thr = target_for(name, d)
            result = check(ratio, op, thr)
            if result == "FAIL" and check(bound, op, thr) == "FAIL":
                result += " (needs > matmul rate)"
            agree = r["agreement"][name]
            agree_text = f"{agree:.4f}"
            if name in r["neighbours"]:
                agree_text += f" / {r['neighbours'][name]:.4f}"
            if agree < MIN_AGREEMENT:
                agree_text += " MISMATCH"
                bad.append(f"D={d} {name}: predictions agree on {agree:.4f} of the queries")
            target = f"{op} {thr}"
            rows.append([d, label, sec, spread, f"{ratio:.3f}", f"{bound:.3f}", target, result,
                         agree_text])  # fmt: skip
    headers = ["D", "method", "median s", "spread", "pdepth/method", "bound", "target", "result",
               "agree pred / nbrs"]  # fmt: skip
    return format_table(headers, rows), bad


def rate_table(results: list[dict]) -> str:
    """pdepth's rate against the matmul timed in the same rounds, and the CPU share other
    processes took meanwhile (0% = quiet machine)."""
    rows = []
    largest = max(r["d"] for r in results)
    op, thr = MATMUL_TARGET
    for r in results:
        pct = 100.0 * r["gflops"] / r["matmul_gflops"]
        target, result = (
            (f"{op} {thr:g}%", check(pct, op, thr)) if r["d"] == largest else ("-", "-")
        )
        other = "-" if r["other_load"] is None else f"{100 * r['other_load']:.0f}%"
        rows.append([r["d"], fmt(r["gflops"]), fmt(r["matmul_gflops"]), f"{pct:.1f}%", target,
                     result, other])  # fmt: skip
    headers = ["D", "pdepth GFLOP/s (2QND/t)", "matmul GFLOP/s", "% of matmul", "target",
               "result", "other processes' CPU"]  # fmt: skip
    return format_table(headers, rows)


# ---------------------------------------------------------------------------------------
# Peak memory, in a fresh subprocess
# ---------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_child(method: str, n: int, m: int, d: int) -> dict:
    """Runs one call in this (fresh) process, after a tiny warm-up call, and measures its
    RSS above the level reached after the inputs were allocated: sampled every ~0.5 ms by a
    thread, and from ru_maxrss."""
    calls = {
        "pdepth": lambda q, s, y: pdepth.knn_vote(q, s, y, K, NUM_CLASSES),
        "torch": lambda q, s, y: torch_pipeline_vote(q, s, y, K, NUM_CLASSES),
        "faiss": lambda q, s, y: faiss_vote(q, s, y, K, NUM_CLASSES),
    }
    fn = calls[method]
    # One tiny call first, so that one-time runtime set-up (thread pools, BLAS buffers) is
    # not counted as the call's memory.
    tiny = make_data(64, 4, d, NUM_CLASSES, seed=2)
    fn(tiny.queries, tiny.support, tiny.labels)
    data = make_data(n, m, d, NUM_CLASSES, seed=1)
    before = _rss_bytes()
    maxrss_before = _maxrss_bytes()
    peak = [before]
    samples = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            samples[0] += 1
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = fn(data.queries, data.support, data.labels)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    maxrss_after = _maxrss_bytes()
    peak_rss = peak[0]
    if maxrss_after > maxrss_before:  # the call set a new high-water mark
        peak_rss = max(peak_rss, maxrss_after)
    del result
    return {
        "method": method,
        "n": n,
        "m": m,
        "d": d,
        "seconds": seconds,
        "inputs_bytes": data.nbytes(),
        "rss_before": before,
        "peak_rss": peak_rss,
        "maxrss_before": maxrss_before,
        "maxrss_after": maxrss_after,
        "samples": samples[0],
        "extra_bytes": peak_rss - before,
    }


def measure_memory(method: str, n: int, m: int, d: int, threads: int | None) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        method,
        str(n),
        str(m),
        str(d),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(mems: list[dict]) -> str:
    rows = []
    mib = 2**20
    for r in mems:
        if "error" in r:
            rows.append([r["method"], "error: " + " ".join(r["error"]), "", "", "", "", "", ""])
            continue
        ratio = (r["inputs_bytes"] + r["extra_bytes"]) / r["inputs_bytes"]
        op, thr = MEMORY_TARGET
        is_target = r["method"] == "pdepth"
        rows.append(
            [
                METHOD_NAMES[r["method"]],
                f"{r['inputs_bytes'] / mib:.0f}",
                f"{r['extra_bytes'] / mib:.0f}",
                f"{ratio:.3f}x",
                f"{op} {thr}x" if is_target else "(context)",
                check(ratio, op, thr) if is_target else "-",
                fmt(r["seconds"]),
                r["samples"],
            ]
        )
    return format_table(
        [
            "method",
            "inputs MiB",
            "extra peak RSS MiB",
            "(inputs + extra) / inputs",
            "target",
            "result",
            "seconds",
            "RSS samples",
        ],
        rows,
    )


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", choices=sorted(SIZES), default="full")
    p.add_argument("--repeat", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--threads", type=int, help="torch / faiss threads (default: library's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--from-json", metavar="IN", help="print the tables of a saved run, no runs")
    p.add_argument(
        "--memory-child", nargs=4, metavar=("METHOD", "N", "M", "D"), help=argparse.SUPPRESS
    )
    return p.parse_args(argv)


def set_threads(threads: int | None) -> None:
    if not threads:
        return
    torch.set_num_threads(threads)
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)


def header(info: dict, cfg: dict, repeat: int) -> str:
    """The machine and the sizes, printed above the numbers."""
    lines = [
        "# pdepth k-NN vote, CPU",
        describe_machine(info),
        f"dtype float32, N={cfg['n']} support, Q={cfg['m']} queries, k={K}, {NUM_CLASSES} "
        f"classes, D in {list(cfg['dims'])}; data: Gaussian blobs (_data.make_data)",
        f"median of {repeat} runs after 1 warm-up; the methods and a {cfg['matmul']}^3 float32 "
        "torch.matmul (the roofline) interleaved run by run; spread = (max - min) / median",
    ]
    if info["versions"]["faiss"] == "not installed":
        lines.append("note: faiss is not importable (pip install faiss-cpu); its rows are skipped")
    return "\n".join(lines)


def report(payload: dict) -> tuple[str, list[str]]:
    """The tables of a run (``payload`` as written by --json) and its failed agreement checks."""
    table, bad = results_table(payload["results"])
    cfg = payload["config"]
    parts = [
        "## Time (median of the runs)",
        "pdepth/method < 1: pdepth faster. bound: the best ratio possible at torch.matmul's "
        "rate, i.e. the time of pdepth's 2QND flops at that rate / the method's time; "
        '"(needs > matmul rate)" marks a target below it.\n'
        "agree: pdepth vs method, fraction of equal predictions / of equal neighbour sets.",
        table,
        "",
        f"## Rate (torch.matmul {cfg['matmul']}^3 float32, timed in the same rounds)",
        rate_table(payload["results"]),
    ]
    if payload["memory"]:
        mc = cfg["memory"]
        parts += [
            "",
            f"## Peak memory: N={mc['n']}, Q={mc['m']}, D={mc['d']} float32, k={K}, one call "
            "in a fresh process after a tiny warm-up call",
            "extra = peak RSS during the call - RSS after allocating the inputs; "
            "target: total peak incl. inputs = (inputs + extra) / inputs",
            memory_table(payload["memory"]),
        ]
    parts.append(f"\nload average at end (1/5/15 min): {payload['load_average_end']}")
    parts += [f"MISMATCH: {line}" for line in bad]
    return "\n".join(parts), bad


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.memory_child:
        method, *nums = args.memory_child
        print(json.dumps(memory_child(method, *map(int, nums))))
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            payload = json.load(f)
        print(header(payload["machine"], payload["config"], payload["config"]["repeat"]))
        text, bad = report(payload)
        print("\n" + text)
        return 1 if bad else 0

    cfg = {**SIZES[args.sizes], "k": K, "num_classes": NUM_CLASSES, "repeat": args.repeat,
           "dtype": "float32", "sizes": args.sizes}  # fmt: skip
    has_faiss = faiss_available()
    info = machine_info("cpu")
    print(header(info, cfg, args.repeat), flush=True)

    results = []
    for d in cfg["dims"]:
        results.append(bench_dim(cfg["n"], cfg["m"], d, args.repeat, has_faiss, cfg["matmul"]))
        times = ", ".join(f"{k} {v:.3f}s" for k, v in results[-1]["seconds"].items())
        print(f"  D={d} done: {times}", flush=True)

    mems = []
    if not args.no_memory:
        mc = cfg["memory"]
        methods = ["pdepth", "torch"] + (["faiss"] if has_faiss else [])
        mems = [measure_memory(meth, mc["n"], mc["m"], mc["d"], args.threads) for meth in methods]

    payload = {
        "machine": info,
        "config": cfg,
        "results": results,
        "memory": mems,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    text, bad = report(payload)
    print("\n" + text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
