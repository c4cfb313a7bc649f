"""
The paper's protocol on a tiny run: its folder, its report and its label errors
=================================================================================

``pdepth run`` (here :func:`pdepth.run` from Python) trains small networks on random halves
of the data and writes a *run folder*: ``results.parquet`` (one row per example),
``summary.json`` (one entry per claim of the paper), ``figures/`` and ``report.html``.
This run is tiny (1,000 Fashion-MNIST images with 20% of the labels flipped, one seed: two
CNNs, 2 epochs), so its figures show the layout of the report rather than the paper's
results; ``make demo`` runs the default (8,000 images, 5 seeds).
"""

# %%
# Run the protocol
# ----------------
# The same as ``pdepth run --subset 1000 --epochs 2 --seeds 1 --k 10 --label-noise 0.2
# --out DIR``. ``--out`` must be new, empty or an earlier pdepth run.
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

import pdepth
from pdepth.figures import FIGURES

# (the docs build names a folder to keep, to show the figures on the report page)
out = Path(os.environ.get("PDEPTH_EXAMPLE_RUN") or tempfile.mkdtemp()) / "run"
config = pdepth.RunConfig(subset=1000, epochs=2, seeds=[0], k=10, label_noise=0.2)
pdepth.run(config, out, overwrite=True, progress=False, log=lambda *_: None)
print(sorted(p.name for p in out.iterdir()))

# %%
# ``results.parquet``: one row per example
# ----------------------------------------
# Depth in the training split and held out, the held-out accuracy (the C-score), the
# difficulty category and the label-error evidence (docs/protocol.md lists every column).
results = pd.read_parquet(out / "results.parquet")
print(results[["label", "train_depth", "held_out_depth", "held_out_accuracy",
               "category", "label_error", "suggested_label"]].head(8).to_string())
print(results["category"].value_counts().to_string())

# %%
# Label errors
# ------------
# The run flipped 20% of the labels (``label_flipped``, ``original_label``). ``label_error``
# flags an example when the held-out networks and the early probes agree on another class
# (docs/design.md section 11); here we score the flags against the flips.
flagged, flipped = results["label_error"], results["label_flipped"]
precision = (flagged & flipped).sum() / max(flagged.sum(), 1)
recall = (flagged & flipped).sum() / flipped.sum()
print(f"{flipped.sum()} flipped, {flagged.sum()} flagged: "
      f"precision {precision:.2f}, recall {recall:.2f}")
right = (results.loc[flagged, "suggested_label"] == results.loc[flagged, "original_label"]).mean()
print(f"suggested_label restores the original label for {right:.0%} of the flagged examples")

# %%
# ``summary.json``: the paper's claims
# ------------------------------------
# One entry per claim: the statistic, what it is computed on and whether this run shows the
# paper's direction. On a run this small most claims are noise.
summary = json.loads((out / "summary.json").read_text())
for name, claim in list(summary["claims"].items())[:6]:
    print(f"{name:32s} holds={claim.get('holds')!s:5s} {claim.get('statistic')}")

# %%
# The report's figures
# --------------------
# ``report.html`` shows each figure with a caption; these are the run's own PNGs, with the
# caption pdepth writes under them (``pdepth.figures.FIGURES``).
for name in ["depth_hist.png", "layer_knn.png", "depth_2d.png", "metrics_vs_depth.png",
             "label_noise.png"]:
    path = out / "figures" / name
    if not path.exists():
        continue
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.imshow(plt.imread(path))
    ax.set_axis_off()
    ax.set_title(name)
    print(f"{name}: {FIGURES[name]}")
    plt.show()
