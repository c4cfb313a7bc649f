"""Atomic file writes: the one place pdepth writes a file under a temporary name in the same
directory and renames it into place with :func:`os.replace`, so a reader (or a resumed run)
sees the old file or the new one, never a partial one.

Temporary names are ``.pdepth.tmp-<pid>.<name>``: pdepth's own prefix, so that a user's file
never matches by chance (``.draft.tmp-2024.pdf`` does not), and the target's name last, so
that its suffix stays (writers that pick the format from the suffix, e.g. matplotlib, need
it). :data:`TMP_NAME` matches them and captures ``<name>``, so that a run directory check
recognises what an interrupted write left behind (and whether ``<name>`` is one of pdepth's
names there). A temporary file is created with :func:`open`'s permissions
(``0o666 & ~umask``) and removed again when the write fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["TMP_NAME", "PendingFiles", "file_sha256", "human_bytes", "json_default", "names_file", "naming",
           "savez", "temp_path", "write_bytes", "write_json", "write_parquet", "write_with"]

TMP_NAME = re.compile(r"\.pdepth\.tmp-\d+\.(.+)")  # temp_path()'s names; group 1: the target


def temp_path(path: str | os.PathLike, keep_suffix: bool = True) -> Path:
    """The temporary name for ``path``: same directory, hidden, pdepth's prefix, this
    process's id, then ``path``'s name (so its suffix is kept; ``keep_suffix`` is accepted
    for the callers of earlier versions and changes nothing)."""
    path = Path(path)
    return path.with_name(f".pdepth.tmp-{os.getpid()}.{path.name}")


def write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write(f)`` on a binary file open at ``path``'s temporary name, then renames
    it to ``path`` (after :func:`os.fsync`). The temporary file is removed if anything
    fails."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        named = naming(exc, path)
        if named is exc:
            raise
        raise named from exc


def human_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit it reaches, to three significant digits
    (``"512 B"``, ``"3.00 MiB"``, ``"12.4 GiB"``): a size in a message never rounds to 0."""
    n = max(int(n), 0)
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.{2 if n < 10 else 1 if n < 100 else 0}f} {unit}"


def naming(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """``exc`` as an OSError naming ``path`` when it is one that names no file (a failed
    write, fsync or fallocate says only "No space left on device"), else ``exc`` itself."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


@contextmanager
def names_file(path: str | os.PathLike):
    """Re-raises an OSError of the block that names no file as one naming ``path``."""
    try:
        yield
    except OSError as exc:
        named = naming(exc, path)
        if named is exc:
            raise
        raise named from exc


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    write_with(path, lambda f: f.write(data))


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths."""
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as JSON (numpy values and paths allowed, :func:`json_default`)."""
    write_bytes(path, json.dumps(obj, indent=1, default=json_default).encode())


def savez(path: str | os.PathLike, **arrays) -> None:
    """:func:`numpy.savez_compressed` of ``arrays`` to ``path`` atomically."""
    import numpy as np

    write_with(path, lambda f: np.savez_compressed(f, **arrays))


def write_parquet(path: str | os.PathLike, df) -> None:
    """``df.to_parquet`` to ``path`` atomically."""
    write_with(path, df.to_parquet)


class PendingFiles:
    """Several files written under temporary names (:meth:`tmp`) and renamed together
    (:meth:`replace_all`) once all are written, or removed (:meth:`discard`)."""

    def __init__(self):
        self.files: list[tuple[Path, Path]] = []

    def tmp(self, path: str | os.PathLike) -> Path:
        """The temporary name to write ``path``'s content to."""
        path = Path(path)
        tmp = temp_path(path)  # e.g. .pdepth.tmp-123.figure.png: still a PNG
        self.files.append((tmp, path))
        return tmp

    def replace_all(self) -> None:
        for tmp, path in self.files:
            os.replace(tmp, path)

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)


def file_sha256(path: str) -> str:
    """The sha256 of a file's content, read in blocks (a checkpoint's identity in the
    protocol key, a cache file's record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
