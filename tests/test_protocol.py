"""The end-to-end protocol (pdepth.protocol, `pdepth run`) on Fashion-MNIST: outputs,
resuming, what an existing --out may hold. Bad input: tests/test_protocol_errors.py; training:
tests/test_protocol_train.py; streaming depth: tests/test_stream.py; the CLI:
tests/test_cli.py; the report: tests/test_report.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from run_helpers import HAVE_FMNIST, needs_fmnist, real_run

import pdepth
from pdepth.cli import main
from pdepth.pipeline import MARKER
from pdepth.report import FIGURES

# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------

SMALL = ["--subset", "1200", "--epochs", "3", "--k", "10", "--seeds", "2", "--quiet"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return real_run(tmp_path_factory, "run", SMALL)


@needs_fmnist
def test_end_to_end_outputs(small_run):
    import pandas as pd

    out = small_run
    for name in ("results.parquet", "per_model.npz", "data.npz", "config.json", "report.html",
                 "COMPLETE"):
        assert (out / name).is_file(), name
    for fig in FIGURES:  # all but the label-noise figure: this run flips no label
        drawn = (out / "figures" / fig).exists()
        assert drawn == (fig != "label_noise.png"), fig
        assert not drawn or (out / "figures" / fig).stat().st_size > 1000, fig
    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "seed0-half0.npz", "seed0-half1.npz", "seed1-half0.npz", "seed1-half1.npz"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["status"] == "complete"
    assert cfg["config"]["subset"] == 1200 and cfg["config"]["seeds"] == [0, 1]
    assert cfg["resolved"]["probes"] == ["input", "block1", "block2", "block3", "fc", "softmax"]
    assert {"torch", "pdepth", "numpy"} <= set(cfg["versions"])
    num_layers = cfg["resolved"]["num_layers"]

    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 1200
    expected = {"dataset_index", "label", "label_name", "category", "train_depth",
                "held_out_depth", "held_out_accuracy", "train_accuracy", "held_out_agreement",
                "confidence", "margin", "ensemble_entropy", "iteration_learned",
                "early_mode", "early_mode_share"}
    expected |= {f"depth_m{r}" for r in range(4)}
    expected |= {f"knn_{s}_{layer}" for s in ("train", "held_out") for layer in range(num_layers)}
    assert expected <= set(df.columns)
    assert set(df["category"].astype(str)) <= set(pdepth.CATEGORIES)
    # every example: one training-split model and one held-out model per seed
    assert (df["train_count"] == 2).all() and (df["held_out_count"] == 2).all()
    assert df["train_depth"].between(0, num_layers).all()
    assert df["held_out_depth"].between(0, num_layers).all()
    assert df["confidence"].between(0, 1).all() and df["margin"].between(-1, 1).all()
    assert df["iteration_learned"].between(0, 3).all()

    # harder (deeper) held-out examples are classified less accurately
    deep = df["held_out_depth"] >= num_layers / 2
    shallow = df["held_out_depth"] == 0
    assert deep.sum() >= 10 and shallow.sum() >= 10
    assert df.loc[deep, "held_out_accuracy"].mean() < df.loc[shallow, "held_out_accuracy"].mean()

    with np.load(out / "per_model.npz") as z:
        assert z["depth"].shape == (4, 1200)
        assert z["layer_pred"].shape == (4, num_layers, 1200)
        assert z["epoch_pred"].shape == (4, 4, 1200)
        assert z["probs"].shape == (4, 1200, 10)
        assert z["knn_vote_share"].shape == (4, num_layers, 1200, 3)
        assert z["probe_accuracy_epochs"].shape == (4, 4, num_layers)  # init + 3 epochs
        assert (z["probe_accuracy_epochs"][:, :, 0] == z["probe_accuracy_epochs"][:, :1, 0]).all()
        # depth per model equals the rule applied to the stored per-probe predictions
        ref = z["probs"].argmax(2)
        for r in range(4):
            np.testing.assert_array_equal(
                z["depth"][r], pdepth.depth_from_predictions(z["layer_pred"][r], ref[r]))


@needs_fmnist
@pytest.mark.slow
def test_report_redraw_and_resume(small_run, tmp_path, capsys):
    import shutil

    import pandas as pd

    out = tmp_path / "copy"
    shutil.copytree(small_run, out)
    before = pd.read_parquet(out / "results.parquet")
    (out / "figures" / "depth_2d.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "figures" / "depth_2d.png").is_file()

    # an interrupted run: one model missing, no final files -> rerun resumes from the others
    for name in ("COMPLETE", "results.parquet", "report.html"):
        (out / name).unlink()
    (out / "models" / "seed1-half1.npz").unlink()
    mtime = (out / "models" / "seed0-half0.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", *SMALL[:-1], "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming (3 model(s) already done)" in err
    assert (out / "models" / "seed0-half0.npz").stat().st_mtime_ns == mtime
    assert (out / "COMPLETE").exists()
    after = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(before, after)


@needs_fmnist
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: "
                    "torch.cuda.is_available() is False")
def test_pipeline_on_cuda(tmp_path):
    cfg = pdepth.RunConfig(subset=600, epochs=2, k=5, seeds=[0], device="cuda")
    out = pdepth.run(cfg, tmp_path / "out", progress=False)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["status"] == "complete" and cfg_json["resolved"]["device"] == "cuda"
    assert cfg_json["models"][0]["memory"]["cuda_peak_bytes"] > 0


# --------------------------------------------------------------------------------------------
# what an existing --out may hold
# --------------------------------------------------------------------------------------------


@needs_fmnist
def test_cli_refuses_existing_results(small_run, capsys):
    mtime = (small_run / "results.parquet").stat().st_mtime_ns
    assert main(["run", *SMALL, "--out", str(small_run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (small_run / "results.parquet").stat().st_mtime_ns == mtime


def test_cli_refuses_unfinished_run_with_other_settings(tmp_path, capsys):
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"pdepth_run": 1, "protocol_key": "something-else"}))
    assert main(["run", *SMALL, "--out", str(out)]) == 2
    assert "different settings" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# resuming: the data's identity, the settings named, the memory budget
# --------------------------------------------------------------------------------------------


def _image_folder(root, seed):
    """Two classes ``a`` and ``b`` of 8 random 12 x 12 RGB PNGs each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).save(
                root / cls / f"{i}.png")
    return root


