"""``report.html`` of a run: the page around the figures :mod:`pdepth.report` draws, with the
paper's claims (``summary.json``: what the paper says, what this run shows), the label-error
flags and, where ``pdepth improve`` ran, its accuracies (``improve.json``)."""

from __future__ import annotations

import html
import json

import numpy as np

from .categories import CATEGORIES
from .metrics import mean_or_none

__all__ = ["claim_line", "report_html"]

e = html.escape
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;}
table{border-collapse:collapse;margin:1em 0;}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:90%;}p.claim{margin:0.2em 0;}.holds{color:#2a7a3b;}.fails{color:#b02a2a;}"""


def claim_line(entry: dict) -> str:
    """One sentence (HTML) from a ``summary.json`` claim entry: what the paper says and what
    this run shows, from its ``holds``."""
    shown = _number(entry.get("value"), "+.3f")
    if entry.get("holds") is None:
        verdict, cls = "cannot be computed on this run", "na"
    elif entry["holds"]:
        verdict, cls = f"holds (the paper's direction is {entry['paper_direction']})", "holds"
    else:
        verdict, cls = (f"does not hold here (the paper's direction is "
                        f"{entry['paper_direction']})"), "fails"
    return (f'<p class="claim"><b>Paper:</b> {e(entry["claim"])} <b>This run:</b> '
            f'{e(entry["statistic"])} = {shown} ({entry["n_examples"]} examples, '
            f'{entry["n_models"]} models): <span class="{cls}">{e(verdict)}</span>.</p>')


def report_html(d, figures, acc_tr, acc_ho) -> str:
    """The page of the run drawn by ``d`` (a :class:`pdepth.report._Drawing`): ``figures``,
    the ``(file name, caption, summary.json claim keys)`` of each figure drawn, and the
    per-probe k-NN accuracy ``acc_tr`` / ``acc_ho`` (training split / held out)."""
    df, cfg, names = d.df, d.cfg, d.names
    c, res = cfg["config"], cfg["resolved"]
    network = c.get("model") or c["arch"]
    figs = "".join(
        f'<h3>{e(name)}</h3><p>{e(caption)}</p>'
        + "".join(claim_line(d.claims[key]) for key in keys if key in d.claims)
        + f'<img src="figures/{e(name)}" style="max-width:100%">'
        for name, caption, keys in figures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pdepth report: {e(network)} on {e(c['dataset'])}</title>
<style>{_STYLE}</style></head><body>
<h1>Prediction depth: {e(network)} on {e(c['dataset'])}</h1>
<p>Baldock, Maennel, Neyshabur, <i>Deep Learning Through the Lens of Example Difficulty</i>,
NeurIPS 2021. {_PROTOCOL[res.get("trained", True)]}</p>
<h2>Summary</h2><table>{_rows(_stats(df, cfg))}</table>
<h2>Claims</h2><p>Each claim of the paper as one number on this run (summary.json).</p>
{_claims_table(d.claims)}
<h2>Categories</h2><table><tr><th>category</th><th>examples</th><th>share</th></tr>
{_category_rows(df)}</table><p>Rules and thresholds: docs/protocol.md; thresholds used:
{e(json.dumps(res.get('thresholds')))}</p>
<h2>Probes</h2><table><tr><th>#</th><th>probe</th><th>dim</th><th>k-NN acc. train</th>
<th>k-NN acc. held out</th></tr>{_probe_rows(names, res, acc_tr, acc_ho)}</table>
<h2>Time and memory per stage</h2>{_stages_html(cfg)}
<h2>Figures</h2>{figs}
<h2>Label errors</h2>{_label_errors(d.summary.get('label_errors'), d.improve)}
<h2>Settings</h2><table>{_rows(c.items(), as_json=True)}</table>
<p>Versions: {e(json.dumps(cfg.get('versions', {}).get('pdepth')))} (pdepth),
{e(json.dumps(cfg.get('versions', {}).get('torch')))} (torch). Full settings: config.json.
Per-example results: results.parquet; per-model arrays: per_model.npz, models/; the claims:
summary.json.</p>
</body></html>
"""


def _rows(pairs, as_json: bool = False) -> str:
    show = json.dumps if as_json else str
    return "".join(f"<tr><td>{e(str(k))}</td><td>{e(show(v))}</td></tr>" for k, v in pairs)


def _stats(df, cfg) -> list[tuple[str, object]]:
    res, timing = cfg["resolved"], cfg.get("timing", {})
    stats = [
        ("examples", len(df)),
        ("models", res.get("num_models")),
        ("probes", res.get("num_layers")),
        *((name, _number(mean_or_none(df[col]))) for name, col in (
            ("mean train-split depth", "train_depth"), ("mean held-out depth", "held_out_depth"),
            ("held-out accuracy", "held_out_accuracy"), ("train accuracy", "train_accuracy"))),
        ("time for the models (s)", f"{timing.get('models_seconds', float('nan')):.1f}"),
    ]
    mem = [m.get("memory", {}).get("peak_bytes", 0) for m in cfg.get("models", [])]
    if mem:
        stats.append(("k-NN peak resident embeddings (MiB)", f"{max(mem) / 2**20:.1f}"))
    if cfg.get("peak_rss_bytes"):
        stats.append(("peak resident set of the run (MiB)",
                      f"{cfg['peak_rss_bytes'] / 2**20:.0f}"))
    return stats


def _category_rows(df) -> str:
    counts = df["category"].astype(str).value_counts()
    return "".join(f"<tr><td>{e(k)}</td><td>{int(counts.get(k, 0))}</td>"
                   f"<td>{100 * counts.get(k, 0) / len(df):.1f}%</td></tr>" for k in CATEGORIES)


def _probe_rows(names, res, acc_tr, acc_ho) -> str:
    dims = res.get("probe_dims", [""] * len(names))
    return "".join(
        f"<tr><td>{i}</td><td>{e(n)}</td><td>{d}</td><td>{_number(a)}</td><td>{_number(b)}</td>"
        "</tr>"
        for i, (n, d, a, b) in enumerate(zip(names, dims, acc_tr, acc_ho, strict=True)))


def _claims_table(claims: dict) -> str:
    head = ("<tr><th>claim</th><th>statistic</th><th>value</th><th>paper</th><th>holds</th>"
            "<th>examples</th></tr>")
    rows = "".join(
        f"<tr><td>{e(key)}</td><td>{e(c['statistic'])}</td>"
        f"<td>{_number(c['value'], '+.3f')}</td>"
        f"<td>{e(c['paper_direction'])}</td><td>{_holds(c['holds'])}</td>"
        f"<td>{c['n_examples']}</td></tr>" for key, c in claims.items())
    return f"<table>{head}{rows}</table>"


def _number(value, spec: str = ".3f") -> str:
    """``value`` formatted; "n/a" for a missing one (None or NaN)."""
    missing = value is None or (isinstance(value, float) and np.isnan(value))
    return "n/a" if missing else format(value, spec)


_PROTOCOL = {
    True: "Each seed splits the data 50/50; a model trains on each half; depth is computed "
          "for its training half (self excluded) and its held-out half with its training half "
          "as the k-NN support (given labels), measured against the network's own prediction.",
    False: "The network was not trained here: its checkpoint is scored with every example in "
           "its training split (the k-NN support, self excluded, given labels), against its "
           "own prediction. Nothing is held out, so the held-out columns and the categories "
           "are missing, and there are no per-epoch (learning-speed) values.",
}


def _stages_html(cfg) -> str:
    """One row per model and stage: seconds and peak resident set (docs/design.md section
    12); the k-NN row sums the probes and gives the largest peak (the slowest probe
    named)."""
    rows = []
    for m in cfg.get("models", []):
        stages = m.get("stages")
        if not stages:
            continue
        model = f"seed {m.get('seed')} half {m.get('half')}"
        parts = [("training", [stages.get("train", {})], ""),
                 ("extraction", stages.get("extract", []),
                  f"{len(stages.get('extract', []))} pass(es)"),
                 ("k-NN", stages.get("knn", []), "")]
        for name, recs, note in parts:
            recs = [r for r in recs if r]
            if not recs:
                continue
            if name == "k-NN":
                slow = max(recs, key=lambda r: r.get("seconds", 0))
                note = f"{len(recs)} probes; slowest {slow.get('probe')} ({slow['seconds']:.1f} s)"
            secs = sum(r.get("seconds", 0) for r in recs)
            peak = max(r.get("peak_rss_bytes", 0) for r in recs) / 2**20
            rows.append(f"<tr><td>{e(model)}</td><td>{name}</td><td>{secs:.1f}</td>"
                        f"<td>{peak:.0f}</td><td>{e(note)}</td></tr>")
    if not rows:
        return "<p>Not recorded by the pdepth version that made this run.</p>"
    cache = {m.get("memory", {}).get("cache") for m in cfg.get("models", [])}
    where = ("on disk (OUT/cache, one probe at a time)" if "disk" in cache else "in memory")
    return (f"<p>Embeddings {where}; --memory-budget "
            f"{cfg['config'].get('memory_budget', 0) / 2**20:.0f} MiB.</p>"
            "<table><tr><th>model</th><th>stage</th><th>seconds</th><th>peak RSS (MiB)</th>"
            f"<th></th></tr>{''.join(rows)}</table>")



# improve.json: the variants, in its order, and what each row shows
_VARIANT_COLUMNS = (("test_accuracy", ".4f"), ("test_accuracy_std", ".4f"),
                    ("train_examples", "d"), ("flagged", "d"), ("precision", ".3f"),
                    ("recall", ".3f"), ("f1", ".3f"))


def _label_errors(errors: dict | None, improve: dict | None) -> str:
    """The label-error flags against the flips (summary.json) and, where ``pdepth improve``
    ran, the test accuracy of each retraining variant (improve.json)."""
    if errors is None:
        return "<p>This run has no label-error flags (it has no summary.json).</p>"
    flags = (f"<p>{errors['flagged']} examples flagged (<code>label_error</code>), "
             f"{errors['flipped']} labels flipped by --label-noise.")
    if errors.get("precision") is not None or errors.get("recall") is not None:
        flags += (f" Against the flips: precision {_number(errors['precision'])}, recall "
                  f"{_number(errors['recall'])}, F1 {_number(errors['f1'])}; the suggested "
                  f"label restores the original one for {errors['relabel_correct']} of the "
                  f"{errors['true_positives']} true flags.")
    flags += "</p>"
    if improve is None:
        return flags + ("<p>Retraining without the flagged labels: <code>pdepth improve "
                        "RUN_DIR</code> (it redraws this report with its results).</p>")
    head = "".join(f"<th>{e(name)}</th>" for name, _ in _VARIANT_COLUMNS)
    rows = "".join(
        f"<tr><td>{e(name)}</td>"
        + ("".join(f"<td>{_number(v.get(col), spec)}</td>" for col, spec in _VARIANT_COLUMNS)
           if not v.get("skipped") else
           f'<td colspan="{len(_VARIANT_COLUMNS)}">skipped: {e(str(v.get("reason")))}</td>')
        + "</tr>"
        for name, v in improve.items() if isinstance(v, dict) and ("test_accuracy" in v
                                                                  or v.get("skipped")))
    settings = improve.get("settings", {})
    return (flags + "<p><code>pdepth improve</code> (improve.json): the run's architecture "
            "retrained on all given labels (baseline), without / relabelling the flagged "
            "examples (pdepth_*) and without cleanlab's flags (cleanlab_remove), evaluated "
            f"on the untouched test split; mean over the seeds {e(str(settings.get('seeds')))}"
            f".</p><table><tr><th>variant</th>{head}</tr>{rows}</table>")


def _holds(holds) -> str:
    return {True: '<span class="holds">yes</span>', False: '<span class="fails">no</span>',
            None: "n/a"}[holds]
