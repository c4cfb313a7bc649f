"""Figures (PNG, matplotlib Agg) and ``report.html`` for a pdepth run directory.

:func:`write_report` reads ``results.parquet``, ``per_model.npz``, ``data.npz``,
``config.json`` and, where they are there, ``summary.json`` (a run from before it gets no
claim figures) and ``improve.json`` from a run directory and (re)draws ``figures/*.png`` and
``report.html``; ``pdepth report DIR`` calls it. Each figure of
a claim of the paper gets a caption from its ``summary.json`` entry: what the paper says and
what this run shows (``holds``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from ._atomic import PendingFiles, names_file
from .categories import CATEGORIES
from .figures import FIGURE_CLAIMS, FIGURES, PRUNE_FIGURES, REPORT_DEPENDENCIES
from .metrics import layer_accuracy
from .report_html import report_html

__all__ = ["FIGURES", "REPORT_DEPENDENCIES", "RunFilesError", "write_report"]

_COLORS = {"easy": "#4c9f70", "ambiguous": "#e0a526", "looks_like_other_class": "#c44e52",
           "atypical": "#5b6fb5"}


OPTIONAL_INPUTS = ("summary.json", "improve.json")  # older runs / before `pdepth improve`


class RunFilesError(ValueError):
    """A result file of a run directory is missing or cannot be read."""


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _load(out: Path):
    """Reads every input first, so that a damaged one stops the report before it writes."""
    import pandas as pd

    read_json = lambda p: json.loads(p.read_text())  # noqa: E731
    readers = {"results.parquet": pd.read_parquet, "per_model.npz": _read_npz,
               "data.npz": _read_npz, "config.json": read_json, "summary.json": read_json,
               "improve.json": read_json}
    loaded = []
    for name, read in readers.items():
        if name in OPTIONAL_INPUTS and not (out / name).exists():
            loaded.append(None)
            continue
        try:
            loaded.append(read(out / name))
        except Exception as exc:  # truncated, damaged, missing: pyarrow, zipfile, JSON, OS
            raise RunFilesError(
                f"{out / name} cannot be read ({type(exc).__name__}: {exc}); to rebuild the "
                f"results from models/, delete {out / 'COMPLETE'} and rerun the same "
                f"`pdepth run --out {out} ...` command") from exc
    for name, value in zip(readers, loaded, strict=True):
        _check_json(out, name, value)
    return tuple(loaded)


def _check_json(out: Path, name: str, value) -> None:
    """The JSON files must hold objects (config.json: with the objects "config" and
    "resolved"); a RunFilesError names the file otherwise. Their values are escaped and
    checked where they are used (pdepth.report_html)."""
    if not name.endswith(".json") or value is None:
        return
    parts = ("config", "resolved") if name == "config.json" else ()
    if not isinstance(value, dict) or not all(isinstance(value.get(k), dict) for k in parts):
        what = "an object" + (" with the objects 'config' and 'resolved'" if parts else "")
        raise RunFilesError(f"{out / name} cannot be read (it holds no JSON {what}); to "
                            f"rebuild the results from models/, delete {out / 'COMPLETE'} "
                            f"and rerun the same `pdepth run --out {out} ...` command")


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
    ``out`` must be a run folder holding only pdepth's files, no symbolic link among them;
    the folder's lock is held while drawing (:func:`pdepth.protocol.outdir.open_for_writing`).
    """
    from .protocol.outdir import open_for_writing  # the run folder's rules, its lock

    with open_for_writing(out, "pdepth report"):
        return _write_report(Path(out))


def _write_report(out: Path) -> Path:
    loaded = _load(out)
    all_or_nothing(out / "figures", lambda pending: _draw(out / "figures", pending, loaded))
    return out / "report.html"


