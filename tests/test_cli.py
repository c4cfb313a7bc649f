"""The command line (pdepth.cli): `pdepth run` / `pdepth report` argument errors, one line
on stderr with exit status 2 and nothing half-written, and `python -m pdepth`. Errors that come
from the protocol's rules (what --out may hold, resuming): tests/test_protocol*.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_helpers import needs_fmnist, one_error_line

from pdepth.cli import main


def test_cli_missing_dataset(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--root", str(tmp_path / "nowhere"), "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and err.count("\n") == 1
    assert not out.exists()  # nothing half-written


def test_cli_unknown_arch(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--arch", "alexnet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "alexnet" in err and "cnn" in err and "resnet18" in err and "vgg16" in err


@needs_fmnist
def test_cli_unknown_probe(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--probes", "block1,nope", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "block2" in err
    assert not out.exists()


def test_cli_report_on_empty_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished pdepth run" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pdepth", "run", "--help"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and "--overwrite" in proc.stdout


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "gpu"])
def test_cli_bad_device(device, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--device", device, "--out", str(out), "--quiet"]) == 2
    assert repr(device) in one_error_line(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# pdepth report / improve write into a run folder only under `run --overwrite`'s rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["report", "improve"])
def test_report_and_improve_never_write_through_a_symlinked_folder(tmp_path, capsys, command):
    """Issue 23: `pdepth report` overwrote a user's depth_hist.png in the target of a
    symlinked figures/."""
    from run_helpers import tree, write_synthetic_run

    out = write_synthetic_run(tmp_path / "run")
    mine = tmp_path / "my_figures"
    mine.mkdir()
    (mine / "depth_hist.png").write_text("the user's figure")
    (out / "figures").symlink_to(mine)
    before, theirs = tree(out), tree(mine)
    assert main([command, str(out), *(["--quiet"] if command == "improve" else [])]) == 2
    err = one_error_line(capsys)
    assert "figures (a symbolic link)" in err and f"pdepth {command}" in err
    assert tree(out) == before and tree(mine) == theirs


def test_report_is_refused_while_another_process_writes(tmp_path, capsys):
    import fcntl
    import os

    from run_helpers import tree, write_synthetic_run

    from pdepth.protocol.outdir import LOCK

    out = write_synthetic_run(tmp_path / "run")
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = tree(out)
        assert main(["report", str(out)]) == 2
        assert "is in use by another pdepth process" in one_error_line(capsys)
        assert tree(out) == before
    finally:
        os.close(fd)
    assert main(["report", str(out)]) == 0
    assert not (out / LOCK).exists()
