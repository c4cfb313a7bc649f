"""A/B of two builds of pdepth on trained embeddings: each build's k-NN in its own process,
the builds alternated round by round (A B A B ...), so that a drifting machine moves both.

The embeddings are bench_trained.py's (its cached ResNet-18 and unpooled probes), written once
to ``--emb``. Per probe, filter and setting (``held``: the held-out rows against the training
rows; ``self``: the training rows against themselves, the self match excluded): the call's
time, the canonical keys' phase time (``knn_stats()["ns_keys"]``), keys per query and a digest
of the output bits, per build and round.

    python benchmarks/ab_trained.py /path/to/tree_a /path/to/tree_b --filters fp32,bf16

Each tree is a checkout with pdepth built in place. ``--bf16-gemm sgemm`` runs the bf16
formats' rounding through the float32 sgemm (a CPU without a bfloat16 unit: the key counts are
the format's, the times are not an AVX512-BF16 machine's). Exit status 1 when two builds or
two filters disagree on the bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
K = 30


def write_embeddings(path: Path, support: int, queries: int, probes: list[str]) -> None:
    """bench_trained.py's embeddings ``[support + queries, D]`` per probe, saved to ``path``."""
    import _repo  # noqa: F401
    import bench_trained as bt
    import torch

    x, y = bt.load_data(support, queries)
    model, line = bt.trained_model(x[:support], y[:support], 100, 32,
                                   Path("/tmp/pdepth-bench-cache"))
    print(line, file=sys.stderr)
    torch.save({"support": support, **bt.embeddings(model, x, probes)}, path)


def child(tree: str, emb: str, filters: list[str], bf16_gemm: str) -> dict:
    """One build's measurements (runs in its own process, ``tree`` first on sys.path)."""
    sys.path.insert(0, tree)
    import torch

    import pdepth
    assert pdepth.__file__.startswith(tree), pdepth.__file__
    if bf16_gemm:
        pdepth._C._knn_test_hooks(bf16_gemm=bf16_gemm)
    data = torch.load(emb)
    n = data.pop("support")
    out = {}
    for probe, x in data.items():
        s, q = x[:n].contiguous(), x[n:].contiguous()
        for f in filters:
            calls = {"held": (q, s, None), "self": (s, s, torch.arange(n))}
            for setting, (qs, ss, self_index) in calls.items():
                pdepth.knn_stats(reset=True)
                t0 = time.perf_counter()
                r = pdepth.knn(qs, ss, K, self_index=self_index, filter=f)
                seconds = time.perf_counter() - t0
                st = pdepth.knn_stats()
                rows = q.shape[0] if setting == "held" else n
                bits = r.dist.numpy().tobytes() + r.index.numpy().tobytes()
                out[f"{probe}|{f}|{setting}"] = {
                    "s": seconds, "keys_s": st["ns_keys"] / 1e9,
                    "keys_per_query": st["candidates"] / rows,
                    "digest": hashlib.sha1(bits).hexdigest()[:12]}
    return out


def _cells(a_: list[dict], b_: list[dict], field: str, fmt: str) -> str:
    return "; ".join(", ".join(fmt.format(r[field]) for r in rs) for rs in (a_, b_))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs=2, help="build A's and build B's checkout")
    p.add_argument("--filters", default="fp32,bf16")
    p.add_argument("--probes", default="bn1,layer3.0,layer4.0")
    p.add_argument("--support", type=int, default=3000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bf16-gemm", default="", choices=["", "kernel", "mkl", "sgemm"])
    p.add_argument("--emb", default="/tmp/pdepth-bench-cache/ab_trained_emb.pt")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    filters = a.filters.split(",")
    if a.child is not None:
        print(json.dumps(child(a.child, a.emb, filters, a.bf16_gemm)))
        return 0
    emb = Path(a.emb)
    if not emb.exists():
        emb.parent.mkdir(parents=True, exist_ok=True)
        write_embeddings(emb, a.support, a.queries, a.probes.split(","))
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for _ in range(a.rounds):
        for name, tree in zip("AB", a.trees, strict=True):
            cmd = [sys.executable, __file__, *a.trees, "--child", str(Path(tree).resolve()),
                   "--emb", str(emb), "--filters", a.filters, "--bf16-gemm", a.bf16_gemm]
            runs[name].append(json.loads(subprocess.run(
                cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    print("| probe | filter | setting | keys / query, A -> B | keys s, A; B | call s, A; B |")
    print("|---|---|---|--:|--:|--:|")
    digests = {}
    for key in runs["A"][0]:
        probe, f, setting = key.split("|")
        a_, b_ = [r[key] for r in runs["A"]], [r[key] for r in runs["B"]]
        for r in a_ + b_:
            digests.setdefault((probe, setting), set()).add(r["digest"])
        print(f"| {probe} | {f} | {setting} | {a_[0]['keys_per_query']:.1f} -> "
              f"{b_[0]['keys_per_query']:.1f} | {_cells(a_, b_, 'keys_s', '{:.3f}')} | "
              f"{_cells(a_, b_, 's', '{:.2f}')} |")
    same = all(len(d) == 1 for d in digests.values())
    print("every build, filter and round bit-identical" if same else "OUTPUTS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
