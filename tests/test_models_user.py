"""The user's own network and weights: ``--model module:factory`` (a module this test writes
and puts on sys.path), ``--checkpoint`` (scored without training; a checkpoint of another
architecture or one that needs pickle is refused with a clear error), and a user ``Dataset``
through the Python API."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from data_helpers import write_mnist
from run_helpers import one_error_line

import pdepth
from pdepth.cli import main
from pdepth.data import DATASETS, normalize_images

pytest.importorskip("torchvision")

NET = textwrap.dedent('''
    import torch
    from torch import nn

    CALLS = []


    class Net(nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


    def build(num_classes, in_channels):
        CALLS.append({"num_classes": num_classes, "in_channels": in_channels})
        return Net(num_classes, in_channels)


    def timm_style(num_classes=1000, in_chans=3, img_size=224, width=4):
        # timm's / torchvision's keyword names, and a builder argument of its own
        CALLS.append({"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size,
                      "width": width})
        return Net(num_classes, in_chans)


    class Optimizer:  # a Python object: torch.load(weights_only=True) refuses it
        lr = 0.1
''')


@pytest.fixture
def net(tmp_path, monkeypatch):
    """The module ``usernet`` (written to tmp_path, on sys.path, forgotten afterwards)."""
    (tmp_path / "usernet.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usernet", raising=False)
    import usernet

    yield usernet
    sys.modules.pop("usernet", None)


@pytest.fixture
def mnist(tmp_path):
    """A tiny MNIST root (24 training images) in torchvision's layout."""
    return tmp_path / "data", write_mnist(tmp_path / "data")["train"]


def _run(root, out, *extra) -> int:
    return main(["run", "--dataset", "mnist", "--root", str(root), "--k", "3", "--quiet",
                 "--out", str(out), *extra])


