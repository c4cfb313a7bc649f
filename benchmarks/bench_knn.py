"""CPU benchmark of ``pdepth.knn_vote`` in every filter mode against faiss-cpu, scikit-learn
and plain torch, on Gaussian blobs, clustered ReLU features, Fashion-MNIST pixels, the ReLU
features of a trained MLP and the paper's widths.

Every mode of ``--filters`` is timed on the same data in the same rounds as the baselines and
the two rooflines of the machine (``torch.matmul`` at 4096^3 in float32 and in bfloat16).
Prints the machine (CPU model and its flags), what ``filter="auto"`` picks at each D
(``pdepth.knn_plan``), per case the times, rates, candidates per query of each mode
(``pdepth.knn_stats``) and whether each mode's output is bit-identical to ``fp32``'s, the
ratios to the baselines, the issue's targets (PASS / FAIL) and the peak memory of one large
call per mode, each measured in a fresh subprocess.

    python benchmarks/bench_knn.py --json out/bench_knn.json     # everything, ~15 min on 2 cores
    python benchmarks/bench_knn.py --quick                       # smoke test, < 1 min
    python benchmarks/bench_knn.py --suites paper --kinds relu   # one part
    python benchmarks/bench_knn.py --from-json out/bench_knn.json

Suites (``--suites``): ``main`` (N=20,000, Q=5,000, D in 64, 512, 2048, for each of
``--kinds``), ``fmnist`` (Fashion-MNIST pixels, D=784), ``mlp`` (hidden ReLU features of an
MLP trained on Fashion-MNIST for a few seconds, D=1024 and 2048), ``paper`` (N=2,000, Q=500,
D in 2048, 16384, 32768, 50176, 65536, for each of ``--kinds``), ``sym`` (the training split
scored against itself, N=3,000, D=4096 and 12544 ReLU features: the symmetric op against the
general one, docs/design.md section 13). k=30, float32 everywhere.

Exit status 1 when a mode's output (pred, dist, index) is not bit-identical to ``fp32``'s,
or when pdepth's predictions disagree with a baseline's on more than 1% of the queries;
missed speed targets are reported, not fatal.
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
from _data import (
    describe_geometry,
    fashion_mnist_pixels,
    make_data,
    make_relu_data,
    trained_mlp_features,
)
from _machine import OtherLoad, describe_machine, machine_info
from _sym_suite import run_sym_suite, sym_table
from _tables import check, fmt, format_table
from _timing import knn_gflops, matmul_fn, time_many

import pdepth

K = 30
NUM_CLASSES = 10
MIN_AGREEMENT = 0.99
CPU_FILTERS = ("fp32", "bf16", "bf16x3", "auto")  # pdepth.FILTERS less the CUDA-only tf32
BASELINES = ("faiss", "sklearn", "torch")
KINDS = ("gaussian", "relu")
SUITES = ("main", "fmnist", "mlp", "paper", "sym")

SIZES = {
    "full": {
        "n": 20_000,
        "m": 5_000,
        "dims": (64, 512, 2048),
        "mlp_widths": (1024, 2048),
        "mlp_epochs": 2,
        "paper": {"n": 2_000, "m": 500, "dims": (2048, 16384, 32768, 50176, 65536)},
        "matmul": 4096,
        "memory": {"n": 200_000, "m": 5_000, "d": 512},
    },
    "small": {
        "n": 2_000,
        "m": 500,
        "dims": (64, 512),
        "mlp_widths": (512,),
        "mlp_epochs": 1,
        "paper": {"n": 400, "m": 100, "dims": (2048, 16384)},
        "matmul": 1024,
        "memory": {"n": 20_000, "m": 500, "d": 64},
    },
}

# Issue 12 targets.
MATMUL_TARGET = (">=", 1.3)  # auto's rate / the float32 matmul rate, main-size cases, D >= 512
MATMUL_TARGET_MIN_D = 512
BASELINE_TARGET = ("<", 1.0)  # auto time / baseline time, main-size cases, every D
PAPER_TARGET = ("<=", 1.0)  # auto time / torch pipeline time, paper widths
MEMORY_TARGET = ("<=", 1.5)  # total peak (inputs + extra) / inputs, every mode

METHOD_NAMES = {
    "faiss": "faiss IndexFlatL2 add+search + vote",
    "sklearn": "sklearn KNeighborsClassifier brute fit+predict",
    "torch": "torch addmm + topk + vote",
}


def method_name(method: str) -> str:
    if method.startswith("pdepth:"):
        return f"pdepth knn_vote filter={method.split(':', 1)[1]}"
    return METHOD_NAMES[method]


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------


def make_cases(cfg: dict, suites, kinds) -> list[dict]:
    """The cases to run, each with a ``make()`` that builds its data (lazily: one case's
    data lives at a time)."""
    cases = []
    n, m = cfg["n"], cfg["m"]
    gens = {"gaussian": make_data, "relu": make_relu_data}
    if "main" in suites:
        for kind in kinds:
            for d in cfg["dims"]:
                cases.append({"suite": "main", "kind": kind, "n": n, "m": m, "d": d,
                              "make": lambda g=gens[kind], d=d: g(n, m, d, NUM_CLASSES, seed=d)})
    if "fmnist" in suites:
        cases.append({"suite": "fmnist", "kind": "fmnist-pixels", "n": n, "m": m, "d": 784,
                      "make": lambda: fashion_mnist_pixels(n, m)})
    if "mlp" in suites:
        trained: dict = {}

        def mlp(width: int):
            if not trained:
                feats, info = trained_mlp_features(n, m, cfg["mlp_widths"],
                                                   epochs=cfg["mlp_epochs"])
                trained.update(feats)
                trained["info"] = info
                print(f"  MLP 784-{'-'.join(map(str, cfg['mlp_widths']))}-10 trained on "
                      f"{n} Fashion-MNIST images, {info['epochs']} epochs in "
                      f"{info['train_seconds']:.1f} s, test accuracy {info['test_accuracy']:.3f}",
                      flush=True)
            return trained.pop(width)

        for w in cfg["mlp_widths"]:
            cases.append({"suite": "mlp", "kind": "fmnist-mlp", "n": n, "m": m, "d": w,
                          "make": lambda w=w: mlp(w), "mlp": trained})
    if "paper" in suites:
        p = cfg["paper"]
        for kind in kinds:
            for d in p["dims"]:
                cases.append({"suite": "paper", "kind": kind, "n": p["n"], "m": p["m"], "d": d,
                              "make": lambda g=gens[kind], d=d: g(p["n"], p["m"], d,
                                                                  NUM_CLASSES, seed=d)})
    return cases


def case_label(r: dict) -> str:
    return f"{r['suite']}/{r['kind']}"


# ---------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def compare_outputs(res, ref) -> tuple[bool, str]:
    """Whether ``res`` (a Vote) is bit-identical to ``ref`` (pred, index and the bits of
    dist), and if not, how far apart they are."""
    same_pred = torch.equal(res.pred, ref.pred)
    same_index = torch.equal(res.index, ref.index)
    same_dist = torch.equal(_bits(res.dist), _bits(ref.dist))
    if same_pred and same_index and same_dist:
        return True, "identical"
    rows = (res.index != ref.index).any(1) | (_bits(res.dist) != _bits(ref.dist)).any(1)
    detail = (f"pred differs on {int((res.pred != ref.pred).sum())} queries, index/dist rows "
              f"differ on {int(rows.sum())}, max |dist diff| "
              f"{(res.dist.double() - ref.dist.double()).abs().max().item():.3g}")
    first = rows.nonzero().flatten()[:1].tolist()
    if first:
        detail += f", first query {first[0]}"
    return False, detail


def bench_case(case: dict, data, filters, repeat: int, has_faiss: bool, matmul_size: int) -> dict:
    """Times every mode, the baselines and both rooflines on one data set, interleaved run
    by run; counts each mode's candidates (one untimed call per mode, which is also its
    warm-up) and checks every mode's output against fp32's."""
    q, s, y = data.queries, data.support, data.labels
    n, m, d = s.shape[0], q.shape[0], s.shape[1]

    def mode_fn(f):
        return lambda: pdepth.knn_vote(q, s, y, K, NUM_CLASSES, filter=f)

    modes = {f"pdepth:{f}": mode_fn(f) for f in filters}
    others = {
        "faiss": (lambda: faiss_vote(q, s, y, K, NUM_CLASSES)) if has_faiss else None,
        "sklearn": lambda: sklearn_vote(q, s, y, K),
        "torch": lambda: torch_pipeline_vote(q, s, y, K, NUM_CLASSES),
        "matmul fp32": matmul_fn(matmul_size),
        "matmul bf16": matmul_fn(matmul_size, dtype=torch.bfloat16),
    }
    others = {name: fn for name, fn in others.items() if fn is not None}

    stats, first = {}, {}
    pdepth.knn_stats(reset=True)
    for name, fn in modes.items():
        first[name] = fn()
        stats[name] = pdepth.knn_stats(reset=True)
    warm = {name: fn() for name, fn in others.items()}  # the baselines' warm-up
    del warm
    with OtherLoad() as load:
        timings = time_many({**modes, **others}, repeat, warmup=0)

    out = {key: case[key] for key in ("suite", "kind", "n", "m", "d")}
    out.update({"seconds": {}, "spread": {}, "times": {}, "gflops": {}, "stats": {},
                "identical": {}, "identity_detail": {}, "agreement": {}, "neighbours": {}})
    out["other_load"] = load.fraction
    out["plan"] = pdepth.knn_plan(d)
    out["geometry"] = describe_geometry(data, K)
    for mm in ("fp32", "bf16"):
        t = timings.pop(f"matmul {mm}")
        out[f"matmul_{mm}_gflops"] = 2.0 * matmul_size**3 / t.median / 1e9
        out[f"matmul_{mm}_times"] = t.times
    ref = first["pdepth:fp32"]
    for name, t in timings.items():
        out["seconds"][name] = t.median
        out["spread"][name] = t.spread
        out["times"][name] = t.times
        out["gflops"][name] = knn_gflops(m, n, d, t.median)
        if name.startswith("pdepth:"):
            st = stats[name]
            out["stats"][name] = st
            ok1, detail1 = compare_outputs(first[name], ref)
            ok2, detail2 = compare_outputs(t.result, ref)
            out["identical"][name] = ok1 and ok2
            out["identity_detail"][name] = detail1 if not ok1 else detail2
            continue
        pred = t.result if name == "sklearn" else t.result[0]
        out["agreement"][name] = agreement(ref.pred, pred)
        if name != "sklearn":
            out["neighbours"][name] = same_neighbours(ref.index, t.result[1])
    out["ratio"] = {  # mode time / baseline time
        mode: {b: out["seconds"][mode] / out["seconds"][b] for b in BASELINES
               if b in out["seconds"]}
        for mode in modes
    }
    return out


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def cand_per_query(r: dict, mode: str) -> float | None:
    st = r["stats"].get(mode)
    return None if st is None else st["candidates"] / r["m"]


def fallback_text(st: dict) -> str:
    if not st or not st.get("tiles"):
        return "-"
    return f"{st['fallback_tiles']}/{st['tiles']}"


def detail_table(results: list[dict]) -> tuple[str, list[str]]:
    """Every method of every case: time, rate, the rate over each roofline, candidates per
    query and fallback tiles (pdepth modes), and the check against fp32's output."""
    rows, bad = [], []
    for r in results:
        fp32_mm, bf16_mm = r["matmul_fp32_gflops"], r["matmul_bf16_gflops"]
        for name in r["seconds"]:
            rate = r["gflops"][name]
            if name.startswith("pdepth:"):
                cand = cand_per_query(r, name)
                ok = r["identical"][name]
                check_text = "identical" if ok else "NOT IDENTICAL: " + r["identity_detail"][name]
                if not ok:
                    bad.append(f"{case_label(r)} D={r['d']} {name}: {r['identity_detail'][name]}")
                extra = [fmt(cand), fallback_text(r["stats"][name]), check_text]
            else:
                agree = r["agreement"][name]
                text = f"pred {agree:.4f}"
                if name in r["neighbours"]:
                    text += f" / nbrs {r['neighbours'][name]:.4f}"
                if agree < MIN_AGREEMENT:
                    text += " MISMATCH"
                    bad.append(f"{case_label(r)} D={r['d']} {name}: predictions agree on "
                               f"{agree:.4f} of the queries")
                extra = ["-", "-", text]
            rows.append([case_label(r), r["d"], method_name(name), fmt(r["seconds"][name]),
                         f"{100 * r['spread'][name]:.0f}%", fmt(rate), f"{rate / fp32_mm:.2f}",
                         f"{rate / bf16_mm:.2f}", *extra])
        for mm, rate in (("fp32", fp32_mm), ("bf16", bf16_mm)):
            rows.append([case_label(r), r["d"], f"torch.matmul {mm} (roofline)", "-", "-",
                         fmt(rate), f"{rate / fp32_mm:.2f}", f"{rate / bf16_mm:.2f}", "-", "-",
                         "-"])
    headers = ["data", "D", "method", "median s", "spread", "GFLOP/s (2QND/t)",
               "x fp32 matmul", "x bf16 matmul", "candidates/query", "fallback tiles",
               "vs pdepth fp32"]
    return format_table(headers, rows), bad


