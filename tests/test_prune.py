"""`pdepth prune RUN_DIR` (pdepth.prune): the selection rule against an independent
recomputation from results.parquet (exact counts, orientation, seeded ties, the stratified
rule), resume per job, the test split read only after every subset is fixed, prune.json /
prune/*.npy / figures/pruning.png, and the CLI's one-line errors. Training runs on conftest's
tiny real run (200 examples, 1 epoch) with one seed and few jobs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from run_helpers import copy_run, one_error_line, tree

import pdepth.improve as improve_mod
import pdepth.prune as prune_mod
from pdepth.cli import main
from pdepth.data import DATASETS, dataset_info
from pdepth.prune import kept_count, parse_keep, parse_modes, parse_scores, select, tie_order

# --- the selection, without training -------------------------------------------------------


def _by_sort(values, harder, mode, m, seed):
    """An independent recomputation: sort (hardness, seeded draw) with Python's sorted."""
    rng = np.random.default_rng(seed)
    perm = list(rng.permutation(len(values)))
    place = {int(i): j for j, i in enumerate(perm)}
    sign = 1 if harder == "higher" else -1
    key = lambda i: (float("inf") if np.isnan(values[i]) else sign * values[i], place[i])  # noqa: E731
    easy_first = sorted(range(len(values)), key=key)
    kept = easy_first[-m:] if mode == "remove_easy" else easy_first[:m]
    return sorted(kept)


@pytest.mark.parametrize("harder", ["higher", "lower"])
@pytest.mark.parametrize("mode", ["remove_easy", "remove_hard"])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.25, 1.0])
def test_select_keeps_round_f_n_the_ones_the_score_selects(harder, mode, fraction):
    rng = np.random.default_rng(5)
    values = rng.integers(0, 4, 101).astype(float)  # many ties
    values[[3, 50]] = np.nan
    kept = select(values, harder, mode, fraction, seed=7)
    m = round(fraction * 101)
    assert len(kept) == m == kept_count(fraction, 101)
    assert kept.tolist() == _by_sort(values, harder, mode, m, 7)
    if mode == "remove_easy" and fraction < 1:  # NaN (no value) counts as the hardest
        assert {3, 50} <= set(kept.tolist())


def test_select_orientation_on_distinct_values():
    values = np.array([5.0, 1.0, 3.0, 4.0, 2.0])
    assert select(values, "higher", "remove_easy", 0.4).tolist() == [0, 3]  # 5 and 4 kept
    assert select(values, "higher", "remove_hard", 0.4).tolist() == [1, 4]
    assert select(values, "lower", "remove_easy", 0.4).tolist() == [1, 4]  # low = hard


def test_ties_broken_by_the_seeded_draw():
    values = np.zeros(50)
    a = select(values, "higher", "remove_easy", 0.5, seed=1)
    assert np.array_equal(a, select(values, "higher", "remove_easy", 0.5, seed=1))
    assert not np.array_equal(a, select(values, "higher", "remove_easy", 0.5, seed=2))
    # all tied: remove_hard keeps the first of the draw, the random baseline's subset
    u = tie_order(50, 1)
    assert np.array_equal(select(values, "higher", "remove_hard", 0.5, seed=1),
                          np.flatnonzero(u < 25))
    assert np.array_equal(select(values, None, "uniform", 0.5, seed=1), np.flatnonzero(u < 25))


def test_random_subsets_are_nested_and_seeded():
    small = select(np.zeros(40), None, "uniform", 0.3, seed=3)
    large = select(np.zeros(40), None, "uniform", 0.7, seed=3)
    assert len(small) == 12 and len(large) == 28 and set(small) <= set(large)


def test_stratified_rule_by_hand():
    # bins of [0, 10) split in 2: values < 5 in bin 0 (8 rows), >= 5 in bin 1 (2 rows), NaN
    # its own bin (1 row). m = round(0.5 * 11) = 6 (half to even: 5.5 -> 6); bins from the
    # smallest: NaN gives min(1, 6 // 3) = 1, bin 1 gives min(2, 5 // 2) = 2, bin 0 gives 3.
    values = np.array([0, 1, 2, 3, 4, 4.5, 4.9, 1.5, 9, 10, np.nan])
    kept = select(values, "higher", "stratified", 0.5, seed=4, bins=2)
    u = tie_order(11, 4)
    bin0 = [i for i in range(8)]
    expected = {10, 8, 9} | set(sorted(bin0, key=lambda i: u[i])[:3])
    assert len(kept) == 6 and set(kept.tolist()) == expected


@pytest.mark.parametrize("m_frac", [0.1, 0.37, 0.5, 0.9, 1.0])
def test_stratified_keeps_exactly_m_and_covers_the_bins(m_frac):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 300), rng.normal(6, 0.2, 20)])
    kept = select(values, "lower", "stratified", m_frac, bins=10)
    assert len(kept) == round(m_frac * 320) and len(set(kept.tolist())) == len(kept)
    edges = np.linspace(values.min(), values.max(), 11)
    b = np.minimum(np.searchsorted(edges, values, side="right") - 1, 9)
    sizes, taken = np.bincount(b, minlength=10), np.bincount(b[kept], minlength=10)
    used = sizes > 0
    partial = used & (taken < sizes)
    # water-filling: the bins not taken whole give equal shares (within one), and a bin
    # taken whole is no larger than those shares
    if partial.any():
        assert taken[partial].max() - taken[partial].min() <= 1
        assert (sizes[used & ~partial] <= taken[partial].max()).all()
    assert taken[used].min() >= 1 or m_frac * 320 < used.sum()  # every bin covered


@pytest.mark.parametrize("call, flag", [
    (lambda: parse_keep("0.5,0"), "--keep"), (lambda: parse_keep("1.5"), "--keep"),
    (lambda: parse_keep("a"), "--keep"), (lambda: parse_keep("0.5,0.5"), "--keep"),
    (lambda: parse_scores("mystery"), "mystery:higher"),
    (lambda: parse_scores("margin,margin"), "twice"),
    (lambda: parse_scores("a/b"), "--scores"), (lambda: parse_scores("random:higher"), "random"),
    (lambda: parse_modes("sideways"), "--remove"), (lambda: parse_modes("none"), "--stratified"),
    (lambda: kept_count(0.001, 100), "--keep 0.001"),
])
def test_bad_settings_name_the_flag(call, flag):
    with pytest.raises(ValueError, match=flag):
        call()


def test_orientation_table():
    scores = {s.name: s.harder for s in parse_scores(
        "held_out_depth,el2n,forgetting_events,aum,margin,held_out_accuracy,random,"
        "mystery:lower,iteration_learned")}
    assert scores == {"held_out_depth": "higher", "el2n": "higher", "forgetting_events": "higher",
                      "aum": "lower", "margin": "lower", "held_out_accuracy": "lower",
                      "random": None, "mystery": "lower", "iteration_learned": "higher"}


# --- on a real run --------------------------------------------------------------------------

@pytest.fixture
def events(monkeypatch):
    """Records the reads of the dataset's splits and the training calls (kept count, seed),
    in order. The test split is cut to its first 500 images (speed: the machine is shared)."""
    log = []
    info = dataset_info("fashion-mnist")
    real_load, real_train = info.load, improve_mod.train_and_test

    def load(root, split, **kw):
        log.append(f"load {split}")
        images, labels = real_load(root, split, **kw)
        return (images[:500], labels[:500]) if split == "test" else (images, labels)

    def train(r, x_all, rows, labels, seed, *args, **kwargs):
        assert x_all.shape[0] == r.run.n  # training data: the run's examples only
        log.append(("train", len(rows), seed))
        return real_train(r, x_all, rows, labels, seed, *args, **kwargs)

    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(info, load=load))
    monkeypatch.setattr(improve_mod, "train_and_test", train)
    return log


ARGS = dict(scores="held_out_depth,margin,random", keep=(0.5,), modes=("remove_easy",),
            seeds=(0,), progress=False, log=None)


