"""Prediction depth on Fashion-MNIST: pdepth against per-layer scikit-learn.

The common peer approach (the ``difficulty`` package, tflearning, ...) fits one scikit-learn
``KNeighborsClassifier`` per probe and predicts; pdepth runs :func:`pdepth.prediction_depth`
(one fused k-NN op call per probe). Both see the same probes:

* support: the first ``--n-support`` Fashion-MNIST training images; queries: the first
  ``--n-query`` test images;
* 6 probes of an MLP-like network built from fixed random projections + ReLU of the pixels,
  widths 784 (the pixels / 255), 1024, 2048, 4096, 1024 and 10 (softmax);
* k = 30, float32, reference = the network's prediction (argmax of the softmax probe).

Prints the machine, the sizes, per-probe seconds of both, the totals, the speedup against the
issue's target (>= 20x), and whether the depths (and the per-probe predictions) are identical.

    python benchmarks/bench_depth.py                 # the full benchmark (~1 min on 2 cores)
    python benchmarks/bench_depth.py --small         # smoke test, a few seconds
    python benchmarks/bench_depth.py --json out/bench_depth.json

Exit status 1 when the depths differ on more than 1% of the queries (a fast but wrong
result); a missed speed target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
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


def pdepth_depth(support, labels, queries, network_pred, k):
    """pdepth.prediction_depth; per-probe seconds from the moments it asks for each layer."""
    stamps: list[float] = []

    def stream(layers):
        for layer in layers:
            stamps.append(time.perf_counter())
            yield layer

    t0 = time.perf_counter()
    res = pdepth.prediction_depth(stream(support), labels, stream(queries),
                                  network_pred=network_pred, k=k, num_classes=10)
    end = time.perf_counter()
    # the support stream is asked first for each layer; layer l runs between its stamp and
    # the next layer's
    starts = stamps[0::2]
    seconds = [b - a for a, b in zip(starts, starts[1:] + [end], strict=True)]
    return res, end - t0, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-support", type=int, default=10_000)
    parser.add_argument("--n-query", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="2,000 x 1,000 smoke test")
    parser.add_argument("--root", default=pdepth.data.FASHION_MNIST_ROOT)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.small:
        args.n_support, args.n_query = 2_000, 1_000

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
    print("# Prediction depth: pdepth vs per-layer scikit-learn KNeighborsClassifier")
    print(describe_machine(info))
    print(f"device: cpu, dtype: float32, support N={n}, queries M={m}, k={k}, "
          f"probes L={len(WIDTHS)} of widths {list(WIDTHS)}, reference: network prediction")
    print("data: Fashion-MNIST (support: train[:N], queries: test[:M]); probes: fixed random "
          "projections + ReLU of the pixels, then a least-squares softmax readout "
          f"(test accuracy {net_acc:.3f})")
    print()

    # warm-up (thread pools, first-call costs), untimed
    pdepth.prediction_depth([p[:500] for p in support], labels[:500],
                            [p[:100] for p in queries], network_pred=network_pred[:100], k=k)

    ceiling_before = matmul_gflops(4096)
    res, pd_total, pd_layers = pdepth_depth(support, labels, queries, network_pred, k)
    t0 = time.perf_counter()
    sk_pred, sk_depth, sk_layers = sklearn_depth(support, labels, queries, network_pred, k)
    sk_total = time.perf_counter() - t0

    rows = []
    for layer, width in enumerate(WIDTHS):
        agree = (res.layer_pred[layer] == sk_pred[layer]).double().mean().item()
        rows.append([layer, width, fmt(pd_layers[layer]), fmt(sk_layers[layer]),
                     fmt(sk_layers[layer] / pd_layers[layer]),
                     fmt(knn_gflops(m, n, width, pd_layers[layer])), f"{agree:.5f}"])
    rows.append(["all", sum(WIDTHS), fmt(pd_total), fmt(sk_total), fmt(sk_total / pd_total),
                 fmt(knn_gflops(m, n, sum(WIDTHS), pd_total)), ""])
    print(format_table(["probe", "D", "pdepth s", "sklearn s", "speedup", "pdepth GFLOP/s",
                        "pred agreement"], rows))
    print()
    speedup = sk_total / pd_total
    identical = torch.equal(res.depth, sk_depth)
    differ = int((res.depth != sk_depth).sum())
    print(f"total: pdepth {pd_total:.2f} s, scikit-learn {sk_total:.2f} s, speedup "
          f"{speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x: {check(speedup, '>=', TARGET_SPEEDUP)})")
    # the best float32 GEMM rate seen before and after the runs (the machine may be shared)
    ceiling = max(ceiling_before, matmul_gflops(4096))
    flops_g = knn_gflops(m, n, sum(WIDTHS), 1.0)  # GFLOP of the cross terms, all probes
    print(f"roofline: the cross terms alone are {flops_g:.0f} GFLOP; torch.matmul at 4096^3 "
          f"runs at {ceiling:.0f} GFLOP/s here (best of before/after), i.e. >= "
          f"{flops_g / ceiling:.1f} s for any exact float32 search; the target "
          f"({sk_total / TARGET_SPEEDUP:.2f} s) needs "
          f"{knn_gflops(m, n, sum(WIDTHS), sk_total / TARGET_SPEEDUP):.0f} GFLOP/s")
    print(f"depths identical: {identical} ({differ} of {m} differ); per-probe predictions "
          f"identical: {torch.equal(res.layer_pred, sk_pred)}")
    print(f"mean depth {res.depth.double().mean():.3f}, depth histogram "
          f"{torch.bincount(res.depth, minlength=len(WIDTHS) + 1).tolist()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "machine": info, "n_support": n, "n_query": m, "k": k, "widths": WIDTHS,
                "pdepth_seconds": pd_total, "sklearn_seconds": sk_total,
                "pdepth_layer_seconds": pd_layers, "sklearn_layer_seconds": sk_layers,
                "speedup": speedup, "target_speedup": TARGET_SPEEDUP,
                "matmul_gflops": ceiling, "network_test_accuracy": net_acc,
                "depths_identical": identical, "depths_differing": differ,
            }, f, indent=1)
    return 1 if differ > 0.01 * m else 0


if __name__ == "__main__":
    sys.exit(main())
