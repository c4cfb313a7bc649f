"""The output directory of a run: its marker, its lock, the check before it is used (new,
empty, overwrite, resume; :func:`open_for_writing` for the commands that write into a
finished run), the per-model files an interrupted run resumes from, and reading the results
back. The rules: docs/protocol.md, "The run folder's rules"."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import _atomic
from ..figures import is_figure_name
from .config import RunConfig
from .errors import ModelFileError, OutputExistsError
from .scoring import CACHE_NAME

__all__ = ["LOCK", "MARKER", "MODEL_ARRAYS", "RESULT_DIRS", "RESULT_FILES", "data_identity",
           "folder_lock",
           "load_model_file", "load_results", "model_path", "open_for_writing",
           "prepare_output"]

RESULT_FILES = ("results.parquet", "per_model.npz", "data.npz", "config.json", "summary.json",
                "improve.json", "prune.json", "report.html", "COMPLETE")
RESULT_DIRS = ("models", "figures", "cache", "prune")
MARKER = ".pdepth-run.json"  # written first into every run directory: {"protocol_key": ...}
LOCK = ".pdepth-run.lock"  # flock()ed by the one process writing into the run directory
MODEL_NAME = re.compile(r"seed-?\d+-half[01]\.npz")
# pdepth prune's subsets and per-job results (pdepth.prune): <score>-<mode>-<fraction>...
PRUNE_NAME = re.compile(r"[A-Za-z0-9_]+-(remove_easy|remove_hard|stratified|uniform|all)"
                        r"-[0-9.e+-]+(\.npy|\.seed\d+\.json)")
MODEL_ARRAYS = ("seed", "half", "train_index", "held_out_index", "in_train", "depth",
                "layer_pred", "probs", "epoch_pred", "loss", "train_accuracy",
                "held_out_accuracy", "knn_vote_share", "probe_accuracy_epochs")


def is_pdepth_name(folder: str, name: str) -> bool:
    """Whether ``folder/name`` ("" for the top level) is a file name pdepth writes: its own
    names, and its temporary names (:data:`pdepth._atomic.TMP_NAME`) for them."""
    tmp = _atomic.TMP_NAME.fullmatch(name)
    if tmp:  # left behind by an interrupted atomic write
        return folder in ("",) + RESULT_DIRS and is_pdepth_name(folder, tmp.group(1))
    if folder == "models":
        return MODEL_NAME.fullmatch(name) is not None
    if folder == "figures":
        return is_figure_name(name)
    if folder == "cache":
        return CACHE_NAME.fullmatch(name) is not None
    if folder == "prune":
        return PRUNE_NAME.fullmatch(name) is not None
    return folder == "" and (name in RESULT_FILES or name in (MARKER, LOCK))


def foreign_entries(out: Path) -> list[str]:
    """The entries of ``out`` (and of its models/, figures/ and cache/) that pdepth did not
    write; a symbolic link in place of one of those folders is one (pdepth never writes
    through a link)."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in RESULT_DIRS and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir())
                        if not (e.is_file() and is_pdepth_name(entry.name, e.name))]
        elif entry.is_symlink() and entry.name in RESULT_DIRS:
            foreign.append(f"{entry.name} (a symbolic link)")
        elif not (entry.is_file() and is_pdepth_name("", entry.name)):
            foreign.append(entry.name)
    return foreign


def _entries(out: Path) -> list[Path]:
    """The entries of the directory ``out`` but its lock file (which alone is no run)."""
    return [p for p in out.iterdir() if p.name != LOCK]


# --------------------------------------------------------------------------------------------
# the lock: one process writes into a run folder at a time
# --------------------------------------------------------------------------------------------

_HELD: dict[str, int] = {}  # the folders whose lock this process holds: nesting depth


@contextmanager
def folder_lock(out: str | os.PathLike, name: str | None = None) -> Iterator[None]:
    """Holds the lock of the existing directory ``out`` for the ``with`` block; raises
    :class:`OutputExistsError` at once (``name``: how the message names the folder) where
    another process holds it.

    The lock is an advisory ``flock`` on ``out/.pdepth-run.lock`` (:data:`LOCK`), which the
    kernel releases when the process ends in any way, ``kill -9`` included: a lock file left
    behind blocks nothing, only a live process's lock does. The file holds the holder's
    process id (for the message) and is removed on release. Nested use in one process (a run
    drawing its report) holds the one lock."""
    out = Path(out)
    key = os.path.realpath(out)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(out, name or str(out))
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        try:
            (out / LOCK).unlink(missing_ok=True)  # while held: an opener of it tries again
        finally:
            os.close(fd)


