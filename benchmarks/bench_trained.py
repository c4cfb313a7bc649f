"""The k-NN filter on *trained* embeddings (issue 26): the paper's ResNet-18 (GroupNorm,
CIFAR stem), trained briefly on Fashion-MNIST, its unpooled probes (the stem's norm and every
block: D = 50,176 down to 4,608), and every filter mode timed against the plain torch
pipeline (addmm + topk) and the float32 and bfloat16 ``torch.matmul`` rates (4096 x 2048 x
4096) of the same run, interleaved round by round.

Two settings per probe: ``held`` (``--queries`` held-out rows against ``--support`` training
rows) and ``self`` (the training rows against themselves, the self match excluded: half the
protocol's k-NN work). Per probe and setting: each mode's time, useful rate ``2 Q N D /
time``, its ratios to both matmul rates and to the torch pipeline, candidates per query and
fallback tiles (``pdepth.knn_stats``), the time split of the kernel where ``knn_stats``
reports one, and whether the mode's output (pred, index, the bits of dist) equals ``fp32``'s.
A geometry table says what the filter faces: the share of zero features, how much the
queries' mean carries of the rows' norms (the centring shift), and how many pairs per query
the bf16 margin alone must pass (exact float64 distances of a sample of queries).

    python benchmarks/bench_trained.py                  # the issue's sizes, every probe
    python benchmarks/bench_trained.py --support 1500 --queries 500 --probes bn1,layer4.0 \
        --filters fp32,bf16,bf16:piece --repeat 1       # a couple of minutes once trained

The trained weights are cached in ``--cache`` per (support rows, steps, batch): training
takes a few minutes on a quiet 2-core machine (34 on a loaded one). ``NAME:piece`` in
``--filters`` runs NAME with the wide path's chunk GEMM of before issue 26. Exit status 1
when a mode's output is not bit-identical to ``fp32``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _repo  # noqa: F401  (the working tree's pdepth, before `import pdepth`)
import torch
from _machine import OtherLoad, describe_machine, machine_info
from _tables import fmt, format_table
from _timing import matmul_fn, time_many

import pdepth

K = 30
NUM_CLASSES = 10
MATMUL = (4096, 2048, 4096)  # M x K x N of the matmul rates


# ---------------------------------------------------------------------------------------
# The model and its embeddings
# ---------------------------------------------------------------------------------------


def load_data(support: int, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``support + queries`` Fashion-MNIST training images (normalised, ``[n, 1, 28, 28]``
    float32) and labels ``[n]``, in a fixed random order: the first ``support`` train."""
    from pdepth.data import dataset_info, load_subset, normalize_images

    info = dataset_info("fashion-mnist")
    images, labels, _ = load_subset(subset=support + queries, seed=0)
    return normalize_images(images, info.mean, info.std), labels


def trained_model(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int,
                  cache: Path) -> tuple[torch.nn.Module, str]:
    """ResNet-18 trained ``steps`` Adam steps (lr 2e-3, cosine) on batches of ``batch``
    rows of ``x`` (seed 0), or its weights from ``cache``. Returns the model (eval mode) and
    a line saying what was done."""
    from pdepth.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18")
    path = cache / f"resnet18-fmnist-n{x.shape[0]}-steps{steps}-b{batch}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), f"weights from {path}"
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    tail = sum(losses[-20:]) / len(losses[-20:])
    return model.eval(), (f"trained {steps} steps of {batch} in {time.perf_counter() - t0:.0f} s "
                          f"(last 20 steps' mean loss {tail:.3f}), cached in {path}")


def embeddings(model, x: torch.Tensor, probes: list[str] | None) -> dict[str, torch.Tensor]:
    """The unpooled embeddings ``[n, D]`` float32 of the chosen probes (default: every probe
    but the input and the softmax), one forward pass truncated after the last of them."""
    from pdepth.depth.cache import sub_spec
    from pdepth.probes import ProbeRecorder, resolve_probes

    spec = resolve_probes(model, "resnet18", max_dim=None)
    wanted = probes or [n for n in spec.names if n not in ("input", "softmax")]
    unknown = [p for p in wanted if p not in spec.names]
    if unknown:
        raise ValueError(f"--probes: unknown probe {unknown[0]!r}; valid: "
                         f"{', '.join(spec.names)}")
    layers = sorted(spec.names.index(p) for p in wanted)
    part = sub_spec(spec, layers)
    chunks: list[list[torch.Tensor]] = [[] for _ in layers]
    with torch.no_grad(), ProbeRecorder(model, part, truncate=True) as rec:
        for i in range(0, x.shape[0], 250):
            out, _ = rec.run(x[i:i + 250])
            for c, t in zip(chunks, out, strict=True):
                c.append(t)
    return {spec.names[i]: torch.cat(c) for i, c in zip(layers, chunks, strict=True)}


