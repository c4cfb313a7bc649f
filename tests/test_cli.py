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


@needs_fmnist
def test_cli_probes_out_of_forward_order(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--probes", "block3,block1", "--out", str(out), "--quiet"]) == 2
    assert "list them as ['block1', 'block3']" in one_error_line(capsys)
    assert not out.exists()


def test_cli_report_on_empty_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished pdepth run" in capsys.readouterr().err


@pytest.mark.slow
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


@pytest.mark.slow
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


# every numeric flag: one line naming the flag and the value, exit 2, nothing written (the
# settings of a tiny run around it, so that a flag let through shows as a finished run)
SMALL = ["--subset", "200", "--epochs", "1", "--k", "3", "--seeds", "1", "--quiet"]


class _exit_code:
    """``main()``'s return value, or the code of the SystemExit argparse raises."""

    value = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is SystemExit:
            self.value = exc.code
            return True
        return False


@pytest.mark.parametrize("flag, value, shown", [
    ("--batch-size", "-1", "-1"), ("--batch-size", "0", "0"), ("--lr", "nan", "nan"),
    ("--lr", "0", "0"), ("--lr", "inf", "inf"), ("--k", "0", "0"),
    ("--k", "99999999999999999999", "99999999999999999999"),
    ("--seeds", "99999999999999999999,1", "99999999999999999999"),
    ("--seeds", "99999999999999999999", "99999999999999999999"),
    ("--memory-budget", "inf", "inf"), ("--memory-budget", "nan", "nan"),
    ("--memory-budget", "0", "0 bytes"), ("--memory-budget", "-5", "-5 MiB"),
    ("--memory-budget", "0.00001", "10 bytes"), ("--subset", "0", "0"),
    ("--max-dim", "-5", "-5"), ("--epochs", "0", "0"), ("--workers", "-1", "-1"),
    ("--image-size", "4", "4"), ("--label-noise", "nan", "nan"), ("--probes", ",", "[]"),
])
def test_bad_numbers_are_refused_before_anything_is_written(flag, value, shown, tmp_path,
                                                            capsys):
    out = tmp_path / "out"
    with _exit_code() as code:
        code.value = main(["run", *SMALL, f"{flag}={value}", "--out", str(out)])
    assert code.value == 2
    err = one_error_line(capsys)
    assert flag in err and shown in err, err
    assert not out.exists()


def test_the_minimum_memory_budget_is_in_the_help(capsys):
    from pdepth.protocol.config import MIN_MEMORY_BUDGET

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"at least {MIN_MEMORY_BUDGET // 2**20}" in help_text


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" would be the current directory
    assert main(["run", *SMALL, "--out", ""]) == 2
    assert "--out ''" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra, shown", [
    (["--seeds", "99999999999999999999,1"], "--seeds"), (["--seeds", "0"], "--seeds"),
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"),
])
def test_improve_refuses_bad_epochs_and_seeds_before_any_work(extra, shown, tmp_path,
                                                              capsys, monkeypatch):
    import pdepth.improve

    monkeypatch.setattr(pdepth.improve, "improve", lambda *a, **k: pytest.fail("ran"))
    with _exit_code() as code:
        code.value = main(["improve", str(tmp_path), *extra])
    assert code.value == 2 and shown in one_error_line(capsys)


def test_run_token_is_checked_and_enters_the_key_only_when_given():
    from pdepth.protocol import RunConfig

    base = RunConfig(subset=200)
    assert base.token is None and "token" not in base.key_settings()  # old runs keep their key
    assert RunConfig(subset=200, token="mean").protocol_key() != base.protocol_key()
    with pytest.raises(ValueError, match=r"token \(--token\) must be one of cls, mean, all, "
                                         "got 'first'"):
        RunConfig(token="first")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--token", "first"])
    assert exc.value.code == 2


