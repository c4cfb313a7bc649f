"""Figures (PNG, matplotlib Agg) and ``report.html`` for a pdepth run directory.

:func:`write_report` reads ``results.parquet``, ``per_model.npz``, ``data.npz`` and
``config.json`` from a run directory and (re)draws ``figures/*.png`` and ``report.html``;
``pdepth report DIR`` calls it.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from ._atomic import PendingFiles
from .categories import CATEGORIES
from .metrics import layer_accuracy

__all__ = ["FIGURES", "REPORT_DEPENDENCIES", "RunFilesError", "write_report"]

REPORT_DEPENDENCIES = ("pandas", "pyarrow", "matplotlib")

FIGURES = {
    "depth_hist.png": "Prediction depth per split (all models): examples in the model's "
                      "training split vs held out.",
    "metrics_vs_depth.png": "Held-out accuracy (C-score estimate), held-out agreement, confidence and "
                            "iteration learned against (rounded) mean depth; mean with "
                            "standard error per depth.",
    "layer_knn.png": "k-NN accuracy (vs the given labels) at each probe, for examples in the "
                     "training split (self excluded) and held out: early layers generalise, "
                     "later layers memorise.",
    "depth_2d.png": "Train-split depth vs held-out depth: counts (left) and categories (right, "
                    "jittered).",
    "examples_by_depth.png": "Random examples at each (rounded) held-out depth.",
    "examples_by_category.png": "Random examples of each category (title: label -> held-out "
                                "networks' most frequent prediction).",
    "training.png": "Training curves of every model.",
}
_COLORS = {"easy": "#4c9f70", "ambiguous": "#e0a526", "looks_like_other_class": "#c44e52",
           "atypical": "#5b6fb5"}


class RunFilesError(ValueError):
    """A result file of a run directory is missing or cannot be read."""


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _load(out: Path):
    """Reads every input first, so that a damaged one stops the report before it writes."""
    import pandas as pd

    readers = {"results.parquet": pd.read_parquet, "per_model.npz": _read_npz,
               "data.npz": _read_npz, "config.json": lambda p: json.loads(p.read_text())}
    loaded = []
    for name, read in readers.items():
        try:
            loaded.append(read(out / name))
        except Exception as exc:  # truncated, damaged, missing: pyarrow, zipfile, JSON, OS
            raise RunFilesError(
                f"{out / name} cannot be read ({type(exc).__name__}: {exc}); to rebuild the "
                f"results from models/, delete {out / 'COMPLETE'} and rerun the same "
                f"`pdepth run --out {out} ...` command") from exc
    return tuple(loaded)


def _binned(x: np.ndarray, y: np.ndarray, num_layers: int):
    ok = ~np.isnan(x) & ~np.isnan(y)
    xb = np.rint(x[ok]).astype(int)
    y = y[ok]
    centers, means, ses = [], [], []
    for b in range(num_layers + 1):
        sel = xb == b
        if sel.sum() == 0:
            continue
        centers.append(b)
        means.append(y[sel].mean())
        ses.append(y[sel].std() / np.sqrt(sel.sum()) if sel.sum() > 1 else 0.0)
    return np.array(centers), np.array(means), np.array(ses)


def _short(name: str) -> str:
    return name.split("/")[0][:9]


def write_report(out: str | os.PathLike) -> Path:
    """Draws every figure of :data:`FIGURES` into ``out/figures`` and writes
    ``out/report.html``. Returns the path of the HTML file.

    All or nothing: the inputs are read first (:class:`RunFilesError` names one that cannot
    be read), the files are drawn under temporary names and renamed only once all are drawn.
    """
    out = Path(out)
    loaded = _load(out)
    figdir = out / "figures"
    created = not figdir.exists()
    figdir.mkdir(exist_ok=True)
    pending = PendingFiles()
    try:
        _draw(figdir, pending, loaded)
        pending.replace_all()
    except BaseException:
        pending.discard()
        if created and not any(figdir.iterdir()):
            figdir.rmdir()
        raise
    return out / "report.html"


def _draw(figdir: Path, pending: PendingFiles, loaded: tuple) -> None:
    """Draws every figure and report.html under temporary names (``pending``), in the order
    of :data:`FIGURES` (the figures share one random generator, used in this order)."""
    d = _Drawing(figdir, pending, loaded)
    d.depth_hist()
    d.metrics_vs_depth()
    acc_tr, acc_ho = d.layer_knn()
    d.depth_2d()
    d.examples_by_depth()
    d.examples_by_category()
    d.training()
    html_path = pending.tmp(figdir.parent / "report.html")
    html_path.write_text(_html(d.df, d.cfg, acc_tr, acc_ho, d.names))


class _Drawing:
    """The figures of one run directory; each method draws one figure of :data:`FIGURES`."""

    per_row = 10  # images per row of the example grids

    def __init__(self, figdir: Path, pending: PendingFiles, loaded: tuple):
        """``loaded``: ``(results table, per-model arrays, data.npz arrays, config.json)``."""
        df, arr, data, cfg = loaded
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        self.plt, self.matplotlib = plt, matplotlib
        self.figdir, self.pending = figdir, pending
        self.df, self.arr, self.cfg = df, arr, cfg
        self.images = data["images"]
        res = cfg["resolved"]
        self.names = list(arr["layer_names"])
        self.num_layers = len(self.names)
        self.class_names = (res.get("class_names")
                            or [str(i) for i in range(res["num_classes"])])
        self.depth, self.in_train = arr["depth"], arr["in_train"].astype(bool)
        self.scored = self.depth >= 0
        self.labels = arr["labels"]
        self.rng = np.random.default_rng(0)

    def save(self, fig, name: str) -> None:
        fig.savefig(self.pending.tmp(self.figdir / name), dpi=110, bbox_inches="tight")
        self.plt.close(fig)

    def depth_hist(self) -> None:
        num_layers, depth = self.num_layers, self.depth
        fig, ax = self.plt.subplots(figsize=(6.5, 3.8))
        bins = np.arange(num_layers + 1)
        for i, (mask, lab) in enumerate(
                ((self.in_train & self.scored, "training split (self excluded)"),
                 (~self.in_train & self.scored, "held out"))):
            counts = np.bincount(depth[mask], minlength=num_layers + 1)
            ax.bar(bins + (i - 0.5) * 0.4, counts / max(1, counts.sum()), width=0.4, label=lab)
        ax.set_xticks(bins)
        ax.set_xlabel(f"prediction depth (0 = every probe agrees, {num_layers} = last "
                      "disagrees)")
        ax.set_ylabel("fraction of (model, example) pairs")
        ax.legend()
        ax.set_title("Prediction depth per split")
        self.save(fig, "depth_hist.png")

    def metrics_vs_depth(self) -> None:
        df, num_layers = self.df, self.num_layers
        panels = [("held_out_accuracy", "held-out accuracy (C-score est.)"),
                  ("held_out_agreement", "held-out agreement"),
                  ("confidence", "held-out confidence"),
                  ("iteration_learned", "iteration (epoch) learned")]
        fig, axes = self.plt.subplots(2, 2, figsize=(9, 6.5))
        for ax, (col, title) in zip(axes.ravel(), panels, strict=True):
            for dcol, lab in (("held_out_depth", "vs held-out depth"),
                              ("train_depth", "vs train-split depth")):
                c, m, s = _binned(df[dcol].to_numpy(float), df[col].to_numpy(float),
                                  num_layers)
                ax.errorbar(c, m, yerr=s, marker="o", capsize=3, label=lab)
            ax.set_title(title)
            ax.set_xlabel("mean prediction depth (rounded)")
            ax.set_xticks(range(num_layers + 1))
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        self.save(fig, "metrics_vs_depth.png")

    def layer_knn(self):
        """Returns the per-probe k-NN accuracy ``(training split, held out)``."""
        num_layers = self.num_layers
        lp = self.arr["layer_pred"].astype(np.int64)
        acc_tr = layer_accuracy(lp, self.labels, self.in_train & self.scored)
        acc_ho = layer_accuracy(lp, self.labels, ~self.in_train & self.scored)
        fig, ax = self.plt.subplots(figsize=(max(6.0, 0.55 * num_layers + 2), 3.8))
        ax.plot(range(num_layers), acc_tr, "o-", label="training split (self excluded)")
        ax.plot(range(num_layers), acc_ho, "s-", label="held out")
        ax.set_xticks(range(num_layers))
        ax.set_xticklabels(self.names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("k-NN accuracy (given labels)")
        ax.set_title(f"Per-probe k-NN accuracy (k = {self.cfg['config']['k']})")
        ax.grid(alpha=0.3)
        ax.legend()
        self.save(fig, "layer_knn.png")
        return acc_tr, acc_ho

    def depth_2d(self) -> None:
        df, num_layers = self.df, self.num_layers
        fig, (a1, a2) = self.plt.subplots(1, 2, figsize=(11, 4.8))
        ok = ~df["train_depth"].isna() & ~df["held_out_depth"].isna()
        tr = df.loc[ok, "train_depth"].to_numpy(float)
        ho = df.loc[ok, "held_out_depth"].to_numpy(float)
        edges = np.arange(-0.25, num_layers + 0.5, 0.5)
        h, _, _, im = a1.hist2d(tr, ho, bins=[edges, edges], cmap="viridis",
                                norm=self.matplotlib.colors.LogNorm())
        fig.colorbar(im, ax=a1, label="examples")
        a1.set_title("Train-split vs held-out depth (counts)")
        cats = df.loc[ok, "category"].astype(str).to_numpy()
        jit = lambda v: v + self.rng.uniform(-0.2, 0.2, v.shape)  # noqa: E731
        for c in CATEGORIES:
            sel = cats == c
            a2.scatter(jit(tr[sel]), jit(ho[sel]), s=4, alpha=0.5, color=_COLORS[c],
                       label=f"{c} ({int(sel.sum())})")
        a2.legend(markerscale=3, fontsize=8, loc="upper left")
        a2.set_title("Difficulty categories")
        for ax in (a1, a2):
            ax.set_xlabel("mean depth, in the training split")
            ax.set_ylabel("mean depth, held out")
            ax.set_xlim(-0.5, num_layers + 0.5)
            ax.set_ylim(-0.5, num_layers + 0.5)
            ax.plot([0, num_layers], [0, num_layers], color="gray", lw=0.5)
        fig.tight_layout()
        self.save(fig, "depth_2d.png")

    def examples_by_depth(self) -> None:
        ho_round = np.rint(self.df["held_out_depth"].to_numpy(float))
        rows = []
        for d in range(self.num_layers + 1):
            idx = np.flatnonzero(ho_round == d)
            idx = self.rng.permutation(idx)[:self.per_row]
            rows.append((f"depth {d}\n({int((ho_round == d).sum())})", idx,
                         [_short(self.class_names[self.labels[i]]) for i in idx]))
        self.grid(rows, "examples_by_depth.png", "Examples by held-out prediction depth")

    def examples_by_category(self) -> None:
        names, labels = self.class_names, self.labels
        rows = []
        mode = self.df["held_out_mode"].to_numpy()
        cat_all = self.df["category"].astype(str).to_numpy()
        for c in CATEGORIES:
            idx = self.rng.permutation(np.flatnonzero(cat_all == c))[:self.per_row]
            rows.append((c.replace("_", "\n"), idx,
                         [f"{_short(names[labels[i]])}>{_short(names[mode[i]])}"
                          for i in idx]))
        self.grid(rows, "examples_by_category.png", "Examples by difficulty category")

    def grid(self, rows, name: str, title: str) -> None:
        """One row of up to :attr:`per_row` images per ``(row_label, indices, captions)``."""
        per_row = self.per_row
        fig, axes = self.plt.subplots(len(rows), per_row,
                                      figsize=(per_row * 0.95, len(rows) * 1.2), squeeze=False)
        for r, (row_label, idx, captions) in enumerate(rows):
            for c in range(per_row):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if c < len(idx):
                    ax.imshow(self.images[idx[c]], cmap="gray_r", vmin=0, vmax=255)
                    ax.set_title(captions[c], fontsize=6)
            axes[r, 0].set_ylabel(row_label, fontsize=8, rotation=0, ha="right", va="center")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        self.save(fig, name)

    def training(self) -> None:
        arr = self.arr
        fig, (a1, a2) = self.plt.subplots(1, 2, figsize=(9, 3.4))
        for r in range(arr["loss"].shape[0]):
            lab = f"seed {arr['seeds'][r]} half {arr['halves'][r]}"
            ep = np.arange(1, arr["loss"].shape[1] + 1)
            a1.plot(ep, arr["loss"][r], label=lab)
            a2.plot(ep, arr["train_accuracy"][r], "-", color=f"C{r}")
            a2.plot(ep, arr["held_out_accuracy"][r], "--", color=f"C{r}")
        a1.set_title("training loss")
        a2.set_title("accuracy (solid: train half, dashed: held out)")
        for ax in (a1, a2):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        a1.legend(fontsize=7)
        fig.tight_layout()
        self.save(fig, "training.png")


def _html(df, cfg, acc_tr, acc_ho, names) -> str:
    c = cfg["config"]
    res = cfg["resolved"]
    summary = cfg.get("summary", {})
    e = html.escape
    counts = df["category"].astype(str).value_counts()
    rows = "".join(
        f"<tr><td>{e(k)}</td><td>{e(json.dumps(v))}</td></tr>" for k, v in c.items())
    cat_rows = "".join(
        f"<tr><td>{e(k)}</td><td>{int(counts.get(k, 0))}</td>"
        f"<td>{100 * counts.get(k, 0) / len(df):.1f}%</td></tr>" for k in CATEGORIES)
    layer_rows = "".join(
        f"<tr><td>{i}</td><td>{e(n)}</td><td>{d}</td><td>{a:.3f}</td><td>{b:.3f}</td></tr>"
        for i, (n, d, a, b) in enumerate(zip(names, res.get("probe_dims", [""] * len(names)),
                                             acc_tr, acc_ho, strict=True)))
    timing = cfg.get("timing", {})
    figs = "".join(
        f'<h3>{e(name)}</h3><p>{e(caption)}</p><img src="figures/{e(name)}" '
        f'style="max-width:100%">' for name, caption in FIGURES.items())
    stats = [
        ("examples", len(df)),
        ("models", res.get("num_models")),
        ("probes", res.get("num_layers")),
        ("mean train-split depth", f"{np.nanmean(df['train_depth']):.3f}"),
        ("mean held-out depth", f"{np.nanmean(df['held_out_depth']):.3f}"),
        ("held-out accuracy", f"{np.nanmean(df['held_out_accuracy']):.3f}"),
        ("train accuracy", f"{np.nanmean(df['train_accuracy']):.3f}"),
        ("time for the models (s)", f"{timing.get('models_seconds', float('nan')):.1f}"),
    ]
    mem = [m.get("memory", {}).get("peak_bytes", 0) for m in cfg.get("models", [])]
    if mem:
        stats.append(("k-NN peak resident embeddings (MiB)", f"{max(mem) / 2**20:.1f}"))
    stat_rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in stats)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pdepth report: {e(c['arch'])} on {e(c['dataset'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;}}
table{{border-collapse:collapse;margin:1em 0;}}td,th{{border:1px solid #ccc;padding:2px 8px;
font-size:90%;}}</style></head><body>
<h1>Prediction depth: {e(c['arch'])} on {e(c['dataset'])}</h1>
<p>Baldock, Maennel, Neyshabur, <i>Deep Learning Through the Lens of Example Difficulty</i>,
NeurIPS 2021. Each seed splits the data 50/50; a model trains on each half; depth is computed
for its training half (self excluded) and its held-out half with its training half as the
k-NN support (given labels), measured against the network's own prediction.</p>
<h2>Summary</h2><table>{stat_rows}</table>
<h2>Categories</h2><table><tr><th>category</th><th>examples</th><th>share</th></tr>{cat_rows}
</table><p>Rules and thresholds: docs/protocol.md; thresholds used:
{e(json.dumps(res.get('thresholds')))}</p>
<h2>Probes</h2><table><tr><th>#</th><th>probe</th><th>dim</th><th>k-NN acc. train</th>
<th>k-NN acc. held out</th></tr>{layer_rows}</table>
<h2>Figures</h2>{figs}
<h2>Settings</h2><table>{rows}</table>
<p>Versions: {e(json.dumps(cfg.get('versions', {}).get('pdepth')))} (pdepth),
{e(json.dumps(cfg.get('versions', {}).get('torch')))} (torch). Full settings: config.json.
Per-example results: results.parquet; per-model arrays: per_model.npz, models/.</p>
<p style="color:#888">summary: {e(json.dumps(summary.get('categories', {})))}</p>
</body></html>
"""
    return doc