def summary_table(results: list[dict], filters) -> str:
    """One row per case: each mode's seconds and candidates per query, auto's rate over the
    rooflines and over each baseline."""
    rows = []
    for r in results:
        secs = [fmt(r["seconds"].get(f"pdepth:{f}")) for f in filters]
        cands = "/".join(fmt(cand_per_query(r, f"pdepth:{f}")) for f in filters)
        auto = "pdepth:auto" if "pdepth:auto" in r["seconds"] else f"pdepth:{filters[-1]}"
        rate = r["gflops"][auto]
        ratios = [fmt(r["ratio"][auto].get(b)) for b in BASELINES]
        identical = all(r["identical"].values())
        other = "-" if r["other_load"] is None else f"{100 * r['other_load']:.0f}%"
        rows.append([case_label(r), r["d"], r["n"], r["m"], r["plan"]["filter"], *secs,
                     fmt(rate), f"{rate / r['matmul_fp32_gflops']:.2f}",
                     f"{rate / r['matmul_bf16_gflops']:.2f}", *ratios, cands,
                     "yes" if identical else "NO", other])
    headers = ["data", "D", "N", "Q", "auto ->", *[f"{f} s" for f in filters],
               "auto GFLOP/s", "auto x fp32 mm", "auto x bf16 mm",
               *[f"auto/{b}" for b in BASELINES], "cand/query " + "/".join(filters),
               "all modes = fp32", "other CPU"]
    return format_table(headers, rows)


