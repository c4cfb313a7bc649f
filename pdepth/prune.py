"""``pdepth prune RUN_DIR``: pruning curves. The run's architecture is retrained on subsets of
the run's examples chosen by a per-example score of ``results.parquet`` and evaluated on the
dataset's untouched test split (docs/prune.md), the way ``pdepth improve`` retrains
(:func:`pdepth.improve.retraining`, :func:`pdepth.improve.train_and_test`).

Selection of ``m = round(f * n)`` of the run's ``n`` examples (Python's ``round``, half to
even; at least 1) for a score column ``s`` and a fraction ``f``:

- *hardness*: ``h = s`` where higher is harder, ``h = -s`` where lower is harder
  (:data:`HARDER`); a missing value (NaN) is the hardest (``h = +inf``);
- *ties*: one seeded draw ``u`` (``numpy.random.default_rng(selection_seed).permutation(n)``,
  ``u[perm[j]] = j``) orders the examples; equal ``h`` are ordered by ``u``;
- ``remove_easy`` keeps the ``m`` largest ``(h, u)``; ``remove_hard`` the ``m`` smallest;
- ``random`` keeps the ``m`` examples drawn first (smallest ``u``): one subset per fraction,
  shared by every retraining seed, nested across fractions;
- ``stratified`` (coverage-preserving, in the spirit of CCS, Zheng et al. 2023): the finite
  values' range ``[min, max]`` is cut into ``bins`` equal-width bins (a value on an inner
  edge goes to the upper bin, ``max`` to the last); NaN values form one more bin. The bins
  are visited from the smallest to the largest (ties: lower bin first); with ``M`` examples
  still to draw and ``r`` bins left, a bin gives ``min(size, M // r)`` examples, those of
  smallest ``u``. This keeps exactly ``m`` (a visited bin smaller than its share gives all,
  and the later, larger bins make up the rest). Orientation does not enter.

Each (score, mode, fraction, seed) job and each seed of the full-data baseline is one file
``prune/<score>-<mode>-<fraction>.seed<seed>.json`` (atomic), holding the settings it was
trained with; a rerun keeps the files whose settings and kept examples match and trains the
others. ``prune/<score>-<mode>-<fraction>.npy`` holds the kept examples' ``dataset_index``
values (int64, ascending). The test split is read only once every subset is fixed and
written, and only to evaluate."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _atomic
from . import improve as _improve
from .summary import SCORE_COLUMNS

__all__ = ["DEFAULT_KEEP", "DEFAULT_SCORES", "HARDER", "MODES", "PRUNE_DIR", "PRUNE_FILE",
           "Score", "kept_count", "parse_keep", "parse_modes", "parse_scores", "prune",
           "select", "tie_order"]

PRUNE_FILE = "prune.json"
PRUNE_DIR = "prune"
RANDOM = "random"
FULL = "full"  # the full-data baseline's jobs: full-all-1.seed<s>.json
DEFAULT_SCORES = ("held_out_depth", "train_depth", "el2n", "forgetting_events", "aum", RANDOM)
DEFAULT_KEEP = (0.3, 0.5, 0.7, 0.9)
DEFAULT_BINS = 50  # CCS's number of strata
MODES = ("remove_easy", "remove_hard", "stratified")
# Which end of each known score column is hard: "higher" (higher = harder) or "lower". The
# difficulty scores take their orientation from pdepth.summary (one table, docs/scores.md).
HARDER = {
    **{name: "higher" if harder else "lower" for name, harder in SCORE_COLUMNS.items()},
    "held_out_iteration_learned": "higher", "train_accuracy": "lower",
    "held_out_agreement": "lower", "confidence": "lower", "train_confidence": "lower",
    "train_margin": "lower", "ensemble_entropy": "higher", "label_error_score": "higher",
}
NAME = re.compile(r"[A-Za-z0-9_]+")  # a score's name: safe in a file name
SELECTION_RULE = (
    "keep m = round(f * n) (at least 1); hardness h = score (higher = harder) or -score "
    "(lower = harder), NaN the hardest; ties by the draw u = place in "
    "numpy.random.default_rng(selection_seed).permutation(n); remove_easy keeps the m "
    "largest (h, u), remove_hard the m smallest, random the m smallest u; stratified: "
    "bins equal-width bins of [min, max] (NaN one more bin), visited smallest first, each "
    "giving min(size, M // bins left) of smallest u (docs/prune.md)")


@dataclass(frozen=True)
class Score:
    """A score to prune by: a column of results.parquet and which end is hard (``"higher"``
    or ``"lower"``), or :data:`RANDOM` (``harder`` None)."""

    name: str
    harder: str | None


def parse_scores(text) -> list[Score]:
    """``"held_out_depth,margin,random"`` (or a list): each a column name, optionally with
    ``:higher`` / ``:lower`` (which end is hard) where :data:`HARDER` does not know it, or
    ``random``. ValueError (naming --scores) for an empty, repeated or unknown-orientation
    name."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [s for s in names if s]
    if not names:
        raise ValueError("--scores must name at least one score column (or random)")
    scores = []
    for item in names:
        name, _, harder = item.partition(":")
        if not NAME.fullmatch(name):
            raise ValueError(f"--scores: {item!r} is not a column name (letters, digits, _)")
        if name == RANDOM:
            if harder:
                raise ValueError(f"--scores: {item!r}: random has no orientation")
            scores.append(Score(RANDOM, None))
            continue
        harder = harder or HARDER.get(name)
        if harder not in ("higher", "lower"):
            raise ValueError(f"--scores: {name!r} is not a score whose hard end pdepth knows "
                             f"({', '.join(HARDER)}); another numeric column of "
                             f"results.parquet works as {name}:higher (higher = harder) or "
                             f"{name}:lower")
        scores.append(Score(name, harder))
    seen = [s.name for s in scores]
    if len(set(seen)) != len(seen):
        raise ValueError(f"--scores names a score twice: {','.join(names)}")
    return scores


