"""The output directory of a run: its marker, the check before it is used (new, empty,
overwrite, resume), the per-model files an interrupted run resumes from, and reading the
results back. The rules: docs/protocol.md, "Bad input, interruption, resuming"."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .. import _atomic
from ..report import FIGURES
from .config import RunConfig
from .errors import ModelFileError, OutputExistsError
from .scoring import CACHE_NAME

__all__ = ["MARKER", "MODEL_ARRAYS", "RESULT_DIRS", "RESULT_FILES", "load_model_file",
           "load_results", "model_path", "prepare_output"]

RESULT_FILES = ("results.parquet", "per_model.npz", "data.npz", "config.json", "summary.json",
                "improve.json", "report.html", "COMPLETE")
RESULT_DIRS = ("models", "figures", "cache")
MARKER = ".pdepth-run.json"  # written first into every run directory: {"protocol_key": ...}
MODEL_NAME = re.compile(r"seed-?\d+-half[01]\.npz")
MODEL_ARRAYS = ("seed", "half", "train_index", "held_out_index", "in_train", "depth",
                "layer_pred", "probs", "epoch_pred", "loss", "train_accuracy",
                "held_out_accuracy", "knn_vote_share", "probe_accuracy_epochs")


def is_pdepth_name(folder: str, name: str) -> bool:
    """Whether ``folder/name`` ("" for the top level) is a file name pdepth writes."""
    if _atomic.TMP_NAME.fullmatch(name):  # left behind by an interrupted atomic write
        return folder in ("",) + RESULT_DIRS
    if folder == "models":
        return MODEL_NAME.fullmatch(name) is not None
    if folder == "figures":
        return name in FIGURES
    if folder == "cache":
        return CACHE_NAME.fullmatch(name) is not None
    return folder == "" and (name in RESULT_FILES or name == MARKER)


def foreign_entries(out: Path) -> list[str]:
    """The entries of ``out`` (and of its models/ and figures/) that pdepth did not write."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in RESULT_DIRS and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir())
                        if not (e.is_file() and is_pdepth_name(entry.name, e.name))]
        elif not (entry.is_file() and is_pdepth_name("", entry.name)):
            foreign.append(entry.name)
    return foreign


def read_marker(out: Path) -> dict | None:
    """The marker's content; None without a marker, {} for a damaged one (still pdepth's)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def check_output(out: Path, config: RunConfig, overwrite: bool) -> None:
    """Raises :class:`OutputExistsError` unless the non-empty directory ``out`` may be used:
    it must be a pdepth run (marker) holding only pdepth's files; a finished run or other
    settings need ``overwrite``."""
    marker = read_marker(out)
    if marker is None:
        raise OutputExistsError(
            f"--out {out} is not empty and is not a pdepth run directory (no {MARKER}, which "
            f"pdepth writes first into every run directory; it holds e.g. "
            f"{_listing(sorted(p.name for p in out.iterdir()))}); pdepth never writes into or "
            "deletes from such a directory, even with --overwrite: choose a new or empty --out"
        )
    foreign = foreign_entries(out)
    if foreign:
        raise OutputExistsError(
            f"--out {out} is a pdepth run directory but holds files pdepth did not write: "
            f"{_listing(foreign)}; move them elsewhere (--overwrite never deletes them) or "
            "choose another --out"
        )
    if overwrite:
        return
    if (out / "COMPLETE").exists():
        raise OutputExistsError(
            f"--out {out} already holds the results of a finished pdepth run; pass --overwrite "
            "to replace them (it deletes only the files pdepth wrote), or choose another --out"
        )
    if marker.get("protocol_key") != config.protocol_key():
        raise OutputExistsError(
            f"--out {out} holds an unfinished pdepth run with different settings; rerun with "
            "its settings to resume it, pass --overwrite to replace it (it deletes only the "
            "files pdepth wrote), or choose another --out"
        )


def _listing(names: list[str], most: int = 5) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def remove_pdepth_files(out: Path) -> None:
    """Deletes the files pdepth wrote (checked by :func:`check_output`), keeping the marker;
    removes models/ and figures/ only when that leaves them empty."""
    for folder in RESULT_DIRS:
        sub = out / folder
        if sub.is_dir():
            for entry in sub.iterdir():
                if entry.is_file() and is_pdepth_name(folder, entry.name):
                    entry.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()
    for entry in out.iterdir():
        if entry.is_file() and entry.name != MARKER and is_pdepth_name("", entry.name):
            entry.unlink()


def prepare_output(out: Path, config: RunConfig, overwrite: bool) -> int:
    """Creates / checks the output directory (the rules: docs/protocol.md, "Bad input,
    interruption, resuming"). Returns the number of per-model files kept for resuming.

    A new or empty directory is used as it is. Any other directory must be a pdepth run
    (its marker, :data:`MARKER`, written first) holding only files pdepth writes; a finished
    run or one with other settings is refused unless ``overwrite``, which deletes pdepth's
    files and nothing else. An unfinished run with the same settings is resumed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory; choose another "
                                "--out")
    if out.is_dir() and any(out.iterdir()):
        check_output(out, config, overwrite)
        if overwrite:
            remove_pdepth_files(out)
    out.mkdir(parents=True, exist_ok=True)
    # The marker comes first: whatever pdepth writes later lies in a recognisable run.
    _atomic.write_json(out / MARKER, {"pdepth_run": 1, "protocol_key": config.protocol_key()})
    (out / "models").mkdir(exist_ok=True)
    return len([p for p in (out / "models").iterdir() if MODEL_NAME.fullmatch(p.name)])


