"""pdepth._atomic: the one atomic-write module (run directories, reports, DepthResult.save)."""

import json
import os

import numpy as np
import pytest

from pdepth import _atomic


def test_writes_replace_and_leave_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    _atomic.write_json(path, {"x": np.int64(3), "y": np.float32(0.5), "z": np.arange(2),
                              "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": 3, "y": 0.5, "z": [0, 1], "p": str(tmp_path)}
    _atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    _atomic.savez(tmp_path / "b.npz", a=np.arange(3))
    with np.load(tmp_path / "b.npz") as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npz"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _atomic.write_with(path, fails)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_permissions_are_those_of_open(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    _atomic.write_bytes(tmp_path / "a", b"")
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("keep_suffix", [False, True])
def test_temporary_names_are_recognised(tmp_path, keep_suffix):
    tmp = _atomic.temp_path(tmp_path / "figure.png", keep_suffix)
    assert tmp.parent == tmp_path
    assert _atomic.TMP_NAME.fullmatch(tmp.name).group(1) == "figure.png"
    assert tmp.suffix == ".png" and tmp.name.startswith(".pdepth.tmp-")


@pytest.mark.parametrize("name", [".draft.tmp-2024.pdf", ".x.tmp-7", ".config.json.tmp-12",
                                  "pdepth.tmp-1.x", ".pdepth.tmp-x.y", ".pdepth.tmp-1."])
def test_a_users_names_are_not_temporary_names(name):
    """Only pdepth's own prefix and pattern (issue 23: --overwrite deleted such files)."""
    assert not _atomic.TMP_NAME.fullmatch(name)


def test_pending_files_all_or_nothing(tmp_path):
    pending = _atomic.PendingFiles()
    for name in ("a.png", "b.html"):
        pending.tmp(tmp_path / name).write_text(name)
    assert not (tmp_path / "a.png").exists()
    pending.replace_all()
    assert (tmp_path / "b.html").read_text() == "b.html"
    dropped = _atomic.PendingFiles()
    dropped.tmp(tmp_path / "c.png").write_text("c")
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.html"]


def test_human_bytes_keeps_three_digits_and_never_rounds_to_zero():
    # Regression: disk messages printed sizes as "0.0 GiB".
    assert _atomic.human_bytes(0) == "0 B" and _atomic.human_bytes(-5) == "0 B"
    assert _atomic.human_bytes(1023) == "1023 B"
    assert _atomic.human_bytes(1024) == "1.00 KiB"
    assert _atomic.human_bytes(200 * 3136 * 4) == "2.39 MiB"
    assert _atomic.human_bytes(12 * 2**20 + 2**19) == "12.5 MiB"
    assert _atomic.human_bytes(3 * 2**30) == "3.00 GiB"
    assert _atomic.human_bytes(700 * 2**40) == "700 TiB"


def test_a_full_disk_names_the_file(tmp_path):
    # Regression: "[Errno 28] No space left on device" named no file.
    import errno

    path = tmp_path / "a.bin"

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=r"No space left on device: '.*a\.bin'") as info:
        _atomic.write_with(path, full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []
