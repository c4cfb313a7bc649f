"""The run folder's rules (pdepth.protocol.outdir; docs/protocol.md, "The run folder's rules"):
its lock, the data identity and settings a resume checks, stale temporary files, and the
check of every command that writes into a run folder (open_for_writing). No training here:
the end-to-end cases are in tests/test_protocol*.py, tests/test_cache.py and tests/test_cli.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import tree

from pdepth.protocol import RunConfig
from pdepth.protocol.errors import OutputExistsError
from pdepth.protocol.outdir import (
    LOCK,
    MARKER,
    data_identity,
    folder_lock,
    open_for_writing,
    prepare_output,
)

CFG = RunConfig(subset=200, epochs=1, k=3)
DATA = "a" * 64


def _unfinished(tmp_path, config=CFG, data=DATA):
    """An unfinished run folder (marker, models/ with one model file) of ``config``."""
    out = tmp_path / "run"
    prepare_output(out, config, False, data_sha256=data)
    (out / "models" / "seed0-half0.npz").write_text("a model")
    return out


# --------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------


def _hold(path):
    """The lock of ``path`` held the way another process holds it (a descriptor of its own:
    flock belongs to the open file description)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    return fd


def test_a_second_writer_is_refused_at_once(tmp_path):
    out = _unfinished(tmp_path)
    fd = _hold(out / LOCK)
    try:
        before = tree(out)
        with pytest.raises(OutputExistsError, match=rf"--out {out} is in use by another pdepth "
                                                    r"process \(process 4242\)"):
            prepare_output(out, CFG, True, data_sha256=DATA)
        (out / "COMPLETE").write_text("x")
        with pytest.raises(OutputExistsError, match="in use by another pdepth process"):
            with open_for_writing(out, "pdepth report"):
                pytest.fail("entered")
        (out / "COMPLETE").unlink()
        assert tree(out) == before  # nothing deleted, nothing written
    finally:
        os.close(fd)
    assert prepare_output(out, CFG, False, data_sha256=DATA) == 1  # released: resumed
    assert not (out / LOCK).exists()  # removed by its holder on release


def test_a_killed_holder_leaves_no_lock(tmp_path):
    """kill -9 of the holder: the kernel drops its flock; the file it leaves blocks
    nothing."""
    out = _unfinished(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'%d' % os.getpid())\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n", str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(OutputExistsError, match=f"process {holder.pid}"):
            prepare_output(out, CFG, False, data_sha256=DATA)
    finally:
        holder.kill()  # SIGKILL
        holder.wait()
    assert (out / LOCK).exists()
    assert prepare_output(out, CFG, False, data_sha256=DATA) == 1