def model_path(out: Path, seed: int, half: int) -> Path:
    return out / "models" / f"seed{seed}-half{half}.npz"


def load_model_file(path: Path, config: RunConfig, seed: int, half: int, n: int) -> dict:
    """Reads ``models/seed<s>-half<h>.npz`` of an unfinished run and checks that it is model
    ``(seed, half)`` of this run (settings, split, sizes), whatever its name says."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        meta = json.loads(str(arrays.pop("meta")[()]))
    except Exception as exc:  # truncated or damaged: zipfile, zlib, EOF, JSON, KeyError...
        raise ModelFileError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it to recompute "
            "that model, then rerun the same command") from exc
    problem = _model_mismatch(arrays, meta, config, (seed, half), n)
    if problem:
        raise ModelFileError(f"{path} {problem}; delete it to recompute that model, then "
                             "rerun the same command")
    arrays["meta"] = meta
    return arrays


def save_model_file(path: Path, arrays: dict, meta: dict) -> None:
    """Writes one model's arrays and ``meta`` (JSON) for :func:`load_model_file`."""
    _atomic.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def _model_mismatch(arrays: dict, meta: dict, config: RunConfig, job: tuple[int, int],
                    n: int) -> str | None:
    """What is wrong with a loaded model file of model ``job = (seed, half)``, or None."""
    seed, half = job
    key = config.protocol_key()
    if meta.get("protocol_key") != key:
        return (f"was computed with other settings (protocol key "
                f"{meta.get('protocol_key')!r}, this run {key!r})")
    missing = [name for name in MODEL_ARRAYS if name not in arrays]
    if missing:
        return f"lacks the arrays {', '.join(missing)}"
    said = (int(arrays["seed"]), int(arrays["half"]), meta.get("seed"), meta.get("half"))
    if said != (seed, half, seed, half):
        return (f"holds the model of seed {said[0]} half {said[1]}, not seed {seed} half "
                f"{half} as its name says")
    if arrays["in_train"].shape != (n,) or not np.array_equal(
            arrays["train_index"], config.split(n, seed, half)[0]):
        return f"does not hold the split of seed {seed} half {half} of these {n} examples"
    return None


def load_results(out: str | os.PathLike):
    """``(results DataFrame, per-model arrays dict, config dict)`` of a finished run."""
    import pandas as pd

    out = Path(out)
    if not (out / "COMPLETE").exists():
        raise FileNotFoundError(f"{out} holds no finished pdepth run (no COMPLETE marker)")
    df = pd.read_parquet(out / "results.parquet")
    with np.load(out / "per_model.npz", allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    return df, arrays, json.loads((out / "config.json").read_text())