@pytest.mark.slow
def test_prune_writes_prune_json_npy_and_figure(tiny_run, tmp_path, events, monkeypatch):
    run_dir = copy_run(tiny_run, tmp_path)
    real_split = improve_mod.load_test_split
    written = []  # the subsets on disk when the test split is read

    def split(r):
        written.extend(sorted(p.name for p in (run_dir / "prune").iterdir()))
        return real_split(r)

    monkeypatch.setattr(improve_mod, "load_test_split", split)
    res = prune_mod.prune(run_dir, **ARGS)
    df = pd.read_parquet(run_dir / "results.parquet")
    n = len(df)
    # the test split is read once, after every subset is written, before the 1st training
    assert events[:2] == ["load train", "load test"]
    assert [e for e in events[2:] if isinstance(e, str)] == []
    assert written == ["held_out_depth-remove_easy-0.5.npy", "margin-remove_easy-0.5.npy",
                       "random-uniform-0.5.npy"]
    assert [e[1] for e in events[2:]] == [n, 100, 100, 100]  # full, the 2 scores, random
    # prune/*.npy: the dataset_index values the score and mode select, recomputed here
    for col, harder in (("held_out_depth", "higher"), ("margin", "lower")):
        rows = _by_sort(df[col].to_numpy(float), harder, "remove_easy", 100, 0)
        saved = np.load(run_dir / "prune" / f"{col}-remove_easy-0.5.npy")
        assert saved.tolist() == sorted(df["dataset_index"].to_numpy()[rows].tolist())
        entry = res["scores"][col]["modes"]["remove_easy"]["0.5"]
        assert entry["kept"] == 100 and entry["file"] == f"prune/{col}-remove_easy-0.5.npy"
        assert len(entry["test_accuracy_per_seed"]) == 1
        assert entry["test_accuracy"] == entry["test_accuracy_per_seed"][0]
    assert len(np.load(run_dir / "prune" / "random-uniform-0.5.npy")) == 100
    assert res["full"]["kept"] == n and 0 <= res["full"]["test_accuracy"] <= 1
    assert json.loads((run_dir / "prune.json").read_text()) == json.loads(json.dumps(res))
    assert (run_dir / "figures" / "pruning.png").stat().st_size > 0
    page = (run_dir / "report.html").read_text()  # the run's report redrawn with it
    assert "<h2>Pruning curves</h2><p><code>pdepth prune</code>" in page
    assert 'src="figures/pruning.png"' in page
    # a later `pdepth report` keeps the section (and the run folder's rules accept prune/)
    assert main(["report", str(run_dir)]) == 0
    assert "figures/pruning.png" in (run_dir / "report.html").read_text()


