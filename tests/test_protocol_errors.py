"""`pdepth run` on bad input: what --out may hold and what --overwrite may delete, resuming
from damaged or misnamed model files, missing optional dependencies; each with the CLI's error
contract (one line on stderr, exit 2, nothing half-written). The report on bad input:
tests/test_report.py; the CLI's own errors: tests/test_cli.py."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
from run_helpers import TINY, copy_run, needs_fmnist, one_error_line, tree

from pdepth.cli import main
from pdepth.pipeline import MARKER, OutputExistsError, RunConfig, prepare_output, run

# --------------------------------------------------------------------------------------------
# what --out may hold, what --overwrite deletes
# --------------------------------------------------------------------------------------------


@needs_fmnist
@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_directory_is_refused_and_kept(tmp_path, capsys, overwrite):
    """The issue's reproduction: a project folder with models/, figures/, config.json."""
    proj = tmp_path / "proj"
    (proj / "models").mkdir(parents=True)
    (proj / "figures").mkdir()
    (proj / "models" / "resnet_final.pt").write_text("ckpt")
    (proj / "figures" / "fig1.png").write_text("x")
    (proj / "config.json").write_text("{}")
    before = tree(proj)
    args = ["run", *TINY, "--out", str(proj)] + (["--overwrite"] if overwrite else [])
    assert main(args) == 2
    err = one_error_line(capsys)
    assert "not a pdepth run directory" in err and "config.json" in err
    assert "unfinished" not in err and "pass --overwrite" not in err
    assert tree(proj) == before
    assert sorted(p.name for p in proj.iterdir()) == ["config.json", "figures", "models"]


def test_prepare_output_deletes_only_pdepth_files(tmp_path):
    cfg = RunConfig(subset=200, epochs=1, k=3)
    out = tmp_path / "run"
    assert prepare_output(out, cfg, False) == 0  # a new directory
    assert json.loads((out / MARKER).read_text())["protocol_key"] == cfg.protocol_key()
    ours = ["config.json", "COMPLETE", "results.parquet", "models/seed0-half0.npz",
            "models/seed1-half1.npz", "figures/depth_hist.png", ".pdepth.tmp-123.config.json",
            "figures/.pdepth.tmp-9.training.png", "models/.pdepth.tmp-7.seed0-half1.npz",
            "cache/seed0-half0.pred03.npy", "cache/seed0-half0.pred03.npy.json",
            "cache/.pdepth.tmp-5.seed0-half0.emb01.npy"]
    for rel in ours:
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_text("pdepth")
    with pytest.raises(OutputExistsError, match="finished pdepth run; pass --overwrite"):
        prepare_output(out, cfg, False)
    mine = ["notes.txt", "models/best.pt", "figures/seed0-half0.npz"]
    for rel in mine:
        (out / rel).write_text("mine")
    before = tree(out)
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="did not write: figures/seed0-half0.npz, "
                                                    "models/best.pt, notes.txt; move them"):
            prepare_output(out, cfg, overwrite)
    assert tree(out) == before
    for rel in mine:
        (out / rel).unlink()
    assert prepare_output(out, cfg, True) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [MARKER, "models"]


@pytest.mark.parametrize("name", [".draft.tmp-2024.pdf", "models/.x.tmp-7",
                                  "figures/.pdepth.tmp-3.notes.png", ".config.json.tmp-12"])
def test_overwrite_keeps_a_users_file_with_a_temporary_looking_name(tmp_path, name):
    """Issue 23: --overwrite deleted such files; only pdepth's own temporary names (its
    prefix, one of its file names) are pdepth's."""
    cfg = RunConfig(subset=200, epochs=1, k=3)
    out = tmp_path / "run"
    prepare_output(out, cfg, False)
    (out / "figures").mkdir()
    (out / "COMPLETE").write_text("x")
    (out / name).write_text("mine")
    before = tree(out)
    with pytest.raises(OutputExistsError, match=rf"did not write: {re.escape(name)}; move"):
        prepare_output(out, cfg, True)
    assert tree(out) == before