def mode_ratio_table(results: list[dict], filters) -> str:
    """Every mode's time over every baseline's (< 1: pdepth faster)."""
    rows = []
    for r in results:
        for f in filters:
            mode = f"pdepth:{f}"
            rows.append([case_label(r), r["d"], f, *[fmt(r["ratio"][mode].get(b))
                                                     for b in BASELINES],
                         f"{r['seconds']['pdepth:fp32'] / r['seconds'][mode]:.2f}"])
    return format_table(["data", "D", "filter", *[f"/{b}" for b in BASELINES],
                         "speed-up over fp32"], rows)


def geometry_table(results: list[dict]) -> str:
    rows = [[case_label(r), r["d"], f"{100 * r['geometry']['zero_fraction']:.0f}%",
             f"{r['geometry']['kth_dist_over_norms']:.3g}"] for r in results]
    return format_table(["data", "D", "zero features", "k-th dist^2 / (q.q + s.s)"], rows)


def targets_table(results: list[dict], mems: list[dict]) -> str:
    rows = []
    for r in results:
        where = f"{case_label(r)} D={r['d']}"
        auto = r["seconds"].get("pdepth:auto")
        if auto is None:
            continue
        if r["suite"] == "paper":
            ratio = r["ratio"]["pdepth:auto"].get("torch")
            op, thr = PAPER_TARGET
            rows.append(["auto at least as fast as torch GEMM + topk (paper widths)", where,
                         f"{op} {thr}", fmt(ratio), check(ratio, op, thr)])
            continue
        if r["d"] >= MATMUL_TARGET_MIN_D:
            x = r["gflops"]["pdepth:auto"] / r["matmul_fp32_gflops"]
            op, thr = MATMUL_TARGET
            rows.append(["auto rate >= 1.3x float32 matmul rate (D >= 512)", where,
                         f"{op} {thr}", f"{x:.2f}", check(x, op, thr)])
        for b in BASELINES:
            ratio = r["ratio"]["pdepth:auto"].get(b)
            op, thr = BASELINE_TARGET
            rows.append([f"auto faster than {b} (time ratio)", where, f"{op} {thr}",
                         fmt(ratio), check(ratio, op, thr)])
    for r in results:
        for mode, ok in r["identical"].items():
            if not ok:
                rows.append([f"{mode} bit-identical to fp32", f"{case_label(r)} D={r['d']}",
                             "identical", "NO", "FAIL"])
    n_checks = sum(len(r["identical"]) for r in results)
    n_ok = sum(sum(r["identical"].values()) for r in results)
    rows.append(["every mode: pred, dist, index bit-identical to fp32", "every case",
                 "all", f"{n_ok}/{n_checks}", "PASS" if n_ok == n_checks else "FAIL"])
    for mem in mems:
        if "error" in mem or not mem["method"].startswith("pdepth:"):
            continue
        ratio = (mem["inputs_bytes"] + mem["extra_bytes"]) / mem["inputs_bytes"]
        op, thr = MEMORY_TARGET
        rows.append([f"peak memory incl. inputs, {mem['method']}",
                     f"N={mem['n']} Q={mem['m']} D={mem['d']}", f"{op} {thr}x",
                     f"{ratio:.3f}x", check(ratio, op, thr)])
    return format_table(["target (issue 12)", "where", "target", "value", "result"], rows)


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
    thread, and from ru_maxrss. ``method``: ``pdepth:<filter>``, ``torch`` or ``faiss``."""
    if method.startswith("pdepth:"):
        filt = method.split(":", 1)[1]

        def fn(q, s, y):
            return pdepth.knn_vote(q, s, y, K, NUM_CLASSES, filter=filt)
    else:
        fn = {
            "torch": lambda q, s, y: torch_pipeline_vote(q, s, y, K, NUM_CLASSES),
            "faiss": lambda q, s, y: faiss_vote(q, s, y, K, NUM_CLASSES),
        }[method]
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


def measure_memory(method: str, n: int, m: int, d: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", method, str(n), str(m),
           str(d)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.bf16_gemm:
        cmd += ["--bf16-gemm", args.bf16_gemm]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(mems: list[dict]) -> str:
    rows = []
    mib = 2**20
    for r in mems:
        if "error" in r:
            rows.append([method_name(r["method"]), "error: " + " ".join(r["error"]), "", "", "",
                         "", "", ""])
            continue
        ratio = (r["inputs_bytes"] + r["extra_bytes"]) / r["inputs_bytes"]
        op, thr = MEMORY_TARGET
        is_target = r["method"].startswith("pdepth:")
        rows.append([
            method_name(r["method"]),
            f"{r['inputs_bytes'] / mib:.0f}",
            f"{r['extra_bytes'] / mib:.0f}",
            f"{ratio:.3f}x",
            f"{op} {thr}x" if is_target else "(context)",
            check(ratio, op, thr) if is_target else "-",
            fmt(r["seconds"]),
            r["samples"],
        ])
    return format_table(["method", "inputs MiB", "extra peak RSS MiB",
                         "(inputs + extra) / inputs", "target", "result", "seconds",
                         "RSS samples"], rows)


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", choices=sorted(SIZES), default="full")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: --sizes small --repeat 2 (under a minute)")
    p.add_argument("--filters", default=",".join(CPU_FILTERS),
                   help="comma-separated pdepth filter modes to time (fp32 is always added: "
                   "it is the reference of the identity check); default: %(default)s")
    p.add_argument("--suites", default=",".join(SUITES),
                   help=f"comma-separated, of {', '.join(SUITES)}; default: all")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="synthetic data of the main and paper suites; default: %(default)s")
    p.add_argument("--dims", help="comma-separated D of the main suite (default: the sizes')")
    p.add_argument("--paper-dims", help="comma-separated D of the paper suite")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--threads", type=int, help="torch / faiss threads (default: library's)")
    p.add_argument("--bf16-gemm", choices=("kernel", "mkl", "sgemm"),
                   help="force pdepth's bfloat16 GEMM backend (test hook; default: its choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--from-json", metavar="IN", help="print the tables of a saved run, no runs")
    p.add_argument(
        "--memory-child", nargs=4, metavar=("METHOD", "N", "M", "D"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat = "small", min(args.repeat, 2)
    return args


def set_threads(threads: int | None) -> None:
    if not threads:
        return
    torch.set_num_threads(threads)
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)


def _csv(text: str, allowed, name: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown:
        raise SystemExit(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
    return items


def header(info: dict, cfg: dict) -> str:
    """The machine, the sizes and what auto picks, printed above the numbers."""
    plans = "\n".join(f"  D={d}: {p['filter']} ({p['reason']}; bf16 GEMM: "
                      f"{p.get('bf16_gemm', '-')}; fallback: {p.get('fallback', '-')})"
                      for d, p in cfg["plans"].items())
    paper = cfg["paper"]
    lines = [
        "# pdepth k-NN vote, CPU, per filter mode",
        describe_machine(info),
        f"filters timed: {', '.join(cfg['filters'])}"
        + (f"; bf16 GEMM forced to {cfg['bf16_gemm']}" if cfg.get("bf16_gemm") else ""),
        f"float32, k={K}, {NUM_CLASSES} classes; suites {', '.join(cfg['suites'])}; "
        f"main: N={cfg['n']}, Q={cfg['m']}, D in {list(cfg['dims'])}, kinds "
        f"{', '.join(cfg['kinds'])}; fmnist: pixels/255, D=784; mlp: widths "
        f"{list(cfg['mlp_widths'])}; paper: N={paper['n']}, Q={paper['m']}, D in "
        f"{list(paper['dims'])}",
        f"median of {cfg['repeat']} runs after 1 warm-up (for the pdepth modes: the "
        "untimed call that counts candidates); the methods and the "
        f"{cfg['matmul']}^3 torch.matmul rooflines (float32, bfloat16) interleaved run by run; "
        "spread = (max - min) / median",
        "what filter='auto' picks (pdepth.knn_plan):",
        plans,
    ]
    if info["versions"]["faiss"] == "not installed":
        lines.append("note: faiss is not importable (pip install faiss-cpu); its rows are skipped")
    return "\n".join(lines)


def report(payload: dict) -> tuple[str, list[str]]:
    """The tables of a run (``payload`` as written by --json) and its failed checks."""
    cfg, results = payload["config"], payload["results"]
    filters = cfg["filters"]
    detail, bad = detail_table(results)
    parts = [
        "## Summary (one row per case; times are medians)",
        "auto -> : the filter auto resolves to. auto/baseline < 1: pdepth faster. "
        "x fp32 mm / x bf16 mm: auto's useful rate 2QND/t over torch.matmul's rate in that "
        "format, timed in the same rounds. cand/query: canonical keys computed per query "
        "(knn_stats candidates / Q), per mode. all modes = fp32: pred, dist and index "
        "bit-identical to filter='fp32' in every mode.",
        summary_table(results, filters),
        "",
        "## Every mode over every baseline (time ratio, < 1: pdepth faster)",
        mode_ratio_table(results, filters),
        "",
        "## Detail",
        "vs pdepth fp32: for the modes, the bit-identity check of pred, dist and index "
        "(the untimed and the last timed call); for the baselines, the fraction of equal "
        "predictions / neighbour sets. fallback tiles: low-precision tiles recomputed in fp32.",
        detail,
        "",
        "## Data geometry",
        "how far the points are from the origin compared with their k-th neighbour (200 "
        "queries, float64): the filter margin grows with |q|^2 + |s|^2, the gaps between "
        "neighbours do not.",
        geometry_table(results),
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
    parts += ["", "## Targets (issue 12)", targets_table(results, payload["memory"])]
    if cfg.get("mlp_info"):
        i = cfg["mlp_info"]
        parts.append(f"\nMLP: 784-{'-'.join(map(str, i['widths']))}-10, {i['epochs']} epochs "
                     f"on {i['n_train']} images in {i['train_seconds']:.1f} s, test accuracy "
                     f"{i['test_accuracy']:.3f}")
    parts.append(f"\nload average at end (1/5/15 min): {payload['load_average_end']}")
    parts += [f"FAILED CHECK: {line}" for line in bad]
    return "\n".join(parts), bad


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.bf16_gemm:
        pdepth._C._knn_test_hooks(bf16_gemm=args.bf16_gemm)
    if args.memory_child:
        method, *nums = args.memory_child
        print(json.dumps(memory_child(method, *map(int, nums))))
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            payload = json.load(f)
        print(header(payload["machine"], payload["config"]))
        text, bad = report(payload)
        print("\n" + text)
        return 1 if bad else 0

    filters = _csv(args.filters, CPU_FILTERS, "filters")
    filters = ["fp32"] + [f for f in filters if f != "fp32"]
    suites = _csv(args.suites, SUITES, "suites")
    kinds = _csv(args.kinds, KINDS, "kinds")
    cfg = {**SIZES[args.sizes], "k": K, "num_classes": NUM_CLASSES, "repeat": args.repeat,
           "dtype": "float32", "sizes": args.sizes, "filters": filters, "suites": suites,
           "kinds": kinds, "bf16_gemm": args.bf16_gemm}  # fmt: skip
    if args.dims:
        cfg["dims"] = tuple(int(x) for x in args.dims.split(","))
    if args.paper_dims:
        cfg["paper"] = {**cfg["paper"], "dims": tuple(int(x) for x in args.paper_dims.split(","))}
    cases = make_cases(cfg, suites, kinds)
    cfg["plans"] = {d: pdepth.knn_plan(d) for d in sorted({c["d"] for c in cases})}
    has_faiss = faiss_available()
    info = machine_info("cpu")
    print(header(info, cfg), flush=True)
    if "sym" in suites:  # the symmetric path against the general one (_sym_suite.py)
        sym_rows, sym_ok = run_sym_suite(args.sizes, filters, args.repeat, K)
        print("\n" + sym_table(sym_rows) + "\n", flush=True)
        if not cases:
            return 0 if sym_ok else 1

    results = []
    t_start = time.perf_counter()
    for case in cases:
        data = case["make"]()
        results.append(bench_case(case, data, filters, args.repeat, has_faiss, cfg["matmul"]))
        del data
        r = results[-1]
        times = ", ".join(f"{k.removeprefix('pdepth:')} {v:.3f}s" for k, v in r["seconds"].items())
        flag = "" if all(r["identical"].values()) else "  NOT IDENTICAL"
        print(f"  {case_label(r)} D={r['d']} done ({time.perf_counter() - t_start:.0f} s): "
              f"{times}{flag}", flush=True)
        if "mlp" in case and "info" in case["mlp"]:
            cfg["mlp_info"] = case["mlp"]["info"]

    mems = []
    if not args.no_memory:
        mc = cfg["memory"]
        methods = [f"pdepth:{f}" for f in filters] + ["torch"] + (["faiss"] if has_faiss else [])
        for meth in methods:
            mems.append(measure_memory(meth, mc["n"], mc["m"], mc["d"], args))
            print(f"  memory {meth} done", flush=True)

    payload = {
        "machine": info,
        "config": cfg,
        "results": results,
        "memory": mems,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.perf_counter() - t_start,
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
