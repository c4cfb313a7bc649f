"""Support-set sharding (pdepth.distributed) against one process, on this machine.

One process runs :func:`pdepth.knn_vote` on the whole support set with all usable cores;
then ``--world`` gloo processes on the CPU (spawned here, ``cores / world`` torch threads
each, so both sides use the same cores) each hold a contiguous shard (``shard_range``) and
run :func:`pdepth.distributed.knn_vote`. Rank 0 checks that predictions, distances and indices
equal the single-process result exactly, and the script prints the times (median over the
runs; the sharded time is the slowest rank's, split into the local op call and the rest:
handshake, all-gather and merge) and the communication volume per query block:
``world * M * k * (4 + 8 + 8)`` bytes gathered by every rank (float32 distances, int64
indices, int64 labels) plus the handshake.

On one CPU this measures overhead (the cores are shared, so no speed-up is expected); the
scaling over GPUs/nodes is estimated in docs/distributed.md.

    python benchmarks/bench_distributed.py                 # N=20000, Q=5000, D=512, k=30
    python benchmarks/bench_distributed.py --small         # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import _repo  # noqa: F401  (the working tree's pdepth, before `import pdepth`)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _data import make_data
from _machine import describe_machine, machine_info
from _tables import fmt, format_table

import pdepth
from pdepth import distributed as pdist


def _worker(rank, world, args, tmp):
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    data = make_data(args.n, args.q, args.d, args.classes, seed=0)
    a, b = pdist.shard_range(args.n, rank, world)
    shard, lab = data.support[a:b].clone(), data.labels[a:b].clone()
    del data.support
    times, local_times = [], []
    for i in range(args.warmup + args.repeat):
        dist.barrier()
        t0 = time.perf_counter()
        out = pdist.knn_vote(data.queries, shard, lab, args.k, args.classes, shard_offset=a)
        t = time.perf_counter() - t0
        t0 = time.perf_counter()
        pdepth.knn_vote(data.queries, shard, lab, args.k, args.classes)  # the local op alone
        tl = time.perf_counter() - t0
        # the slowest rank's times
        tt = torch.tensor([t, tl], dtype=torch.float64)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(float(tt[0]))
            local_times.append(float(tt[1]))
    if rank == 0:
        torch.save({"out": tuple(out), "times": times, "local": local_times},
                   f"{tmp}/rank0.pt")
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--q", type=int, default=5000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--small", action="store_true", help="N=2000, Q=500, D=64")
    args = p.parse_args(argv)
    if args.small:
        args.n, args.q, args.d = 2000, 500, 64
    args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    torch.set_num_threads(args.threads)

    print("# pdepth support-set sharding (torch.distributed, gloo, CPU)")
    print(describe_machine(machine_info("cpu")))
    print(f"float32, N={args.n} support, Q={args.q} queries, D={args.d}, k={args.k}, "
          f"{args.classes} classes; world={args.world} processes x "
          f"{max(1, args.threads // args.world)} threads vs 1 process x {args.threads} threads; "
          f"median of {args.repeat} runs after {args.warmup} warm-up")

    data = make_data(args.n, args.q, args.d, args.classes, seed=0)
    single = []
    for i in range(args.warmup + args.repeat):
        t0 = time.perf_counter()
        want = pdepth.knn_vote(data.queries, data.support, data.labels, args.k, args.classes)
        if i >= args.warmup:
            single.append(time.perf_counter() - t0)
    del data

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.world, args, tmp), nprocs=args.world,
                           join=True, start_method="spawn")
        res = torch.load(f"{tmp}/rank0.pt")
    same = all(torch.equal(a, b) for a, b in zip(res["out"], want, strict=True))
    t1 = statistics.median(single)
    tw = statistics.median(res["times"])
    tl = statistics.median(res["local"])
    gathered = args.world * args.q * args.k * (4 + 8 + 8)
    handshake = args.world * len(pdist._FIELDS) * 8
    rows = [
        ["1 process (pdepth.knn_vote)", fmt(t1), "-", "-", "1.000"],
        [f"{args.world} ranks (pdepth.distributed.knn_vote)", fmt(tw), fmt(tl),
         fmt(tw - tl), fmt(tw / t1)],
    ]
    print(format_table(["run", "median s", "local op s (slowest rank)",
                        "handshake + gather + merge s", "time / 1 process"], rows))
    print(f"same result as 1 process (pred, dist, index exactly equal): {same}")
    print(f"communication per query block of M={args.q}: every rank gathers "
          f"world * M * k * (4 + 8 + 8) = {gathered:,} bytes ({gathered / 2**20:.1f} MiB) "
          f"+ handshake {handshake} bytes; per query {gathered // args.q:,} bytes "
          f"(vs {args.n // args.world * args.d * 4:,} bytes of support per shard, never sent)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