def geometry(q: torch.Tensor, s: torch.Tensor, self_match: bool, margin: float,
             sample: int = 64) -> dict:
    """What the filter faces on this data: the share of zero entries, the share of the
    queries' mean squared norm carried by their mean (what centring removes), and, from exact
    float64 distances of ``sample`` queries, the k-th distance relative to the centred
    ``|a|^2 + |b|^2`` of its pair and the pairs per query whose ``E - margin * Q`` is at
    most the k-th distance (the candidates of a perfect GEMM with the bf16 margin)."""
    mean = q.double().mean(0)
    qn = q.double().pow(2).sum(1)
    a, b = q[:sample].double() - mean, s.double() - mean
    an, bn = a.pow(2).sum(1, keepdim=True), b.pow(2).sum(1)
    dist = torch.cdist(q[:sample].double(), s.double()).pow(2)
    if self_match:
        dist[torch.arange(sample), torch.arange(sample)] = float("inf")
    kth, at = dist.kthvalue(K, 1)
    qsum = an + bn
    pass_ = (dist - margin * qsum <= kth.unsqueeze(1)).sum(1).double()
    if self_match:
        pass_ -= 1  # the self pair is never a candidate
    return {
        "zeros": float((q == 0).double().mean()),
        "mean_share": float(mean.dot(mean) / qn.mean()),
        "kth_over_q": float((kth / qsum.gather(1, at.unsqueeze(1)).squeeze(1)).median()),
        "margin_pairs": float(pass_.mean()),
    }


# ---------------------------------------------------------------------------------------
# Timing one (probe, setting)
# ---------------------------------------------------------------------------------------