def test_prepare_output_other_settings_and_odd_paths(tmp_path):
    cfg = RunConfig(subset=200, epochs=1, k=3)
    out = tmp_path / "run"
    out.mkdir()
    assert prepare_output(out, cfg, False) == 0  # an existing empty directory is fine
    (out / "models" / "seed0-half0.npz").write_text("x")
    assert prepare_output(out, cfg, False) == 1  # same settings: resumed
    other = RunConfig(subset=200, epochs=1, k=4)
    with pytest.raises(OutputExistsError, match="unfinished pdepth run with different"):
        prepare_output(out, other, False)
    assert prepare_output(out, other, True) == 0
    assert json.loads((out / MARKER).read_text())["protocol_key"] == other.protocol_key()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        prepare_output(tmp_path / "file", cfg, True)


@needs_fmnist
@pytest.mark.slow
def test_overwrite_of_its_own_run_repeats(tiny_run, tmp_path):
    """`make demo` reruns `pdepth run --overwrite` into the same directory."""
    out = copy_run(tiny_run, tmp_path)
    with np.load(tiny_run / "per_model.npz") as z:
        before = {k: z[k] for k in z.files}
    assert main(["run", *TINY, "--out", str(out), "--overwrite"]) == 0
    with np.load(out / "per_model.npz") as z:
        for name, value in before.items():
            assert np.array_equal(z[name], value), name  # same seeds, same results
    assert (out / "COMPLETE").exists()


@needs_fmnist
@pytest.mark.parametrize("bad", [["--lr", "-1"], "weight_decay", "untrainable"])
def test_overwrite_validates_everything_before_deleting(tiny_run, tmp_path, capsys, bad,
                                                        monkeypatch):
    """Issue 23: --overwrite deleted a finished run's results, then training refused the
    settings. The settings are checked, and a training step is tried on a copy of the network,
    before the folder is touched: anything training refuses fails there ("untrainable": a
    network whose training step raises, which no settings check can see)."""
    out = copy_run(tiny_run, tmp_path)
    before = tree(out)
    if bad == "weight_decay":  # no flag: through the Python API
        with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
            run(RunConfig(subset=200, epochs=1, k=3, seeds=[0, 1], weight_decay=-1.0), out,
                overwrite=True, progress=False)
    elif bad == "untrainable":
        def untrainable(*args, **kwargs):
            raise RuntimeError("this network cannot train")

        monkeypatch.setattr("pdepth.protocol.runner.train_model", untrainable)
        with pytest.raises(ValueError, match="training with these settings fails.*cannot train"):
            run(RunConfig(subset=200, epochs=1, k=3, seeds=[0, 1]), out, overwrite=True,
                progress=False)
    else:
        assert main(["run", *TINY, *bad, "--overwrite", "--out", str(out)]) == 2
        assert "-1" in one_error_line(capsys)
    assert tree(out) == before


@needs_fmnist
def test_run_is_refused_while_another_process_writes_into_out(tiny_run, tmp_path, capsys):
    """Issue 23: two `pdepth run --overwrite` on one folder both ran, mixing their files."""
    import fcntl
    import os

    from pdepth.protocol.outdir import LOCK

    out = copy_run(tiny_run, tmp_path)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = tree(out)
        assert main(["run", *TINY, "--k", "4", "--overwrite", "--out", str(out)]) == 2
        err = one_error_line(capsys)
        assert f"--out {out} is in use by another pdepth process" in err
        assert tree(out) == before
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# settings checked before anything is read or written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, message", [
    ({"batch_size": -1}, r"batch_size \(--batch-size\) must be an integer >= 1, got -1"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be an integer >= 1, got 0"),
    ({"k": 2.5}, r"k \(--k\) must be an integer >= 1, got 2.5"),
    ({"lr": float("nan")}, r"lr \(--lr\) must be a finite number > 0, got nan"),
    ({"weight_decay": -1e-4}, r"weight_decay must be a finite number >= 0, got -0.0001"),
    ({"seeds": [0, 2**70]}, r"seeds \(--seeds\) must be an integer in 0..4294967295"),
    ({"seeds": [-1]}, r"seeds \(--seeds\) must be an integer in 0..4294967295, got -1"),
    ({"subset_seed": -1}, r"subset_seed must be an integer in 0..4294967295, got -1"),
    ({"label_noise_seed": 2**40}, r"label_noise_seed must be an integer in 0..4294967295"),
    ({"memory_budget": float("inf")}, r"memory_budget \(--memory-budget\) must be a number "
                                      r"of bytes in 1048576\.\."),
    ({"memory_budget": 2**19}, r"at least 1; a smaller budget .* got 524288 bytes"),
    ({"subset": 0}, r"subset \(--subset\) must be an integer >= 4 \(or None: every"),
    ({"max_dim": 0}, r"max_dim \(--max-dim\) must be an integer >= 1 \(or None: no pooling"),
    ({"image_size": 4}, r"image_size \(--image-size\) must be an integer >= 8, got 4"),
    ({"workers": True}, r"workers \(--workers\) must be an integer >= 0, got True"),
    ({"thresholds": {"easy_depth": float("nan")}}, r"thresholds\['easy_depth'\] must be a "
                                                   r"fraction in \[0, 1\], got nan"),
    ({"probes": []}, r"probes \(--probes\) names no module"),
])
def test_every_numeric_setting_is_checked_by_run_config(setting, message):
    """The Python API gets the checks the CLI's flags get: RunConfig refuses the value."""
    with pytest.raises(ValueError, match=message):
        RunConfig(**setting)