@needs_fmnist
def test_cli_token_cls_on_a_network_without_a_class_token(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--token", "cls", "--subset", "200", "--out", str(out), "--quiet"]) == 2
    assert "token 'cls': SmallCNN (cnn) has no class token" in one_error_line(capsys)


@needs_fmnist
@pytest.mark.slow
def test_run_metric_cosine_equals_prediction_depth_over_hand_normalised_embeddings(tmp_path):
    """`pdepth run --metric cosine` (embeddings through the disk store, 1 MiB budget): each
    model's probe predictions and depths are prediction_depth(metric="euclidean") over the
    trained model's embeddings normalised by hand; config.json records the metric."""
    import json

    import numpy as np
    import torch

    import pdepth
    from pdepth.data import load_subset, normalize_images
    from pdepth.models import build_model
    from pdepth.protocol.config import split_halves

    out = tmp_path / "run"
    assert main(["run", "--subset", "200", "--epochs", "1", "--k", "3", "--seeds", "1",
                 "--quiet", "--memory-budget", "1", "--keep-cache", "--metric", "cosine",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["metric"] == "cosine"
    images, labels, _ = load_subset(subset=200, seed=0)
    x = normalize_images(images)
    with np.load(out / "per_model.npz") as z:
        per_model = {k: z[k] for k in ("layer_pred", "depth", "halves")}
    for i, half in enumerate(per_model["halves"]):
        train, held = split_halves(200, 0)[half], split_halves(200, 0)[1 - half]
        rows = torch.as_tensor(np.concatenate([train, held]))
        prefix = out / "cache" / f"seed0-half{half}"
        model = build_model("cnn")
        model.load_state_dict(torch.load(f"{prefix}.train.pt", weights_only=True)["state"])
        emb = pdepth.extract(model, x[rows], "cnn", batch_size=1000, max_dim=4096)
        unit = [pdepth.normalize_rows(t) for t in emb.layers.values()]
        # the store holds the normalised rows
        assert np.array_equal(np.load(f"{prefix}.emb01.npy"), unit[1].numpy())
        n = len(train)
        self_index = torch.cat([torch.arange(n), torch.full((len(held),), -1)])
        want = pdepth.prediction_depth([u[:n] for u in unit], labels[rows[:n]], unit,
                                       network_pred=emb.logits, k=3, self_index=self_index,
                                       num_classes=10)
        order = np.argsort(rows.numpy())
        assert np.array_equal(per_model["layer_pred"][i], want.layer_pred.numpy()[:, order])
        assert np.array_equal(per_model["depth"][i], want.depth.numpy()[order])


def test_run_bad_metric_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--metric", "dot", "--out", str(out)])
    assert exit_.value.code == 2
    err = one_error_line(capsys)
    assert "--metric" in err and "'dot'" in err


def test_score_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score", "--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--model-arg", "--checkpoint", "--dataset", "--image-column",
                 "--label-column", "--subset", "--test-subset", "--probes", "--token",
                 "--metric", "--k", "--reference", "--memory-budget", "--device",
                 "--batch-size", "--out", "--overwrite", "--quiet"):
        assert flag in help_text, flag


@pytest.mark.parametrize("args, shown", [
    ([], "--model"),  # required
    (["--model", "timm:resnet18", "--reference", "consensus"], "consensus"),
])
def test_score_argument_errors_are_one_line(args, shown, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score", *args])
    assert exc.value.code == 2
    assert shown in one_error_line(capsys)


@pytest.mark.parametrize("args, shown", [
    (["--k", "0"], "k (--k) must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "batch_size (--batch-size)"),
    (["--memory-budget", "nan"], "memory_budget (--memory-budget)"),
    (["--model-arg", "oops"], "--model-arg takes KEY=VALUE"),
    (["--dataset", "hf:/nowhere"], "hf:/nowhere: no such folder"),
])
def test_score_bad_settings_write_nothing(args, shown, tmp_path, capsys):
    pytest.importorskip("pandas")
    out = tmp_path / "out"
    code = main(["score", "--model", "usernet_absent:build", *args, "--out", str(out)])
    assert code == 2 and shown in one_error_line(capsys)
    assert not out.exists()


def test_run_takes_model_args_only_with_a_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--model-arg", "width=8", "--out", str(out), "--quiet"]) == 2
    assert "--model-arg ['width'] is for --model, not --arch" in one_error_line(capsys)
    assert not out.exists()