def parse_keep(text) -> list[float]:
    """``"0.3,0.5"`` (or a list) -> distinct fractions in (0, 1], ascending; ValueError
    naming --keep otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        keep = [float(x) for x in items if str(x).strip()]
    except ValueError:
        raise ValueError(f"--keep takes fractions in (0, 1] like 0.3,0.5, got {text!r}") from None
    bad = [f for f in keep if not (math.isfinite(f) and 0 < f <= 1)]
    if not keep or bad:
        raise ValueError(f"--keep fractions must be in (0, 1], got {text!r}")
    if len(set(keep)) != len(keep):
        raise ValueError(f"--keep names a fraction twice: {text!r}")
    return sorted(keep)


def parse_modes(remove, stratified: bool = False) -> list[str]:
    """``--remove easy,hard`` (or ``easy``, ``hard``, ``none``) and ``--stratified`` -> the
    modes of :data:`MODES`; ValueError naming --remove otherwise."""
    items = [s.strip() for s in (remove.split(",") if isinstance(remove, str) else remove)]
    items = [s for s in items if s]
    if items == ["none"]:
        items = []
    bad = [s for s in items if s not in ("easy", "hard")]
    if bad or len(set(items)) != len(items):
        raise ValueError(f"--remove takes easy, hard, easy,hard or none, got {remove!r}")
    modes = [f"remove_{s}" for s in ("easy", "hard") if s in items]
    modes += ["stratified"] if stratified else []
    if not modes:
        raise ValueError("--remove none needs --stratified: no mode to prune with")
    return modes


def kept_count(fraction: float, n: int) -> int:
    """``round(fraction * n)`` (at least 1): how many examples a fraction keeps."""
    m = round(fraction * n)
    if m < 1:
        raise ValueError(f"--keep {fraction:g} keeps no example of the run's {n}")
    return m


def tie_order(n: int, seed: int) -> np.ndarray:
    """``u`` (int64 ``[n]``): example ``i``'s place in one seeded draw without replacement
    (``u[perm[j]] = j``, ``perm = default_rng(seed).permutation(n)``)."""
    perm = np.random.default_rng(seed).permutation(n)
    u = np.empty(n, np.int64)
    u[perm] = np.arange(n)
    return u


def select(values, harder: str | None, mode: str, fraction: float, *, seed: int = 0,
           bins: int = DEFAULT_BINS) -> np.ndarray:
    """The rows kept (int64, ascending) of ``values`` (float ``[n]``, one score per example;
    ignored for ``harder=None``, the random baseline) under ``mode`` (:data:`MODES`) at
    ``fraction``; the rule is the module docstring's."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    m = kept_count(fraction, n)
    u = tie_order(n, seed)
    if harder is None:  # random: the first m of the draw
        return np.sort(np.flatnonzero(u < m))
    if mode == "stratified":
        return _stratified(values, m, u, bins)
    h = np.where(np.isnan(values), np.inf, values if harder == "higher" else -values)
    order = np.lexsort((u, h))  # easiest first; equal hardness in the draw's order
    if mode == "remove_easy":
        return np.sort(order[n - m:])
    if mode == "remove_hard":
        return np.sort(order[:m])
    raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")