def test_run_config_keeps_valid_settings_as_given():
    cfg = RunConfig(memory_budget=2**20, subset=None, max_dim=None, seeds=[0, 2**32 - 1],
                    batch_size=64.0)
    assert cfg.memory_budget == 2**20 and cfg.seeds == [0, 2**32 - 1]
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
    assert cfg.protocol_key() == RunConfig(memory_budget=2**20, subset=None, max_dim=None,
                                           seeds=[0, 2**32 - 1], batch_size=64).protocol_key()


@pytest.mark.parametrize("where", ["data/run", "data", "link/run", "data/cat/run"])
def test_an_out_inside_the_data_root_is_refused(where, tmp_path, capsys):
    """Its report's PNGs would be a new class of the next run's image folder."""
    from data_helpers import write_image_folder

    from pdepth import run

    write_image_folder(tmp_path / "data", ("cat", "dog"))
    (tmp_path / "link").symlink_to(tmp_path / "data")
    before = tree(tmp_path / "data")
    args = ["run", "--dataset", "imagefolder", "--root", str(tmp_path / "data"), "--epochs",
            "1", "--seeds", "1", "--k", "3", "--quiet", "--out", str(tmp_path / where)]
    assert main(args) == 2
    assert "inside the data's root folder" in one_error_line(capsys)
    assert tree(tmp_path / "data") == before
    with pytest.raises(ValueError, match="inside the data's root folder"):
        run(RunConfig(dataset="imagefolder", root=str(tmp_path / "data")), tmp_path / where)
    with pytest.raises(ValueError, match="--out '' names no folder"):
        run(RunConfig(dataset="imagefolder", root=str(tmp_path / "data")), "")


# --------------------------------------------------------------------------------------------
# resuming from model files
# --------------------------------------------------------------------------------------------


@needs_fmnist
def test_resume_checks_what_a_model_file_holds(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    (out / "COMPLETE").unlink()
    shutil.copy(out / "models" / "seed0-half0.npz", out / "models" / "seed1-half1.npz")
    assert main(["run", *TINY, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "seed1-half1.npz holds the model of seed 0 half 0" in err
    assert "delete it to recompute that model" in err
    assert not (out / "COMPLETE").exists()


@needs_fmnist
@pytest.mark.slow
def test_resume_names_a_truncated_model_file(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    (out / "COMPLETE").unlink()
    path = out / "models" / "seed0-half1.npz"
    path.write_bytes(path.read_bytes()[:1000])
    assert main(["run", *TINY, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "seed0-half1.npz cannot be read" in err and "delete it" in err
    path.unlink()  # as the message says
    assert main(["run", *TINY, "--out", str(out)]) == 0
    assert (out / "COMPLETE").exists()


# --------------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, quiet", [("tqdm", False), ("pandas", True),
                                           ("matplotlib", True)])
def test_missing_optional_dependency(module, quiet, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    out = tmp_path / "out"
    args = ["run", "--subset", "200", "--epochs", "1", "--k", "3", "--out", str(out)]
    assert main(args + (["--quiet"] if quiet else [])) == 2
    err = one_error_line(capsys)
    assert module in err and 'pip install "pdepth[run]"' in err
    assert not out.exists()
