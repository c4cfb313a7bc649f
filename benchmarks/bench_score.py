"""`pdepth score` end to end on a generated image folder: a timm ViT-S/16-sized model (random
weights, 224x224 input) and a torchvision ResNet-50 (random weights) on 5,000 training + 1,000
test images, with the time of each stage (data + model + preprocessing, scoring), the peak
memory and the probes x widths.

    python benchmarks/bench_score.py --device cuda            # the full measurement
    python benchmarks/bench_score.py --quick                  # a few seconds on a CPU: tiny
                                                              # images and models, a smoke test

Writes a JSON record to --out (default: benchmarks/bench_score.json) and prints a table; the
machine is recorded with it (benchmarks/_machine.py). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import describe_machine, machine_info  # noqa: E402

# (name, --model, --model-arg, --probes: a preset or module names) of the full run and of
# --quick. The presets: every block (ViT at its class token, docs/design.md section 1).
FULL = [
    ("vit_s16_224", "timm:vit_small_patch16_224", ["num_classes=10"], "vit"),
    ("resnet50_224", "torchvision:resnet50", ["num_classes=10"], "resnet"),
]
QUICK = [
    ("vit_tiny_32", "timm:vit_tiny_patch16_224",
     ["num_classes=10", "img_size=32", "patch_size=8", "depth=2", "embed_dim=64",
      "num_heads=2"], "vit"),
    ("resnet18_32", "torchvision:resnet18", ["num_classes=10"], "layer1,layer4"),
]


def make_image_folder(root: Path, n_train: int, n_test: int, size: int, classes: int = 10,
                      seed: int = 0) -> Path:
    """root/{train,test}/<class>/<i>.png: random RGB images with a class-dependent tint."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % classes
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] += np.uint8(40 + 5 * c)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


def run_one(name, model, model_args, probes, data: Path, size: int, args, tmp: Path) -> dict:
    from pdepth.model_score import ScoreSettings, score_to_folder

    settings = ScoreSettings(
        model=model, dataset="imagefolder", root=str(data), model_args=model_args,
        image_size=size, probes=probes.split(",") if "," in probes else probes, k=args.k, reference="network",
        memory_budget=int(args.memory_budget * 2**20), device=args.device,
        batch_size=args.batch_size, max_dim=args.max_dim or None)
    t0 = time.perf_counter()
    out = score_to_folder(settings, tmp / name, overwrite=True)
    wall = time.perf_counter() - t0
    cfg = json.loads((out / "config.json").read_text())
    r = cfg["resolved"]
    stats = cfg["stats"]
    return {
        "name": name, "model": model, "model_args": model_args, "wall_seconds": wall,
        "timing": cfg["timing"], "num_train": r["num_train"], "num_test": r["num_test"],
        "probes": r["probes"], "probe_dims": r["probe_dims"],
        "preprocessing": r["preprocessing"],
        "peak_rss_bytes": stats["peak_rss_bytes"], "cuda_peak_bytes": stats["cuda_peak_bytes"],
        "peak_embedding_bytes": stats["peak_bytes"], "store": stats["store"],
        "passes": stats["passes"], "extract_seconds": stats["extract_seconds"],
        "knn_seconds": stats["knn_seconds"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny images and models (smoke test)")
    p.add_argument("--train", type=int, default=None, help="training images (default 5000; "
                                                             "quick: 60)")
    p.add_argument("--test", type=int, default=None, help="test images (default 1000; "
                                                           "quick: 20)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-dim", type=int, default=4096,
                   help="pool conv maps to at most this many features, as pdepth run's default "
                        "(0: unpooled; ResNet-50's layer1 is then 802,816 wide)")
    p.add_argument("--memory-budget", type=float, default=4096, help="MiB")
    p.add_argument("--out", default=str(Path(__file__).with_name("bench_score.json")))
    args = p.parse_args(argv)
    quick = args.quick
    n_train = args.train or (60 if quick else 5000)
    n_test = args.test or (20 if quick else 1000)
    size = 32 if quick else 224
    if quick:
        args.k = min(args.k, 5)
    cases = QUICK if quick else FULL
    info = machine_info(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = make_image_folder(tmp / "data", n_train, n_test, size)
        gen_seconds = time.perf_counter() - t0
        for case in cases:
            rows.append(run_one(*case, data, size, args, tmp))
    record = {"machine": info, "quick": quick, "image_size": size,
              "generate_seconds": gen_seconds, "k": args.k, "results": rows}
    Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    print(describe_machine(info))
    print("| model | train + test | load s | forward s | k-NN s | score s | store, passes | "
          "peak RSS GiB | probes x dims |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dims = ", ".join(f"{n}:{d}" for n, d in zip(r["probes"], r["probe_dims"], strict=True))
        print(f"| {r['name']} | {r['num_train']} + {r['num_test']} | "
              f"{r['timing']['load_seconds']:.1f} | {r['extract_seconds']:.1f} | "
              f"{r['knn_seconds']:.1f} | {r['timing']['score_seconds']:.1f} | "
              f"{r['store']}, {r['passes']} | {r['peak_rss_bytes'] / 2**30:.2f} | {dims} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
