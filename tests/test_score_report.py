"""The report of a `pdepth score` folder (pdepth.score_report): drawn by the score before
COMPLETE, drawn again by `pdepth report DIR`, every value escaped, all or nothing, replaced by
--overwrite. The score itself: tests/test_score.py; the run's report: tests/test_report.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_helpers import needs_fmnist, one_error_line

from pdepth.cli import main
from pdepth.figures import SCORE_FIGURES

pytestmark = needs_fmnist


def _mlp(num_classes, in_channels, image_size):
    """The model scored (imported by name as test_score_report:_mlp)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(
        in_channels * image_size ** 2, 8), torch.nn.ReLU(), torch.nn.Linear(8, num_classes))


@pytest.fixture
def score_cmd(monkeypatch):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return ["score", "--model", "test_score_report:_mlp", "--dataset", "fashion-mnist",
            "--subset", "30", "--test-subset", "10", "--k", "3", "--probes", "1,3",
            "--quiet", "--out"]


def _files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".pdepth-run.")}


def test_score_writes_its_report(tmp_path, score_cmd):
    out = tmp_path / "out"
    assert main([*score_cmd, str(out)]) == 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(SCORE_FIGURES)
    page = (out / "report.html").read_text()
    for name in SCORE_FIGURES:
        assert f'src="figures/{name}"' in page
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert "k-NN acc. test" in page and "images" in page  # why no examples figure


def test_score_report_escapes_and_redraws(tmp_path, score_cmd, capsys):
    import pandas as pd

    out = tmp_path / "out"
    assert main([*score_cmd, str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["settings"]["model"] = "<script>model</script>"
    cfg["resolved"]["model"]["spec"] = "<script>spec</script>"
    cfg["resolved"]["class_names"][0] = "<script>class</script>"
    cfg["resolved"]["probes"][1] = "<img src=x onerror=alert(1)>"
    cfg["resolved"]["probe_dims"][0] = "<b>dim</b>"
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b>dim" not in page
    for text in ("&lt;script&gt;spec", "&lt;script&gt;model", "&lt;script&gt;class",
                 "&lt;img src=x", "&lt;b&gt;dim"):
        assert text in page

    # a value no pdepth score writes: one line, exit 2, nothing written
    df = pd.read_parquet(out / "results.parquet")
    df["depth"] = "<script>"
    df.to_parquet(out / "results.parquet")
    before = _files(out)
    assert main(["report", str(out)]) == 2
    assert "cannot draw" in one_error_line(capsys)
    assert _files(out) == before


def test_score_folder_with_report_overwrite(tmp_path, score_cmd, capsys):
    out = tmp_path / "out"
    assert main([*score_cmd, str(out)]) == 0
    capsys.readouterr()
    assert main([*score_cmd, str(out)]) == 2  # finished: only --overwrite replaces it
    assert "--overwrite" in one_error_line(capsys)
    (out / "figures" / "depth_hist.png").write_bytes(b"old")
    assert main([*score_cmd, str(out), "--overwrite"]) == 0
    assert (out / "figures" / "depth_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.html").exists() and (out / "COMPLETE").exists()