def all_or_nothing(figdir: Path, draw) -> None:
    """``draw(pending)`` writes the report's files under temporary names
    (:class:`PendingFiles`); they are renamed into place once all are written, or removed
    (with ``figdir``, where this made it and it is left empty) when anything fails."""
    created = not figdir.exists()
    figdir.mkdir(exist_ok=True)
    pending = PendingFiles()
    try:
        draw(pending)
        pending.replace_all()
    except BaseException:
        pending.discard()
        if created and not any(figdir.iterdir()):
            figdir.rmdir()
        raise


# what each figure reads, for the error naming the file an edit made undrawable
FIGURE_INPUTS = {
    "depth_hist.png": "per_model.npz", "metrics_vs_depth.png": "results.parquet",
    "layer_knn.png": "per_model.npz", "depth_2d.png": "results.parquet",
    "vote_shares.png": "summary.json", "convergence.png": "summary.json",
    "label_noise.png": "summary.json",
    "examples_by_depth.png": "results.parquet, per_model.npz, data.npz or config.json",
    "examples_by_category.png": "results.parquet, per_model.npz, data.npz or config.json",
    "training.png": "per_model.npz", "score_correlations.png": "summary.json",
    "score_reliability.png": "summary.json"}
# what an edited file that no pdepth run writes makes numpy, pandas or the figures raise
_EDITED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def _draw(figdir: Path, pending: PendingFiles, loaded: tuple) -> None:
    """Draws every figure and report.html under temporary names (``pending``), in the order
    of :data:`FIGURES` (the figures share one random generator, used in this order). A
    value that no pdepth run writes (an edited file) stops it with a RunFilesError naming
    the figure and the files it reads."""
    out = figdir.parent
    with _edited(out, "the report", "config.json, per_model.npz or data.npz"):
        d = _Drawing(figdir, pending, loaded)
    acc = None
    for name in FIGURES:
        with _edited(out, f"figures/{name}", FIGURE_INPUTS[name]):
            drawn = getattr(d, name.removesuffix(".png"))()
        acc = drawn if name == "layer_knn.png" else acc
    with _edited(out, "figures/pruning.png", "prune.json", "pdepth prune",
                 f"rerun `pdepth prune {out} ...`"):
        d.pruning()  # where pdepth prune ran
    acc_tr, acc_ho = acc
    html_path = pending.tmp(figdir.parent / "report.html")
    captions = {**FIGURES, **PRUNE_FIGURES}
    figures = [(name, captions[name], FIGURE_CLAIMS.get(name, ())) for name in d.drawn]
    with _edited(out, "report.html", "the run's files"):
        page = report_html(d, figures, acc_tr, acc_ho)
    with names_file(figdir.parent / "report.html"):  # a full disk names no file
        html_path.write_text(page)


@contextlib.contextmanager
def _edited(out: Path, what: str, inputs: str, command: str = "pdepth run",
            redo: str | None = None):
    """Turns the errors of a value no ``command`` writes into one RunFilesError line,
    ending with ``redo`` (how to write the files again)."""
    try:
        yield
    except RunFilesError:
        raise
    except _EDITED as exc:
        msg = " ".join(str(exc).split())[:200]
        redo = redo or (f"to rebuild the results from models/, delete {out / 'COMPLETE'} "
                        f"and rerun the same `pdepth run --out {out} ...` command")
        raise RunFilesError(
            f"{out}: cannot draw {what} from {inputs} ({type(exc).__name__}: {msg}): a file "
            f"holds values no {command} writes; {redo}") from exc