def torch_pipeline(q, s, y, self_match: bool, max_elements: int = 2**25):
    """The plain torch pipeline (``|q|^2 - 2 q.s + |s|^2`` with ``addmm`` over query chunks,
    ``topk``, a bincount vote); with ``self_match`` query i's own support row i is set to inf
    first. Returns ``(pred[M], index[M, K])``."""
    from _baselines import torch_vote

    n = s.shape[0]
    rows = max(1, max_elements // n)
    snorm, qnorm = s.pow(2).sum(1).unsqueeze(0), q.pow(2).sum(1, keepdim=True)
    preds, indices = [], []
    for r0 in range(0, q.shape[0], rows):
        dist = torch.addmm(snorm, q[r0:r0 + rows], s.t(), alpha=-2.0).add_(qnorm[r0:r0 + rows])
        if self_match:
            r = torch.arange(dist.shape[0])
            dist[r, r + r0] = float("inf")
        index = dist.topk(K, dim=1, largest=False).indices
        preds.append(torch_vote(y[index], NUM_CLASSES))
        indices.append(index)
    return torch.cat(preds), torch.cat(indices)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def identical(a, b) -> bool:
    return (torch.equal(a.pred, b.pred) and torch.equal(a.index, b.index)
            and torch.equal(_bits(a.dist), _bits(b.dist)))


def bench_one(q, s, y, self_match: bool, filters: list[str], repeat: int) -> dict:
    """Every mode, the torch pipeline and both matmul rates on one (queries, support),
    interleaved; one untimed call per mode first (its stats and its warm-up)."""
    sidx = torch.arange(s.shape[0]) if self_match else None

    def mode(f):
        name, _, variant = f.partition(":")
        if variant != "piece":
            return lambda: pdepth.knn_vote(q, s, y, K, NUM_CLASSES, self_index=sidx, filter=name)

        def per_piece():  # the wide path's chunk GEMM before issue 26 (centred_dot per piece)
            pdepth._C._knn_low_chunk(False, 0)
            try:
                return pdepth.knn_vote(q, s, y, K, NUM_CLASSES, self_index=sidx, filter=name)
            finally:
                pdepth._C._knn_low_chunk(True, 0)
        return per_piece

    calls: dict[str, list[dict]] = {f: [] for f in filters}

    def timed(f):  # the stats of each timed call (knn_stats is process-wide)
        fn = mode(f)

        def run():
            pdepth.knn_stats(reset=True)
            result = fn()
            calls[f].append(pdepth.knn_stats(reset=True))
            return result
        return run

    stats, first = {}, {}
    pdepth.knn_stats(reset=True)
    for f in filters:
        first[f] = mode(f)()
        stats[f] = pdepth.knn_stats(reset=True)
    fns = {f: timed(f) for f in filters}
    fns["torch"] = lambda: torch_pipeline(q, s, y, self_match)
    fns["matmul fp32"] = matmul_fn(0, dtype=torch.float32, shape=MATMUL)
    fns["matmul bf16"] = matmul_fn(0, dtype=torch.bfloat16, shape=MATMUL)
    for name in ("torch", "matmul fp32", "matmul bf16"):
        fns[name]()  # warm-up
    with OtherLoad() as load:
        timings = time_many(fns, repeat, warmup=0)
    ref = first["fp32"] if "fp32" in first else pdepth.knn_vote(
        q, s, y, K, NUM_CLASSES, self_index=sidx, filter="fp32")
    mm = 2.0 * MATMUL[0] * MATMUL[1] * MATMUL[2]
    out = {"m": q.shape[0], "n": s.shape[0], "d": s.shape[1], "other_load": load.fraction,
           "matmul_fp32": mm / timings["matmul fp32"].median / 1e9,
           "matmul_bf16": mm / timings["matmul bf16"].median / 1e9,
           "torch_seconds": timings["torch"].median,
           "torch_same_pred": float((timings["torch"].result[0] == ref.pred).double().mean()),
           "modes": {}}
    for f in filters:
        t = timings[f]
        split = {key: sum(c[key] for c in calls[f]) / len(calls[f]) for key in calls[f][0]
                 if key.startswith("ns_")}
        out["modes"][f] = {"seconds": t.median, "mean_seconds": sum(t.times) / len(t.times),
                           "spread": t.spread, "stats": stats[f], "split_ns": split,
                           "identical": identical(first[f], ref) and identical(t.result, ref)}
    return out


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def rate(r: dict, seconds: float) -> float:
    return 2.0 * r["m"] * r["n"] * r["d"] / seconds / 1e9


SPLIT = ("gemm", "norms", "seeds", "keys", "select")


def split_text(mr: dict) -> str:
    """The kernel's time split (``knn_stats`` ``ns_*``, mean over the timed calls) as shares
    of their mean time; the rest is outside the kernel's phases (checks, the vote)."""
    split = mr["split_ns"]
    if f"ns_{SPLIT[0]}" not in split:
        return "-"
    return " ".join(f"{p} {split[f'ns_{p}'] / 1e9 / mr['mean_seconds']:.0%}" for p in SPLIT)


def detail_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for f, mr in r["modes"].items():
            st, sec = mr["stats"], mr["seconds"]
            g = rate(r, sec)
            rows.append([r["probe"], r["d"], r["setting"], f, fmt(sec), fmt(g),
                         f"{g / r['matmul_fp32']:.2f}x", f"{g / r['matmul_bf16']:.2f}x",
                         f"{sec / r['torch_seconds']:.2f}",
                         fmt(st.get("candidates", 0) / r["m"]),
                         f"{st.get('fallback_tiles', 0)}/{st.get('tiles', 0)}",
                         split_text(mr), "yes" if mr["identical"] else "NO"])
        rows.append([r["probe"], r["d"], r["setting"], "torch", fmt(r["torch_seconds"]),
                     fmt(rate(r, r["torch_seconds"])),
                     f"{rate(r, r['torch_seconds']) / r['matmul_fp32']:.2f}x",
                     f"{rate(r, r['torch_seconds']) / r['matmul_bf16']:.2f}x", "1.00", "-",
                     "-", f"pred = fp32's on {r['torch_same_pred']:.1%}", "-"])
    return format_table(["probe", "D", "setting", "mode", "s", "GFLOP/s", "x fp32 mm",
                         "x bf16 mm", "/ torch", "cand/q", "fallback", "split of the call",
                         "= fp32"], rows)


def rates_table(results: list[dict]) -> str:
    rows = [[r["probe"], r["setting"], fmt(r["matmul_fp32"]), fmt(r["matmul_bf16"]),
             f"{r['matmul_bf16'] / r['matmul_fp32']:.2f}",
             "-" if r["other_load"] is None else f"{r['other_load']:.2f}"] for r in results]
    return format_table(["probe", "setting", "fp32 mm GFLOP/s", "bf16 mm GFLOP/s", "bf16/fp32",
                         "other load"], rows)


def combined_table(results: list[dict], filters: list[str]) -> str:
    """Per probe, both settings together (the protocol's work): 2 (Q + N) N D over the summed
    time, against the matmul rates (the mean of the two settings') and the torch pipeline."""
    by_probe: dict[str, list[dict]] = {}
    for r in results:
        by_probe.setdefault(r["probe"], []).append(r)
    rows = []
    for probe, rs in by_probe.items():
        if len(rs) != 2:
            continue
        flop = sum(2.0 * r["m"] * r["n"] * r["d"] for r in rs)
        fp32 = sum(r["matmul_fp32"] for r in rs) / 2
        bf16 = sum(r["matmul_bf16"] for r in rs) / 2
        torch_s = sum(r["torch_seconds"] for r in rs)
        for f in filters:
            sec = sum(r["modes"][f]["seconds"] for r in rs)
            g = flop / sec / 1e9
            rows.append([probe, rs[0]["d"], f, fmt(g), f"{g / fp32:.2f}x", f"{g / bf16:.2f}x",
                         f"{sec / torch_s:.2f}"])
    return format_table(["probe", "D", "mode", "GFLOP/s", "x fp32 mm", "x bf16 mm", "/ torch"],
                        rows)


def geometry_table(results: list[dict]) -> str:
    rows = [[r["probe"], r["d"], r["setting"], f"{r['geometry']['zeros']:.0%}",
             f"{r['geometry']['mean_share']:.2f}", f"{r['geometry']['kth_over_q']:.3f}",
             fmt(r["geometry"]["margin_pairs"]), fmt(r["plan_margin"])]
            for r in results]
    return format_table(["probe", "D", "setting", "zeros", "|mean|^2 / mean |q|^2",
                         "k-th dist / Q", "pairs in bf16 margin / q", "bf16 m"], rows)


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--support", type=int, default=3000, help="training rows (support)")
    p.add_argument("--queries", type=int, default=1000, help="held-out query rows")
    p.add_argument("--probes", default=None,
                   help="comma-separated probe names (default: every unpooled probe)")
    p.add_argument("--settings", default="held,self", help="held, self or both")
    p.add_argument("--filters", default="fp32,bf16,bf16x3,auto",
                   help="filter modes; NAME:piece runs NAME with the wide path's chunk GEMM "
                        "of before issue 26 (centred_dot per piece; a test hook)")
    p.add_argument("--steps", type=int, default=100, help="training steps")
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache", default="/tmp/pdepth-bench-cache", help="trained weights")
    p.add_argument("--json", default=None, help="write every number here")
    a = p.parse_args(argv)
    for name in ("support", "queries", "steps", "batch", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    a.settings = [x for x in a.settings.split(",") if x]
    if not a.settings or set(a.settings) - {"held", "self"}:
        p.error(f"--settings must list held and/or self, got {','.join(a.settings)!r}")
    a.filters = [x for x in a.filters.split(",") if x]
    if "fp32" not in a.filters:
        a.filters.insert(0, "fp32")
    a.probes = [x for x in a.probes.split(",") if x] if a.probes else None
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    info = machine_info()
    print(describe_machine(info))
    x, y = load_data(a.support, a.queries)
    model, how = trained_model(x[:a.support], y[:a.support], a.steps, a.batch, Path(a.cache))
    print(f"ResNet-18 (GroupNorm) on Fashion-MNIST: {how}")
    t0 = time.perf_counter()
    emb = embeddings(model, x, a.probes)
    print(f"embeddings of {len(emb)} probes for {x.shape[0]} rows in "
          f"{time.perf_counter() - t0:.0f} s; k = {K}, repeat {a.repeat}, filters "
          f"{','.join(a.filters)}")
    ys = y[:a.support]
    results = []
    for probe, e in emb.items():
        s, held = e[:a.support].contiguous(), e[a.support:].contiguous()
        plan = pdepth.knn_plan(e.shape[1], filter="bf16")
        for setting in a.settings:
            q = held if setting == "held" else s
            r = bench_one(q, s, ys, setting == "self", a.filters, a.repeat)
            r.update(probe=probe, setting=setting, plan_margin=plan["margin"],
                     geometry=geometry(q, s, setting == "self", plan["margin"]))
            results.append(r)
            best = min(a.filters, key=lambda f: r["modes"][f]["seconds"])
            print(f"  {probe} D={r['d']} {setting}: best {best} "
                  f"{rate(r, r['modes'][best]['seconds']):.0f} GFLOP/s, torch "
                  f"{rate(r, r['torch_seconds']):.0f}, matmul fp32 {r['matmul_fp32']:.0f} "
                  f"bf16 {r['matmul_bf16']:.0f}", flush=True)
        del s, held
    print(f"\nMatmul rates ({MATMUL[0]} x {MATMUL[1]} x {MATMUL[2]}) and the other processes' "
          "load (fraction of all CPUs) while each block ran:\n")
    print(rates_table(results))
    print("\nEvery mode per probe and setting (useful rate 2 Q N D / time; '/ torch' is the "
          "time over the torch pipeline's; split: the kernel's own phases, share of the "
          "call):\n")
    print(detail_table(results))
    if set(a.settings) == {"held", "self"}:
        print("\nBoth settings together, 2 (Q + N) N D / summed time:\n")
        print(combined_table(results, a.filters))
    print("\nGeometry (k-th distance relative to the centred |a|^2 + |b|^2; pairs per query "
          "a perfect GEMM with the bf16 margin would pass):\n")
    print(geometry_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "args": vars(a),
                                            "results": results}, indent=1, default=str))
    bad = [(r["probe"], r["setting"], f) for r in results
           for f, mr in r["modes"].items() if not mr["identical"]]
    if bad:
        print(f"\nNOT bit-identical to fp32: {bad}")
        return 1
    print("\nevery mode bit-identical to fp32 (pred, index, dist bits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