def _acquire(out: Path, name: str) -> int:
    """The descriptor of ``out/LOCK``, locked by this process."""
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputExistsError(
                f"{name} is in use by another pdepth process"
                + (f" (process {holder})" if holder.isdigit() else "")
                + f": it holds the lock {path}, and one process at a time writes into a run "
                "folder; wait for it to finish or stop it, or choose another folder") from None
        except OSError as exc:  # a filesystem without locks
            os.close(fd)
            raise OSError(f"{path} cannot be locked ({exc.strerror or exc}); pdepth locks a "
                          "run folder while it writes: choose a folder on another "
                          "filesystem") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            st, now = os.fstat(fd), os.stat(path)
            same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if same:  # else the last holder removed the file as it was opened here: again
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextmanager
def lock_output(out: Path, name: str | None = None) -> Iterator[None]:
    """Creates ``out`` where it is missing and holds its lock (:func:`folder_lock`); refuses
    first, writing nothing, a path that is not a directory or a non-empty directory that is
    not a pdepth run (no marker)."""
    out = Path(out)
    name = name or f"--out {out}"
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{name} exists and is not a directory; choose another "
                                "--out")
    if out.is_dir() and _entries(out) and read_marker(out) is None:
        _refuse_foreign_directory(out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, name):
        yield


@contextmanager
def open_for_writing(out: str | os.PathLike, command: str) -> Iterator[Path]:
    """For a command (``command``, e.g. ``"pdepth report"``) that writes into the folder of
    a run: checks the folder as ``pdepth run --overwrite`` does and holds its lock for the
    ``with`` block. The folder must be a pdepth run (its marker, or ``COMPLETE`` for a run
    of a version before the marker) holding only files pdepth writes: a symbolic link in
    place of ``models/``, ``figures/`` or ``cache/`` is refused, as is any other file.
    Raises :class:`OutputExistsError` (or FileNotFoundError for a missing folder), one line,
    before anything is written."""
    out = Path(out)
    _check_writable(out, command)
    with folder_lock(out, str(out)):
        _check_writable(out, command)  # again, now that no other pdepth process writes
        yield out


def _check_writable(out: Path, command: str) -> None:
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory; {command} writes into the folder "
                                "of a `pdepth run`")
    if read_marker(out) is None and not (out / "COMPLETE").is_file():
        raise OutputExistsError(f"{out} is not a pdepth run directory and holds no finished "
                                f"pdepth run (missing: {MARKER}, COMPLETE); {command} writes "
                                "only into the folder of a pdepth run")
    foreign = foreign_entries(out)
    if foreign:
        raise OutputExistsError(
            f"{out} holds files pdepth did not write: {_listing(foreign)}; {command} writes "
            "only into a run folder that holds nothing else (it never writes through a "
            "link): move them elsewhere")


def read_marker(out: Path) -> dict | None:
    """The marker's content; None without a marker, {} for a damaged one (still pdepth's)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _refuse_foreign_directory(out: Path) -> None:
    raise OutputExistsError(
        f"--out {out} is not empty and is not a pdepth run directory (no {MARKER}, which "
        f"pdepth writes first into every run directory; it holds e.g. "
        f"{_listing(sorted(p.name for p in _entries(out)))}); pdepth never writes into or "
        "deletes from such a directory, even with --overwrite: choose a new or empty --out"
    )


def check_output(out: Path, config: RunConfig, overwrite: bool,
                 data_sha256: str | None = None) -> None:
    """Raises :class:`OutputExistsError` unless the non-empty directory ``out`` may be used:
    it must be a pdepth run (marker) holding only pdepth's files; a finished run, other
    settings (naming them) or other data (``data_sha256``: the identity of the data read,
    :func:`data_identity`) need ``overwrite``."""
    marker = read_marker(out)
    if marker is None:
        _refuse_foreign_directory(out)
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
    if marker.get("protocol_key") not in config.accepted_keys():
        raise OutputExistsError(
            f"--out {out} holds an unfinished pdepth run with different settings"
            f"{_differences(marker.get('settings'), config.key_settings())}; rerun with its "
            "settings to resume it, pass --overwrite to replace it (it deletes only the files "
            "pdepth wrote), or choose another --out"
        )
    problem = _other_data(out, marker, data_sha256)
    if problem:
        raise OutputExistsError(
            f"--out {out} holds an unfinished pdepth run {problem}; rerun with its data to "
            "resume it, pass --overwrite to replace it (it deletes only the files pdepth "
            "wrote), or choose another --out"
        )


# settings of RunConfig without a flag of their own: how a message names them
_NO_FLAG = {"subset_seed": "subset_seed", "eval_batch_size": "eval_batch_size",
            "weight_decay": "weight_decay", "thresholds": "thresholds",
            "label_noise_seed": "label_noise_seed", "arch_version": "the architecture's version",
            "checkpoint_sha256": "the --checkpoint file's content (sha256)",
            "data_sha256": "the Dataset's content (sha256)",
            "noise_matrix_sha256": "the --noise-matrix file's content (sha256)"}


def _differences(theirs, ours: dict) -> str:
    """``" (--k: 5 here, 9 in the run; ...)"``: the settings that differ, where the marker
    records the run's (pdepth writes them since issue 23), else ``""``."""
    if not isinstance(theirs, dict):
        return " (its marker, from an earlier pdepth, does not say which)"
    ours = json.loads(json.dumps(ours, default=str))  # as the marker holds them (lists...)
    names = sorted(set(theirs) | set(ours))
    diffs = [f"{_NO_FLAG.get(k, '--' + k.replace('_', '-'))}: {_value(ours, k)} here, "
             f"{_value(theirs, k)} in the run" for k in names if theirs.get(k) != ours.get(k)]
    return f" ({'; '.join(diffs)})" if diffs else ""


