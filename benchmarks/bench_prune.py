"""Pruning curves on Fashion-MNIST (issue 25's target): `pdepth run` with the default
architecture, then `pdepth prune` by prediction depth, EL2N, forgetting events, AUM and
random at keep 0.3/0.5/0.7/0.9, both ends removed, 3 retraining seeds; prints each curve
(mean +- std over the seeds) and, per fraction >= 0.5, whether the best prediction-depth
selection is at least as good as the best other score and as random.

    python benchmarks/bench_prune.py --out-dir runs/bench-prune            # the full target
    python benchmarks/bench_prune.py --quick --out-dir /tmp/bench-prune    # a smoke test:
                                        # 300 examples, 1 epoch, 1 seed, keep 0.5, 2 scores
    python benchmarks/bench_prune.py --run-dir runs/pdepth                 # an existing run

Both steps are the CLI's (`pdepth run ...`, `pdepth prune ...`; printed), so an interrupted
benchmark resumes where it stopped when run again with the same arguments. Scores the run
does not have (an older run without el2n / forgetting_events / aum) are skipped with one
line. Writes a JSON record (machine, commands, seconds, prune.json) to --record and prints a
table; the machine is recorded with it (benchmarks/_machine.py). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import describe_machine, machine_info  # noqa: E402

PD = ("held_out_depth", "train_depth")
SCORES = "held_out_depth,train_depth,el2n,forgetting_events,aum,random"
KEEP = "0.3,0.5,0.7,0.9"


def commands(args) -> tuple[list[str] | None, list[str]]:
    """``(pdepth run's arguments or None, pdepth prune's arguments)``."""
    run_dir = args.run_dir or str(Path(args.out_dir) / "run")
    run = None if args.run_dir else (
        ["run", "--out", run_dir, "--device", args.device, "--quiet"]
        + (["--subset", "300", "--epochs", "1", "--seeds", "1", "--k", "5"] if args.quick
           else []))
    prune = ["prune", run_dir, "--device", args.device, "--quiet",
             "--scores", "held_out_depth,random" if args.quick else SCORES,
             "--keep", "0.5" if args.quick else KEEP, "--remove", "easy,hard",
             "--seeds", "1" if args.quick else "3"]
    return run, prune


def verdict(prune: dict) -> list[str]:
    """Per mode and fraction >= 0.5: the best PD selection against the best other score and
    random (means over the seeds)."""
    lines = []
    scores = prune.get("scores", {})
    random = scores.get("random", {}).get("modes", {}).get("uniform", {})
    for mode in ("remove_easy", "remove_hard"):
        fractions = sorted({f for s in scores.values() for f in s["modes"].get(mode, {})},
                           key=float)
        for f in (f for f in fractions if float(f) >= 0.5):
            acc = {name: s["modes"][mode][f]["test_accuracy"] for name, s in scores.items()
                   if name != "random" and f in s["modes"].get(mode, {})}
            pd = max((acc[s], s) for s in PD if s in acc) if any(s in acc for s in PD) else None
            other = max(((a, s) for s, a in acc.items() if s not in PD), default=None)
            rnd = random.get(f, {}).get("test_accuracy")
            if pd is None:
                continue
            text = f"{mode} keep {f}: PD ({pd[1]}) {pd[0]:.4f}"
            if other is not None:
                text += f" vs best other ({other[1]}) {other[0]:.4f}: " + (
                    "at least as good" if pd[0] >= other[0] else "worse")
            if rnd is not None:
                text += f"; random {rnd:.4f}: " + ("PD >= random" if pd[0] >= rnd
                                                   else "PD < random")
            lines.append(text)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke test (minutes on a CPU)")
    p.add_argument("--out-dir", default="runs/bench-prune",
                   help="where the run is made (OUT_DIR/run; default: %(default)s)")
    p.add_argument("--run-dir", default=None, help="prune an existing finished run instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", default=str(Path(__file__).with_name("bench_prune.json")))
    args = p.parse_args(argv)
    from pdepth.cli import main as pdepth

    run, prune = commands(args)
    seconds = {}
    for name, cmd in (("run", run), ("prune", prune)):
        if cmd is None:
            continue
        print("pdepth " + shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        if pdepth(cmd) != 0:
            return 1
        seconds[name] = time.perf_counter() - t0
    result = json.loads((Path(prune[1]) / "prune.json").read_text())
    info = machine_info(args.device)
    record = {"machine": info, "quick": args.quick, "seconds": seconds,
              "commands": {k: "pdepth " + shlex.join(v) for k, v in
                           (("run", run), ("prune", prune)) if v is not None},
              "prune": result}
    Path(args.record).write_text(json.dumps(record, indent=1, default=str))
    print(describe_machine(info))
    print(f"seconds: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}; retrainings: "
          f"{len(result['full']['test_accuracy_per_seed'])} seeds x "
          f"{1 + sum(len(m) for s in result['scores'].values() for m in s['modes'].values())}"
          " subsets")
    full = result["full"]
    print(f"all {full['kept']} examples: {full['test_accuracy']:.4f} +- "
          f"{full['test_accuracy_std']:.4f}")
    print("| score | mode | " + " | ".join(f"keep {f:g}" for f in
                                           sorted({p['fraction'] for s in result['scores']
                                                   .values() for m in s['modes'].values()
                                                   for p in m.values()})) + " |")
    for score, s in result["scores"].items():
        for mode, points in s["modes"].items():
            cells = [f"{points[f]['test_accuracy']:.4f} +- {points[f]['test_accuracy_std']:.4f}"
                     for f in sorted(points, key=float)]
            print(f"| {score} | {mode} | " + " | ".join(cells) + " |")
    for line in verdict(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
