"""Label errors per noise kind: for each `--noise-kind`, one `pdepth run --label-noise P
--noise-kind KIND` and one `pdepth improve` on it, then a table of the flags' precision, recall
and F1 against the flips and the test accuracy of each variant (pdepth's flags removed or
relabelled, cleanlab's removed, nothing removed). The runs of every kind share the subset, the
seeds and the noise seed; with every class mapped (Fashion-MNIST) the kinds flip the same
examples, only the new labels differ (docs/protocol.md, "Label noise").

    # the measurement of docs/protocol.md (Fashion-MNIST, 8,000 examples, 20% noise)
    python benchmarks/bench_label_noise.py --subset 8000 --epochs 3 --seeds 2 \\
        --improve-seeds 3 --kinds uniform,asymmetric --out-dir runs/label_noise
    # a smaller one (what this file's numbers in docs/protocol.md were measured with)
    python benchmarks/bench_label_noise.py --subset 2000 --epochs 3 --seeds 2 \\
        --improve-seeds 2 --out-dir /tmp/label_noise
    # the class map of a reference run (each class -> the class its held-out models confuse it
    # with most), and its row-normalised confusion matrix for --noise-kind confusion
    python benchmarks/bench_label_noise.py --confusion-map runs/ref --write-matrix conf.npy

A finished run in --out-dir is reused (its improve.json too with --reuse; with --reflag its
`label_error` column is first recomputed from its per_model.npz by the current rule, for runs
written before a change of the rule). Writes a JSON
record (--json, default: OUT_DIR/bench_label_noise.json) with the machine, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import OtherLoad, describe_machine, machine_info  # noqa: E402
from _tables import fmt, format_table  # noqa: E402

VARIANTS = ("baseline", "pdepth_remove", "pdepth_relabel", "cleanlab_remove")


def run_kind(kind: str, args) -> dict:
    """`pdepth run` (unless finished) and `pdepth improve` (unless --reuse finds it) for one
    kind; returns improve.json with the run's flip count and the seconds each step took."""
    from pdepth.cli import main

    out = Path(args.out_dir) / f"{args.dataset}-{kind}-{args.noise:g}"
    run_args = ["run", "--dataset", args.dataset, "--subset", str(args.subset), "--epochs",
                str(args.epochs), "--seeds", str(args.seeds), "--label-noise", str(args.noise),
                "--noise-kind", kind, "--device", args.device, "--quiet", "--out", str(out)]
    if kind == "confusion":
        run_args += ["--noise-matrix", args.noise_matrix]
    seconds = {}
    t = time.perf_counter()
    if not (out / "COMPLETE").exists():
        if main(run_args) != 0:
            raise SystemExit(f"pdepth run failed for --noise-kind {kind}")
    elif args.reflag:
        reflag(out)
    seconds["run"] = time.perf_counter() - t
    t = time.perf_counter()
    if not (args.reuse and (out / "improve.json").exists()):
        if main(["improve", str(out), "--seeds", str(args.improve_seeds), "--device",
                 args.device, "--quiet"]) != 0:
            raise SystemExit(f"pdepth improve failed for --noise-kind {kind}")
    seconds["improve"] = time.perf_counter() - t
    result = json.loads((out / "improve.json").read_text())
    resolved = json.loads((out / "config.json").read_text())["resolved"]["label_noise"]
    return {"run_dir": str(out), "command": " ".join(["pdepth", *run_args]),
            "label_noise": resolved, "seconds": seconds, "improve": result}


def reflag(run_dir: Path) -> None:
    """Rewrites ``label_error`` of a finished run's results.parquet with the current rule
    (pdepth.label_errors, from per_model.npz); the score and suggestion do not depend on it."""
    import pandas as pd

    from pdepth.label_errors import label_error_evidence

    arrays = np.load(run_dir / "per_model.npz")
    df = pd.read_parquet(run_dir / "results.parquet")
    ev = label_error_evidence(arrays["probs"], arrays["in_train"], arrays["layer_pred"],
                              arrays["labels"], arrays["probs"].shape[2])
    df["label_error"] = ev["label_error"]
    df.to_parquet(run_dir / "results.parquet")