def _value(settings: dict, name: str) -> str:
    if name not in settings:
        return "unset"
    text = json.dumps(settings[name], default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _other_data(out: Path, marker: dict, data_sha256: str | None) -> str | None:
    """Why the run in ``out`` is on other data than ``data_sha256``, or None. The marker
    records the run's data identity; for a marker of an earlier pdepth, the run's own copy
    of its data (``data.npz``) is hashed instead."""
    if data_sha256 is None:
        return None
    theirs = marker.get("data_sha256")
    if theirs is None:
        theirs = _data_npz_identity(out)
        if theirs is None:
            if not _has_results(out):
                return None  # nothing computed yet: nothing to mix
            return ("whose data cannot be told (its marker is from an earlier pdepth and its "
                    "data.npz cannot be read), so it may be on other data")
    if theirs == data_sha256:
        return None
    return (f"on other data: the images and labels read here (sha256 {data_sha256[:12]}...) "
            f"are not the run's (sha256 {theirs[:12]}...{_run_root(out)})")


def data_identity(images, labels) -> str:
    """The identity of a run's data: the sha256 of what was read -- the images (uint8, with
    their shape) and the dataset's labels of the run's examples, in order. Every file of a
    run folder that depends on the data is written with it, and a resume on other data is
    refused (docs/protocol.md, "The run folder's rules")."""
    images = np.ascontiguousarray(np.asarray(images))
    labels = np.ascontiguousarray(np.asarray(labels), dtype=np.int64)
    digest = hashlib.sha256(f"{images.shape} {images.dtype}\n".encode())
    digest.update(images.data)
    digest.update(labels.data)
    return digest.hexdigest()


def _data_npz_identity(out: Path) -> str | None:
    try:
        with np.load(out / "data.npz", allow_pickle=False) as z:
            labels = z["original_labels"] if "original_labels" in z.files else z["labels"]
            return data_identity(np.ascontiguousarray(z["images"]),
                                 np.ascontiguousarray(labels))
    except Exception:  # noqa: BLE001  (missing or damaged: cannot tell)
        return None


def _has_results(out: Path) -> bool:
    """Whether ``out`` holds anything computed (a model file or a cache file)."""
    return any((out / d).is_dir() and any((out / d).iterdir()) for d in ("models", "cache"))


def _run_root(out: Path) -> str:
    """``", read from /data/x"``: where the run in ``out`` read its data (its config.json),
    or ``""``."""
    try:
        root = json.loads((out / "config.json").read_text())["resolved"]["root"]
    except Exception:  # noqa: BLE001  (a hint only)
        return ""
    return f", read from {root}" if isinstance(root, str) and root else ""


def _listing(names: list[str], most: int = 5) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def remove_pdepth_files(out: Path) -> None:
    """Deletes the files pdepth wrote (checked by :func:`check_output`), keeping the marker
    and the lock; removes models/, figures/ and cache/ only when that leaves them empty."""
    for folder in RESULT_DIRS:
        sub = out / folder
        if sub.is_dir():
            for entry in sub.iterdir():
                if entry.is_file() and is_pdepth_name(folder, entry.name):
                    entry.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()
    for entry in out.iterdir():
        if (entry.is_file() and entry.name not in (MARKER, LOCK)
                and is_pdepth_name("", entry.name)):
            entry.unlink()


def remove_temporaries(out: Path) -> list[str]:
    """Deletes the temporary files that interrupted writes left in ``out`` (only pdepth's
    exact temporary names for its own files, :func:`is_pdepth_name`; with the lock held, no
    live pdepth process owns one). Returns their paths relative to ``out``."""
    removed = []
    for folder in ("",) + RESULT_DIRS:
        sub = out / folder
        if not sub.is_dir() or sub.is_symlink():
            continue
        for entry in sorted(sub.iterdir()):
            if (_atomic.TMP_NAME.fullmatch(entry.name) and entry.is_file()
                    and is_pdepth_name(folder, entry.name)):
                entry.unlink()
                removed.append(f"{folder}/{entry.name}".lstrip("/"))
    return removed


def prepare_output(out: Path, config: RunConfig, overwrite: bool, *,
                   data_sha256: str | None = None, log=None) -> int:
    """Creates / checks the output directory (the rules: docs/protocol.md, "The run folder's
    rules") under its lock (:func:`lock_output`, held already by :func:`pdepth.run`).
    Returns the number of per-model files kept for resuming.

    A new or empty directory is used as it is. Any other directory must be a pdepth run
    (its marker, :data:`MARKER`, written first) holding only files pdepth writes; a finished
    run, or one with other settings or on other data (``data_sha256``, see
    :func:`check_output`), is refused unless ``overwrite``, which deletes pdepth's files and
    nothing else. An unfinished run with the same settings and data is resumed, its stale
    temporary files removed (``log`` is told)."""
    out = Path(out)
    with lock_output(out):
        if _entries(out):
            check_output(out, config, overwrite, data_sha256)
            if overwrite:
                remove_pdepth_files(out)
            else:
                stale = remove_temporaries(out)
                if stale and log:
                    log(f"pdepth run: removed {len(stale)} temporary file(s) of an interrupted "
                        f"run: {_listing(stale)}")
        # The marker comes first: whatever pdepth writes later lies in a recognisable run.
        _atomic.write_json(out / MARKER, {"pdepth_run": 1, "protocol_key": config.protocol_key(),
                                          "data_sha256": data_sha256,
                                          "settings": config.key_settings()})
        (out / "models").mkdir(exist_ok=True)
        return len([p for p in (out / "models").iterdir() if MODEL_NAME.fullmatch(p.name)])


def model_path(out: Path, seed: int, half: int) -> Path:
    return out / "models" / f"seed{seed}-half{half}.npz"


def load_model_file(path: Path, config: RunConfig, seed: int, half: int, n: int,
                    data_sha256: str | None = None) -> dict:
    """Reads ``models/seed<s>-half<h>.npz`` of an unfinished run and checks that it is model
    ``(seed, half)`` of this run (settings, data where the file records it, split, sizes),
    whatever its name says."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        meta = json.loads(str(arrays.pop("meta")[()]))
    except Exception as exc:  # truncated or damaged: zipfile, zlib, EOF, JSON, KeyError...
        raise ModelFileError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it to recompute "
            "that model, then rerun the same command") from exc
    problem = _model_mismatch(arrays, meta, config, (seed, half), n, data_sha256)
    if problem:
        raise ModelFileError(f"{path} {problem}; delete it to recompute that model, then "
                             "rerun the same command")
    arrays["meta"] = meta
    return arrays


def save_model_file(path: Path, arrays: dict, meta: dict) -> None:
    """Writes one model's arrays and ``meta`` (JSON) for :func:`load_model_file`."""
    _atomic.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def _model_mismatch(arrays: dict, meta: dict, config: RunConfig, job: tuple[int, int],
                    n: int, data_sha256: str | None) -> str | None:
    """What is wrong with a loaded model file of model ``job = (seed, half)``, or None."""
    seed, half = job
    key = config.protocol_key()
    if meta.get("protocol_key") not in config.accepted_keys():
        return (f"was computed with other settings (protocol key "
                f"{meta.get('protocol_key')!r}, this run {key!r})")
    said = meta.get("data_sha256")  # files of earlier versions: checked by the marker only
    if said is not None and data_sha256 is not None and said != data_sha256:
        return (f"was computed on other data (sha256 {str(said)[:12]}..., this run's "
                f"{data_sha256[:12]}...)")
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
    shapes = {name: arrays[name].shape for name in ("depth", "layer_pred", "probs")}
    if shapes["depth"] != (n,) or shapes["layer_pred"][-1:] != (n,) or \
            shapes["probs"][:1] != (n,):
        return f"holds arrays of other sizes than these {n} examples ({shapes})"
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
