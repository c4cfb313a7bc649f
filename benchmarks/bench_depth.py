"""Prediction depth on Fashion-MNIST: pdepth against per-layer scikit-learn.

The common peer approach (the ``difficulty`` package, tflearning, ...) fits one scikit-learn
``KNeighborsClassifier`` per probe and predicts; pdepth runs :func:`pdepth.prediction_depth`
(one fused k-NN op call per probe). Both see the same probes:

* support: the first ``--n-support`` Fashion-MNIST training images; queries: the first
  ``--n-query`` test images;
* 6 probes of an MLP-like network built from fixed random projections + ReLU of the pixels,
  widths 784 (the pixels / 255), 1024, 2048, 4096, 1024 and 10 (softmax);
* k = 30, float32, reference = the network's prediction (argmax of the softmax probe).

pdepth runs once per filter mode of ``--filters`` (``filter=`` of :func:`pdepth.prediction_depth`,
the GEMM format that only filters candidates), scikit-learn once. Prints the machine (CPU
model and flags), the sizes, per-probe seconds of every mode and of scikit-learn, the totals,
the rates over the float32 and bfloat16 ``torch.matmul`` rooflines, the candidates per query
of each mode (``pdepth.knn_stats``), the speedup against the issue's target (>= 20x), and
whether the depths and per-probe predictions of every mode are identical to ``fp32``'s and to
scikit-learn's.

    python benchmarks/bench_depth.py                 # the full benchmark (~2 min on 2 cores)
    python benchmarks/bench_depth.py --small         # smoke test, a few seconds
    python benchmarks/bench_depth.py --filters auto  # one mode (fp32 is always added)
    python benchmarks/bench_depth.py --json out/bench_depth.json

Exit status 1 when a mode's depths or per-probe predictions differ from ``fp32``'s at all, or
when pdepth's depths differ from scikit-learn's on more than 1% of the queries (a fast but
wrong result); a missed speed target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time

import _repo  # noqa: F401  (the working tree's pdepth, before `import pdepth`)
import torch
from _machine import describe_machine, machine_info
from _tables import check, fmt, format_table
from _timing import knn_gflops, matmul_gflops

import pdepth

WIDTHS = (784, 1024, 2048, 4096, 1024, 10)
TARGET_SPEEDUP = 20.0
CPU_FILTERS = ("fp32", "bf16", "bf16x3", "auto")  # pdepth.FILTERS less the CUDA-only tf32
# prediction_depth(filter=...) where the plumbing has it; else the benchmark runs the same
# per-probe knn_vote(filter=...) calls itself and reduces them with depth_from_predictions.
HAS_FILTER_ARG = "filter" in inspect.signature(pdepth.prediction_depth).parameters


def make_network(support_pixels: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """A fixed MLP: He-scaled Gaussian random projections + ReLU (784 -> 1024 -> 2048 ->
    4096 -> 1024), then a 10-way readout fitted by least squares to the support labels, so
    that its softmax prediction (the depth reference) is a real classifier's."""
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(a, b, generator=g) * (2.0 / a) ** 0.5
              for a, b in zip(WIDTHS[:-2], WIDTHS[1:-1], strict=True)]
    h = _hidden(support_pixels, hidden)[-1]
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    readout = torch.linalg.lstsq(h.double(), onehot.double() * 8 - 4).solution.float()
    return hidden, readout