def table(results: dict) -> str:
    rows = []
    for kind, r in results.items():
        for name in VARIANTS:
            v = r["improve"].get(name, {})
            if v.get("skipped"):
                rows.append([kind, name, "skipped: " + v.get("reason", ""), "", "", "", "", ""])
                continue
            acc = v.get("test_accuracy_per_seed", [])
            rows.append([kind, name, v.get("train_examples"), v.get("flagged", ""),
                         fmt(v.get("precision")) if "precision" in v else "",
                         fmt(v.get("recall")) if "recall" in v else "",
                         fmt(v.get("f1")) if "f1" in v else "",
                         f"{100 * np.mean(acc):.1f}% ± {100 * np.std(acc, ddof=1):.1f}"
                         if len(acc) > 1 else f"{100 * np.mean(acc):.1f}%"])
    return format_table(["kind", "variant", "train", "flagged", "precision", "recall", "F1",
                         "test accuracy"], rows)


def confusion_map(run_dir: str, write_matrix: str | None) -> dict:
    """Per class of the run's original labels, the class its held-out ensemble predicts most
    often among the wrong predictions (pdepth.protocol.noise.heldout_matrix, what
    `--noise-matrix heldout:RUN_DIR` uses); that matrix to --write-matrix."""
    from pdepth.protocol.noise import heldout_matrix

    matrix = heldout_matrix(run_dir)
    off = matrix.copy()
    np.fill_diagonal(off, 0.0)
    target = off.argmax(1)
    names = json.loads((Path(run_dir) / "config.json").read_text())["resolved"]["class_names"]
    out = {"run_dir": run_dir, "matrix_rows": matrix.round(4).tolist(),
           "held_out_accuracy_per_class": np.diag(matrix).round(4).tolist(),
           "map": {int(i): int(t) for i, t in enumerate(target)},
           "map_names": {names[i]: names[t] for i, t in enumerate(target)},
           "share_of_errors": [round(float(off[i, t] / off[i].sum()), 3)
                               for i, t in enumerate(target)]}
    if write_matrix:
        if write_matrix.endswith(".csv"):
            np.savetxt(write_matrix, matrix, delimiter=",", fmt="%.6f")
        else:
            np.save(write_matrix, matrix)
        out["matrix"] = write_matrix
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="uniform,asymmetric")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--noise-matrix", default=None, help="for the confusion kind")
    ap.add_argument("--subset", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--improve-seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", default="runs/label_noise")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reuse", action="store_true", help="keep an improve.json found")
    ap.add_argument("--reflag", action="store_true",
                    help="recompute label_error of a finished run with the current rule")
    ap.add_argument("--confusion-map", metavar="RUN_DIR", default=None,
                    help="print the most-confused class map of a finished run and stop")
    ap.add_argument("--write-matrix", default=None, help="with --confusion-map: .npy or .csv")
    args = ap.parse_args()
    if args.confusion_map:
        print(json.dumps(confusion_map(args.confusion_map, args.write_matrix), indent=1))
        return
    kinds = [k for k in args.kinds.split(",") if k]
    if "confusion" in kinds and not args.noise_matrix:
        ap.error("--kinds confusion needs --noise-matrix FILE")
    results = {}
    with OtherLoad() as load:
        for kind in kinds:
            results[kind] = run_kind(kind, args)
    info = machine_info(args.device)
    record = {"settings": vars(args), "machine": info, "other_load": load.fraction,
              "results": results}
    path = Path(args.json or Path(args.out_dir) / "bench_label_noise.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(describe_machine(info))
    print(f"other processes' load while measuring: {load.fraction}")
    print(table(results))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
