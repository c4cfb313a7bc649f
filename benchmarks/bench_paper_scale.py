"""The paper's protocol at its scale: ResNet-18, every probe unpooled, the embedding store
(docs/design.md section 12).

Two measurements, one table each, after the machine (CPU model and flags):

1. **Passes**: the cost of a forward pass truncated after each probe, relative to a full
   forward pass (what several passes over the data cost when the disk cannot hold every
   probe at once).
2. **A run**: ``pdepth run`` with the given settings (or a finished run's ``config.json``
   with ``--from-run``): per model, the time and peak resident set of training, of each
   extraction pass and of each probe's k-NN with its rate (``2 n N D`` flop over the time),
   and the whole run's wall time and peak. ``--full-estimate`` adds what the same stages
   would take on the full training set (60,000 examples, halves of 30,000), scaled from the
   measured ones (training and extraction linearly in n, the k-NN in n N): an
   extrapolation, labelled so.

    python benchmarks/bench_paper_scale.py --subset 6000                # ~20 min on 2 cores
    python benchmarks/bench_paper_scale.py --subset all --memory-budget 12288   # one seed
    python benchmarks/bench_paper_scale.py --from-run runs/paper --full-estimate
    python benchmarks/bench_paper_scale.py --one-probe bn1 --subset all --memory-budget 8192
    python benchmarks/bench_paper_scale.py --one-model --subset all --memory-budget 12288 \
        --no-passes                                                   # issue 15's target

``--one-probe NAME`` measures one probe's stages at full size instead of a run: a seeded,
untrained network's embeddings of that probe for every example (one pass, truncated after
it, to the disk store in ``--out``), then its k-NN against the first half (k = 30, the
protocol's query order and self exclusion), with the time, rate and peak RSS of each.

``--one-model`` measures one model of the protocol instead of a run's two: the protocol's
own ``run_model`` trains model (seed 0, half 0) on its half and scores both halves through
the store, after the same disk check as ``pdepth run``; the stage table and the model's wall
time and peak follow.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _repo  # noqa: F401  (the working tree's pdepth, before `import pdepth`)
import torch
from _machine import cpu_flags, cpu_model

FULL_N = 60_000


def forward_costs(arch: str, batch: int = 200, repeat: int = 2) -> list[tuple[str, float]]:
    """``(probe, seconds of a forward truncated after it / a full forward)`` per probe."""
    from pdepth.depth.cache import sub_spec
    from pdepth.models import build_model
    from pdepth.probes import ProbeRecorder, resolve_probes

    model = build_model(arch).eval()
    spec = resolve_probes(model, arch, max_dim=None)
    x = torch.randn(batch, 1, 28, 28)

    def timed(part, truncate):
        with ProbeRecorder(model, part, truncate=truncate) as rec:
            rec.run(x[:8])  # warm-up
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                rec.run(x)
                best = min(best, time.perf_counter() - t0)
        return best

    full = timed(sub_spec(spec, []), False)
    return [(name, timed(sub_spec(spec, [i]), True) / full)
            for i, name in enumerate(spec.names)]


def one_probe(arch: str, probe: str, subset: str, budget_mib: float, out: Path) -> list[str]:
    """Extraction and k-NN of one probe at full size (see the module docstring)."""
    import numpy as np

    from pdepth.data import dataset_info, load_subset, normalize_images
    from pdepth.depth.cache import LayerStore, extract_to_store, layer_knn
    from pdepth.models import build_model
    from pdepth.probes import probe_dims, resolve_probes
    from pdepth.protocol.stages import stage

    torch.manual_seed(0)
    model = build_model(arch).eval()
    spec = resolve_probes(model, arch, max_dim=None)
    layer = spec.names.index(probe)
    info = dataset_info("fashion-mnist")
    images, labels, _ = load_subset(subset=None if subset == "all" else int(subset), seed=0)
    x = normalize_images(images, info.mean, info.std)
    n = x.shape[0]
    rows = np.random.default_rng(0).permutation(n)
    n_s = n // 2
    out.mkdir(parents=True, exist_ok=True)
    dims = probe_dims(model, spec, x[:1])
    store = LayerStore(n, dims, out, "bench")
    with stage({}) as ext:
        extract_to_store(model, x, rows, spec, [layer], store, logits=False, batch_size=1000,
                         device="cpu")
    self_index = torch.cat([torch.arange(n_s), torch.full((n - n_s,), -1)])
    with stage({}) as knn:
        layer_knn(store, layer, labels[torch.as_tensor(rows[:n_s])], k=30, num_classes=10,
                  self_index=self_index, memory_budget=int(budget_mib * 2**20), counts=True)
    store.drop(layer)
    dim = dims[layer]
    flop = 2 * n * n_s * dim
    return [f"probe {probe} (D = {dim}), {n} queries x {n_s} support, k = 30, untrained "
            f"{arch}, --memory-budget {budget_mib:.0f} MiB",
            f"  extraction (one pass, truncated): {ext['seconds']:.1f} s, peak RSS "
            f"{ext['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"  k-NN: {knn['seconds']:.1f} s, {flop / knn['seconds'] / 1e9:.1f} GFLOP/s "
            f"({flop:.2e} flop), peak RSS {knn['peak_rss_bytes'] / 2**30:.2f} GiB"]


def one_model(a) -> dict:
    """Model (seed 0, half 0) of ``pdepth run --arch A --max-dim 0 --subset S --epochs E
    --memory-budget B``, through the protocol's code; returns a ``config.json``-like record
    of it for :func:`stage_table` (also written beside ``--out``, as ``OUT.one_model.json``).
    ``--out`` is prepared as ``pdepth run --overwrite`` would: a directory holding anything
    pdepth did not write is refused, not deleted."""
    from pdepth.protocol import RunConfig
    from pdepth.protocol.model_run import run_model
    from pdepth.protocol.outdir import model_path, prepare_output
    from pdepth.protocol.runner import load_run_data
    from pdepth.protocol.scoring import check_cache_space
    from pdepth.protocol.stages import peak_rss_bytes, stage_peaks

    out = Path(a.out)
    config = RunConfig(arch=a.arch, max_dim=None, seeds=[0], epochs=a.epochs,
                       subset=None if a.subset == "all" else int(a.subset),
                       memory_budget=int(a.memory_budget * 2**20))
    t0 = time.perf_counter()
    data = load_run_data(config, progress=True)
    config = data.config
    check_cache_space(out, data.n, data.dims, config.memory_budget)
    prepare_output(out, config, overwrite=True)
    meta = run_model(config, data, 0, 0, path=model_path(out, 0, 0), progress=True,
                     log=lambda m: print(m, flush=True))["meta"]
    cfg = {"resolved": {"num_examples": data.n, "num_layers": data.spec.num_probes,
                        "probes": list(data.spec.names), "probe_dims": list(data.dims)},
           "config": {"knn_filter": config.knn_filter, "memory_budget": config.memory_budget},
           "models": [meta], "timing": {"total_seconds": time.perf_counter() - t0}}
    cfg["peak_rss_bytes"] = max([peak_rss_bytes()] + stage_peaks(cfg["models"]))
    out.with_name(out.name + ".one_model.json").write_text(json.dumps(cfg, indent=1))
    return cfg


def run_record(a) -> dict:
    """The ``config.json`` of ``--from-run``, or of ``pdepth run`` with the given settings
    (one seed: two models), run first."""
    out = Path(a.from_run or a.out)
    if a.from_run is None:
        from pdepth.cli import main as cli

        argv = ["run", "--arch", a.arch, "--max-dim", "0", "--subset", a.subset, "--epochs",
                str(a.epochs), "--seeds", "1", "--memory-budget", str(a.memory_budget),
                "--out", str(out), "--overwrite"]
        print(f"\npdepth {' '.join(argv)}")
        if cli(argv) != 0:
            raise SystemExit("the run failed")
    return json.loads((out / "config.json").read_text())


def stage_table(cfg: dict, full_estimate: bool) -> list[str]:
    """Rows of the per-stage table of a finished run's ``config.json``."""
    n = cfg["resolved"]["num_examples"]
    dims = dict(zip(cfg["resolved"]["probes"], cfg["resolved"]["probe_dims"], strict=True))
    scale_n, scale_nn = FULL_N / n, (FULL_N / n) ** 2
    lines = [f"{'model':<8} {'stage':<22} {'seconds':>9} {'peak RSS GiB':>12} "
             f"{'GFLOP/s':>8}" + (f" {'full-set s (extrapolated)':>26}" if full_estimate else "")]
    totals = {"measured": 0.0, "full": 0.0}
    for m in cfg["models"]:
        st, name = m["stages"], f"s{m['seed']}h{m['half']}"
        recs = [("train", st["train"], None, scale_n)]
        recs += [(f"extract pass {i + 1}", r, None, scale_n)
                 for i, r in enumerate(st["extract"])]
        recs += [(f"k-NN {r['probe']}", r, 2 * n * (n // 2) * dims[r["probe"]], scale_nn)
                 for r in st["knn"]]
        for stage, r, flop, scale in recs:
            rate = f"{flop / r['seconds'] / 1e9:8.1f}" if flop else " " * 8
            est = f" {r['seconds'] * scale:26.0f}" if full_estimate else ""
            lines.append(f"{name:<8} {stage:<22} {r['seconds']:9.1f} "
                         f"{r['peak_rss_bytes'] / 2**30:12.2f} {rate}{est}")
            totals["measured"] += r["seconds"]
            totals["full"] += r["seconds"] * scale
    lines.append(f"run wall time {cfg['timing']['total_seconds']:.0f} s, stages "
                 f"{totals['measured']:.0f} s, peak RSS {cfg['peak_rss_bytes'] / 2**30:.2f} GiB"
                 + (f"; full set (extrapolated) {totals['full'] / 3600:.2f} h"
                    if full_estimate else ""))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--subset", default="6000", help="examples, or 'all'")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--memory-budget", type=float, default=1024, help="MiB")
    p.add_argument("--out", default="runs/bench-paper-scale")
    p.add_argument("--from-run", default=None, help="a finished run's directory")
    p.add_argument("--full-estimate", action="store_true")
    p.add_argument("--no-passes", action="store_true", help="skip the forward-cost table")
    p.add_argument("--one-probe", default=None, help="measure one probe at full size")
    p.add_argument("--one-model", action="store_true",
                   help="one model (seed 0, half 0) instead of a run's two")
    a = p.parse_args()
    flags = ", ".join(f for f, on in cpu_flags().items() if on)
    print(f"machine: {cpu_model()} ({flags}), {torch.get_num_threads()} threads")
    if not a.no_passes:
        print("\nforward pass truncated after each probe, relative to a full forward pass:")
        for name, ratio in forward_costs(a.arch):
            print(f"  {name:<10} {ratio:5.2f}")
    if a.one_probe:
        print("\n".join(one_probe(a.arch, a.one_probe, a.subset, a.memory_budget, Path(a.out))))
        return
    if a.one_model:
        cfg = one_model(a)
    else:
        cfg = run_record(a)
    print(f"\n{cfg['resolved']['num_examples']} examples, {cfg['resolved']['num_layers']} "
          f"probes, dims {cfg['resolved']['probe_dims']}, k-NN filter "
          f"{cfg['config']['knn_filter']}, --memory-budget "
          f"{cfg['config']['memory_budget'] / 2**20:.0f} MiB, embeddings "
          f"{cfg['models'][0]['memory'].get('cache', '?')}")
    print("\n".join(stage_table(cfg, a.full_estimate)))


if __name__ == "__main__":
    main()