def _hidden(pixels: torch.Tensor, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    h = pixels.reshape(len(pixels), -1).float() / 255
    out = [h]
    for proj in hidden:
        h = torch.relu(h @ proj)
        out.append(h)
    return out


def make_probes(pixels: torch.Tensor, network) -> list[torch.Tensor]:
    """The 6 probes: pixels / 255, the 4 hidden ReLU layers, the softmax output."""
    hidden, readout = network
    probes = _hidden(pixels, hidden)
    probes.append(torch.softmax(probes[-1] @ readout, dim=1))
    return [p.contiguous() for p in probes]


def sklearn_depth(support, labels, queries, network_pred, k):
    """The peer approach: scikit-learn KNeighborsClassifier fit + predict per probe."""
    from sklearn.neighbors import KNeighborsClassifier

    preds, seconds = [], []
    y = labels.numpy()
    for s, q in zip(support, queries, strict=True):
        t0 = time.perf_counter()
        clf = KNeighborsClassifier(n_neighbors=k).fit(s.numpy(), y)
        preds.append(torch.from_numpy(clf.predict(q.numpy())).long())
        seconds.append(time.perf_counter() - t0)
    layer_pred = torch.stack(preds)
    return layer_pred, pdepth.depth_from_predictions(layer_pred, network_pred), seconds


class _ByProbe:
    """What :func:`pdepth_depth` needs of a result when ``prediction_depth`` has no
    ``filter=`` (per-probe ``knn_vote`` + ``depth_from_predictions``)."""

    def __init__(self, layer_pred, depth):
        self.layer_pred, self.depth = layer_pred, depth


def pdepth_depth(support, labels, queries, network_pred, k, filter="auto"):
    """pdepth.prediction_depth with ``filter``; per-probe seconds from the moments it asks
    for each layer."""
    stamps: list[float] = []

    def stream(layers):
        for layer in layers:
            stamps.append(time.perf_counter())
            yield layer

    t0 = time.perf_counter()
    if HAS_FILTER_ARG:
        res = pdepth.prediction_depth(stream(support), labels, stream(queries),
                                      network_pred=network_pred, k=k, num_classes=10,
                                      filter=filter)
    else:
        preds = [pdepth.knn_vote(q, s, labels, k, 10, filter=filter).pred
                 for s, q in zip(stream(support), stream(queries), strict=True)]
        layer_pred = torch.stack(preds)
        res = _ByProbe(layer_pred, pdepth.depth_from_predictions(layer_pred, network_pred))
    end = time.perf_counter()
    # the support stream is asked first for each layer; layer l runs between its stamp and
    # the next layer's
    starts = stamps[0::2]
    seconds = [b - a for a, b in zip(starts, starts[1:] + [end], strict=True)]
    return res, end - t0, seconds


def run_modes(filters, support, labels, queries, network_pred, k, repeat, with_sklearn=True):
    """Every mode (and scikit-learn) ``repeat`` times, interleaved run by run so that
    background load spreads over all of them; medians, the candidates of each mode's first
    run (knn_stats) and the last results."""
    out = {f: {"totals": [], "layers": [], "stats": None, "result": None} for f in filters}
    sk = {"totals": [], "layers": [], "result": None}
    pdepth.knn_stats(reset=True)
    for _ in range(repeat):
        for f in filters:
            res, total, layers = pdepth_depth(support, labels, queries, network_pred, k, f)
            st = pdepth.knn_stats(reset=True)
            if out[f]["stats"] is None:
                out[f]["stats"] = st
            out[f]["totals"].append(total)
            out[f]["layers"].append(layers)
            out[f]["result"] = res
        if with_sklearn:
            t0 = time.perf_counter()
            pred, depth, layers = sklearn_depth(support, labels, queries, network_pred, k)
            sk["totals"].append(time.perf_counter() - t0)
            sk["layers"].append(layers)
            sk["result"] = (pred, depth)
    for r in [*out.values(), *([sk] if with_sklearn else [])]:
        r["total"] = statistics.median(r["totals"])
        r["layer_seconds"] = [statistics.median(col) for col in zip(*r["layers"], strict=True)]
    return out, (sk if with_sklearn else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-support", type=int, default=10_000)
    parser.add_argument("--n-query", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="2,000 x 1,000 smoke test")
    parser.add_argument("--filters", default=",".join(CPU_FILTERS),
                        help="comma-separated filter modes (fp32, the reference of the identity "
                        "check, is always added); default: %(default)s")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (median)")
    parser.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn")
    parser.add_argument("--root", default=pdepth.data.FASHION_MNIST_ROOT)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.small:
        args.n_support, args.n_query = 2_000, 1_000
    filters = [f.strip() for f in args.filters.split(",") if f.strip()]
    unknown = [f for f in filters if f not in CPU_FILTERS]
    if unknown:
        parser.error(f"--filters: unknown {unknown}; choose from {list(CPU_FILTERS)}")
    filters = ["fp32"] + [f for f in filters if f != "fp32"]

    train_x, train_y = pdepth.load_fashion_mnist(args.root, "train")
    test_x, _ = pdepth.load_fashion_mnist(args.root, "test")
    n, m, k = args.n_support, args.n_query, args.k
    labels = train_y[:n]
    network = make_network(train_x[:n], labels)
    support = make_probes(train_x[:n], network)
    queries = make_probes(test_x[:m], network)
    network_pred = queries[-1].argmax(1)
    test_y = pdepth.load_fashion_mnist(args.root, "test")[1][:m]
    net_acc = (network_pred == test_y).double().mean().item()

    info = machine_info("cpu")
    print("# Prediction depth: pdepth (per filter mode) vs per-layer scikit-learn "
          "KNeighborsClassifier")
    print(describe_machine(info))
    print(f"device: cpu, dtype: float32, support N={n}, queries M={m}, k={k}, "
          f"probes L={len(WIDTHS)} of widths {list(WIDTHS)}, reference: network prediction")
    print("data: Fashion-MNIST (support: train[:N], queries: test[:M]); probes: fixed random "
          "projections + ReLU of the pixels, then a least-squares softmax readout "
          f"(test accuracy {net_acc:.3f})")
    print(f"filters: {', '.join(filters)} (" + ("prediction_depth(filter=...)" if HAS_FILTER_ARG
          else "prediction_depth has no filter= yet: per-probe knn_vote(filter=...) + "
          "depth_from_predictions") + f"), {args.repeat} run(s) each (median), interleaved "
          "with scikit-learn's")
    print("auto picks: " + ", ".join(f"D={w}: {pdepth.knn_plan(w)['filter']}" for w in WIDTHS))
    print()

    # warm-up (thread pools, first-call costs), untimed
    pdepth.prediction_depth([p[:500] for p in support], labels[:500],
                            [p[:100] for p in queries], network_pred=network_pred[:100], k=k)

    ceiling_before = matmul_gflops(4096)
    bf16_before = matmul_gflops(4096, dtype=torch.bfloat16)
    modes, sk = run_modes(filters, support, labels, queries, network_pred, k, args.repeat,
                          with_sklearn=not args.no_sklearn)
    if sk is None:
        sk_pred = sk_depth = sk_layers = sk_total = None
    else:
        (sk_pred, sk_depth), sk_layers, sk_total = sk["result"], sk["layer_seconds"], sk["total"]
    # the best GEMM rates seen before and after the runs (the machine may be shared)
    ceiling = max(ceiling_before, matmul_gflops(4096))
    bf16_ceiling = max(bf16_before, matmul_gflops(4096, dtype=torch.bfloat16))

    ref = modes["fp32"]["result"]
    identical, bad = {}, []
    for f in filters:
        res = modes[f]["result"]
        same_depth = torch.equal(res.depth, ref.depth)
        same_pred = torch.equal(res.layer_pred, ref.layer_pred)
        identical[f] = same_depth and same_pred
        if not identical[f]:
            bad.append(f"filter={f}: depths differ from fp32's on "
                       f"{int((res.depth != ref.depth).sum())} of {m} queries, per-probe "
                       f"predictions on {int((res.layer_pred != ref.layer_pred).sum())}")

    headers = ["probe", "D", "auto ->", *[f"{f} s" for f in filters]]
    if sk_total is not None:
        headers += ["sklearn s", "sklearn / auto" if "auto" in filters else "sklearn / fp32",
                    "pred agreement (fp32 vs sklearn)"]
    best = "auto" if "auto" in filters else filters[-1]
    rows = []
    for layer, width in enumerate(WIDTHS):
        row = [layer, width, pdepth.knn_plan(width)["filter"],
               *[fmt(modes[f]["layer_seconds"][layer]) for f in filters]]
        if sk_total is not None:
            agree = (ref.layer_pred[layer] == sk_pred[layer]).double().mean().item()
            row += [fmt(sk_layers[layer]),
                    fmt(sk_layers[layer] / modes[best]["layer_seconds"][layer]), f"{agree:.5f}"]
        rows.append(row)
    row = ["all", sum(WIDTHS), "", *[fmt(modes[f]["total"]) for f in filters]]
    if sk_total is not None:
        row += [fmt(sk_total), fmt(sk_total / modes[best]["total"]), ""]
    rows.append(row)
    print(format_table(headers, rows))
    print()

    flops_g = knn_gflops(m, n, sum(WIDTHS), 1.0)  # GFLOP of the cross terms, all probes
    mode_rows = []
    for f in filters:
        r = modes[f]
        rate = flops_g / r["total"]
        st = r["stats"] or {}
        cand = st.get("candidates", 0) / (m * len(WIDTHS))
        fallback = f"{st.get('fallback_tiles', 0)}/{st.get('tiles', 0)}"
        sk_col = [fmt(sk_total / r["total"])] if sk_total is not None else []
        mode_rows.append([f, fmt(r["total"]), f"{modes['fp32']['total'] / r['total']:.2f}",
                          fmt(rate), f"{rate / ceiling:.2f}", f"{rate / bf16_ceiling:.2f}",
                          fmt(cand), fallback, *sk_col,
                          "identical" if identical[f] else "DIFFERENT"])
    print(format_table(["filter", "total s", "speed-up over fp32", "GFLOP/s (2MND/t, all probes)",
                        "x fp32 matmul", "x bf16 matmul", "candidates/query/probe",
                        "fallback tiles", *(["sklearn / mode"] if sk_total is not None else []),
                        "depths + per-probe preds vs fp32"], mode_rows))
    print()
    print(f"roofline: the cross terms alone are {flops_g:.0f} GFLOP; torch.matmul at 4096^3 "
          f"runs at {ceiling:.0f} GFLOP/s in float32 and {bf16_ceiling:.0f} GFLOP/s in bfloat16 "
          f"here (best of before/after), i.e. >= {flops_g / ceiling:.1f} s for a float32 GEMM "
          f"and >= {flops_g / bf16_ceiling:.1f} s for a bfloat16 one")
    differ = 0
    if sk_total is not None:
        speedup = sk_total / modes[best]["total"]
        sk_same = torch.equal(ref.depth, sk_depth)
        differ = int((ref.depth != sk_depth).sum())
        print(f"total: pdepth filter={best} {modes[best]['total']:.2f} s, scikit-learn "
              f"{sk_total:.2f} s, speedup {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x: "
              f"{check(speedup, '>=', TARGET_SPEEDUP)}); the target "
              f"({sk_total / TARGET_SPEEDUP:.2f} s) needs "
              f"{knn_gflops(m, n, sum(WIDTHS), sk_total / TARGET_SPEEDUP):.0f} GFLOP/s")
        print(f"depths identical to scikit-learn's: {sk_same} ({differ} of {m} differ); "
              f"per-probe predictions identical: {torch.equal(ref.layer_pred, sk_pred)}")
    print(f"every mode's depths and per-probe predictions identical to fp32's: "
          f"{all(identical.values())}")
    print(f"mean depth {ref.depth.double().mean():.3f}, depth histogram "
          f"{torch.bincount(ref.depth, minlength=len(WIDTHS) + 1).tolist()}")
    for line in bad:
        print(f"NOT IDENTICAL: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "machine": info, "n_support": n, "n_query": m, "k": k, "widths": WIDTHS,
                "filters": filters, "repeat": args.repeat,
                "has_filter_arg": HAS_FILTER_ARG,
                "modes": {f: {"seconds": r["total"], "runs": r["totals"],
                              "layer_seconds": r["layer_seconds"], "stats": r["stats"],
                              "identical_to_fp32": identical[f]} for f, r in modes.items()},
                "pdepth_seconds": modes[best]["total"], "pdepth_filter": best,
                "sklearn_seconds": sk_total, "sklearn_layer_seconds": sk_layers,
                "sklearn_runs": None if sk is None else sk["totals"],
                "speedup": None if sk_total is None else sk_total / modes[best]["total"],
                "target_speedup": TARGET_SPEEDUP,
                "matmul_gflops": ceiling, "matmul_bf16_gflops": bf16_ceiling,
                "network_test_accuracy": net_acc,
                "depths_identical": None if sk_total is None else torch.equal(ref.depth,
                                                                              sk_depth),
                "depths_differing": differ, "modes_identical": all(identical.values()),
            }, f, indent=1)
    return 1 if bad or differ > 0.01 * m else 0


if __name__ == "__main__":
    sys.exit(main())