class _Drawing:
    """The figures of one run directory; each method draws one figure of :data:`FIGURES`."""

    per_row = 10  # images per row of the example grids

    def __init__(self, figdir: Path, pending: PendingFiles, loaded: tuple):
        """``loaded``: ``(results table, per-model arrays, data.npz arrays, config.json,
        summary.json or None, improve.json or None)``."""
        df, arr, data, cfg, summary, improve = loaded
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        self.plt, self.matplotlib = plt, matplotlib
        self.figdir, self.pending = figdir, pending
        self.df, self.arr, self.cfg = df, arr, cfg
        summary = summary or {}  # a run from before summary.json: no claim figures
        claims = summary.get("claims", {})
        claims = claims if isinstance(claims, dict) else {}
        self.claims = {k: v for k, v in claims.items() if isinstance(v, dict)}
        self.summary, self.improve = summary, improve
        self.drawn: list[str] = []  # the figures drawn, in the order of FIGURES
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
        with names_file(self.figdir / name):  # a full disk names no file
            fig.savefig(self.pending.tmp(self.figdir / name), dpi=110, bbox_inches="tight")
        self.plt.close(fig)
        self.drawn.append(name)

    def probe_axis(self, ax) -> None:
        """The probes on the x axis, by name."""
        ax.set_xticks(range(self.num_layers))
        ax.set_xticklabels(self.names, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("probe")

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
        panels = [("held_out_accuracy", "held-out accuracy (C-score)"),
                  ("held_out_agreement", "held-out agreement"),
                  ("confidence", "held-out confidence"),
                  ("margin", "held-out margin"),
                  ("ensemble_entropy", "ensemble entropy (nats)"),
                  ("iteration_learned", "iteration (epoch) learned")]
        fig, axes = self.plt.subplots(2, 3, figsize=(13, 7))
        for ax, (col, title) in zip(axes.ravel(), panels, strict=True):
            for dcol, lab in (("held_out_depth", "vs held-out depth"),
                              ("train_depth", "vs train-split depth")):
                c, m, s = _binned(df[dcol].to_numpy(float), df[col].to_numpy(float),
                                  num_layers)
                ax.errorbar(c, m, yerr=s, marker="o", capsize=3, label=lab)
            ax.set_title(title)
            ax.set_ylabel(title)
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
        self.probe_axis(ax)
        ax.set_ylabel("k-NN accuracy (given labels)")
        ax.set_title(f"Per-probe k-NN accuracy (k = {self.cfg['config']['k']})")
        ax.grid(alpha=0.3)
        ax.legend()
        self.save(fig, "layer_knn.png")
        return acc_tr, acc_ho

    def depth_2d(self) -> None:
        df, num_layers = self.df, self.num_layers
        fig, (a1, a2) = self.plt.subplots(1, 2, figsize=(13, 4.8))
        ok = ~df["train_depth"].isna() & ~df["held_out_depth"].isna()
        tr = df.loc[ok, "train_depth"].to_numpy(float)
        ho = df.loc[ok, "held_out_depth"].to_numpy(float)
        edges = np.arange(-0.25, num_layers + 0.5, 0.5)
        if ok.any():
            h, _, _, im = a1.hist2d(tr, ho, bins=[edges, edges], cmap="viridis",
                                    norm=self.matplotlib.colors.LogNorm())
            fig.colorbar(im, ax=a1, label="examples")
        else:  # a checkpoint run holds nothing out
            for ax in (a1, a2):
                ax.text(0.5, 0.5, "no held-out split", ha="center", transform=ax.transAxes)
        a1.set_title("Train-split vs held-out depth (counts)")
        cats = df.loc[ok, "category"].astype(str).to_numpy()
        jit = lambda v: v + self.rng.uniform(-0.2, 0.2, v.shape)  # noqa: E731
        for c in CATEGORIES:
            sel = cats == c
            a2.scatter(jit(tr[sel]), jit(ho[sel]), s=4, alpha=0.5, color=_COLORS[c],
                       label=f"{c} ({int(sel.sum())})")
        a2.legend(markerscale=3, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
        a2.set_title("Difficulty categories")
        for ax in (a1, a2):
            ax.set_xlabel("mean depth, in the training split")
            ax.set_ylabel("mean depth, held out")
            ax.set_xlim(-0.5, num_layers + 0.5)
            ax.set_ylim(-0.5, num_layers + 0.5)
            ax.plot([0, num_layers], [0, num_layers], color="gray", lw=0.5)
        fig.tight_layout()
        self.save(fig, "depth_2d.png")

    def vote_shares(self) -> None:
        """Per category (columns) and split (rows): the vote shares per probe."""
        entry = self.claims.get("groups_processed_differently", {})
        if entry.get("vote_share") is None:
            return  # a run from before the vote counts
        fig, axes = self.plt.subplots(2, len(CATEGORIES), figsize=(13, 6.5), sharey=True,
                                      squeeze=False)
        # the label on top: it hides under the prediction where the network is right
        styles = {"label": ("o-", "given label", 3),
                  "prediction": ("s--", "network's prediction", 2),
                  "other": ("^:", "most frequent other class", 2)}
        for col, cat in enumerate(CATEGORIES):
            count = entry["category_examples"][cat]
            for row, (split, name) in enumerate((("train", "training split"),
                                                 ("held_out", "held out"))):
                ax = axes[row, col]
                shares = np.array(entry["vote_share"][cat][split], dtype=float)
                for i, which in enumerate(entry["vote_share_order"]):
                    style, label, z = styles[which]
                    ax.plot(range(self.num_layers), shares[:, i], style, label=label, zorder=z,
                            ms=4 if which == "label" else 6)
                ax.set_title(f"{cat} ({count}), {name}", fontsize=9)
                if not count:
                    ax.text(0.5, 0.5, "no examples", ha="center", va="center",
                            transform=ax.transAxes, color="gray")
                self.probe_axis(ax)
                ax.set_ylim(-0.02, 1.02)
                ax.grid(alpha=0.3)
            for row in range(2):
                axes[row, 0].set_ylabel("share of k-NN votes")
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        self.save(fig, "vote_shares.png")

    def convergence(self) -> None:
        entry = self.claims.get("early_layers_converge_faster", {})
        if entry.get("probe_accuracy_epochs") is None:
            return  # a run from before the per-epoch probes
        curves = np.array(entry["probe_accuracy_epochs"], dtype=float)  # [E+1, L]
        fig, (a1, a2) = self.plt.subplots(1, 2, figsize=(11, 4))
        cmap = self.plt.get_cmap("viridis")
        for layer in range(self.num_layers):
            a1.plot(range(curves.shape[0]), curves[:, layer], "o-", ms=3,
                    color=cmap(layer / max(1, self.num_layers - 1)), label=self.names[layer])
        a1.set_xlabel("epoch (0 = initialisation)")
        a1.xaxis.set_major_locator(self.matplotlib.ticker.MaxNLocator(integer=True))
        a1.set_ylabel("k-NN accuracy (training sample)")
        a1.set_title("Probe accuracy during training")
        a1.legend(fontsize=7, ncol=2)
        a1.grid(alpha=0.3)
        a2.bar(range(self.num_layers), entry["convergence_epoch"], color="#5b6fb5")
        self.probe_axis(a2)
        a2.set_ylabel("epoch reaching 95% of the gain")
        a2.set_title("Convergence epoch per probe")
        a2.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        self.save(fig, "convergence.png")

    def label_noise(self) -> None:
        acc = self.claims.get("flipped_labels_memorised_late", {}).get("knn_accuracy_flipped")
        if acc is None:
            return  # no label was flipped
        fig, ax = self.plt.subplots(figsize=(max(6.5, 0.55 * self.num_layers + 2), 4))
        for key, style, label in (("train_given", "o-", "training split, flipped label"),
                                  ("train_original", "o--", "training split, original label"),
                                  ("held_out_given", "s-", "held out, flipped label"),
                                  ("held_out_original", "s--", "held out, original label")):
            ax.plot(range(self.num_layers), acc[key], style, label=label)
        self.probe_axis(ax)
        ax.set_ylabel("share of k-NN votes (flipped examples)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Flipped labels: memorised by the later layers?")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        self.save(fig, "label_noise.png")

    def examples_by_depth(self) -> None:
        split = "held_out" if self.df["held_out_depth"].notna().any() else "train"
        ho_round = np.rint(self.df[f"{split}_depth"].to_numpy(float))
        rows = []
        for d in range(self.num_layers + 1):
            idx = np.flatnonzero(ho_round == d)
            idx = self.rng.permutation(idx)[:self.per_row]
            rows.append((f"depth {d}\n({int((ho_round == d).sum())})", idx,
                         [_short(self.class_names[self.labels[i]]) for i in idx]))
        self.grid(rows, "examples_by_depth.png",
                  f"Examples by {split.replace('_', '-')} prediction depth")

    def examples_by_category(self) -> None:
        names, labels = self.class_names, self.labels
        rows = []
        mode = self.df["held_out_mode"].to_numpy()
        cat_all = self.df["category"].astype(str).to_numpy()
        for c in CATEGORIES:
            idx = self.rng.permutation(np.flatnonzero(cat_all == c))[:self.per_row]
            rows.append((c.replace("_", "\n"), idx,
                         [f"{_short(names[labels[i]])}\n> {_short(names[mode[i]])}"
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
        if arr["loss"].shape[1] == 0:  # a checkpoint: not trained here
            a1.text(0.5, 0.5, "not trained here (--checkpoint)", ha="center",
                    transform=a1.transAxes)
        a1.set_title("training loss")
        a1.set_ylabel("cross-entropy loss")
        a2.set_title("accuracy (solid: train half, dashed: held out)")
        a2.set_ylabel("accuracy")
        for ax in (a1, a2):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(self.matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        a1.legend(fontsize=7)
        fig.tight_layout()
        self.save(fig, "training.png")

    def score_correlations(self) -> None:
        entry = self.summary.get("score_correlations")
        if not isinstance(entry, dict) or not entry.get("scores"):
            return  # a run from before the difficulty scores
        names = [str(n) for n in entry["scores"]]
        harder = [bool(h) for h in entry["higher_is_harder"]]
        matrix = np.array([[np.nan if v is None else float(v) for v in row]
                           for row in entry["matrix"]], dtype=float)
        size = max(5.0, 0.5 * len(names) + 2)
        fig, ax = self.plt.subplots(figsize=(size + 1, size))
        im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        labels = [n + ("" if h else " *") for n, h in zip(names, harder, strict=True)]
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(labels, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, shrink=0.8, label="Spearman r")
        ax.set_title("Difficulty scores: rank correlation over the examples\n"
                     "(* higher = easier)", fontsize=10)
        fig.tight_layout()
        self.save(fig, "score_correlations.png")

    def score_reliability(self) -> None:
        entry = self.summary.get("score_reliability")
        scores = entry.get("scores") if isinstance(entry, dict) else None
        if not isinstance(scores, dict) or not scores:
            return  # one seed (or a run from before the scores): nothing to compare
        names = list(scores)
        value = lambda v: np.nan if v is None else float(v)  # noqa: E731
        half = [value(scores[n]["split_half"]) for n in names]
        brown = [value(scores[n]["spearman_brown"]) for n in names]
        x = np.arange(len(names))
        fig, ax = self.plt.subplots(figsize=(max(6.5, 0.6 * len(names) + 2), 4))
        ax.bar(x - 0.2, half, 0.4, label=f"split half (seeds {entry['seeds_a']} vs "
                                        f"{entry['seeds_b']})", color="#5b6fb5")
        ax.bar(x + 0.2, brown, 0.4, label="Spearman-Brown, all seeds", color="#e0a040")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("Spearman r")
        ax.set_ylim(min(-0.05, np.nanmin(half + brown + [0.0]) - 0.05), 1.0)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title("Difficulty scores: stability across seeds")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        self.save(fig, "score_reliability.png")

    def pruning(self) -> None:
        """figures/pruning.png and the report's section, where pdepth prune ran."""
        from .prune_report import draw_pruning, prune_html

        path = self.figdir.parent / "prune.json"
        prune = json.loads(path.read_text()) if path.exists() else None
        self.prune_html = prune_html(prune)
        if prune is not None and draw_pruning(prune, self.figdir / "pruning.png",
                                              self.pending):
            self.drawn.append("pruning.png")