def _stratified(values: np.ndarray, m: int, u: np.ndarray, bins: int) -> np.ndarray:
    """CCS-style coverage-preserving selection of ``m`` rows (module docstring)."""
    finite = ~np.isnan(values)
    b = np.full(values.shape[0], bins, np.int64)  # NaN: a bin of its own
    if finite.any():
        lo, hi = values[finite].min(), values[finite].max()
        scaled = (values[finite] - lo) / (hi - lo) * bins if hi > lo else 0 * values[finite]
        b[finite] = np.minimum(np.floor(scaled).astype(np.int64), bins - 1)
    members = [np.flatnonzero(b == k) for k in range(bins + 1)]
    members = [rows[np.argsort(u[rows])] for rows in members if rows.size]
    members.sort(key=len)  # stable: equal sizes stay in bin order
    kept, left = [], m
    for i, rows in enumerate(members):
        take = min(len(rows), left // (len(members) - i))
        kept.append(rows[:take])
        left -= take
    assert left == 0
    return np.sort(np.concatenate(kept))


def prune(run_dir: str | os.PathLike, *, scores=None, keep=DEFAULT_KEEP,
          modes=("remove_easy", "remove_hard"), seeds=(0, 1, 2), epochs: int | None = None,
          device: str = "cpu", model: str | None = None, bins: int = DEFAULT_BINS,
          selection_seed: int = 0, progress: bool = True, log=print,
          command: str | None = None) -> dict:
    """Retrains the run's network on the subsets of every score, mode and fraction (and on
    every example: the baseline), once per seed of ``seeds``, evaluates each on the test
    split and writes ``RUN_DIR/prune.json`` (returned), ``RUN_DIR/prune/*.npy`` and
    ``figures/pruning.png`` (with report.html where the run has one).

    ``scores``: :func:`parse_scores`'s input; None is :data:`DEFAULT_SCORES`, whose columns
    missing from the run are skipped with one line (a named one missing is an error).
    ``keep``, ``modes``: :func:`parse_keep`, :data:`MODES`. ``epochs`` (default the run's),
    ``device``, ``model`` (a run of the user's ``--model`` names it again): as
    :func:`pdepth.improve.improve`. ``bins``: the stratified mode's bins. ``selection_seed``:
    the draw breaking ties (and the random baseline's draw). Every input is checked before
    anything is written; the folder's lock is held throughout.

    ``prune.json``: ``full`` (the baseline: ``kept``, ``test_accuracy_per_seed``,
    ``test_accuracy`` mean, ``test_accuracy_std`` sample std, 0 for one seed), ``scores``
    (score -> ``harder`` and ``modes`` -> mode -> fraction (``"0.5"``) -> the same fields and
    ``file``, the .npy), ``skipped_scores``, ``settings``, ``selection`` (the rule) and
    ``test_split``."""
    from .protocol.outdir import open_for_writing

    with open_for_writing(run_dir, "pdepth prune"):
        return _prune(Path(run_dir), scores=scores, keep=keep, modes=modes, seeds=seeds,
                      epochs=epochs, device=device, model=model, bins=bins,
                      selection_seed=selection_seed, progress=progress, log=log,
                      command=command)


def _prune(out: Path, *, scores, keep, modes, seeds, epochs, device, model, bins,
           selection_seed, progress, log, command) -> dict:
    from .protocol.config import check_seeds
    from .protocol.outdir import data_identity

    t0 = time.perf_counter()
    warn = log or (lambda msg: print(msg, file=sys.stderr, flush=True))  # even when quiet
    log = log or (lambda msg: None)
    plan = _plan(out, scores, keep, modes, bins, selection_seed)
    seeds = check_seeds([seeds] if isinstance(seeds, int) else list(seeds))
    r = _improve.retraining(plan.run, epochs=epochs, device=device, model=model,
                            command="pdepth prune")
    if plan.skipped_line:  # every input is checked now: a warning, not an error
        warn(plan.skipped_line)
    data_sha256 = data_identity(r.images.numpy(), plan.run.labels)
    base = _settings_key(r, data_sha256)
    # Every subset is fixed now, from results.parquet alone; written before any training.
    (out / PRUNE_DIR).mkdir(exist_ok=True)
    for name, rows in plan.subsets.items():
        if name != _name(FULL, "all", 1.0):
            _atomic.write_with(out / PRUNE_DIR / f"{name}.npy",
                               lambda f, rows=rows: np.save(f, plan.run.dataset_index[rows]))
    test = []  # the test split, read at the first evaluation
    results: dict = {}
    memo: dict = {}
    for name, rows in plan.subsets.items():
        for seed in seeds:
            results[(name, seed)] = _job(out, name, rows, seed, r, base, test, progress, log,
                                         memo)
    result = _result(plan, seeds, results, out)
    result["settings"] = {
        "epochs": r.options.epochs, "seeds": seeds, "device": str(r.device), "bins": bins,
        "selection_seed": selection_seed, "arch": r.arch, "model": r.model,
        "lr": r.options.lr, "weight_decay": r.options.weight_decay,
        "batch_size": r.options.batch_size, "run_examples": plan.run.n,
        "run_epochs": plan.run.config.get("config", {}).get("epochs"),
        "data_sha256": data_sha256, "seconds": time.perf_counter() - t0,
        "command": command or shlex.join(["pdepth", "prune", str(out)]),
        "training": "every subset: the run's architecture from torch.manual_seed(seed)'s "
                    "initial weights, Adam with a cosine schedule for the epochs "
                    "(pdepth.protocol.train_model), batch order seeded with seed",
    }
    result["selection"] = SELECTION_RULE
    result["test_split"] = {"dataset": r.info.name, "split": "test", "root": str(r.root),
                            "used_for": "evaluation only: every subset comes from the run's "
                                        "examples (training split) and results.parquet"}
    _atomic.write_json(out / PRUNE_FILE, result)
    _draw(out, result)
    return result


@dataclass
class _Plan:
    run: object  # pdepth.improve.RunFiles
    scores: list[Score]
    skipped: dict  # score -> reason
    keep: list[float]
    modes: list[str]
    subsets: dict  # job name -> kept rows (int64, ascending), the baseline first
    skipped_line: str | None = None  # the one line saying which default scores are missing


def _plan(out: Path, scores, keep, modes, bins, selection_seed) -> _Plan:
    """Every subset, from the run's files alone; every input checked first."""
    default = scores is None
    scores = parse_scores(DEFAULT_SCORES if default else scores)
    keep = parse_keep(keep)
    modes = list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct names of {', '.join(MODES)}, got {modes}")
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 10**6:
        raise ValueError(f"--bins must be an integer in 1..1000000, got {bins!r}")
    if not isinstance(selection_seed, int) or not 0 <= selection_seed < 2**32:
        raise ValueError(f"--selection-seed must be an integer in 0..2**32-1, got "
                         f"{selection_seed!r}")
    run = _improve.load_run(out)
    import pandas as pd

    table = pd.read_parquet(out / "results.parquet")
    numeric = [c for c in table.columns if table[c].dtype.kind in "iuf"]
    missing = [s.name for s in scores if s.name != RANDOM and s.name not in table.columns]
    if missing and not default:
        raise ValueError(f"--scores: {out / 'results.parquet'} has no column "
                         f"{', '.join(missing)}; its numeric columns: {', '.join(numeric)}")
    skipped, line = {}, None
    if missing:
        known = [c for c in numeric if c in HARDER]
        line = (f"pdepth prune: skipping {', '.join(missing)} (not in this run's "
                f"results.parquet, from an earlier pdepth); score columns here: "
                f"{', '.join(known)}")
        skipped = {name: "not in results.parquet" for name in missing}
        scores = [s for s in scores if s.name not in missing]
    for s in scores:
        if s.name != RANDOM and table[s.name].dtype.kind not in "iuf":
            raise ValueError(f"--scores: column {s.name} of {out / 'results.parquet'} is not "
                             f"numeric ({table[s.name].dtype}); numeric: {', '.join(numeric)}")
    for f in keep:
        kept_count(f, run.n)
    subsets = {_name(FULL, "all", 1.0): np.arange(run.n)}
    for s in scores:
        values = (np.zeros(run.n) if s.name == RANDOM
                  else table[s.name].to_numpy(np.float64))
        for mode in (["uniform"] if s.name == RANDOM else modes):
            for f in keep:
                subsets[_name(s.name, mode, f)] = select(values, s.harder, mode, f,
                                                         seed=selection_seed, bins=bins)
    return _Plan(run, scores, skipped, keep, modes, subsets, line)


def _name(score: str, mode: str, fraction: float) -> str:
    """A subset's file name stem, e.g. ``el2n-remove_easy-0.5``."""
    return f"{score}-{mode}-{fraction:g}"


def _settings_key(r, data_sha256: str) -> dict:
    """What a job's result depends on besides its subset and seed."""
    cfg = r.run.config.get("config", {})
    return {"arch": r.arch, "model": r.model, "model_args": cfg.get("model_args"),
            "epochs": r.options.epochs, "lr": r.options.lr,
            "weight_decay": r.options.weight_decay, "batch_size": r.options.batch_size,
            "dataset": r.info.name, "root": str(r.root), "data_sha256": data_sha256}


def _job(out: Path, name: str, rows, seed: int, r, base: dict, test: list, progress, log,
         memo: dict):
    """One (subset, seed): read back from its file where a finished job of the same settings
    and examples left it, else trained, evaluated and saved. ``memo`` holds this call's jobs
    by key: a subset equal to one trained before (at ``--keep 1`` every score keeps the whole
    run, the baseline) takes its result instead of training the same examples again."""
    path = out / PRUNE_DIR / f"{name}.seed{seed}.json"
    key = {**base, "seed": seed, "kept": int(len(rows)),
           "kept_sha256": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()}
    memo_key = json.dumps(key, sort_keys=True)
    same = memo.get(memo_key)
    if same is not None:
        if _read_job(path) != same:
            _atomic.write_json(path, same)
        log(f"pdepth prune: {name} seed {seed}: the same examples as {same['name']}")
        return same
    done = _read_job(path)
    if done is not None and done.get("key") == key:
        log(f"pdepth prune: {name} seed {seed}: done before ({path.name})")
        memo[memo_key] = {**done, "name": done.get("name", name)}
        return done
    if done is not None:
        log(f"pdepth prune: {name} seed {seed}: {path.name} was trained with other settings "
            "or examples; training again")
    if not test:
        test.extend(_improve.load_test_split(r))  # only to evaluate
    x_all, x_test, test_labels, _ = test
    t = time.perf_counter()
    acc, train_acc = _improve.train_and_test(r, x_all, rows, r.run.labels[rows], seed, x_test,
                                             test_labels, progress=progress,
                                             desc=f"{name} seed {seed}")
    entry = {"key": key, "test_accuracy": acc, "final_train_accuracy": train_acc,
             "train_seconds": time.perf_counter() - t, "name": name}
    _atomic.write_json(path, entry)
    memo[memo_key] = entry
    log(f"pdepth prune: {name} seed {seed}: test accuracy {acc:.4f} ({len(rows)} examples)")
    return entry


def _read_job(path: Path) -> dict | None:
    """A job file's content; None where there is none or it cannot be read (trained
    again)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("test_accuracy"), float)
    return entry if ok else None


def _entry(name: str, rows, seeds, results) -> dict:
    acc = [results[(name, s)]["test_accuracy"] for s in seeds]
    return {"kept": int(len(rows)), "test_accuracy_per_seed": acc,
            "test_accuracy": float(np.mean(acc)),
            "test_accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0}


def _result(plan: _Plan, seeds, results, out: Path) -> dict:
    full = _name(FULL, "all", 1.0)
    result = {"full": {**_entry(full, plan.subsets[full], seeds, results), "fraction": 1.0},
              "scores": {}, "skipped_scores": plan.skipped}
    for s in plan.scores:
        modes = {}
        for mode in (["uniform"] if s.name == RANDOM else plan.modes):
            modes[mode] = {}
            for f in plan.keep:
                name = _name(s.name, mode, f)
                modes[mode][f"{f:g}"] = {**_entry(name, plan.subsets[name], seeds, results),
                                         "fraction": f, "file": f"{PRUNE_DIR}/{name}.npy"}
        result["scores"][s.name] = {"harder": s.harder, "modes": modes}
    return result


def _draw(out: Path, result: dict) -> None:
    """figures/pruning.png, and report.html redrawn where the run has one."""
    if (out / "report.html").exists():
        from .report import write_report

        write_report(out)
        return
    from .prune_report import draw_pruning
    from .report import all_or_nothing

    all_or_nothing(out / "figures",
                   lambda pending: draw_pruning(result, out / "figures" / "pruning.png",
                                                pending))