@pytest.mark.slow
def test_resume_on_another_image_folder_is_refused(tmp_path, capsys):
    """Issue 23: a resumed run mixed models trained on another --root (same class names)."""
    from run_helpers import one_error_line, tree

    first, second = _image_folder(tmp_path / "one", 1), _image_folder(tmp_path / "two", 2)
    out = tmp_path / "run"
    args = ["run", "--dataset", "imagefolder", "--image-size", "12", "--subset", "all",
            "--epochs", "1", "--k", "3", "--seeds", "2", "--quiet", "--out", str(out)]
    assert main([*args, "--root", str(first)]) == 0
    (out / "COMPLETE").unlink()
    for half in (0, 1):
        (out / "models" / f"seed1-half{half}.npz").unlink()
    before = tree(out)
    capsys.readouterr()
    assert main([*args, "--root", str(second)]) == 2
    err = one_error_line(capsys)
    assert "unfinished pdepth run on other data" in err and f"read from {first}" in err
    assert tree(out) == before
    assert main([*args, "--root", str(first)]) == 0  # its own data: resumed
    assert "run" in capsys.readouterr().out


@needs_fmnist
@pytest.mark.slow
def test_resume_with_a_lower_memory_budget_and_named_settings(tiny_run, tmp_path, capsys):
    """The memory budget is no part of the run's identity (a run that ran out of memory
    resumes with a lower one); a refusal names the settings that differ."""
    from run_helpers import TINY, copy_run, one_error_line

    out = copy_run(tiny_run, tmp_path)
    (out / "COMPLETE").unlink()
    (out / "models" / "seed1-half1.npz").unlink()
    assert main(["run", *TINY, "--k", "4", "--out", str(out)]) == 2
    assert "(--k: 4 here, 3 in the run)" in one_error_line(capsys)
    assert main(["run", *TINY, "--memory-budget", "1", "--out", str(out)]) == 0
    assert (out / "COMPLETE").exists()
    with np.load(tiny_run / "per_model.npz") as a, np.load(out / "per_model.npz") as b:
        assert np.array_equal(a["depth"], b["depth"])


def test_metric_enters_the_protocol_key_only_when_not_euclidean():
    """RunConfig.metric: "euclidean" (the default) leaves the key of earlier runs as it was;
    "cosine" changes it; anything else is one ValueError naming --metric."""
    from pdepth.protocol.config import RunConfig

    base = RunConfig(subset=200)
    assert "metric" not in base.key_settings()
    assert RunConfig(subset=200, metric="euclidean").protocol_key() == base.protocol_key()
    cosine = RunConfig(subset=200, metric="cosine")
    assert cosine.key_settings()["metric"] == "cosine"
    assert cosine.protocol_key() != base.protocol_key()
    with pytest.raises(ValueError, match=r"metric \(--metric\) must be one of .* got 'l2'"):
        RunConfig(metric="l2")
