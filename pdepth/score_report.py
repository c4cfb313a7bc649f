"""Figures (PNG, matplotlib Agg) and ``report.html`` for a ``pdepth score`` folder.

A score folder holds one model scored on two splits (``results.parquet``: one row per
example, ``split`` train / test; ``config.json``), not the per-model arrays of ``pdepth run``
(:mod:`pdepth.report`), so it gets the figures that apply to one model
(:data:`pdepth.figures.SCORE_FIGURES`): the depth per split, each probe's k-NN accuracy per
split and the model's accuracy against depth. Examples by depth are not drawn: a score does
not store the images. ``pdepth score`` draws it before ``COMPLETE``; ``pdepth report DIR``
draws it again (:func:`write_score_report`).

All or nothing, as the run's report: the inputs are read first, the files are drawn under
temporary names and renamed once all are drawn. Every value on the page goes through
:mod:`pdepth.report_html`'s escaping helpers: a score folder is data anyone may have edited.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ._atomic import PendingFiles, names_file
from .figures import SCORE_FIGURES
from .metrics import layer_accuracy
from .report import RunFilesError, _binned, all_or_nothing
from .report import _edited as edited
from .report_html import _dict, _list, _number, _probe_rows, _rows, _text, e, page_head

__all__ = ["SCORE_COMMAND", "draw_score_report", "is_score_folder", "write_score_report"]

SCORE_COMMAND = "pdepth score"  # config.json's "command" in a score folder
SPLITS = (("train", "training split (self excluded)"), ("test", "test split"))


def is_score_folder(out: str | os.PathLike) -> bool:
    """Whether ``out/config.json`` says the folder was written by ``pdepth score``."""
    try:
        cfg = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("command") == SCORE_COMMAND


def write_score_report(out: str | os.PathLike) -> Path:
    """``pdepth report DIR`` on a score folder: :func:`draw_score_report` under the rules of
    every command that writes into a run folder (its lock, pdepth's files only)."""
    from .protocol.outdir import open_for_writing

    with open_for_writing(out, "pdepth report"):
        return draw_score_report(out)


def draw_score_report(out: str | os.PathLike) -> Path:
    """Draws :data:`SCORE_FIGURES` into ``out/figures`` and writes ``out/report.html`` from
    ``results.parquet`` and ``config.json`` alone; returns the HTML file's path. The caller
    holds the folder's lock. A file that cannot be read or holds values no ``pdepth score``
    writes is a :class:`pdepth.report.RunFilesError` naming it, with nothing written."""
    out = Path(out)
    df, cfg = _load(out)
    all_or_nothing(out / "figures", lambda pending: _draw(out, pending, df, cfg))
    return out / "report.html"


def _load(out: Path):
    import pandas as pd

    loaded = []
    for name, read in (("results.parquet", pd.read_parquet),
                       ("config.json", lambda p: json.loads(p.read_text()))):
        try:
            loaded.append(read(out / name))
        except Exception as exc:  # truncated, damaged, missing: pyarrow, JSON, OS
            raise RunFilesError(f"{out / name} cannot be read ({type(exc).__name__}: {exc}); "
                                f"{_REDO.format(out=out)}") from exc
    if not isinstance(loaded[1], dict):
        raise RunFilesError(f"{out / 'config.json'} cannot be read (it holds no JSON object); "
                            f"{_REDO.format(out=out)}")
    return tuple(loaded)


_REDO = "to score again, rerun the same `pdepth score --out {out} --overwrite ...` command"


def _edited(out: Path, what: str):
    """The run report's rule (:func:`pdepth.report._edited`): a value no pdepth score writes
    is one RunFilesError line."""
    return edited(out, what, "results.parquet and config.json", SCORE_COMMAND,
                  _REDO.format(out=out))


class _Score:
    """The arrays of one score folder, per split."""

    def __init__(self, df, cfg: dict):
        self.res = _dict(cfg.get("resolved"))
        cols = [c for c in df.columns if isinstance(c, str) and c.startswith("pred_")]
        cols.sort(key=lambda c: int(c[5:]))
        self.num_layers = len(cols)
        names = _list(self.res.get("probes"))
        self.names = ([str(n) for n in names] if len(names) == self.num_layers
                      else [f"probe {i}" for i in range(self.num_layers)])
        split = df["split"].astype(str).to_numpy()
        self.masks = {name: split == name for name, _ in SPLITS}
        self.depth = df["depth"].to_numpy(np.int64)
        self.correct = df["correct"].to_numpy(bool)
        self.labels = df["label"].to_numpy(np.int64)
        self.layer_pred = df[cols].to_numpy(np.int64).T[None]  # [1, L, n]
        self.top = max(self.num_layers, int(self.depth.max(initial=0)))  # the deepest depth

    def knn_accuracy(self, split: str) -> np.ndarray:
        return layer_accuracy(self.layer_pred, self.labels, self.masks[split][None])


def _draw(out: Path, pending: PendingFiles, df, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with _edited(out, "the report"):
        s = _Score(df, cfg)
    figdir = out / "figures"
    for name, draw in (("depth_hist.png", _depth_hist), ("layer_knn.png", _layer_knn),
                       ("accuracy_vs_depth.png", _accuracy_vs_depth)):
        with _edited(out, f"figures/{name}"):
            fig = draw(plt, s)
            with names_file(figdir / name):  # a full disk names no file
                fig.savefig(pending.tmp(figdir / name), dpi=110, bbox_inches="tight")
            plt.close(fig)
    with _edited(out, "report.html"):
        page = score_html(df, cfg, s)
    with names_file(out / "report.html"):
        pending.tmp(out / "report.html").write_text(page)


def _finish(fig, ax, title: str, ylabel: str):
    """The labels, grid and legend every score figure has; returns ``fig``."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _depth_hist(plt, s: _Score):
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    top = s.top
    bins = np.arange(top + 1)
    for i, (split, label) in enumerate(SPLITS):
        counts = np.bincount(s.depth[s.masks[split]], minlength=top + 1)
        ax.bar(bins + (i - 0.5) * 0.4, counts / max(1, counts.sum()), width=0.4,
               label=f"{label} ({int(counts.sum())})")
    ax.set_xticks(bins)
    ax.set_xlabel(f"prediction depth (0 = every probe agrees, {s.num_layers} = the last "
                  "disagrees)")
    return _finish(fig, ax, "Prediction depth per split", "fraction of the split")


def _layer_knn(plt, s: _Score):
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * s.num_layers + 2), 3.8))
    for (split, label), style in zip(SPLITS, ("o-", "s-"), strict=True):
        ax.plot(range(s.num_layers), s.knn_accuracy(split), style, label=label)
    ax.set_xticks(range(s.num_layers))
    ax.set_xticklabels(s.names, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("probe")
    return _finish(fig, ax, "Per-probe k-NN accuracy", "k-NN accuracy (given labels)")


def _accuracy_vs_depth(plt, s: _Score):
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    top = s.top
    for (split, label), style, up in zip(SPLITS, ("o-", "s--"), (5, -11), strict=True):
        mask = s.masks[split]
        depth = s.depth[mask]
        centers, means, _ = _binned(depth.astype(float), s.correct[mask].astype(float), top)
        ax.plot(centers, means, style, label=label)
        counts = np.bincount(depth, minlength=top + 1)
        for c, m in zip(centers, means, strict=True):
            ax.annotate(str(int(counts[c])), (c, m), textcoords="offset points",
                        xytext=(0, up), ha="center", fontsize=7)  # train above, test below
    ax.set_xticks(range(top + 1))
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("prediction depth")
    return _finish(fig, ax, "Accuracy against prediction depth", "accuracy of the model")


def score_html(df, cfg: dict, s: _Score) -> str:
    """The page of a score folder: what was scored, per split the counts, accuracy and mean
    depth, the probes' k-NN accuracy, the figures and the settings; every value escaped."""
    res, settings = s.res, _dict(cfg.get("settings"))
    model = _text(_dict(res.get("model")).get("spec") or settings.get("model"))
    dataset = _text(settings.get("dataset"))
    acc = {split: s.knn_accuracy(split) for split, _ in SPLITS}
    figs = "".join(f'<h3>{e(name)}</h3><p>{e(caption)}</p>'
                   f'<img src="figures/{e(name)}" style="max-width:100%">'
                   for name, caption in SCORE_FIGURES.items())
    classes = ", ".join(str(c) for c in _list(res.get("class_names")))  # _rows escapes
    versions = _dict(cfg.get("versions"))
    return f"""{page_head("pdepth score", model, dataset)} A model trained elsewhere, scored
by <code>pdepth score</code>: the support set
is the training split with its given labels; training examples are scored against it with
their own row excluded, test examples against the same support (docs/score.md).</p>
<h2>Summary</h2><table><tr><th></th><th>train</th><th>test</th></tr>{_split_rows(s)}</table>
<table>{_rows([("classes", classes)])}</table>
<h2>Probes</h2><table><tr><th>#</th><th>probe</th><th>dim</th><th>k-NN acc. train</th>
<th>k-NN acc. test</th></tr>{_probe_rows(s.names, res, acc["train"], acc["test"])}</table>
<h2>Figures</h2>{figs}
<p>Examples by depth are not drawn: <code>pdepth score</code> does not store the images
(results.parquet's <code>dataset_index</code> names each example's row in its split).</p>
<h2>Settings</h2><table>{_rows(settings.items(), as_json=True)}</table>
<h2>Resolved</h2><table>{_rows(res.items(), as_json=True)}</table>
<p>Versions: {e(json.dumps(versions.get('pdepth')))} (pdepth),
{e(json.dumps(versions.get('torch')))} (torch). Full settings: config.json. Per-example
results: results.parquet.</p>
</body></html>
"""


def _split_rows(s: _Score) -> str:
    """Per split: examples, the model's accuracy, the mean depth (values via _number)."""
    stats = {}
    for split, _ in SPLITS:
        m = s.masks[split]
        n = int(m.sum())
        stats[split] = (_number(n, "d"), _number(s.correct[m].mean() if n else None),
                        _number(s.depth[m].mean() if n else None))
    names = ("examples", "accuracy of the model", "mean prediction depth")
    return "".join(f"<tr><td>{name}</td><td>{stats['train'][i]}</td>"
                   f"<td>{stats['test'][i]}</td></tr>" for i, name in enumerate(names))