def _strict_json(path):
    """A JSON file, refusing NaN / Infinity (not JSON)."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))


@pytest.mark.slow
def test_a_model_factory_trains_and_is_probed_by_name(net, mnist, tmp_path):
    root, _ = mnist
    out = tmp_path / "run"
    assert _run(root, out, "--model", "usernet:build", "--probes", "act,pool", "--epochs", "1",
                "--seeds", "1") == 0
    # called with the keywords its signature names (not image_size), once per model + once
    # to find the probes
    assert net.CALLS == [{"num_classes": 10, "in_channels": 1}] * 3
    cfg = _strict_json(out / "config.json")
    assert cfg["config"]["model"] == "usernet:build" and cfg["config"]["arch"] is None
    assert cfg["resolved"]["probes"] == ["input", "act", "pool", "softmax"]
    with np.load(out / "per_model.npz") as pm:
        assert pm["depth"].shape == (2, 24) and pm["layer_pred"].shape == (2, 4, 24)


@pytest.mark.slow
def test_a_timm_style_factory_gets_its_keyword_names_and_model_args(net, mnist, tmp_path,
                                                                   capsys):
    # --model module:factory for a builder taking in_chans / img_size (timm's names) instead
    # of in_channels / image_size; --model-arg passes its other arguments
    root, _ = mnist
    out = tmp_path / "run"
    assert _run(root, out, "--model", "usernet:timm_style", "--model-arg", "width=8",
                "--probes", "act,pool", "--epochs", "1", "--seeds", "1") == 0
    assert net.CALLS[0] == {"num_classes": 10, "in_chans": 1, "img_size": 28, "width": 8}
    assert _strict_json(out / "config.json")["config"]["model_args"] == {"width": 8}
    assert _run(root, tmp_path / "bad", "--model", "usernet:timm_style", "--model-arg",
                "depth=3") == 2
    assert "rejects --model-arg depth=3" in one_error_line(capsys)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_checkpoint_is_scored_without_training(net, mnist, tmp_path):
    root, (images, labels) = mnist
    torch.manual_seed(3)
    model = net.build(10, 1).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    out = tmp_path / "run"
    assert _run(root, out, "--model", "usernet:build", "--checkpoint",
                str(tmp_path / "ck.pt")) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["seed0-half0.npz"]
    with np.load(out / "per_model.npz") as pm:
        arrays = dict(pm)
    assert arrays["in_train"].all() and arrays["depth"].shape == (1, 24)
    assert arrays["epoch_pred"].shape == (1, 0, 24) and arrays["loss"].shape == (1, 0)
    # the checkpoint's own outputs: nothing was trained
    info = DATASETS["mnist"]
    with torch.no_grad():
        probs = torch.softmax(model(normalize_images(torch.from_numpy(images), info.mean,
                                                     info.std)), 1)
    np.testing.assert_allclose(arrays["probs"][0], probs.numpy(), rtol=1e-5, atol=1e-6)
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    assert df["train_depth"].notna().all() and df["held_out_depth"].isna().all()
    assert df["iteration_learned"].isna().all() and df["category"].isna().all()
    assert not df["label_error"].any()
    cfg = _strict_json(out / "config.json")
    assert cfg["config"]["epochs"] == 0 and cfg["config"]["seeds"] == [0]
    assert cfg["resolved"]["trained"] is False and cfg["summary"]["mean_held_out_depth"] is None
    assert cfg["models"][0]["final_held_out_accuracy"] is None
    summary = _strict_json(out / "summary.json")
    assert summary["claims"]["depth_vs_accuracy"]["value"] is None
    assert "not trained here" in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_names_the_keys(net, mnist, tmp_path, capsys):
    root, _ = mnist
    torch.save(pdepth.models.build_model("cnn").state_dict(), tmp_path / "cnn.pt")
    out = tmp_path / "run"
    assert _run(root, out, "--model", "usernet:build", "--checkpoint",
                str(tmp_path / "cnn.pt")) == 2
    err = one_error_line(capsys)
    assert "does not fit Net" in err and "missing keys conv.weight" in err
    assert "unexpected keys block1.0.weight" in err
    assert not out.exists()  # refused before anything was written
    # the same weights do fit their own architecture
    assert _run(root, out, "--arch", "cnn", "--checkpoint", str(tmp_path / "cnn.pt")) == 0


@pytest.mark.slow
def test_a_checkpoint_that_needs_pickle_is_refused(net, mnist, tmp_path, capsys):
    root, _ = mnist
    torch.save({"state_dict": net.build(10, 1).state_dict(), "optimizer": net.Optimizer()},
               tmp_path / "pickled.pt")
    out = tmp_path / "run"
    assert _run(root, out, "--model", "usernet:build", "--checkpoint",
                str(tmp_path / "pickled.pt")) == 2
    err = one_error_line(capsys)
    assert "is refused" in err and "needs pickle" in err and "usernet.Optimizer" in err
    assert not out.exists()
    # the same state dict under "state_dict", without the Python object, loads
    torch.save({"state_dict": net.build(10, 1).state_dict(), "epoch": 3}, tmp_path / "ok.pt")
    assert _run(root, out, "--model", "usernet:build", "--checkpoint",
                str(tmp_path / "ok.pt")) == 0


@pytest.mark.parametrize("extra, message", [
    (["--model", "usernet"], "--model takes module:factory"),
    (["--model", "nosuchmodule:build"], "cannot import 'nosuchmodule'"),
    (["--model", "usernet:nothing"], "has no attribute 'nothing'"),
    (["--model", "usernet:build", "--arch", "cnn"], "exclude each other"),
    (["--checkpoint", "missing.pt"], "'missing.pt' cannot be read"),
])
def test_bad_model_settings_name_the_flag_and_value(net, mnist, tmp_path, capsys, extra,
                                                    message):
    root, _ = mnist
    assert _run(root, tmp_path / "run", *extra) == 2
    assert message in one_error_line(capsys)


def test_a_checkpoint_run_takes_no_epochs(net, mnist, tmp_path, capsys):
    root, _ = mnist
    torch.save(net.build(10, 1).state_dict(), tmp_path / "ck.pt")
    assert _run(root, tmp_path / "run", "--model", "usernet:build", "--checkpoint",
                str(tmp_path / "ck.pt"), "--epochs", "2") == 2
    assert "no epochs; got epochs 2 (--epochs)" in one_error_line(capsys)


class _Squares(torch.utils.data.Dataset):
    """A map-style Dataset of images 10x10 whose class is where the bright square sits:
    float tensors [1, 10, 10], or grey PIL images (``pil``)."""

    classes = ("left", "right")

    def __init__(self, n: int = 20, pil: bool = False):
        self.n, self.pil = n, pil

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.zeros(1, 10, 10)
        y = i % 2
        x[0, 3:7, (1 if y == 0 else 6):(4 if y == 0 else 9)] = 1.0 + 0.01 * i
        if self.pil:
            from PIL import Image

            return Image.fromarray((x[0] * 200).to(torch.uint8).numpy(), mode="L"), y
        return x, y


@pytest.mark.parametrize("pil", [False, True])
@pytest.mark.slow
def test_a_user_dataset_runs_through_the_python_api(tmp_path, pil):
    config = pdepth.RunConfig(dataset="squares", arch="mlp", subset=None, epochs=1, k=3,
                              seeds=[0])
    data = _Squares(pil=pil)
    out = pdepth.run(config, tmp_path / "run", progress=False, dataset=data)
    cfg = _strict_json(out / "config.json")
    assert cfg["resolved"]["class_names"] == ["left", "right"]
    assert cfg["resolved"]["image_shape"] == [1, 10, 10] and len(cfg["config"]["data_sha256"]) == 64
    # uint8 images are normalised with their statistics; float ones are the input as given
    assert (cfg["resolved"]["normalization"]["mean"] is None) == (not pil)
    with np.load(out / "data.npz") as z:
        assert z["images"].shape == (20, 10, 10) and z["labels"].tolist() == [0, 1] * 10
        if pil:
            assert np.array_equal(z["images"][3], np.asarray(data[3][0]))
    # other data, another protocol key: an unfinished run is not resumed on it
    (out / "COMPLETE").unlink()
    with pytest.raises(pdepth.protocol.OutputExistsError, match="different settings"):
        pdepth.run(config, out, progress=False, dataset=_Squares(22, pil))


@pytest.mark.parametrize("content, message", [
    (b"hello\n", "is not a torch.save checkpoint"), (b"", "is empty (0 bytes)"),
    (b"PK\x03\x04" + b"\0" * 40, "is a zip archive but not a readable torch.save checkpoint"),
])
def test_a_checkpoint_file_that_is_not_one_is_one_line(net, mnist, tmp_path, capsys, content,
                                                       message):
    root, _ = mnist
    (tmp_path / "weights.pt").write_bytes(content)
    out = tmp_path / "run"
    assert _run(root, out, "--model", "usernet:build", "--checkpoint",
                str(tmp_path / "weights.pt")) == 2
    err = one_error_line(capsys)
    assert message in err and str(tmp_path / "weights.pt") in err
    assert not out.exists()
