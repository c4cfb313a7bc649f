"""``report.html`` of a run: the page around the figures :mod:`pdepth.report` draws, with the
paper's claims (``summary.json``: what the paper says, what this run shows), the label-error
flags and, where ``pdepth improve`` ran, its accuracies (``improve.json``).

Every value that reaches the page comes from a file of the run folder, which anyone may have
edited: text goes through :func:`_text` (``html.escape``), numbers through :func:`_number`
(which emits a formatted number, "n/a", or the escaped text of what it got instead), and
nested values are read with :func:`_dict` / :func:`_list`, so that a string where a number
belongs, a ``<script>`` in a name or a dict where a list belongs shows as escaped text and
never as markup or a traceback."""

from __future__ import annotations

import html
import json
import math
import numbers

from .categories import CATEGORIES
from .metrics import mean_or_none

__all__ = ["claim_line", "page_head", "report_html"]

e = html.escape


def _text(value) -> str:
    """Any value as escaped text."""
    return e(value if isinstance(value, str) else str(value))


def _number(value, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec`` where it is a real number (an integer spec on a
    float: ``g``); "n/a" for a missing one (None or NaN); anything else (a string, a dict,
    a bool) as escaped text: a damaged file shows what it holds, never markup."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _text(value)
    if math.isnan(float(value)):
        return "n/a"
    try:
        return e(format(value, spec))
    except (TypeError, ValueError):
        return e(format(float(value), "g"))


def _dict(value) -> dict:
    """``value`` where it is a dict (a JSON object), else an empty one."""
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    """``value`` where it is a list (a JSON array), else an empty one."""
    return value if isinstance(value, list) else []


def _real(value) -> float | None:
    """``value`` as a float where it is a real number (not a bool), else None."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return float(value) if ok else None


def _mib(value, spec: str) -> str:
    """Bytes as MiB (:func:`_number`; escaped text for a value that is not a number)."""
    number = _real(value)
    return _number(value if number is None else number / 2**20, spec)
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;}
table{border-collapse:collapse;margin:1em 0;}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:90%;}p.claim{margin:0.2em 0;}.holds{color:#2a7a3b;}.fails{color:#b02a2a;}"""


def claim_line(entry: dict) -> str:
    """One sentence (HTML) from a ``summary.json`` claim entry: what the paper says and what
    this run shows, from its ``holds``."""
    entry = _dict(entry)
    shown = _number(entry.get("value"), "+.3f")
    direction = entry.get("paper_direction")
    if entry.get("holds") is True:
        verdict, cls = f"holds (the paper's direction is {direction})", "holds"
    elif entry.get("holds") is False:
        verdict, cls = f"does not hold here (the paper's direction is {direction})", "fails"
    else:
        verdict, cls = "cannot be computed on this run", "na"
    return (f'<p class="claim"><b>Paper:</b> {_text(entry.get("claim"))} <b>This run:</b> '
            f'{_text(entry.get("statistic"))} = {shown} '
            f'({_number(entry.get("n_examples"), "d")} examples, '
            f'{_number(entry.get("n_models"), "d")} models): <span class="{cls}">{e(verdict)}'
            '</span>.</p>')


def report_html(d, figures, acc_tr, acc_ho) -> str:
    """The page of the run drawn by ``d`` (a :class:`pdepth.report._Drawing`): ``figures``,
    the ``(file name, caption, summary.json claim keys)`` of each figure drawn, and the
    per-probe k-NN accuracy ``acc_tr`` / ``acc_ho`` (training split / held out)."""
    df, cfg, names = d.df, _dict(d.cfg), d.names
    c, res = _dict(cfg.get("config")), _dict(cfg.get("resolved"))
    network, dataset = _text(c.get("model") or c.get("arch")), _text(c.get("dataset"))
    claims = _dict(d.claims)
    figs = "".join(
        f'<h3>{e(name)}</h3><p>{e(caption)}</p>'
        + "".join(claim_line(claims[key]) for key in keys if key in claims)
        + f'<img src="figures/{e(name)}" style="max-width:100%">'
        for name, caption, keys in figures)
    versions = _dict(cfg.get("versions"))
    protocol = _PROTOCOL[res.get("trained", True) is not False]
    return f"""{page_head("pdepth report", network, dataset)} {protocol}</p>
<h2>Summary</h2><table>{_stat_rows(_stats(df, cfg))}</table>
<h2>Claims</h2><p>Each claim of the paper as one number on this run (summary.json).</p>
{_claims_table(claims)}
<h2>Categories</h2><table><tr><th>category</th><th>examples</th><th>share</th></tr>
{_category_rows(df)}</table><p>Rules and thresholds: docs/protocol.md; thresholds used:
{e(json.dumps(res.get('thresholds')))}</p>
<h2>Probes</h2><table><tr><th>#</th><th>probe</th><th>dim</th><th>k-NN acc. train</th>
<th>k-NN acc. held out</th></tr>{_probe_rows(names, res, acc_tr, acc_ho)}</table>
<h2>Time and memory per stage</h2>{_stages_html(cfg)}
<h2>Difficulty scores</h2>{_scores_section(_dict(d.summary))}
<h2>Figures</h2>{figs}
<h2>Label errors</h2>{_label_errors(_dict(d.summary).get('label_errors'), d.improve)}
<h2>Pruning curves</h2>{getattr(d, 'prune_html', '')}
<h2>Settings</h2><table>{_rows(c.items(), as_json=True)}</table>
<p>Versions: {e(json.dumps(versions.get('pdepth')))} (pdepth),
{e(json.dumps(versions.get('torch')))} (torch). Full settings: config.json.
Per-example results: results.parquet; per-model arrays: per_model.npz, models/; the claims:
summary.json.</p>
</body></html>
"""


def page_head(kind: str, network: str, dataset: str) -> str:
    """A report page up to the paper's reference, its paragraph left open for the protocol
    (``network`` and ``dataset`` already escaped)."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{kind}: {network} on {dataset}</title>
<style>{_STYLE}</style></head><body>
<h1>Prediction depth: {network} on {dataset}</h1>
<p>Baldock, Maennel, Neyshabur, <i>Deep Learning Through the Lens of Example Difficulty</i>,
NeurIPS 2021."""


def _rows(pairs, as_json: bool = False) -> str:
    show = json.dumps if as_json else str
    return "".join(f"<tr><td>{_text(k)}</td><td>{_text(show(v))}</td></tr>" for k, v in pairs)


def _stat_rows(stats) -> str:
    """The summary table: names as they are, values already HTML (:func:`_number`)."""
    return "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in stats)


def _stats(df, cfg) -> list[tuple[str, str]]:
    """``(name, HTML of the value)`` of the summary table."""
    res, timing = _dict(cfg.get("resolved")), _dict(cfg.get("timing"))
    stats = [
        ("examples", _number(len(df), "d")),
        ("models", _number(res.get("num_models"), "d")),
        ("probes", _number(res.get("num_layers"), "d")),
        *((name, _number(_column_mean(df, col))) for name, col in (
            ("mean train-split depth", "train_depth"), ("mean held-out depth", "held_out_depth"),
            ("held-out accuracy", "held_out_accuracy"), ("train accuracy", "train_accuracy"))),
        ("time for the models (s)", _number(timing.get("models_seconds", float("nan")), ".1f")),
    ]
    models = [_dict(m) for m in _list(cfg.get("models"))]
    mem = [_real(_dict(m.get("memory")).get("peak_bytes", 0)) or 0.0 for m in models]
    if mem:
        stats.append(("k-NN peak resident embeddings (MiB)", _mib(max(mem), ".1f")))
    if cfg.get("peak_rss_bytes"):
        stats.append(("peak resident set of the run (MiB)", _mib(cfg["peak_rss_bytes"], ".0f")))
    return stats


def _column_mean(df, col) -> float | None:
    """The mean of a column of results.parquet (None where it is missing or not numeric: an
    edited table shows "n/a")."""
    try:
        return mean_or_none(df[col])
    except (KeyError, TypeError, ValueError):
        return None


def _category_rows(df) -> str:
    counts = df["category"].astype(str).value_counts()
    return "".join(f"<tr><td>{e(k)}</td><td>{int(counts.get(k, 0))}</td>"
                   f"<td>{100 * counts.get(k, 0) / len(df):.1f}%</td></tr>" for k in CATEGORIES)


def _probe_rows(names, res, acc_tr, acc_ho) -> str:
    dims = _list(res.get("probe_dims")) or [""] * len(names)
    dims = (dims + [""] * len(names))[:len(names)]  # one per probe, whatever the file says
    return "".join(
        f"<tr><td>{i}</td><td>{_text(n)}</td><td>{_number(d, 'd')}</td><td>{_number(a)}</td>"
        f"<td>{_number(b)}</td></tr>"
        for i, (n, d, a, b) in enumerate(zip(names, dims, acc_tr, acc_ho, strict=True)))


def _claims_table(claims: dict) -> str:
    head = ("<tr><th>claim</th><th>statistic</th><th>value</th><th>paper</th><th>holds</th>"
            "<th>examples</th></tr>")
    rows = "".join(
        f"<tr><td>{_text(key)}</td><td>{_text(c.get('statistic'))}</td>"
        f"<td>{_number(c.get('value'), '+.3f')}</td>"
        f"<td>{_text(c.get('paper_direction'))}</td><td>{_holds(c.get('holds'))}</td>"
        f"<td>{_number(c.get('n_examples'), 'd')}</td></tr>"
        for key, c in ((k, _dict(v)) for k, v in _dict(claims).items()))
    return f"<table>{head}{rows}</table>"


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
    models = [_dict(m) for m in _list(cfg.get("models"))]
    for m in models:
        stages = _dict(m.get("stages"))
        if not stages:
            continue
        model = f"seed {m.get('seed')} half {m.get('half')}"
        extract = _list(stages.get("extract"))
        parts = [("training", [stages.get("train")], ""),
                 ("extraction", extract, f"{len(extract)} pass(es)"),
                 ("k-NN", _list(stages.get("knn")), "")]
        for name, recs, note in parts:
            recs = [r for r in map(_dict, recs) if r]
            if not recs:
                continue
            seconds = [_real(r.get("seconds")) or 0.0 for r in recs]
            if name == "k-NN":
                slow = max(range(len(recs)), key=seconds.__getitem__)
                note = (f"{len(recs)} probes; slowest {recs[slow].get('probe')} "
                        f"({seconds[slow]:.1f} s)")
            peak = max(_real(r.get("peak_rss_bytes")) or 0.0 for r in recs)
            rows.append(f"<tr><td>{_text(model)}</td><td>{name}</td><td>{sum(seconds):.1f}</td>"
                        f"<td>{_mib(peak, '.0f')}</td><td>{_text(note)}</td></tr>")
    if not rows:
        return "<p>Not recorded by the pdepth version that made this run.</p>"
    cache = {_dict(m.get("memory")).get("cache") for m in models
             if isinstance(_dict(m.get("memory")).get("cache"), str)}
    where = ("on disk (OUT/cache, one probe at a time)" if "disk" in cache else "in memory")
    return (f"<p>Embeddings {where}; --memory-budget "
            f"{_mib(_dict(cfg.get('config')).get('memory_budget', 0), '.0f')} MiB.</p>"
            "<table><tr><th>model</th><th>stage</th><th>seconds</th><th>peak RSS (MiB)</th>"
            f"<th></th></tr>{''.join(rows)}</table>")


# improve.json: the variants, in its order, and what each row shows
_VARIANT_COLUMNS = (("test_accuracy", ".4f"), ("test_accuracy_std", ".4f"),
                    ("train_examples", "d"), ("flagged", "d"), ("precision", ".3f"),
                    ("recall", ".3f"), ("f1", ".3f"))


def _scores_section(summary: dict) -> str:
    """Prediction depth among the field's difficulty scores (docs/scores.md): per score its
    orientation, its Spearman correlation with the held-out depth (``score_correlations``)
    and its stability across seeds (``score_reliability``), every value escaped."""
    corr, rel = _dict(summary.get("score_correlations")), _dict(summary.get("score_reliability"))
    names = _list(corr.get("scores"))
    if not names:
        return "<p>This run has no difficulty scores (a run of an older version).</p>"
    harder, matrix = _list(corr.get("higher_is_harder")), _list(corr.get("matrix"))
    at = names.index("held_out_depth") if "held_out_depth" in names else None
    per = _dict(rel.get("scores"))
    rows = ""
    for i, name in enumerate(names):
        row = _list(matrix[i]) if i < len(matrix) else []
        with_depth = row[at] if at is not None and at < len(row) else None
        orient = harder[i] if i < len(harder) else None
        shown = ("harder" if orient else "easier") if isinstance(orient, bool) else orient
        r = _dict(per.get(name)) if isinstance(name, str) else {}
        rows += (f"<tr><td>{_text(name)}</td><td>{_text(shown)}</td>"
                 f"<td>{_number(with_depth, '+.3f')}</td>"
                 f"<td>{_number(r.get('split_half'), '+.3f')}</td>"
                 f"<td>{_number(r.get('spearman_brown'), '+.3f')}</td></tr>")
    reason = rel.get("reason")
    note = (f"<p>Stability across seeds: {_text(reason)}.</p>" if reason else
            f"<p>Stability: the score from seeds {_text(rel.get('seeds_a'))} against seeds "
            f"{_text(rel.get('seeds_b'))} (Spearman over the examples), and the Spearman-Brown "
            "estimate for all seeds.</p>")
    return ("<p>The field's per-example difficulty scores next to prediction depth "
            "(results.parquet columns; definitions, orientation and the models each uses: "
            "docs/scores.md).</p>" + note
            + "<table><tr><th>score</th><th>higher =</th><th>Spearman with held_out_depth</th>"
              "<th>split-half r</th><th>Spearman-Brown</th></tr>" + rows + "</table>")


def _label_errors(errors: dict | None, improve: dict | None) -> str:
    """The label-error flags against the flips (summary.json) and, where ``pdepth improve``
    ran, the test accuracy of each retraining variant (improve.json). Where no label was
    flipped, precision, recall and F1 show "no flips" (there is nothing to find)."""
    if not isinstance(errors, dict):
        return "<p>This run has no label-error flags (it has no summary.json).</p>"
    flags = (f"<p>{_number(errors.get('flagged'), 'd')} examples flagged "
             f"(<code>label_error</code>), {_number(errors.get('flipped'), 'd')} labels flipped "
             "by --label-noise.")
    if errors.get("flipped") == 0:
        flags += " Precision and recall: no flips (nothing to find, nothing to check)."
    elif errors.get("precision") is not None or errors.get("recall") is not None:
        flags += (f" Against the flips: precision {_number(errors.get('precision'))}, recall "
                  f"{_number(errors.get('recall'))}, F1 {_number(errors.get('f1'))}; the "
                  f"suggested label restores the original one for "
                  f"{_number(errors.get('relabel_correct'), 'd')} of the "
                  f"{_number(errors.get('true_positives'), 'd')} true flags.")
    flags += "</p>"
    if improve is None:
        return flags + ("<p>Retraining without the flagged labels: <code>pdepth improve "
                        "RUN_DIR</code> (it redraws this report with its results).</p>")
    improve = _dict(improve)
    head = "".join(f"<th>{e(name)}</th>" for name, _ in _VARIANT_COLUMNS)
    rows = "".join(
        f"<tr><td>{_text(name)}</td>"
        + ("".join(f"<td>{_variant_cell(v, col, spec)}</td>" for col, spec in _VARIANT_COLUMNS)
           if not v.get("skipped") else
           f'<td colspan="{len(_VARIANT_COLUMNS)}">skipped: {_text(v.get("reason"))}</td>')
        + "</tr>"
        for name, v in improve.items() if isinstance(v, dict) and ("test_accuracy" in v
                                                                  or v.get("skipped")))
    settings = _dict(improve.get("settings"))
    return (flags + "<p><code>pdepth improve</code> (improve.json): the run's architecture "
            "retrained on all given labels (baseline), without / relabelling the flagged "
            "examples (pdepth_*) and without cleanlab's flags (cleanlab_remove), evaluated "
            f"on the untouched test split; mean over the seeds {_text(settings.get('seeds'))}"
            f".</p><table><tr><th>variant</th>{head}</tr>{rows}</table>")


def _variant_cell(v: dict, col: str, spec: str) -> str:
    """One cell of improve.json's table: "no flips" for the precision, recall and F1 of a
    run whose noise is known and flipped nothing."""
    if col in ("precision", "recall", "f1") and v.get("flipped") == 0 and v.get(col) is None:
        return "no flips"
    return _number(v.get(col), spec)


def _holds(holds) -> str:
    if holds is True:
        return '<span class="holds">yes</span>'
    return '<span class="fails">no</span>' if holds is False else "n/a"
