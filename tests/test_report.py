"""The report (pdepth.report): write_report on a synthetic finished run (no training, no
Fashion-MNIST: run_helpers.write_synthetic_run) draws every figure of FIGURES as a PNG file and
an HTML page with every section and figure; damaged or missing inputs raise RunFilesError
naming the file and leave the directory as it was; `pdepth report DIR`. The same on a real
run (tiny_run, needs Fashion-MNIST): a missing dependency, truncated results, and a failure
half-way through the figures."""

from __future__ import annotations

import html
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from run_helpers import copy_run, needs_fmnist, one_error_line, tree, write_synthetic_run

import pdepth
import pdepth.report
from pdepth.cli import main
from pdepth.report import FIGURE_CLAIMS, FIGURES, RunFilesError, write_report
from pdepth.report_html import claim_line

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INPUTS = ("results.parquet", "per_model.npz", "data.npz", "config.json")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A finished synthetic run with its report drawn once (tests change copies)."""
    out = write_synthetic_run(tmp_path_factory.mktemp("synthetic") / "run")
    assert write_report(out) == out / "report.html"
    return out


# --------------------------------------------------------------------------------------------
# what the report holds
# --------------------------------------------------------------------------------------------


def test_every_figure_is_a_png_file(synthetic_run):
    figdir = synthetic_run / "figures"
    assert sorted(p.name for p in figdir.iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        data = (figdir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name


def test_html_has_every_section_and_figure(synthetic_run):
    page = (synthetic_run / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    for section in ("Summary", "Categories", "Probes", "Figures", "Settings"):
        assert f"<h2>{section}</h2>" in page, section
    for name, caption in FIGURES.items():
        assert f'<img src="figures/{name}"' in page, name
        assert html.escape(caption) in page, name
    for section in ("Claims", "Label errors"):
        assert f"<h2>{section}</h2>" in page, section
    for category in pdepth.CATEGORIES:
        assert f"<td>{category}</td>" in page, category
    for probe in ("input", "block1", "block2", "block3", "fc", "softmax"):
        assert f"<td>{probe}</td>" in page, probe
    assert "Prediction depth: cnn on fashion-mnist" in page


def test_difficulty_scores_section(synthetic_run):
    """The scores' table: per score its orientation, its correlation with the held-out depth
    and its stability across seeds, from summary.json."""
    page = (synthetic_run / "report.html").read_text()
    summary = json.loads((synthetic_run / "summary.json").read_text())
    assert "<h2>Difficulty scores</h2>" in page
    corr, rel = summary["score_correlations"], summary["score_reliability"]
    at = corr["scores"].index("held_out_depth")
    for i, name in enumerate(corr["scores"]):
        orient = "harder" if corr["higher_is_harder"][i] else "easier"
        r = corr["matrix"][i][at]
        shown = "n/a" if r is None else format(r, "+.3f")
        half = rel["scores"][name]["split_half"]
        assert (f"<tr><td>{name}</td><td>{orient}</td><td>{shown}</td>"
                f"<td>{'n/a' if half is None else format(half, '+.3f')}</td>") in page, name


@pytest.mark.slow
def test_one_seed_reliability_says_why(synthetic_run, tmp_path):
    out = copy_run(synthetic_run, tmp_path)
    _edit_json(out, "summary.json", lambda s: s["score_reliability"].update(
        scores=None, reason="the run has 1 seed: two disjoint halves need at least 2"))
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Stability across seeds: the run has 1 seed" in page
    assert 'src="figures/score_reliability.png"' not in page  # not drawn: nothing to show
    assert 'src="figures/score_correlations.png"' in page


def test_each_claim_figure_has_its_summary_caption(synthetic_run):
    page = (synthetic_run / "report.html").read_text()
    claims = json.loads((synthetic_run / "summary.json").read_text())["claims"]
    assert set(claims) == {key for keys in FIGURE_CLAIMS.values() for key in keys}
    for name, keys in FIGURE_CLAIMS.items():
        section = page.split(f"<h3>{name}</h3>")[1].split("<img")[0]
        for key in keys:
            line = claim_line(claims[key])
            assert line in section, (name, key)
            verdict = {True: "holds (the paper", False: "does not hold here",
                       None: "cannot be computed"}[claims[key]["holds"]]
            assert verdict in line and html.escape(claims[key]["claim"]) in line
    # the synthetic flip: its early probes vote the original class, the last ones the given
    assert claims["flipped_labels_memorised_late"]["holds"] is True
    assert "holds (the paper" in claim_line(claims["flipped_labels_memorised_late"])


@pytest.mark.slow
def test_improve_results_and_runs_without_summary(synthetic_run, tmp_path):
    out = copy_run(synthetic_run, tmp_path)
    improve = {"baseline": {"test_accuracy": 0.8012, "test_accuracy_std": 0.0,
                            "train_examples": 40},
               "pdepth_remove": {"test_accuracy": 0.8231, "test_accuracy_std": 0.001,
                                 "train_examples": 39, "flagged": 1, "precision": 1.0,
                                 "recall": 1.0, "f1": 1.0},
               "cleanlab_remove": {"skipped": True, "reason": "cleanlab is not installed"},
               "noise_known": True, "settings": {"seeds": [0, 1]}}
    (out / "improve.json").write_text(json.dumps(improve))
    write_report(out)
    page = (out / "report.html").read_text()
    errors = page.split("<h2>Label errors</h2>")[1].split("<h2>")[0]
    for text in ("<td>pdepth_remove</td><td>0.8231</td><td>0.0010</td><td>39</td><td>1</td>",
                 "<td>baseline</td><td>0.8012</td>", "skipped: cleanlab is not installed",
                 "1 examples flagged"):
        assert text in errors, text
    # a run from before summary.json: no claim figures, no claim lines, still a report
    (out / "summary.json").unlink()
    (out / "improve.json").unlink()
    write_report(out)
    page = (out / "report.html").read_text()
    assert "Paper:" not in page and "has no summary.json" in page
    for name in FIGURES:
        assert (f'<img src="figures/{name}"' in page) == (name not in (
            "vote_shares.png", "convergence.png", "label_noise.png",
            "score_correlations.png", "score_reliability.png")), name


def test_no_temporary_files_are_left(synthetic_run):
    assert not [p for p in synthetic_run.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_redraw_replaces_every_file(synthetic_run, tmp_path):
    out = copy_run(synthetic_run, tmp_path)
    (out / "figures" / "depth_2d.png").unlink()
    (out / "report.html").write_text("stale")
    assert write_report(out) == out / "report.html"
    assert (out / "figures" / "depth_2d.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "<h2>Figures</h2>" in (out / "report.html").read_text()


@pytest.mark.slow
def test_cli_report_on_a_finished_run(synthetic_run, tmp_path, capsys):
    out = copy_run(synthetic_run, tmp_path)
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")


# --------------------------------------------------------------------------------------------
# damaged input: the documented error, nothing written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, damage", [
    *((name, damage) for name in INPUTS for damage in ("truncated", "missing")),
    ("summary.json", "truncated"), ("improve.json", "truncated")])  # optional: never missing
def test_damaged_input_names_the_file_and_changes_nothing(synthetic_run, tmp_path, name,
                                                          damage):
    out = copy_run(synthetic_run, tmp_path)
    path = out / name
    if name == "improve.json":
        path.write_text('{"baseline": {"test_accuracy": 0.8}}')
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    before = tree(out)
    with pytest.raises(RunFilesError, match=rf"{name} cannot be read") as exc:
        write_report(out)
    assert isinstance(exc.value, ValueError)
    assert f"delete {out / 'COMPLETE'}" in str(exc.value) and "pdepth run --out" in str(exc.value)
    assert tree(out) == before


def test_cli_damaged_input_is_one_error_line(synthetic_run, tmp_path, capsys):
    out = copy_run(synthetic_run, tmp_path)
    (out / "config.json").write_text("{not json")
    before = tree(out)
    assert main(["report", str(out)]) == 2
    assert "config.json cannot be read" in one_error_line(capsys)
    assert tree(out) == before


@pytest.mark.slow
def test_failure_half_way_leaves_every_file(synthetic_run, tmp_path, monkeypatch):
    out = copy_run(synthetic_run, tmp_path)
    before = tree(out)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pdepth.report, "report_html", boom)  # every figure drawn, the page fails
    with pytest.raises(RuntimeError, match="boom"):
        write_report(out)
    assert tree(out) == before


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_leaves_every_file(synthetic_run, tmp_path,
                                                          monkeypatch, capsys):
    # Regression: a full disk while drawing said "[Errno 28] No space left on device" only.
    import errno

    from matplotlib.figure import Figure

    out = copy_run(synthetic_run, tmp_path)
    before = tree(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    assert main(["report", str(out)]) == 2
    assert f"No space left on device: '{out / 'figures' / 'depth_hist.png'}'" \
        in one_error_line(capsys)
    monkeypatch.undo()
    monkeypatch.setattr(Path, "write_text", full)
    assert main(["report", str(out)]) == 2
    assert f"No space left on device: '{out / 'report.html'}'" in one_error_line(capsys)
    assert tree(out) == before


@pytest.mark.slow
def test_first_report_failure_leaves_no_figures_folder(synthetic_run, tmp_path, monkeypatch):
    out = copy_run(synthetic_run, tmp_path)
    for p in (out / "figures").iterdir():
        p.unlink()
    (out / "figures").rmdir()
    (out / "report.html").unlink()
    monkeypatch.setattr(pdepth.report, "report_html", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_report(out)
    assert not (out / "figures").exists() and not (out / "report.html").exists()


# --------------------------------------------------------------------------------------------
# on a real run (Fashion-MNIST)
# --------------------------------------------------------------------------------------------


@needs_fmnist
def test_report_missing_dependency(tiny_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(tiny_run)]) == 2
    assert 'matplotlib, not installed: pip install "pdepth[run]"' in one_error_line(capsys)


@needs_fmnist
def test_report_on_truncated_results(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    path = out / "results.parquet"
    path.write_bytes(path.read_bytes()[:500])
    before = tree(out)
    assert main(["report", str(out)]) == 2
    err = one_error_line(capsys)
    assert "results.parquet cannot be read" in err and "COMPLETE" in err
    assert tree(out) == before


@needs_fmnist
def test_report_is_all_or_nothing(tiny_run, tmp_path, monkeypatch):
    """A failure half-way through the figures leaves every file as it was."""
    out = copy_run(tiny_run, tmp_path)
    before = tree(out)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pdepth.report, "layer_accuracy", boom)  # the 3rd figure fails
    with pytest.raises(RuntimeError, match="boom"):
        pdepth.report.write_report(out)
    assert tree(out) == before


# --------------------------------------------------------------------------------------------
# hostile values in every file the report reads (issue 23, item 13): escaped, or one line
# --------------------------------------------------------------------------------------------

JS = "<script>alert(1)</script>"


def _edit_json(out, name, edit):
    path = out / name
    value = json.loads(path.read_text()) if path.exists() else {}
    edit(value)
    path.write_text(json.dumps(value))


def _hostile_config(cfg):
    c, res = cfg["config"], cfg["resolved"]
    c.update(arch=JS, model=JS, dataset={"name": JS}, k=JS, memory_budget=JS, **{JS: JS})
    res.update(probe_dims=[JS, {"x": JS}], thresholds={JS: [JS]}, trained=JS,
               num_models=JS, num_layers=[JS], class_names=[JS] * 10)
    cfg.update(timing={"models_seconds": JS}, peak_rss_bytes=JS, versions={"pdepth": JS},
               models=[JS, {"seed": JS, "half": [JS], "memory": {"peak_bytes": JS, "cache": JS},
                            "stages": {"train": {"seconds": JS, "peak_rss_bytes": {"a": JS}},
                                       "extract": JS,
                                       "knn": [{"probe": JS, "seconds": JS}, JS]}}])


def _hostile_summary(summary):
    for entry in summary["claims"].values():  # the figures' own fields stay as they are
        entry.update(claim=JS, statistic={"s": JS}, value=JS, n_examples=[JS],
                     n_models=JS, paper_direction=JS, holds=JS)
    summary["claims"][JS] = JS
    summary["label_errors"] = {"flagged": JS, "flipped": {"n": JS}, "precision": JS,
                               "recall": [JS], "f1": JS, "relabel_correct": JS,
                               "true_positives": JS}
    # the difficulty scores: a name, the seeds and a row the figures still draw
    summary["score_correlations"]["scores"][0] = JS
    summary["score_correlations"]["higher_is_harder"][1] = JS
    summary["score_reliability"].update(seeds_a=[JS], reason=JS)


def _hostile_improve(improve):
    improve.update({
        "baseline": {"test_accuracy": JS, "test_accuracy_std": {"x": JS},
                     "train_examples": 12.5, "flagged": [JS], "precision": JS},
        JS: {"test_accuracy": 0.5, "flipped": JS, "f1": JS},
        "cleanlab_remove": {"skipped": True, "reason": JS},
        "settings": {"seeds": JS}, "noise_known": JS})


def _hostile_table(out):
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    df["category"] = JS
    df["label_name"] = JS
    df["train_accuracy"] = JS  # a string where a number belongs: "n/a" in the summary
    df.to_parquet(out / "results.parquet")


def _edit_npz(out, name, **changes):
    with np.load(out / name) as z:
        arrays = dict(z)
    arrays.update(changes)
    np.savez_compressed(out / name, **arrays)


HOSTILE = {
    "config.json": lambda out: _edit_json(out, "config.json", _hostile_config),
    "summary.json": lambda out: _edit_json(out, "summary.json", _hostile_summary),
    "improve.json": lambda out: _edit_json(out, "improve.json", _hostile_improve),
    "results.parquet": _hostile_table,
    "per_model.npz": lambda out: _edit_npz(
        out, "per_model.npz", layer_names=np.array([JS, "b", "c", "d", "e", "f"])),
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.slow
def test_hostile_values_are_escaped(synthetic_run, tmp_path, capsys, name):
    """A string where a number belongs, a <script> in a name, a dict where a list belongs:
    the page is written and every value shows as escaped text."""
    out = copy_run(synthetic_run, tmp_path)
    HOSTILE[name](out)
    assert main(["report", str(out)]) == 0, capsys.readouterr().err
    page = (out / "report.html").read_text()
    assert "<script" not in page.lower(), name
    if name == "results.parquet":  # its names reach no page; the mean shows as missing
        assert "<td>train accuracy</td><td>n/a</td>" in page
    else:
        assert html.escape(JS) in page, name


@pytest.mark.parametrize("name, edit, figure", [
    ("summary.json", lambda out: _edit_json(out, "summary.json", lambda s: s["claims"][
        "groups_processed_differently"].update(vote_share={"easy": JS})), "vote_shares.png"),
    ("config.json", lambda out: _edit_json(out, "config.json", lambda c: c["resolved"].update(
        class_names={"0": JS})), "examples_by_depth.png"),
    ("results.parquet", lambda out: _edit_table(out, "train_depth", JS), "metrics_vs_depth"),
    ("per_model.npz", lambda out: _edit_npz(out, "per_model.npz", depth=np.array([JS])),
     "the report"),
    ("data.npz", lambda out: _edit_npz(out, "data.npz", images=np.array([[JS]])),
     "examples_by_depth.png"),
    ("config.json", lambda out: (out / "config.json").write_text(json.dumps([JS])),
     "config.json cannot be read"),
    ("improve.json", lambda out: (out / "improve.json").write_text(json.dumps(JS)),
     "improve.json cannot be read"),
])
@pytest.mark.slow
def test_hostile_values_that_cannot_be_drawn_are_one_line(synthetic_run, tmp_path, capsys,
                                                          name, edit, figure):
    """Values a figure cannot be drawn from: refused with one line naming the file, nothing
    written."""
    out = copy_run(synthetic_run, tmp_path)
    edit(out)
    before = tree(out)
    assert main(["report", str(out)]) == 2
    err = one_error_line(capsys)
    assert name in err and figure in err, err
    assert tree(out) == before


def _edit_table(out, column, value):
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    df[column] = value
    df.to_parquet(out / "results.parquet")


@pytest.mark.slow
def test_improve_without_flips_shows_no_flips(synthetic_run, tmp_path):
    """improve.json of a run without noise (precision / recall null, flipped 0): the table
    says "no flips", not 0.0 or n/a."""
    out = copy_run(synthetic_run, tmp_path)
    entry = {"test_accuracy": 0.8, "test_accuracy_std": 0.0, "train_examples": 39,
             "flagged": 1, "flipped": 0, "true_flags": 0, "precision": None, "recall": None,
             "f1": None}
    (out / "improve.json").write_text(json.dumps(
        {"baseline": {"test_accuracy": 0.8, "train_examples": 40}, "pdepth_remove": entry,
         "noise_known": True, "settings": {"seeds": [0]}}))
    _edit_json(out, "summary.json", lambda s: s["label_errors"].update(
        flipped=0, true_positives=0, precision=None, recall=None, f1=None))
    write_report(out)
    errors = (out / "report.html").read_text().split("<h2>Label errors</h2>")[1]
    assert "<td>1</td><td>no flips</td><td>no flips</td><td>no flips</td>" in errors
    assert "0 labels flipped" in errors and "no flips" in errors.split("</p>")[0]
