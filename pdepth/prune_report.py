"""The pruning curves of ``prune.json`` (``pdepth prune``, :mod:`pdepth.prune`) in a run's
report: ``figures/pruning.png`` (:func:`draw_pruning`) and the report's section
(:func:`prune_html`). ``prune.json`` is a file of the run folder, which anyone may have
edited: its values reach the page through :mod:`pdepth.report_html`'s escaping helpers."""

from __future__ import annotations

from pathlib import Path

from .report_html import _dict, _number, _real, _text

__all__ = ["curves", "draw_pruning", "prune_html"]

_MODE_TITLES = {"remove_easy": "easiest removed", "remove_hard": "hardest removed",
                "stratified": "stratified (coverage-preserving)"}


def curves(prune: dict) -> dict:
    """``mode -> [(score, fractions, means, stds)]`` from ``prune.json``'s ``scores``, each
    curve sorted by fraction; the random baseline (mode ``uniform``) is under the key
    ``"random"``. Entries that are not numbers are left out (an edited file)."""
    out: dict = {}
    for score, entry in _dict(_dict(prune).get("scores")).items():
        for mode, points in _dict(_dict(entry).get("modes")).items():
            pts = sorted((_real(p.get("fraction")), _real(p.get("test_accuracy")),
                          _real(p.get("test_accuracy_std")) or 0.0)
                         for p in _dict(points).values() if isinstance(p, dict)
                         and _real(p.get("fraction")) is not None
                         and _real(p.get("test_accuracy")) is not None)
            if pts:
                key = "random" if mode == "uniform" else mode
                out.setdefault(key, []).append((str(score), *map(list, zip(*pts, strict=True))))
    return out


def draw_pruning(prune: dict, path: Path, pending) -> bool:
    """Draws ``path`` (``figures/pruning.png``) under its temporary name (``pending``, a
    :class:`pdepth._atomic.PendingFiles`): one panel per mode, test accuracy against the
    fraction kept, one line per score (error bars: the std over seeds), the random baseline
    dashed and the full-data accuracy as a horizontal band. Returns False (draws nothing)
    where ``prune`` holds no curve."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ._atomic import names_file

    lines = curves(prune)
    modes = [m for m in lines if m != "random"] or (["random"] if "random" in lines else [])
    if not modes:
        return False
    full = _dict(_dict(prune).get("full"))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4), squeeze=False,
                             sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        for score, x, y, s in lines[mode]:
            ax.errorbar(x, y, yerr=s, marker="o", capsize=3, label=score)
        if mode != "random":
            for _, x, y, s in lines.get("random", []):
                ax.errorbar(x, y, yerr=s, color="black", ls="--", marker="x", capsize=3,
                            label="random")
        mean, std = _real(full.get("test_accuracy")), _real(full.get("test_accuracy_std"))
        if mean is not None:
            ax.axhline(mean, color="gray", lw=1, label="all examples")
            ax.axhspan(mean - (std or 0), mean + (std or 0), color="gray", alpha=0.2)
        ax.set_title(_MODE_TITLES.get(mode, mode))
        ax.set_xlabel("fraction of the training set kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("test accuracy (mean ± std over seeds)")
    fig.tight_layout()
    with names_file(path):  # a full disk names no file
        fig.savefig(pending.tmp(path), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def prune_html(prune: dict | None) -> str:
    """The report's section on ``prune.json``: a table of the test accuracy (mean ± std over
    seeds) per score and mode (rows) and fraction kept (columns), with the full-data
    baseline; a hint where ``pdepth prune`` has not run."""
    if prune is None:
        return ("<p>Pruning curves (test accuracy after retraining on the easiest / hardest "
                "examples by each score): <code>pdepth prune RUN_DIR</code> (docs/prune.md; "
                "it redraws this report with its results).</p>")
    prune = _dict(prune)
    full, settings = _dict(prune.get("full")), _dict(prune.get("settings"))
    rows, fractions = [], set()
    for score, entry in _dict(prune.get("scores")).items():
        for mode, points in _dict(_dict(entry).get("modes")).items():
            cells = {str(k): _dict(v) for k, v in _dict(points).items()}
            fractions |= set(cells)
            rows.append((score, mode, cells))
    cols = sorted(fractions, key=lambda f: _real(_float(f)) or 0.0)
    head = "".join(f"<th>keep {_text(f)}</th>" for f in cols)
    body = "".join(
        f"<tr><td>{_text(score)}</td><td>{_text(mode)}</td>"
        + "".join(f"<td>{_cell(cells.get(f))}</td>" for f in cols) + "</tr>"
        for score, mode, cells in rows)
    skipped = _dict(prune.get("skipped_scores"))
    return (f"<p><code>pdepth prune</code> (prune.json): the run's architecture retrained on "
            f"the examples each score keeps, evaluated on the untouched test split; mean ± "
            f"std over the seeds {_text(settings.get('seeds'))}, "
            f"{_number(settings.get('epochs'), 'd')} epochs. All "
            f"{_number(full.get('kept'), 'd')} examples: {_cell(full)}. Subsets: prune/*.npy "
            "(dataset_index values); rule: docs/prune.md."
            + (f" Not in this run: {_text(', '.join(map(str, skipped)))}." if skipped else "")
            + f"</p><table><tr><th>score</th><th>mode</th>{head}</tr>{body}</table>")


def _float(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def _cell(entry) -> str:
    entry = _dict(entry)
    if "test_accuracy" not in entry:
        return "n/a"
    return (f"{_number(entry.get('test_accuracy'), '.4f')} ± "
            f"{_number(entry.get('test_accuracy_std'), '.4f')}")