def test_the_lock_nests_in_one_process_and_counts_as_pdepths(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("123\n")  # left by a killed run: no run yet, an empty folder
    with folder_lock(out):
        assert prepare_output(out, CFG, False) == 0  # takes the lock it holds already
        assert (out / LOCK).exists()
    assert not (out / LOCK).exists()
    (out / LOCK).write_text("123\n")
    (out / "COMPLETE").write_text("x")
    assert prepare_output(out, CFG, True) == 0  # the lock file is no foreign file


# --------------------------------------------------------------------------------------------
# what a resume checks: settings (named), data, the memory budget being no setting
# --------------------------------------------------------------------------------------------


def test_the_refusal_names_the_settings_that_differ(tmp_path):
    out = _unfinished(tmp_path)
    other = RunConfig(subset=200, epochs=2, k=9)
    with pytest.raises(OutputExistsError) as exc:
        prepare_output(out, other, False, data_sha256=DATA)
    msg = str(exc.value)
    assert "different settings (--epochs: 2 here, 1 in the run; --k: 9 here, 3 in the run)" \
        in msg and "\n" not in msg
    marker = json.loads((out / MARKER).read_text())
    marker.pop("settings")  # a marker of an earlier pdepth
    (out / MARKER).write_text(json.dumps(marker))
    with pytest.raises(OutputExistsError, match="from an earlier pdepth, does not say which"):
        prepare_output(out, other, False, data_sha256=DATA)


def test_memory_budget_is_no_part_of_the_runs_identity(tmp_path):
    """A run that ran out of memory resumes with a lower --memory-budget; the marker of an
    earlier version (whose key counted the budget) still resumes with the same budget."""
    out = _unfinished(tmp_path)
    low = RunConfig(subset=200, epochs=1, k=3, memory_budget=2**20)
    assert low.protocol_key() == CFG.protocol_key()
    assert prepare_output(out, low, False, data_sha256=DATA) == 1
    legacy = CFG.accepted_keys()[1]
    assert legacy != CFG.protocol_key()
    (out / MARKER).write_text(json.dumps({"pdepth_run": 1, "protocol_key": legacy}))
    assert prepare_output(out, CFG, False) == 1


def test_a_resume_on_other_data_is_refused(tmp_path):
    out = _unfinished(tmp_path)
    before = tree(out)
    with pytest.raises(OutputExistsError, match=r"unfinished pdepth run on other data: the "
                                                r"images and labels read here \(sha256 bbbb"):
        prepare_output(out, CFG, False, data_sha256="b" * 64)
    assert tree(out) == before
    assert prepare_output(out, CFG, True, data_sha256="b" * 64) == 0  # --overwrite: replaced
    assert json.loads((out / MARKER).read_text())["data_sha256"] == "b" * 64


def test_a_marker_without_the_data_is_checked_against_data_npz(tmp_path):
    """A run of an earlier pdepth: its data.npz (the images and labels it read) decides."""
    out = _unfinished(tmp_path)
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    labels = np.array([0, 1])
    np.savez(out / "data.npz", images=images, labels=labels + 1, original_labels=labels)
    (out / MARKER).write_text(json.dumps({"pdepth_run": 1, "protocol_key": CFG.protocol_key()}))
    same = data_identity(images, labels)
    assert prepare_output(out, CFG, False, data_sha256=same) == 1
    (out / MARKER).write_text(json.dumps({"pdepth_run": 1, "protocol_key": CFG.protocol_key()}))
    with pytest.raises(OutputExistsError, match="on other data"):
        prepare_output(out, CFG, False, data_sha256=data_identity(images[::-1], labels))
    (out / "data.npz").unlink()  # cannot tell, and a model is there: refused
    with pytest.raises(OutputExistsError, match="whose data cannot be told"):
        prepare_output(out, CFG, False, data_sha256=same)


# --------------------------------------------------------------------------------------------
# stale temporary files
# --------------------------------------------------------------------------------------------


def test_a_resume_removes_stale_temporaries(tmp_path):
    out = _unfinished(tmp_path)
    (out / "cache").mkdir()
    stale = [".pdepth.tmp-99.config.json", "models/.pdepth.tmp-7.seed0-half1.npz",
             "cache/.pdepth.tmp-5.seed0-half0.emb03.npy",
             "cache/.pdepth.tmp-5.seed0-half0.emb03.npy.json"]
    for rel in stale:
        (out / rel).write_text("half-written")
    lines = []
    assert prepare_output(out, CFG, False, data_sha256=DATA, log=lines.append) == 1
    assert not [rel for rel in stale if (out / rel).exists()]
    assert (out / "models" / "seed0-half0.npz").exists()
    assert "removed 4 temporary file(s)" in lines[0]


# --------------------------------------------------------------------------------------------
# open_for_writing: pdepth report / improve
# --------------------------------------------------------------------------------------------


def _finished(tmp_path):
    out = _unfinished(tmp_path)
    (out / "figures").mkdir()
    (out / "COMPLETE").write_text("x")
    return out


def test_open_for_writing_refuses_a_symlinked_folder(tmp_path):
    out = _finished(tmp_path)
    (out / "figures").rmdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (out / "figures").symlink_to(target)
    with pytest.raises(OutputExistsError, match=r"figures \(a symbolic link\); pdepth report "
                                                "writes only into a run folder"):
        with open_for_writing(out, "pdepth report"):
            pytest.fail("entered")


def test_open_for_writing_refuses_foreign_files_and_folders(tmp_path):
    out = _finished(tmp_path)
    (out / "figures" / "mine.png").write_text("x")
    with pytest.raises(OutputExistsError, match="figures/mine.png"):
        with open_for_writing(out, "pdepth improve"):
            pytest.fail("entered")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(OutputExistsError, match="is not a pdepth run directory"):
        with open_for_writing(plain, "pdepth report"):
            pytest.fail("entered")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        with open_for_writing(tmp_path / "missing", "pdepth report"):
            pytest.fail("entered")


def test_open_for_writing_holds_the_lock(tmp_path):
    out = _finished(tmp_path)
    (out / MARKER).unlink()  # a finished run of a version before the marker: COMPLETE
    with open_for_writing(out, "pdepth report") as folder:
        assert folder == out and (out / LOCK).exists()
        fd = os.open(out / LOCK, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not (out / LOCK).exists()