@pytest.mark.slow
def test_prune_resumes_per_job(tiny_run, tmp_path, events, monkeypatch):
    run_dir = copy_run(tiny_run, tmp_path)
    real = improve_mod.train_and_test

    def interrupted(*args, **kwargs):
        if sum(isinstance(e, tuple) for e in events) == 1:  # after one job
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(improve_mod, "train_and_test", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune_mod.prune(run_dir, **ARGS)
    done = sorted(p.name for p in (run_dir / "prune").glob("*.json"))
    assert done == ["full-all-1.seed0.json"] and not (run_dir / "prune.json").exists()
    first = (run_dir / "prune" / done[0]).stat().st_mtime_ns
    monkeypatch.setattr(improve_mod, "train_and_test", real)
    events.clear()
    lines = []
    prune_mod.prune(run_dir, **{**ARGS, "log": lines.append})
    assert [e[1] for e in events if isinstance(e, tuple)] == [100, 100, 100]  # not the full one
    assert (run_dir / "prune" / done[0]).stat().st_mtime_ns == first
    assert any("done before" in line for line in lines)
    # everything done: a rerun trains nothing and never reads the test split
    events.clear()
    prune_mod.prune(run_dir, **ARGS)
    assert events == ["load train"]
    # other settings (epochs): every job trains again
    events.clear()
    prune_mod.prune(run_dir, **{**ARGS, "epochs": 2, "scores": "random"})
    assert [e[1] for e in events if isinstance(e, tuple)] == [200, 100]


@pytest.mark.slow
def test_prune_missing_default_scores_skipped_in_one_line(tiny_run, tmp_path, monkeypatch):
    run_dir = copy_run(tiny_run, tmp_path)
    # a run folder of a version before the standard scores: no el2n, forgetting_events, aum
    results = pd.read_parquet(run_dir / "results.parquet")
    results.drop(columns=["el2n", "forgetting_events", "aum"], errors="ignore").to_parquet(
        run_dir / "results.parquet")
    warnings = []
    trained = []
    monkeypatch.setattr(improve_mod, "train_and_test",
                        lambda r, x, rows, *a, **k: (trained.append(len(rows)), (0.5, 0.5))[1])
    res = prune_mod.prune(run_dir, scores=None, keep=(0.9,), seeds=(0,), progress=False,
                          log=warnings.append)
    skipped = [w for w in warnings if "skipping" in w]
    df = pd.read_parquet(run_dir / "results.parquet")
    missing = [c for c in ("el2n", "forgetting_events", "aum") if c not in df.columns]
    assert missing == ["el2n", "forgetting_events", "aum"]
    assert len(skipped) == 1 and all(c in skipped[0] for c in missing)
    assert "held_out_depth" in skipped[0]  # names the columns there are
    assert set(res["skipped_scores"]) == set(missing)
    assert set(res["scores"]) == {"held_out_depth", "train_depth", "random"} - set(missing)


def test_a_subset_equal_to_another_is_trained_once(tiny_run, tmp_path, monkeypatch):
    """--keep 1: every score keeps the whole run, i.e. the baseline; those jobs take the
    baseline's result per seed (their files written too) instead of training it again."""
    run_dir = copy_run(tiny_run, tmp_path)
    trained = []

    def train(r, x, rows, labels, seed, *a, **k):
        trained.append((len(rows), seed))
        return 0.5 + 0.01 * len(trained), 0.9

    monkeypatch.setattr(improve_mod, "train_and_test", train)
    lines = []
    res = prune_mod.prune(run_dir, scores="held_out_depth,random", keep=(0.5, 1.0),
                          modes=("remove_easy",), seeds=(0, 1), progress=False,
                          log=lines.append)
    n = res["full"]["kept"]
    assert trained == [(n, 0), (n, 1), (n // 2, 0), (n // 2, 1), (n // 2, 0), (n // 2, 1)]
    for score, mode in (("held_out_depth", "remove_easy"), ("random", "uniform")):
        whole = res["scores"][score]["modes"][mode]["1"]
        assert whole["kept"] == n
        assert whole["test_accuracy_per_seed"] == res["full"]["test_accuracy_per_seed"]
        assert (run_dir / "prune" / f"{score}-{mode}-1.seed1.json").exists()
    assert sum("the same examples as full-all-1" in line for line in lines) == 4
    trained.clear()
    prune_mod.prune(run_dir, scores="held_out_depth,random", keep=(0.5, 1.0),
                    modes=("remove_easy",), seeds=(0, 1), progress=False)
    assert trained == []


@pytest.mark.parametrize("args, message", [
    (["--scores", "el2n_typo:higher"], "has no column el2n_typo"),
    (["--scores", "el2n_typo"], "el2n_typo:higher (higher = harder)"),
    (["--scores", "label_name:higher"], "not numeric"),
    (["--keep", "0.5,2"], "--keep"),
    (["--remove", "middle"], "--remove"),
    (["--seeds", "0,0"], "--seeds"),
    (["--epochs", "0"], "--epochs"),
    (["--device", "bogus"], "--device"),
    (["--bins", "0"], "--bins"),
    (["--keep", "0.001"], "--keep 0.001"),
])
def test_cli_bad_input_one_line_nothing_written(args, message, tiny_run, tmp_path, capsys):
    run_dir = copy_run(tiny_run, tmp_path)
    before = tree(run_dir)
    assert main(["prune", str(run_dir), *args, "--quiet"]) == 2
    assert message in one_error_line(capsys)
    assert tree(run_dir) == before


def test_cli_not_a_run(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in one_error_line(capsys)


@pytest.mark.slow
def test_cli_end_to_end(tiny_run, tmp_path, capsys, events):
    run_dir = copy_run(tiny_run, tmp_path)
    assert main(["prune", str(run_dir), "--scores", "train_depth,iteration_learned",
                 "--keep", "0.3", "--remove", "hard", "--stratified", "--bins", "4",
                 "--seeds", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "prune.json")
    res = json.loads((run_dir / "prune.json").read_text())
    assert set(res["scores"]) == {"train_depth", "iteration_learned"}
    assert set(res["scores"]["train_depth"]["modes"]) == {"remove_hard", "stratified"}
    df = pd.read_parquet(run_dir / "results.parquet")
    rows = select(df["iteration_learned"].to_numpy(float), "higher", "stratified", 0.3,
                  bins=4)
    saved = np.load(run_dir / "prune" / "iteration_learned-stratified-0.3.npy")
    assert saved.tolist() == df["dataset_index"].to_numpy()[rows].tolist() and len(rows) == 60
    s = res["settings"]
    assert s["seeds"] == [0] and s["epochs"] == 1 and s["command"].startswith("pdepth prune ")
    assert res["test_split"]["split"] == "test"
    # the folder stays a run folder pdepth accepts (prune/ and prune.json are pdepth's)
    from pdepth.protocol.outdir import foreign_entries

    assert foreign_entries(run_dir) == [] and (run_dir / "figures" / "pruning.png").exists()


# --- the report's section and figure, from a hand-built prune.json ---------------------------

PRUNE_JSON = {
    "full": {"kept": 10, "test_accuracy": 0.8, "test_accuracy_std": 0.01},
    "scores": {
        "held_out_depth": {"harder": "higher", "modes": {"remove_easy": {
            "0.9": {"fraction": 0.9, "test_accuracy": 0.79, "test_accuracy_std": 0.02},
            "0.5": {"fraction": 0.5, "test_accuracy": 0.7, "test_accuracy_std": 0.03}}}},
        "random": {"harder": None, "modes": {"uniform": {
            "0.5": {"fraction": 0.5, "test_accuracy": 0.72, "test_accuracy_std": 0.0}}}}},
    "settings": {"seeds": [0, 1], "epochs": 2}}


def test_prune_report_curves_table_and_figure(tmp_path):
    from pdepth._atomic import PendingFiles
    from pdepth.prune_report import curves, draw_pruning, prune_html

    lines = curves(PRUNE_JSON)
    assert lines == {"remove_easy": [("held_out_depth", [0.5, 0.9], [0.7, 0.79], [0.03, 0.02])],
                     "random": [("random", [0.5], [0.72], [0.0])]}
    page = prune_html(PRUNE_JSON)
    assert "<td>held_out_depth</td><td>remove_easy</td><td>0.7000 ± 0.0300</td>" in page
    assert "All 10 examples: 0.8000 ± 0.0100" in page
    pending = PendingFiles()
    assert draw_pruning(PRUNE_JSON, tmp_path / "pruning.png", pending)
    pending.replace_all()
    assert (tmp_path / "pruning.png").read_bytes().startswith(b"\x89PNG")
    assert not draw_pruning({"scores": {}}, tmp_path / "none.png", PendingFiles())


def test_prune_html_escapes_an_edited_file():
    from pdepth.prune_report import curves, prune_html

    edited = {"scores": {"<script>x</script>": {"modes": {"<b>": {
        "0.5": {"fraction": "0.5<", "test_accuracy": "<i>", "test_accuracy_std": {}}}}}},
        "full": {"kept": "<u>"}, "settings": {"seeds": "<s>"}}
    page = prune_html(edited)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<i>" not in page
    assert curves(edited) == {}  # no number, no curve
    assert "pdepth prune RUN_DIR" in prune_html(None)
